"""The join: only the prompt trains, padding is invisible, outputs line up with the caller's tokens."""

import pytest
import torch
from conftest import make_backbone

import softprompt as sp
from softprompt.joins import prefix_join


def batch(bb, texts, side):
    bb.tokenizer.padding_side = side
    enc = bb.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["the movie was great and fun", "bad", "this plot is not very good !"]


def test_only_prompt_gets_gradients_and_backbone_is_bitwise_unchanged(backbone):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    prompt = sp.PromptTuning.create(backbone, num_virtual_tokens=4, init="vocab", seed=1)
    model = sp.PromptedModel(backbone, prompt)
    assert [n for n, _ in model.named_parameters()] == ["method.weight"]
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    ids, mask = batch(backbone, TEXTS, "right")
    labels = ids.masked_fill(mask == 0, -100)
    start = prompt.weight.detach().clone()
    for _ in range(3):
        loss = model(ids, mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        assert prompt.weight.grad is not None and prompt.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in backbone.model.parameters())
        opt.step()
    assert not torch.equal(prompt.weight, start)
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_zero_virtual_tokens_is_the_bare_model(backbone):
    empty = sp.PromptTuning(torch.empty(0, backbone.hidden_size))
    ids, _ = batch(backbone, ["the movie was great and fun"], "right")
    ours = sp.PromptedModel(backbone, empty)(ids).logits
    bare = backbone.model(input_ids=ids).logits
    assert torch.equal(ours, bare)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(backbone, side):
    model = sp.PromptedModel(backbone, sp.PromptTuning.create(backbone, num_virtual_tokens=5, seed=2))
    ids, mask = batch(backbone, TEXTS, side)
    logits = model(ids, mask).logits
    assert logits.shape[:2] == ids.shape  # virtual positions stripped
    for i, text in enumerate(TEXTS):
        alone_ids, _ = batch(backbone, [text], side)
        alone = model(alone_ids).logits[0]
        real = mask[i].bool()
        torch.testing.assert_close(logits[i][real], alone, atol=1e-5, rtol=1e-4)


def test_positions_put_the_prompt_right_before_the_first_real_token():
    prompt = torch.zeros(3, 4)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    j = prefix_join(prompt, torch.zeros(2, 4, 4), mask, labels=torch.ones(2, 4, dtype=torch.long))
    assert j.position_ids[0].tolist()[:3] == [0, 1, 2] and j.position_ids[0, 5:].tolist() == [3, 4]
    assert j.position_ids[1, 3:6].tolist() == [3, 4, 5]
    assert j.attention_mask.tolist() == [[1, 1, 1, 0, 0, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
    assert (j.labels[:, :3] == -100).all() and (j.labels[:, 3:] == 1).all()


def test_hidden_states_are_aligned_and_loss_ignores_virtual_positions(llama):
    model = sp.PromptedModel(llama, sp.PromptTuning.create(llama, num_virtual_tokens=4))
    ids, mask = batch(llama, TEXTS, "right")
    out = model(ids, mask, labels=ids.masked_fill(mask == 0, -100), output_hidden_states=True)
    assert all(h.shape[1] == ids.shape[1] for h in out.hidden_states)
    # manual loss over real positions only, plus the last virtual position predicting the first token
    full = llama.model(inputs_embeds=torch.cat([model.method().embeddings.expand(3, -1, -1), llama.embed(ids)], 1),
                       attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), mask], 1),
                       position_ids=torch.cat([torch.arange(4).expand(3, 4), 4 + (mask.cumsum(1) - 1).clamp(min=0)], 1))
    logits = full.logits[:, 3:-1]
    target = ids.masked_fill(mask == 0, -100)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)


def test_backbone_stays_in_eval_mode_while_the_prompt_trains():
    bb = make_backbone("gpt2")  # its config has dropout 0.1
    model = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=3)).train()
    assert model.training and not bb.model.training
    ids, _ = batch(bb, TEXTS[:1], "right")
    assert torch.equal(model(ids).logits, model(ids).logits)  # dropout off: deterministic


def test_too_long_input_raises_or_truncates():
    bb = make_backbone("gpt2")  # 64 positions
    model = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=10))
    ids = torch.randint(4, 60, (2, 60))
    with pytest.raises(sp.SoftPromptError, match="exceeds the model's 64 positions"):
        model(ids)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding
    out = model(ids, mask, truncate=True)
    assert out.logits.shape[1] == 54
    alone = model(ids[:1, -54:]).logits
    torch.testing.assert_close(out.logits[:1], alone, atol=1e-5, rtol=1e-4)


def test_empty_input_is_refused(llama):
    model = sp.PromptedModel(llama, sp.PromptTuning.create(llama, num_virtual_tokens=2))
    with pytest.raises(sp.SoftPromptError, match="empty input"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(sp.SoftPromptError, match=r"empty input in row\(s\) \[1\]"):
        model(torch.ones(2, 3, dtype=torch.long), torch.tensor([[1, 1, 1], [0, 0, 0]]))


def test_hidden_size_mismatch_is_refused(llama):
    with pytest.raises(sp.SoftPromptError, match="prompt_tuning prompt of width 16 does not fit backbone"):
        sp.PromptedModel(llama, sp.PromptTuning(torch.zeros(4, 16)))


def test_plain_module_takes_the_prompt():
    """The seed's example: any module that maps embeddings, here an nn.Linear."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3)
    bb = sp.ModuleBackbone(linear, hidden_size=8)
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=2, init="random")
    model = sp.PromptedModel(bb, prompt)
    x = torch.randn(4, 5, 8)
    y = model(inputs_embeds=x)
    assert y.shape == (4, 5, 3)
    torch.testing.assert_close(y, linear(x))  # position-wise module: real positions are untouched
    target = torch.randn(4, 3)
    seen = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7 * 8, 3))
    model2 = sp.PromptedModel(sp.ModuleBackbone(seen, hidden_size=8), prompt)
    loss = torch.nn.functional.mse_loss(model2(inputs_embeds=x), target)
    loss.backward()
    assert prompt.weight.grad.abs().sum() > 0 and linear.weight.grad is None and seen[1].weight.grad is None


def test_bf16_backbone_keeps_a_float32_prompt():
    bb = make_backbone("llama", dtype=torch.bfloat16)
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=3)
    assert prompt.weight.dtype == torch.float32
    model = sp.PromptedModel(bb, prompt)
    ids, mask = batch(bb, TEXTS, "right")
    out = model(ids, mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16 and prompt.weight.grad.dtype == torch.float32
