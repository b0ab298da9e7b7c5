"""The lean training path (hidden states, LM head only where a loss or score needs it, label-word rows only)
gives the straightforward path's loss and prompt gradient: the equality guard of every speed-up."""

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone

import softprompt as sp
from softprompt.model import PromptedModel
from softprompt.tasks.encode import TaskEncoder
from softprompt.tasks.spec import TaskSpec
from softprompt.train.loop import classification_loss, generation_loss

TEXTS = ["the movie was great and fun", "bad", "this plot is not very good !"]


class Plain(PromptedModel):
    """The straightforward path: full forward(), full-vocabulary logits."""

    lean = False


def unpatched(module) -> bool:
    """No forward patch left active: none at all, or the MLP plan switch, which is off in this thread."""
    from softprompt.model import _THREAD, _switchable_mlp_forward

    forward = vars(module).get("forward")
    return forward is None or (getattr(forward, "__func__", None) is _switchable_mlp_forward
                               and getattr(_THREAD, "mlp", None) is None)


def batch(bb, texts, side):
    bb.tokenizer.padding_side = side
    enc = bb.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def make_prompt(bb, P, seed=3):
    if P == 0:
        return sp.PromptTuning(torch.empty(0, bb.hidden_size))
    return sp.PromptTuning.create(bb, num_virtual_tokens=P, init="vocab", seed=seed)


def loss_and_grad(model_cls, bb, fn, P=4, **kw):
    prompt = make_prompt(bb, P)
    model = model_cls(bb, prompt, **kw)
    loss = fn(model)
    if P:
        loss.backward()
    return loss.detach(), None if not P else prompt.weight.grad.clone()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("cached", [True, False])
def test_hidden_states_and_head_give_the_forward_logits(backbone, side, cached):
    ids, mask = batch(backbone, TEXTS, side)
    for P in (0, 4):
        model = PromptedModel(backbone, make_prompt(backbone, P, seed=1), prompt_cache=cached)
        assert model.lean
        with torch.no_grad():
            full = model(ids, mask).logits
            hidden, last = model.hidden_states(ids, mask)
            lean = model.head(hidden)
            rows = model.head(hidden, [5, 9])
        real = mask.bool()
        torch.testing.assert_close(lean[real], full[real], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rows, lean[..., [5, 9]])
        assert (last is None) == (P == 0)


@pytest.mark.parametrize("template", [SYNTH_TASK["template"], "review : {text} sentiment :"])  # 2nd: shared start
@pytest.mark.parametrize("loss_kind", ["options", "lm"])
def test_classification_loss_and_gradient_equal_the_full_logits_path(backbone, loss_kind, template):
    enc = TaskEncoder(TaskSpec(**{**SYNTH_TASK, "template": template}), backbone.tokenizer, 4, backbone.max_positions,
                      backbone.pad_token_id)
    rows = [{"text": t, "label": lab} for t, lab in zip(TEXTS, ["positive", "negative", "negative"], strict=True)]
    b = enc.classification_batch(rows)
    a = loss_and_grad(PromptedModel, backbone, lambda m: classification_loss(enc, m, b, loss_kind))
    p = loss_and_grad(Plain, backbone, lambda m: classification_loss(enc, m, b, loss_kind))
    torch.testing.assert_close(a[0], p[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a[1], p[1], atol=1e-6, rtol=1e-4)


def test_unnormalised_scores_differ_from_log_likelihoods_by_a_row_constant(llama):
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), llama.tokenizer, 4, llama.max_positions, llama.pad_token_id)
    b = enc.classification_batch([{"text": t, "label": "positive"} for t in TEXTS])
    model = PromptedModel(llama, sp.PromptTuning.create(llama, num_virtual_tokens=4, seed=2))
    with torch.no_grad():
        logp = enc.label_scores(model, b)
        raw = enc.label_scores(model, b, normalize=False)
        plain = enc.label_scores(Plain(llama, model.method), b)
    torch.testing.assert_close(logp, plain, atol=1e-5, rtol=1e-5)
    diff = logp - raw
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("P", [0, 3])
@pytest.mark.parametrize("cached", [True, False])
def test_target_loss_equals_forward_loss_with_labels(backbone, P, cached):
    enc = TaskEncoder(TaskSpec(template="question : {q} answer :", target_field="a"), backbone.tokenizer, P,
                      backbone.max_positions, backbone.pad_token_id)
    b = enc.generation_batch([{"q": "what is the capital of france", "a": "paris"}, {"q": "who", "a": "it is"},
                              {"q": "why", "a": "the plot was not good"}])
    n = int((b["labels"][:, (1 if P == 0 else 0):] != -100).sum())
    a = loss_and_grad(PromptedModel, backbone, lambda m: generation_loss(m, b), P=P, prompt_cache=cached)
    p = loss_and_grad(Plain, backbone, lambda m: generation_loss(m, b), P=P, prompt_cache=cached)
    ref = loss_and_grad(PromptedModel, backbone, lambda m: m(b["input_ids"], b["attention_mask"],
                                                              labels=b["labels"]).loss * n, P=P, prompt_cache=cached)
    torch.testing.assert_close(a[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p[0], ref[0], atol=1e-5, rtol=1e-5)
    if P:
        torch.testing.assert_close(a[1], ref[1], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(p[1], ref[1], atol=1e-6, rtol=1e-4)


def test_bf16_math_attention_keeps_loss_and_gradient():
    """bf16 training on CPU runs SDPA's math kernel (faster backward there): same loss and gradient as flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    bb = make_backbone("llama", dtype=torch.bfloat16)
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
    b = enc.classification_batch([{"text": t, "label": "negative"} for t in TEXTS])
    ours = loss_and_grad(PromptedModel, bb, lambda m: classification_loss(enc, m, b, "options"))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = loss_and_grad(Plain, bb, lambda m: classification_loss(enc, m, b, "options"))
    torch.testing.assert_close(ours[0], flash[0], atol=2e-2, rtol=2e-2)
    cos = torch.nn.functional.cosine_similarity(ours[1].flatten(), flash[1].flatten(), dim=0)
    assert cos > 0.99, cos


def test_activation_checkpointing_under_bf16_autocast():
    """The recompute in backward must pick the forward's attention kernel (math under bf16 on CPU)."""
    bb = make_backbone("llama")
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
    b = enc.classification_batch([{"text": t, "label": "negative"} for t in TEXTS])

    def fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return classification_loss(enc, m, b, "options")

    plain = loss_and_grad(PromptedModel, bb, fn)
    ckpt = loss_and_grad(PromptedModel, bb, fn, activation_checkpointing=True)
    torch.testing.assert_close(ckpt[0], plain[0])
    torch.testing.assert_close(ckpt[1], plain[1])


@pytest.mark.parametrize("case", ["classification", "generation"])
def test_activation_checkpointing_keeps_loss_and_gradient(backbone, case):
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), backbone.tokenizer, 4, backbone.max_positions, backbone.pad_token_id)
    gen = TaskEncoder(TaskSpec(template="question : {q} answer :", target_field="a"), backbone.tokenizer, 4,
                      backbone.max_positions, backbone.pad_token_id)
    rows = [{"text": "review : " + t, "label": "positive", "q": t, "a": "it is"} for t in TEXTS]  # shared start
    if case == "classification":
        b = enc.classification_batch(rows)

        def fn(m):
            return classification_loss(enc, m, b, "options")
    else:
        b = gen.generation_batch(rows)

        def fn(m):
            return generation_loss(m, b)
    calls = []
    mlps = [m for name, m in backbone.model.named_modules() if name.endswith(".mlp")]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in mlps]  # (recompute stops early)
    plain = loss_and_grad(PromptedModel, backbone, fn)
    n_plain = len(calls)
    ckpt = loss_and_grad(PromptedModel, backbone, fn, activation_checkpointing=True)
    for h in hooks:
        h.remove()
    assert len(calls) - n_plain == n_plain + len(mlps)  # each layer recomputed once in backward (prompt run: not)
    torch.testing.assert_close(ckpt[0], plain[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ckpt[1], plain[1], atol=1e-6, rtol=1e-4)
    layers = backbone.model.base_model
    assert all(unpatched(m) for m in layers.modules())  # patches removed or switched off


@pytest.mark.parametrize("texts", [TEXTS, ["review : " + t for t in TEXTS]])
@pytest.mark.parametrize("cached", [True, False])
def test_last_only_gives_the_answer_column_with_less_work(backbone, cached, texts):
    """last_only: the last layer's MLP at the answer column only, and (prompt cache) the rows' shared first
    tokens run once with the prompt; the answer column's hidden state and the prompt gradient stay the same."""
    from softprompt.model import _shared_prefix

    ids, mask = batch(backbone, texts, "left")
    shared = _shared_prefix(ids, mask)
    assert (shared > 0) == (texts is not TEXTS)
    mlps = [m for name, m in backbone.model.named_modules() if name.endswith(".mlp")]
    assert len(mlps) == backbone.model.config.num_hidden_layers
    widths = []
    first = next(iter(mlps[-1].children()))  # the MLP's first projection (its own input width)
    hook = first.register_forward_pre_hook(lambda mod, args: widths.append(args[0].shape[1]))
    for P in (0, 4):
        grads, outs = [], []
        for last_only in (False, True):
            prompt = make_prompt(backbone, P, seed=1)
            model = PromptedModel(backbone, prompt, prompt_cache=cached)
            widths.clear()
            h = model.hidden_states(ids, mask, last_only=last_only)[0][:, -1]  # (B, H)
            if P:
                (h * torch.linspace(-1, 1, h.shape[-1])).sum().backward()
                grads.append(prompt.weight.grad)
            if last_only:
                assert widths[-1] == 1  # the input rows' last MLP: the answer column only
                torch.testing.assert_close(h, outs[0], atol=1e-5, rtol=1e-5)
            outs.append(h.detach())
        if P:
            torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    hook.remove()
    assert all(unpatched(m) for m in mlps)  # patch switched off
    if cached and shared:  # without grad (evaluation): the prompt + shared tokens' states are cached and reused
        model = PromptedModel(backbone, make_prompt(backbone, 4, seed=1))
        with torch.no_grad():
            a = model.hidden_states(ids, mask, last_only=True)[0]
            b = model.hidden_states(ids, mask, last_only=True)[0]
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_last_column_mlp_is_per_thread_and_survives_deepcopy(llama):
    """The answer-column MLP switch applies to the thread scoring only; a deep copy (the fine-tuning baseline)
    runs its own weights, not the original's."""
    import copy
    import threading

    from softprompt.model import _mlp_plan, _thread_state

    base = llama.model.base_model
    ids, mask = batch(llama, TEXTS, "left")
    with torch.no_grad():
        want = llama.model(input_ids=ids, attention_mask=mask).logits
    seen = {}
    with torch.no_grad(), _thread_state(mlp=_mlp_plan(base, torch.ones_like(mask), last_only=True)):
        inside = llama.model(input_ids=ids, attention_mask=mask).logits
        t = threading.Thread(target=lambda: seen.update(other=llama.model(input_ids=ids, attention_mask=mask).logits))
        t.start()
        t.join()
    torch.testing.assert_close(inside[:, -1], want[:, -1])  # the answer column is exact
    assert not torch.allclose(inside[:, 0], want[:, 0])  # the other columns were not computed
    torch.testing.assert_close(seen["other"], want)  # another thread got the plain MLP
    twin = copy.deepcopy(llama.model)
    mlp = twin.base_model.layers[-1].mlp
    torch.nn.init.zeros_(mlp.down_proj.weight)  # change the copy only
    with torch.no_grad():
        assert not torch.allclose(twin(input_ids=ids, attention_mask=mask).logits, want)
        torch.testing.assert_close(llama.model(input_ids=ids, attention_mask=mask).logits, want)


NEW_SPEEDUPS = ["unpadded_mlp", "gated_mlp_memory", "cached_weight_casts", "sdpa_gqa"]


@pytest.fixture
def speedups():
    """Restore the switches after a test that flips them."""
    from softprompt.model import SPEEDUPS

    saved = dict(SPEEDUPS)
    yield SPEEDUPS
    SPEEDUPS.update(saved)


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("off", [None, *NEW_SPEEDUPS, "all"])
@pytest.mark.parametrize("case", ["classification", "generation"])
def test_each_speedup_keeps_loss_and_gradient(backbone, speedups, case, off, precision):
    """Every switch on (the default), each one off, all off: the same loss and prompt gradient as the plain
    full-logits path, on a padded batch, in float32 and under bf16 autocast."""
    for k in NEW_SPEEDUPS:
        speedups[k] = off not in (k, "all")
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), backbone.tokenizer, 4, backbone.max_positions, backbone.pad_token_id)
    gen = TaskEncoder(TaskSpec(template="question : {q} answer :", target_field="a"), backbone.tokenizer, 4,
                      backbone.max_positions, backbone.pad_token_id)
    rows = [{"text": t, "label": "positive", "q": t, "a": "it is"} for t in TEXTS]
    b = enc.classification_batch(rows) if case == "classification" else gen.generation_batch(rows)
    assert not bool(b["attention_mask"].all())  # padded: the unpadded MLP has something to skip

    def fn(m):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return classification_loss(enc, m, b, "options") if case == "classification" else generation_loss(m, b)

    ours = loss_and_grad(PromptedModel, backbone, fn)
    plain = loss_and_grad(Plain, backbone, fn)
    tol = {"atol": 1e-5, "rtol": 1e-4} if precision == "float32" else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours[0], plain[0], **tol)
    if precision == "float32":
        torch.testing.assert_close(ours[1], plain[1], atol=1e-6, rtol=1e-4)
    else:  # bf16: different (equally valid) roundings; the gradient points the same way
        cos = torch.nn.functional.cosine_similarity(ours[1].flatten(), plain[1].flatten(), dim=0)
        assert cos > 0.99, cos


def saved_for_backward(fn) -> tuple[torch.Tensor, dict]:
    """Run fn under saved_tensors_hooks: its result, and the bytes of distinct storages autograd keeps for
    backward, parameters excepted, by dtype and in all."""
    params = set()
    seen, total = {}, 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st.data_ptr() not in seen and st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
            total += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, {"bytes": total, "storages": seen}


def test_speedups_are_engaged(speedups):
    """Each switch changes what runs (equal results are checked above): the MLP sees real tokens only, a gated MLP
    keeps less for backward, SDPA gets the key/value heads, bf16 weights are cast once and reused."""
    import torch.nn.functional as F

    bb = make_backbone("llama")
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
    b = enc.classification_batch([{"text": t, "label": "positive"} for t in TEXTS])
    real = int(b["attention_mask"].sum())
    mlp0 = bb.model.base_model.layers[0].mlp
    rows_seen, kv_heads = [], []
    hook = mlp0.gate_proj.register_forward_pre_hook(lambda m, a: rows_seen.append(a[0].reshape(-1, a[0].shape[-1])
                                                                                    .shape[0]))
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, *a, **kw):
        if k.shape[0] == len(TEXTS):  # the rows' forward (the prompt's batch-1 run has no mask: GQA anyway)
            kv_heads.append(k.shape[1])
        return sdpa(q, k, *a, **kw)

    def step():
        m = PromptedModel(bb, make_prompt(bb, 4))
        return classification_loss(enc, m, b, "options")

    kept = {}
    F.scaled_dot_product_attention = spy
    try:
        for on in (False, True):
            for k in NEW_SPEEDUPS:
                speedups[k] = on
            rows_seen.clear()
            kv_heads.clear()
            _, kept[on] = saved_for_backward(step)
            assert rows_seen[-1] == (real if on else b["input_ids"].numel())  # the rows' MLP: real tokens only
            assert set(kv_heads) == ({bb.model.config.num_key_value_heads} if on
                                     else {bb.model.config.num_attention_heads})
    finally:
        F.scaled_dot_product_attention = sdpa
        hook.remove()
    cfg = bb.model.config  # at least one (tokens, intermediate) float32 tensor less per layer but the last
    assert kept[False]["bytes"] - kept[True]["bytes"] >= (cfg.num_hidden_layers - 1) * real * cfg.intermediate_size * 4
    # bf16 autocast: the frozen weights are cast once, kept on the backbone and reused by later steps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, first = saved_for_backward(step)
        _, again = saved_for_backward(step)
    casts = bb.__dict__["_weight_casts"][torch.bfloat16].store
    n_linear = sum(type(m) is torch.nn.Linear for m in bb.model.base_model.modules())
    assert len(casts) == n_linear
    cast_ptrs = {w.untyped_storage().data_ptr() for _, w in casts.values()}
    assert cast_ptrs <= set(first["storages"]) and cast_ptrs <= set(again["storages"])  # the same copies kept
    with torch.no_grad():  # an in-place change to a weight is seen: its copy is made again
        layer = bb.model.base_model.layers[0].mlp.down_proj
        old = casts[layer][1]
        layer.weight.mul_(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()
        torch.testing.assert_close(casts[layer][1], (old.float() * 2).to(torch.bfloat16))
        layer.weight.div_(2)
        layer.weight.data = layer.weight.data * 3  # replaced (new storage, as .to(device) does): cast again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()
        torch.testing.assert_close(casts[layer][1], (old.float() * 3).to(torch.bfloat16))


def test_gated_activation_gradient():
    from softprompt.model import _GatedActivation

    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _GatedActivation.apply(a, b, torch.nn.SiLU()), (g, u))
    assert torch.autograd.gradcheck(lambda a, b: _GatedActivation.apply(a, b, torch.nn.GELU("tanh")), (g, u))


def test_weight_casts_and_gqa_switch_stay_in_their_thread(llama):
    """While one thread trains under bf16 autocast (cached bf16 weights, GQA attention), a plain float32 forward
    in another thread sees the float32 weights and the plain kernels: its logits are the unpatched ones."""
    import threading

    from softprompt.model import _THREAD, _attention_backend, _thread_state, _weight_casts

    ids, mask = batch(llama, TEXTS, "left")
    with torch.no_grad():
        want = llama.model(input_ids=ids, attention_mask=mask).logits
    seen = {}
    embeds = llama.embed(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16), _attention_backend(llama, embeds), \
            _thread_state(casts=_weight_casts(llama, llama.model.base_model)):
        assert _THREAD.casts is not None and _THREAD.gqa
        with torch.no_grad():
            inside = llama.model(input_ids=ids, attention_mask=mask).logits

        def other():
            with torch.no_grad():
                seen["logits"] = llama.model(input_ids=ids, attention_mask=mask).logits

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert getattr(_THREAD, "casts", None) is None and not getattr(_THREAD, "gqa", False)
    assert seen["logits"].dtype == torch.float32
    torch.testing.assert_close(seen["logits"], want, atol=1e-6, rtol=1e-5)  # float32 weights (thread noise only)
    assert (inside.float() - want).abs().max() > 1e-4  # while this thread ran on bf16 weights
    torch.testing.assert_close(inside.float(), want, atol=5e-2, rtol=5e-2)


def test_clear_caches_drops_the_weight_casts():
    bb = make_backbone("llama")
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
    b = enc.classification_batch([{"text": t, "label": "positive"} for t in TEXTS])
    m = PromptedModel(bb, make_prompt(bb, 4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = enc.label_scores(m, b)
        assert "_weight_casts" in vars(bb) and "_prompt_states" in vars(bb)
        bb.clear_caches()
        assert not any(k in vars(bb) for k in bb.CACHES)
        torch.testing.assert_close(enc.label_scores(m, b), before, atol=0, rtol=0)  # recomputed, same
