"""Generation: the prompt's key/values computed once and reused give the same tokens as recomputing them."""

import pytest
import torch
from conftest import make_backbone

import softprompt as sp

TEXTS = ["the movie was", "it is a very good", "what is the capital of"]


def test_reused_prompt_cache_equals_recomputation(backbone):
    prompt = sp.PromptTuning.create(backbone, num_virtual_tokens=6, seed=3)
    reused = sp.generate(backbone, prompt, TEXTS, max_new_tokens=8)
    fresh = sp.generate(backbone, prompt, TEXTS, max_new_tokens=8, reuse_prompt_cache=False)
    assert reused.tokens == fresh.tokens
    torch.testing.assert_close(reused.prefill_logits, fresh.prefill_logits, atol=1e-5, rtol=1e-4)


def test_prompt_kv_is_computed_once_per_prompt(llama):
    prompt = sp.PromptTuning.create(llama, num_virtual_tokens=4)
    cache = sp.runtime(llama).cache
    misses, hits = cache.misses, cache.hits
    for _ in range(3):
        sp.generate(llama, prompt, TEXTS, max_new_tokens=2)
    assert cache.misses == misses + 1 and cache.hits >= hits + 2
    with torch.no_grad():
        prompt.weight.add_(0.5)  # a changed prompt is a new cache entry
    sp.generate(llama, prompt, TEXTS[:1], max_new_tokens=2)
    assert cache.misses == misses + 2


def test_batched_generation_equals_each_row_alone(backbone):
    prompt = sp.PromptTuning.create(backbone, num_virtual_tokens=5, seed=4)
    together = sp.generate(backbone, prompt, TEXTS, max_new_tokens=6)
    for i, text in enumerate(TEXTS):
        alone = sp.generate(backbone, prompt, [text], max_new_tokens=6)
        assert alone.tokens[0] == together.tokens[i]


def test_greedy_matches_a_step_by_step_reference(llama):
    """Our decode loop against argmax over the full prepended sequence recomputed at every step."""
    prompt = sp.PromptTuning.create(llama, num_virtual_tokens=3, seed=5)
    model = sp.PromptedModel(llama, prompt)
    ids = llama.tokenizer(TEXTS[1])["input_ids"]
    ref = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(torch.tensor([ids + ref])).logits[0, -1].argmax())
            if nxt in llama.eos_token_ids:
                break
            ref.append(nxt)
    assert sp.generate(llama, prompt, [TEXTS[1]], max_new_tokens=6).tokens[0] == ref


def test_no_prompt_generation_matches_transformers_generate(llama):
    ids = llama.tokenizer(TEXTS[0], return_tensors="pt")
    hf = llama.model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    ours = sp.generate(llama, None, [TEXTS[0]], max_new_tokens=5)
    expected = [t for t in hf[0, ids["input_ids"].shape[1]:].tolist()]
    cut = next((i for i, t in enumerate(expected) if t in llama.eos_token_ids), len(expected))
    assert ours.tokens[0] == expected[:cut]


def test_sampling_is_seeded_and_respects_top_k(llama):
    prompt = sp.PromptTuning.create(llama, num_virtual_tokens=2)
    a = sp.generate(llama, prompt, TEXTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    b = sp.generate(llama, prompt, TEXTS, max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    greedy = sp.generate(llama, prompt, TEXTS, max_new_tokens=8)
    assert a.tokens == b.tokens and a.tokens != greedy.tokens
    top1 = sp.generate(llama, prompt, TEXTS, max_new_tokens=8, do_sample=True, top_k=1, seed=1)
    assert top1.tokens == greedy.tokens  # top_k=1 sampling is greedy


def test_stops_at_eos_and_stop_strings(llama):
    prompt = sp.PromptTuning.create(llama, num_virtual_tokens=2)
    full = sp.generate(llama, prompt, [TEXTS[0]], max_new_tokens=10)
    assert len(full.tokens[0]) >= 2, "tiny model should produce a few tokens"
    word = llama.tokenizer.decode(full.tokens[0][1:2])
    stopped = sp.generate(llama, prompt, [TEXTS[0]], max_new_tokens=10, stop=[word])
    assert word not in stopped.texts[0] and len(stopped.tokens[0]) <= 2
    first = full.tokens[0][0]
    llama.model.generation_config.eos_token_id = first  # the first greedy token becomes an EOS
    out = sp.generate(llama, prompt, [TEXTS[0]], max_new_tokens=10)
    assert out.tokens == [[]] and out.stats["steps"] == 1  # ends at once, EOS itself not returned


def test_generation_bad_input(llama):
    prompt = sp.PromptTuning.create(llama, num_virtual_tokens=2)
    with pytest.raises(sp.SoftPromptError, match="empty input"):
        sp.generate(llama, prompt, [], max_new_tokens=2)
    with pytest.raises(sp.SoftPromptError, match="empty input in row 1"):
        sp.generate(llama, prompt, ["the", "  "], max_new_tokens=2)
    with pytest.raises(sp.SoftPromptError, match="exceeds the model's 128 positions"):
        sp.generate(llama, prompt, ["the " * 120], max_new_tokens=10)
    out = sp.generate(llama, prompt, ["the " * 120], max_new_tokens=10, truncate=True)
    assert out.stats["input_tokens"] == 128 - 2 - 10
    with pytest.raises(sp.SoftPromptError, match="max_new_tokens"):
        sp.generate(llama, prompt, ["the"], max_new_tokens=0)
    bad = sp.PromptTuning(torch.full((2, llama.hidden_size), float("nan")))
    with pytest.raises(sp.SoftPromptError, match="NaN"):
        sp.generate(llama, bad, ["the"], max_new_tokens=2)


def test_bf16_generation_with_reuse_matches_recompute():
    bb = make_backbone("qwen2", dtype=torch.bfloat16)
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=4)
    a = sp.generate(bb, prompt, TEXTS, max_new_tokens=5)
    b = sp.generate(bb, prompt, TEXTS, max_new_tokens=5, reuse_prompt_cache=False)
    torch.testing.assert_close(a.prefill_logits, b.prefill_logits, atol=5e-2, rtol=5e-2)


def test_mixed_task_batch_equals_each_request_alone(backbone):
    """Rows with different prompts (lengths 3 and 7) and a row with none, in one batch: each row gets exactly the
    greedy tokens (and prefill logits within tolerance) it gets alone."""
    short = sp.PromptTuning.create(backbone, num_virtual_tokens=3, seed=11)
    long = sp.PromptTuning.create(backbone, num_virtual_tokens=7, seed=12)
    prompts = [short, long, None, long, short]
    texts = ["the movie was", "it is a very good", "what is the capital of", "bad", "the plot and the actors were"]
    mixed = sp.generate(backbone, prompts, texts, max_new_tokens=6)
    for i, (p, t) in enumerate(zip(prompts, texts, strict=True)):
        alone = sp.generate(backbone, p, [t], max_new_tokens=6)
        assert mixed.tokens[i] == alone.tokens[0], i
        torch.testing.assert_close(mixed.prefill_logits[i], alone.prefill_logits[0], atol=1e-5, rtol=1e-4)


def test_per_row_prompt_list_must_match_the_batch(llama):
    p = sp.PromptTuning.create(llama, num_virtual_tokens=2)
    with pytest.raises(sp.SoftPromptError, match="2 prompts for 3 inputs"):
        sp.generate(llama, [p, p], TEXTS, max_new_tokens=2)
    only_none = sp.generate(llama, [None, None, None], TEXTS, max_new_tokens=3)
    assert only_none.tokens == sp.generate(llama, None, TEXTS, max_new_tokens=3).tokens


def test_a_zero_token_prompt_generates_like_no_prompt(llama):
    empty = sp.PromptTuning(torch.empty(0, llama.hidden_size))
    assert sp.generate(llama, empty, TEXTS, max_new_tokens=4).tokens == sp.generate(llama, None, TEXTS, max_new_tokens=4).tokens


def test_prompt_kv_cache_is_keyed_by_autocast_state(llama):
    prompt = sp.EmbeddingPrompt(torch.randn(3, 32))
    rt = sp.runtime(llama)
    join = sp.get_join("embeddings", "causal_lm")
    plain = join.prefix(rt, prompt)
    assert join.prefix(rt, prompt) is plain  # cached
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = join.prefix(rt, prompt)
    k_auto, k_plain = auto.layers[0][0], plain.layers[0][0]
    assert auto is not plain and not torch.equal(k_auto.float(), k_plain)  # bf16-rounded, kept apart


def test_long_mixed_generation_grows_its_store_in_place_and_equals_each_row_alone(llama):
    """Past the room the key/value store was made with (the prompt and inputs plus 64 positions) it grows: every
    layer still a view of one buffer, and each row's tokens those it gets alone."""
    from softprompt.generation import Decoding, Row, Sampling, _store
    from softprompt.tasks.encode import left_pad

    prompts = [sp.PromptTuning.create(llama, num_virtual_tokens=3, seed=1)(), None,
               sp.PrefixTuning.create(llama, num_virtual_tokens=5, seed=2)()]
    rows = [Row(Sampling(max_new_tokens=90, ignore_eos=True)) for _ in TEXTS]
    ids, mask = left_pad([llama.tokenizer(t)["input_ids"] for t in TEXTS], llama.pad_token_id, llama.device)
    buffers = set()
    with torch.no_grad():
        dec = Decoding(llama, prompts, ids, mask, rows)
        for _ in dec:
            store = _store(dec.cache)
            assert store is not None
            buffers.add(store.buf.data_ptr())
    assert len(buffers) >= 2  # it grew
    hf = llama.model.generate(ids[1:2, mask[1].argmax():], max_new_tokens=90, do_sample=False, pad_token_id=0,
                              eos_token_id=None)  # the row without a prompt: transformers' own loop and cache
    assert rows[1].tokens == hf[0, ids.shape[1] - int(mask[1].argmax()):].tolist()
    for i in (0, 2):  # the prompted rows: each alone
        alone = Row(Sampling(max_new_tokens=90, ignore_eos=True))
        with torch.no_grad():
            for _ in Decoding(llama, [prompts[i]], ids[i:i + 1, mask[i].argmax():], mask[i:i + 1, mask[i].argmax():],
                              [alone]):
                pass
        assert rows[i].tokens == alone.tokens


def test_a_prefix_joined_keeps_its_values_and_its_layers_become_views(llama):
    from softprompt.joins.causal import Prefix

    layers = [(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)) for _ in range(3)]
    prefix = Prefix([(k.clone(), v.clone()) for k, v in layers], None)
    joined = prefix.joined()
    assert joined.shape == (6, 2, 4, 8) and prefix.joined() is joined
    for i, (k, v) in enumerate(layers):
        torch.testing.assert_close(prefix.layers[i][0], k, rtol=0, atol=0)
        torch.testing.assert_close(prefix.layers[i][1], v, rtol=0, atol=0)
        assert prefix.layers[i][1].data_ptr() == joined[2 * i + 1].data_ptr()
