"""Gemma 3 on a tiny random config: its embedding module scales token embeddings by sqrt(hidden), it mixes
sliding-window and full attention layers. Prompts initialised from the vocabulary start where the model's own
embedding module puts tokens, and a prompt made of a text's tokens gives exactly the model run on those ids."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tokenizer

from softprompt import CausalLMBackbone
from softprompt.generation import generate
from softprompt.init import embed_scale
from softprompt.methods import PromptTuning
from softprompt.model import PromptedModel


def make_gemma(window: int = 6) -> CausalLMBackbone:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                           sliding_window=window, layer_types=["sliding_attention", "full_attention"],
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._name_or_path = "tiny-gemma3"
    return CausalLMBackbone(model, make_tokenizer())


def test_prompts_start_where_gemmas_scaled_embeddings_are():
    bb = make_gemma()
    assert embed_scale(bb) == pytest.approx(32**0.5, rel=1e-3)
    prompt = PromptTuning.create(bb, num_virtual_tokens=3, init="text", init_text="the movie was").weight
    ids = bb.tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    assert torch.allclose(prompt, bb.embed(torch.tensor(ids)).float(), atol=1e-6)
    vocab = PromptTuning.create(bb, num_virtual_tokens=8, init="vocab").weight
    real = bb.embed(torch.arange(4, 40)).detach().float()
    assert float(vocab.detach().norm(dim=-1).mean()) == pytest.approx(float(real.norm(dim=-1).mean()), rel=0.3)


@pytest.mark.parametrize("text", ["great", "great and fun but not very boring , really"])  # the second: past the window
def test_a_prompt_of_a_texts_tokens_equals_the_model_run_on_those_ids(text):
    bb = make_gemma()
    head = "the movie was"
    method = PromptTuning.create(bb, num_virtual_tokens=3, init="text", init_text=head)
    ids = torch.tensor([bb.tokenizer(text, add_special_tokens=False)["input_ids"]])
    whole = torch.tensor([bb.tokenizer(f"{head} {text}", add_special_tokens=False)["input_ids"]])
    assert whole.shape[1] == 3 + ids.shape[1]
    with torch.no_grad():
        ref = bb.model(input_ids=whole).logits[:, 3:]
        got = PromptedModel(bb, method)(ids, torch.ones_like(ids)).logits
    assert torch.allclose(got, ref, atol=1e-4), (got - ref).abs().max()
    out = generate(bb, method, [text], max_new_tokens=5)
    seq = whole[0].tolist()
    with torch.no_grad():
        for _ in range(5):
            nxt = int(bb.model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if nxt in bb.eos_token_ids:
                break
            seq.append(nxt)
    assert out.tokens[0] == seq[whole.shape[1]:]
