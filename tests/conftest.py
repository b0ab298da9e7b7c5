"""Tiny random models built from configs in code: nothing is downloaded by a test."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

WORDS = ("the a movie film was is great good bad awful fine plot actors story boring fun loved hated it this "
         "and but not very really positive negative cat dog yes no review sentiment : . , ! ? hello world "
         "answer question what who why how paris france capital of").split()


def make_tokenizer(specials=("<pad>", "<s>", "</s>", "<unk>"), template: str | None = None, **named):
    """A word-level tokenizer over `specials` + WORDS. `template` (e.g. "[CLS] $A [SEP]") puts special tokens
    around each text; `named`: the special tokens' roles (pad_token=..., default: the four of a causal LM)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    named = named or {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=named["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template:
        tk.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in template.split() if t in vocab])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **named)


VOCAB = 64  # >= len(specials + WORDS)


def tiny_config(arch: str):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.1, embd_pdrop=0.1,
                          attn_pdrop=0.1, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=128, **common)
    raise ValueError(arch)


def make_backbone(arch: str = "llama", seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    from softprompt import CausalLMBackbone

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    model.config._name_or_path = f"tiny-{arch}-{seed}"
    return CausalLMBackbone(model, make_tokenizer())


def make_learnable_backbone(seed: int = 0):
    """A tiny Llama whose random weights are large enough (init range 0.2) for a prompt to steer it: with the
    default 0.02 the network is so close to linear that no prompt can separate the synthetic classes."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from softprompt import CausalLMBackbone

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config._name_or_path = f"tiny-learnable-{seed}"
    return CausalLMBackbone(model, make_tokenizer())


POSITIVE = "great good fun loved fine".split()
NEGATIVE = "bad awful boring hated not".split()
FILLER = "the a movie film was is plot actors story it this and very really".split()


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Sentiment-like rows: one polar word among filler words, labelled by that word's polarity."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [rng.choice(FILLER) for _ in range(4)]
        words.insert(rng.randrange(5), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"text": " ".join(words), "label": "positive" if positive else "negative"})
    return rows


def synthetic_splits(seed: int = 0) -> dict:
    return {"train": synthetic_rows(800, seed), "validation": synthetic_rows(128, seed + 1),
            "test": synthetic_rows(128, seed + 2)}


SYNTH_TASK = {"name": "synth", "data": "synthetic", "template": "{text} sentiment :",
              "verbalizer": {"positive": " yes", "negative": " no"}, "max_length": 32}


def write_model_and_data(folder, rows_per_split: int) -> dict:
    """A learnable tiny model folder and JSONL splits on disk, for CLI / subprocess tests. Returns the task."""
    import json

    bb = make_learnable_backbone()
    bb.model.save_pretrained(folder / "model")
    bb.tokenizer.save_pretrained(folder / "model")
    for split, rows in synthetic_splits().items():
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:rows_per_split]))
    return {**SYNTH_TASK, "data": {s: str(folder / f"{s}.jsonl") for s in ("train", "validation", "test")}}


ARCHS = ["llama", "gpt2", "qwen2"]


@pytest.fixture(params=ARCHS)
def backbone(request):
    return make_backbone(request.param)


@pytest.fixture
def llama():
    return make_backbone("llama")
