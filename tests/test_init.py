"""Initialisers: seeded, shaped (P, H), float32, and each doing what its name says."""

import pytest
import torch

import softprompt as sp
from softprompt.init import frequent_token_ids, initialise


def test_every_initialiser_is_seeded_and_float32(llama, tmp_path):
    src = sp.PromptTuning.create(llama, num_virtual_tokens=3, init="vocab", seed=9)
    sp.save_prompt(tmp_path / "src.safetensors", src, llama)
    kw = {"text": "great movie", "labels": [" positive", " negative"], "path": str(tmp_path / "src.safetensors")}
    for init in ["random", "vocab", "text", "labels", "file"]:
        a = initialise(llama, 6, init, seed=1, **kw)
        b = initialise(llama, 6, init, seed=1, **kw)
        assert a.shape == (6, 32) and a.dtype == torch.float32 and torch.equal(a, b), init
    assert not torch.equal(initialise(llama, 6, "vocab", seed=1), initialise(llama, 6, "vocab", seed=2))


def test_random_follows_embedding_statistics(llama):
    x = initialise(llama, 4000, "random", seed=0)
    emb = llama.embedding_matrix.detach()
    torch.testing.assert_close(x.std(0), emb.std(0), atol=0.1 * emb.std().item(), rtol=0.15)


def test_vocab_samples_frequent_non_special_tokens(llama):
    pool = frequent_token_ids(llama)
    assert not set(pool) & {0, 1, 2, 3}  # <pad> <s> </s> <unk>
    x = initialise(llama, 5, "vocab", seed=0)
    emb = llama.embedding_matrix.detach()
    for row in x:  # each row is exactly one pool token's embedding
        hits = (emb == row).all(-1).nonzero().flatten().tolist()
        assert len(hits) == 1 and hits[0] in pool


def test_text_is_repeated_or_truncated(llama):
    ids = llama.tokenizer("great movie", add_special_tokens=False)["input_ids"]
    emb = llama.embedding_matrix.detach()
    x = initialise(llama, 5, "text", text="great movie")
    assert torch.equal(x, emb[[ids[0], ids[1], ids[0], ids[1], ids[0]]])
    assert torch.equal(initialise(llama, 1, "text", text="great movie"), emb[[ids[0]]])


def test_labels_fill_one_slot_each_multi_token_averaged(llama):
    emb = llama.embedding_matrix.detach()
    tok = llama.tokenizer
    x = initialise(llama, 4, "labels", labels=["positive", "very good"])
    assert torch.equal(x[0], emb[tok("positive", add_special_tokens=False)["input_ids"][0]])
    torch.testing.assert_close(x[1], emb[tok("very good", add_special_tokens=False)["input_ids"]].mean(0))
    with pytest.raises(sp.SoftPromptError, match="do not fit"):
        initialise(llama, 1, "labels", labels=["a", "the"])


def test_file_transfer_truncates_or_fills(llama, tmp_path):
    src = sp.PromptTuning.create(llama, num_virtual_tokens=3, seed=4)
    sp.save_prompt(tmp_path / "s.safetensors", src, llama)
    two = initialise(llama, 2, "file", path=str(tmp_path / "s.safetensors"))
    five = initialise(llama, 5, "file", path=str(tmp_path / "s.safetensors"))
    assert torch.equal(two, src.weight[:2].detach()) and torch.equal(five[:3], src.weight.detach())


def test_bad_initialiser_arguments(llama):
    with pytest.raises(sp.SoftPromptError, match="unknown init"):
        initialise(llama, 3, "zeros")
    with pytest.raises(sp.SoftPromptError, match="needs init_text"):
        initialise(llama, 3, "text")
    with pytest.raises(sp.SoftPromptError, match="tokenises to nothing"):
        initialise(llama, 3, "text", text=" ")
    with pytest.raises(sp.SoftPromptError, match="at least 1"):
        initialise(llama, 0, "vocab")
