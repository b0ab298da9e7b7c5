"""The fast path (softprompt.fastpath), through its public switches: each switch keeps the loss and the prompt
gradient of the plain path, is engaged where it should be, stays in its thread, installs only where it is known and
correct, and uninstalls to the untouched model."""

import copy
import threading

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone, make_tokenizer

import softprompt as sp
from softprompt.fastpath import ARCHITECTURES, SWITCHES, Architecture, FastPathConfig
from softprompt.tasks.encode import TaskEncoder, left_pad
from softprompt.tasks.spec import TaskSpec
from softprompt.train.loop import classification_loss, generation_loss

# the lean forward in rows (its products as F.linear, or packed / oneDNN) rather than feature-major with
# weight-first products, whichever this CPU's default is
ROWS = FastPathConfig(transposed_products=False, dnnl_decode=False)  # decode steps on packed weights

TEXTS = ["the movie was great and fun", "bad", "this plot is not very good !"]


@pytest.fixture
def switched():
    """Set a backbone's fast-path config for a test, restore the default after."""
    touched = []

    def use(bb, config):
        sp.runtime(bb).configure(config)
        touched.append(bb)

    yield use
    for bb in touched:
        sp.runtime(bb).configure(FastPathConfig())


def batch(bb, texts, side="left"):
    bb.tokenizer.padding_side = side
    enc = bb.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def encoders(bb):
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
    gen = TaskEncoder(TaskSpec(template="question : {q} answer :", target_field="a"), bb.tokenizer, 4,
                      bb.max_positions, bb.pad_token_id)
    return enc, gen


def step(bb, case, precision="float32", P=4, name="prompt_tuning"):
    """Loss and prompt gradient of one training step on a padded batch (rows sharing their first tokens)."""
    enc, gen = encoders(bb)
    rows = [{"text": "review : " + t, "label": "positive", "q": t, "a": "it is"} for t in TEXTS]
    b = enc.classification_batch(rows) if case == "classification" else gen.generation_batch(rows)
    assert not bool(b["attention_mask"].all())  # padded: the unpadded MLP has something to skip
    method = sp.get_method(name).create(bb, num_virtual_tokens=P, init="vocab", seed=3)
    model = sp.PromptedModel(bb, method)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = classification_loss(enc, model, b, "options") if case == "classification" else generation_loss(model, b)
    loss.backward()
    return loss.detach().float(), torch.cat([p.grad.flatten() for p in method.parameters()])


@pytest.mark.parametrize("off", [None, *SWITCHES, "all"])
@pytest.mark.parametrize("case", ["classification", "generation"])
def test_each_switch_keeps_loss_and_gradient(backbone, switched, case, off):
    """Every switch on (the default), each one off, all off: the loss and prompt gradient of the plain path (the
    model's own forward and full logits), in float32, where every switch's logic is the same as in any precision."""
    config = FastPathConfig() if off is None else FastPathConfig.off() if off == "all" else FastPathConfig().without(off)
    switched(backbone, FastPathConfig(enabled=False))
    want = step(backbone, case)
    switched(backbone, config)
    got = step(backbone, case)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_bf16_switches_within_bf16_rounding_of_float32(backbone, switched, name):
    """bf16 autocast: the fast path is as close to float32 as the plain bf16 path (the model's own forward under
    autocast): loss within 4 bf16 roundings (2^-8 relative each), prompt gradient within twice the plain path's
    error (measured 0.4-0.7% for both) or 2%. Cached weight casts give exactly autocast's own casts' numbers."""
    ref_loss, ref_grad = step(backbone, "classification", "float32", name=name)

    def error(config):
        switched(backbone, config)
        loss, grad = step(backbone, "classification", "bf16", name=name)
        return loss, grad, float((grad - ref_grad).norm() / ref_grad.norm())

    plain = error(FastPathConfig(enabled=False))
    uncached = error(FastPathConfig().without("cached_weight_casts"))
    fast = error(FastPathConfig())
    for loss, _, grad_error in (plain, uncached, fast):
        assert abs(loss - ref_loss) <= 4 * 2**-8 * abs(ref_loss)
        assert grad_error <= max(2 * plain[2], 0.02), (grad_error, plain[2])
    torch.testing.assert_close(fast[0], uncached[0], atol=0, rtol=0)  # same bf16 weights, same numbers
    torch.testing.assert_close(fast[1], uncached[1], atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_hidden_states_and_head_give_the_forward_logits(backbone, side):
    ids, mask = batch(backbone, TEXTS, side)
    for P in (0, 4):
        method = sp.PromptTuning.create(backbone, num_virtual_tokens=P, seed=1) if P else \
            sp.PromptTuning(torch.empty(0, backbone.hidden_size))
        model = sp.PromptedModel(backbone, method)
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
        with torch.no_grad():  # a strided slice (the positions before a label's words) gives the same logits
            torch.testing.assert_close(model.head(hidden[:, -3:-1]), lean[:, -3:-1])
            torch.testing.assert_close(model.head(hidden[:, -3:-1], [5, 9]), lean[:, -3:-1][..., [5, 9]])


def saved_bytes(fn) -> tuple[object, int]:
    """fn's result, and the bytes of distinct storages autograd keeps for its backward."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_speedups_are_engaged(switched):
    """Each switch changes what runs (equal results are checked above): the MLP sees real tokens only, the last
    layer's MLP the answer column only, SDPA gets the key/value heads, a gated MLP keeps less for backward, the
    rows' shared first tokens run once, bf16 weights are cast once and reused."""
    import torch.nn.functional as F

    bb = make_backbone("llama")
    cfg = bb.model.config
    enc, _ = encoders(bb)
    b = enc.classification_batch([{"text": "review : " + t, "label": "positive"} for t in TEXTS])
    real = int(b["attention_mask"].sum())
    mlps = [layer.mlp for layer in bb.model.base_model.layers]
    widths = {0: [], len(mlps) - 1: []}
    hooks = [mlps[i].gate_proj.register_forward_pre_hook(lambda m, a, i=i: widths[i].append(a[0].shape[:-1].numel()))
             for i in widths]
    kv_heads = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, *a, **kw):
        if k.shape[0] == len(TEXTS):  # the rows' forward
            kv_heads.append(k.shape[1])
        return sdpa(q, k, *a, **kw)

    def train_step():
        m = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=1))
        return classification_loss(enc, m, b, "options")

    kept = {}
    F.scaled_dot_product_attention = spy
    try:
        for on in (False, True):
            switched(bb, FastPathConfig() if on else FastPathConfig(lean_head=True).without(*SWITCHES[1:]))
            for w in widths.values():
                w.clear()
            kv_heads.clear()
            _, kept[on] = saved_bytes(train_step)
            shared = 2  # "review :" starts every row: it runs once, after the prompt, when shared_prefix is on
            rows_tokens = real - shared * len(TEXTS) if on else b["input_ids"].numel()
            assert widths[0][-1] == rows_tokens  # the first MLP: the real tokens only
            assert widths[len(mlps) - 1][-1] == (len(TEXTS) if on else b["input_ids"].numel())  # the answer column
            assert set(kv_heads) == ({cfg.num_key_value_heads} if on else {cfg.num_attention_heads})
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in hooks:
            h.remove()
    # at least one (tokens, intermediate) float32 tensor less per layer but the last
    assert kept[False] - kept[True] >= (cfg.num_hidden_layers - 1) * (real - 6) * cfg.intermediate_size * 4
    fp = sp.runtime(bb).fastpath
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_step()
        casts = fp.casts[torch.bfloat16].store
        first = {m: w.data_ptr() for m, (_, w) in casts.items()}
        train_step()
    assert len(casts) == sum(type(m) is torch.nn.Linear for m in bb.model.base_model.modules())
    assert {m: w.data_ptr() for m, (_, w) in casts.items()} == first  # cast once, reused
    layer = mlps[0].down_proj
    with torch.no_grad():
        layer.weight.mul_(2)  # changed in place: cast again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train_step()
    torch.testing.assert_close(casts[layer][1].float(), layer.weight.to(torch.bfloat16).float())


def test_every_generation_step_attends_with_the_key_value_heads():
    """Not only the prefill: each decode step runs on the fast path too (SDPA gets the key/value heads)."""
    import torch.nn.functional as F

    bb = make_backbone("llama")
    cfg = bb.model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    method = sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=1)
    sp.generate(bb, method, TEXTS, max_new_tokens=1)  # installs the fast path (its self-check runs the plain path)
    heads, queries = [], []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, *a, **kw):
        heads.append(k.shape[1])
        queries.append(q.shape[2])
        return sdpa(q, k, *a, **kw)

    F.scaled_dot_product_attention = spy
    try:
        sp.generate(bb, method, TEXTS, max_new_tokens=4)
    finally:
        F.scaled_dot_product_attention = sdpa
    assert len(queries) > cfg.num_hidden_layers  # decode steps were seen, not only the prefill's layers
    assert set(heads) == {cfg.num_key_value_heads}


def test_a_forward_in_another_thread_runs_the_plain_modules(llama):
    """While one thread runs an engaged forward (bf16 casts, GQA, unpadded MLPs), a float32 forward of the same
    model in another thread sees the plain modules: its logits are the untouched model's."""
    ids, mask = batch(llama, TEXTS)
    with torch.no_grad():
        want = llama.model(input_ids=ids, attention_mask=mask).logits
    rt = sp.runtime(llama)
    seen = {}
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad(), rt.engaged(mask):
        inside = llama.model(input_ids=ids, attention_mask=mask).logits

        def other():
            with torch.no_grad():
                seen["logits"] = llama.model(input_ids=ids, attention_mask=mask).logits

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["logits"].dtype == torch.float32
    torch.testing.assert_close(seen["logits"], want, atol=1e-6, rtol=1e-5)
    real = mask.bool()
    assert (inside.float() - want)[real].abs().max() > 1e-4  # this thread ran on bf16 weights
    torch.testing.assert_close(inside.float()[real], want[real], atol=5e-2, rtol=5e-2)


def test_uninstall_restores_the_untouched_model(llama):
    rt = sp.runtime(llama)
    fp = rt.fastpath
    assert fp.installed and llama.model.config._attn_implementation == "softprompt_sdpa"
    assert all("forward" in vars(m) for m in fp.mlps + fp.linears)
    modules = fp.mlps + fp.linears
    fp.uninstall()
    assert llama.model.config._attn_implementation == "sdpa"
    assert not any("forward" in vars(m) for m in modules) and not rt.lean
    fp.install()
    assert fp.installed and rt.lean


def test_unknown_or_failing_architecture_runs_the_plain_path(capsys, monkeypatch):
    bb = make_backbone("llama")
    bb.model.config.model_type = "llama-like-unknown"
    rt = sp.runtime(bb)
    assert not rt.lean and not rt.fastpath.installed
    assert "'llama-like-unknown' is not in the fast path's table; running the plain path" in capsys.readouterr().err
    enc, _ = encoders(bb)
    b = enc.classification_batch([{"text": t, "label": "positive"} for t in TEXTS])
    m = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=4, seed=1))
    plain = enc.label_scores(m, b)
    assert plain.shape == (3, 2) and torch.isfinite(plain).all()
    # a known type whose head does something the table does not say: the self-check catches it
    monkeypatch.setitem(ARCHITECTURES, "llama", Architecture(gated_mlp=True, logits=lambda c, x: 2 * x))
    bb2 = make_backbone("llama")
    assert not sp.runtime(bb2).lean
    assert "final hidden states through the LM head do not give its logits" in capsys.readouterr().err
    assert all("forward" not in vars(m) for m in bb2.model.modules())


def test_soft_capped_logits_go_through_the_self_checked_head():
    """Gemma 2 caps its logits (tanh(x / c) * c) after the LM head: the fast path's head does too, and scores equal
    the model's own."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, max_position_embeddings=64, final_logit_softcapping=3.0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    bb = sp.CausalLMBackbone(AutoModelForCausalLM.from_config(cfg), make_tokenizer())
    assert sp.runtime(bb).lean
    ids, mask = batch(bb, TEXTS)
    m = sp.PromptedModel(bb, sp.PromptTuning.create(bb, num_virtual_tokens=3, seed=1))
    with torch.no_grad():
        full = m(ids, mask).logits
        lean = m.head(m.hidden_states(ids, mask)[0])
    assert full.abs().max() <= 3.0 + 1e-5  # capped
    torch.testing.assert_close(lean[mask.bool()], full[mask.bool()], atol=1e-5, rtol=1e-4)


def test_a_deep_copy_runs_its_own_weights(llama):
    """The fine-tuning baseline trains a deep copy: the copy's installed modules run the copy's weights."""
    ids, mask = batch(llama, TEXTS)
    sp.runtime(llama)
    with torch.no_grad():
        want = llama.model(input_ids=ids, attention_mask=mask).logits
    twin = copy.deepcopy(llama)
    assert sp.runtime(twin).lean
    torch.nn.init.zeros_(twin.model.base_model.layers[-1].mlp.down_proj.weight)
    m_twin = sp.PromptedModel(twin, sp.PromptTuning(torch.empty(0, 32)))
    m_orig = sp.PromptedModel(llama, sp.PromptTuning(torch.empty(0, 32)))
    with torch.no_grad():
        assert not torch.allclose(m_twin(ids, mask).logits, want)
        torch.testing.assert_close(m_orig(ids, mask).logits, want)


def test_gated_activation_gradient_for_every_activation_it_knows_and_none_other():
    """Gradients checked against finite differences, and without a nested autograd call in backward (which
    FlopCounterMode and other module hooks refuse: the activation's derivative is torch's own backward kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from softprompt.fastpath.mlp import GatedActivation, activation_kind

    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    acts = {"silu": torch.nn.SiLU(), "gelu_tanh": torch.nn.GELU("tanh"), "gelu_none": torch.nn.GELU()}
    for want, act in acts.items():
        kind = activation_kind(act)
        assert kind == want
        assert torch.autograd.gradcheck(lambda a, b, act=act, kind=kind: GatedActivation.apply(a, b, act, kind),
                                        (g, u))
        with FlopCounterMode(display=False):
            GatedActivation.apply(g, u, act, kind).sum().backward()
    assert activation_kind(torch.nn.ReLU()) is None and activation_kind(torch.nn.Tanh()) is None


def test_prompt_cache_is_keyed_by_content_and_precision_and_bounded(llama):
    rt = sp.runtime(llama)
    rt.clear()
    enc, _ = encoders(llama)
    b = enc.classification_batch([{"text": t, "label": "positive"} for t in TEXTS])
    method = sp.PromptTuning.create(llama, num_virtual_tokens=4, seed=1)
    model = sp.PromptedModel(llama, method).eval()
    with torch.no_grad():
        a = enc.label_scores(model, b)
        misses = rt.cache.misses
        assert torch.equal(enc.label_scores(model, b), a) and rt.cache.misses == misses  # reused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc.label_scores(model, b)
        assert rt.cache.misses > misses  # another precision: computed apart
        method.weight.add_(0.1)  # new content: never the stale prefix
        assert not torch.allclose(enc.label_scores(model, b), a)
    rt.clear()
    assert len(rt.cache) == 0
    for i in range(rt.cache.capacity + 5):
        with torch.no_grad():
            sp.generate(llama, torch.randn(2, 32) * 0.1 + i, ["the movie"], max_new_tokens=1)
    assert len(rt.cache) == rt.cache.capacity


@pytest.mark.skipif(not __import__("softprompt.fastpath.packed", fromlist=["AVAILABLE"]).AVAILABLE,
                    reason="this torch has no MKL packed GEMM")
def test_packed_decode_steps_equal_the_plain_ones_and_are_taken_only_for_decode(switched):
    """Float32 decode steps of 3-32 rows go through packed weights (padded to a bucket) and give the plain logits to
    float32 rounding and the same greedy tokens; 1-2 rows, prefills, training and the switch off stay plain. (With
    transposed products off: where they are on, they take the lean forward's products before packed weights.)"""
    from softprompt.generation import generate

    bb = make_backbone("llama")
    fp = sp.runtime(bb).fastpath
    texts = ["the movie was", "a film is", "hello world", "what is the capital of france ?", "it was fun"]
    switched(bb, ROWS.without("packed_decode"))
    plain = generate(bb, None, texts, max_new_tokens=6)
    switched(bb, ROWS)
    assert sp.runtime(bb).fastpath.installed
    fp = sp.runtime(bb).fastpath
    fp.packed.clear()
    packed = generate(bb, None, texts, max_new_tokens=6)
    assert packed.tokens == plain.tokens
    buckets = [b for (_, b) in fp.packed.store if b != "dnnl"]  # (oneDNN prefill weights: the next test)
    assert set(buckets) == {8}  # 5 rows -> the 8-row bucket; the prefill (many positions per row) not in one
    # the lean decode step: q/k/v and gate/up packed side by side, o and down alone, and the LM head
    assert len(buckets) == 4 * bb.config.num_hidden_layers + 1
    switched(bb, ROWS.without("lean_decode"))
    fp.packed.clear()
    assert generate(bb, None, texts, max_new_tokens=6).tokens == plain.tokens
    assert len(fp.packed.store) == len(fp.linears)  # the model's forward: every Linear of the decoder, the LM head
    switched(bb, ROWS)
    fp.packed.clear()
    generate(bb, None, texts[:2], max_new_tokens=4)  # 2 rows: the plain GEMM
    assert not [b for (_, b) in fp.packed.store if b != "dnnl"]
    fp.packed.clear()
    x = torch.randn(12, 1, bb.hidden_size)
    lin = bb.model.model.layers[0].mlp.up_proj
    with torch.no_grad(), fp.engaged():
        got = lin(x)
    assert (got - torch.nn.functional.linear(x, lin.weight)).abs().max() < 1e-5
    assert {b for (_, b) in fp.packed.store} == {16}
    fp.packed.clear()
    with fp.engaged():  # gradients on: training is never packed
        lin(x.requires_grad_())
    assert not fp.packed.store


def _prefills_give_the_models_own_logits(bb, texts: list[str], running_rows: int) -> None:
    """A prefill of `texts` alone and one riding in the decode step of a running batch (its first `running_rows`
    texts) give the model's own last-position logits, to float32 rounding."""
    from softprompt.fastpath.decode import Fresh
    from softprompt.generation import Decoding, Row, Sampling

    def rows(n):
        return [Row(Sampling(max_new_tokens=4)) for _ in range(n)]
    ids, mask = left_pad([bb.tokenizer(t)["input_ids"] for t in texts], bb.pad_token_id, bb.device)
    n = len(texts)
    with torch.no_grad():
        own = bb.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        dec = Decoding(bb, [None] * n, ids, mask, rows(n))
        running = Decoding(bb, [None] * running_rows, ids[:running_rows], mask[:running_rows], rows(running_rows))
        running.pick()
        joining = Decoding(bb, [None] * n, ids, mask, rows(n), prefill=False)
        assert isinstance(joining._fresh, Fresh)
        running.advance(joining=joining)
    for got in (dec.prefill_logits, joining.prefill_logits):
        torch.testing.assert_close(got, own[:, -1].float(), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not __import__("softprompt.fastpath.packed", fromlist=["DNNL_AVAILABLE"]).DNNL_AVAILABLE,
                    reason="this torch has no oneDNN")
def test_dnnl_prefill_products_equal_the_plain_ones_and_are_taken_only_for_float32_inference(switched):
    """The lean forward's prefill products (alone and beside a decode step) through oneDNN give the model's own
    prefill logits to float32 rounding and the same greedy tokens as the switch off; one reordered weight per
    layer product (q/k/v, o, gate/up, down), none for the LM head; training and bfloat16 never take it."""
    from softprompt.generation import generate

    bb = make_backbone("llama")
    texts = ["the movie was", "a film is", "hello world", "what is the capital of france ?", "it was fun"]
    switched(bb, FastPathConfig(dnnl_prefill=False, dnnl_decode=False))
    plain = generate(bb, None, texts, max_new_tokens=6)
    switched(bb, FastPathConfig(dnnl_prefill=True, dnnl_decode=False, transposed_products=False))
    fp = sp.runtime(bb).fastpath
    fp.packed.clear()
    assert generate(bb, None, texts, max_new_tokens=6).tokens == plain.tokens
    dnnl = [m for (m, b) in fp.packed.store if b == "dnnl"]
    assert len(dnnl) == 4 * bb.config.num_hidden_layers and bb.model.get_output_embeddings() not in sum(dnnl, ())
    _prefills_give_the_models_own_logits(bb, texts, running_rows=2)  # alone, and beside a running batch's step
    # training and bfloat16 weights: the modules' own products
    half = make_backbone("llama", dtype=torch.bfloat16)
    with torch.no_grad():
        assert fp._dnnl() is fp.packed and sp.runtime(half).fastpath._dnnl() is None
    assert torch.is_grad_enabled() and fp._dnnl() is None


@pytest.mark.skipif(not __import__("softprompt.fastpath.packed", fromlist=["DNNL_AVAILABLE"]).DNNL_AVAILABLE,
                    reason="this torch has no oneDNN")
def test_dnnl_decode_steps_and_lm_head_equal_the_plain_ones_and_replace_packed_weights(switched):
    """With `dnnl_decode`, decode steps (1 to 32 rows) and the LM head go through oneDNN: the same greedy tokens as
    the modules' own products, the decode step's logits equal the plain step's to float32 rounding, one reordered
    weight per layer product and one for the LM head, and no packed copy per row bucket; training never takes it."""
    from softprompt.fastpath.decode import LeanDecode
    from softprompt.generation import generate

    bb = make_backbone("llama")
    texts = ["the movie was", "a film is", "hello world", "what is the capital of france ?", "it was fun"]
    switched(bb, FastPathConfig(transposed_products=False, dnnl_prefill=False, dnnl_decode=False,
                                packed_decode=False))
    plain = {n: generate(bb, None, texts[:n], max_new_tokens=6).tokens for n in (1, 5)}
    switched(bb, FastPathConfig(transposed_products=False, dnnl_prefill=False, dnnl_decode=True))  # layers: decode only
    fp = sp.runtime(bb).fastpath
    fp.packed.clear()
    assert fp.decode_step() is not None  # its self-check passed with these products
    for n in (1, 5):
        assert generate(bb, None, texts[:n], max_new_tokens=6).tokens == plain[n]
    kinds = [b for (_, b) in fp.packed.store]
    head = bb.model.get_output_embeddings()
    assert set(kinds) == {"dnnl"} and len(kinds) == 4 * bb.config.num_hidden_layers + 1
    assert (head,) in [m for (m, _) in fp.packed.store]
    # one step's logits against the modules' own products, on the same cache
    ids, mask = left_pad([bb.tokenizer(t)["input_ids"] for t in texts], bb.pad_token_id, bb.device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    lean = LeanDecode(bb)
    with torch.no_grad():
        prefilled = [bb.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=bb.new_cache(),
                              use_cache=True).cache
                     for _ in range(2)]
        nxt = torch.tensor([[7]] * len(texts))
        step_mask = torch.cat([mask, torch.ones(len(texts), 1, dtype=mask.dtype)], dim=1)
        with fp.engaged():
            got = lean.step(nxt, step_mask, pos[:, -1:] + 1, prefilled[0], None, False, fp.packed)
            want = lean.step(nxt, step_mask, pos[:, -1:] + 1, prefilled[1])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.is_grad_enabled() and fp._dnnl("dnnl_decode") is None
    # the model's own forward (lean decode step off): its decode steps' Linears through oneDNN, one by one
    switched(bb, FastPathConfig(transposed_products=False, dnnl_decode=True, lean_decode=False))
    fp.packed.clear()
    assert generate(bb, None, texts, max_new_tokens=6).tokens == plain[5]
    assert {b for (_, b) in fp.packed.store} == {"dnnl"} and len(fp.packed.store) == len(fp.linears)


def test_float32_cpu_products_default_by_the_cpus_capability():
    """With AVX-512 prefill products go through oneDNN (measured faster there); without it, weight-first products
    (measured faster there, and oneDNN about even)."""
    from softprompt.precision import cpu_flags

    avx512 = "avx512f" in cpu_flags()
    assert FastPathConfig().dnnl_prefill is avx512 and FastPathConfig().transposed_products is not avx512
    assert FastPathConfig().dnnl_decode is avx512


def test_weight_first_products_equal_f_linear_at_every_token_count():
    """`weight_first` (feature-major h (in, N) -> (out, N), zero columns padded to the counts MKL runs fastest at)
    gives F.linear's outputs to float32 rounding: one module or several side by side, with and without biases,
    columns of a row-major tensor or contiguous ones."""
    from softprompt.fastpath.packed import padded, weight_first

    torch.manual_seed(0)
    mods = (torch.nn.Linear(24, 40, bias=False), torch.nn.Linear(24, 8), torch.nn.Linear(24, 16, bias=False))
    for n in (1, 3, 8, 9, 16, 28, 33):
        x = torch.randn(n, 24)
        want = torch.cat([torch.nn.functional.linear(x, m.weight, m.bias) for m in mods], dim=-1)
        for h in (x.t(), x.t().contiguous()):
            with torch.no_grad():
                got = weight_first(mods, h)
                one = weight_first(mods[1:2], h)
            assert got.shape == (64, n) and one.shape == (8, n)
            torch.testing.assert_close(got.t(), want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one.t(), want[:, 40:48], atol=1e-5, rtol=1e-5)
    assert [padded(n) for n in (1, 8, 9, 16, 17, 28, 159)] == [1, 8, 16, 16, 32, 32, 160]


@pytest.mark.parametrize("config", [ROWS, FastPathConfig(transposed_products=True)], ids=["rows", "feature-major"])
def test_lean_prefills_alone_and_beside_a_step_give_the_models_own_logits(config, switched):
    """A new batch's prefill through the lean forward, alone and riding in a running batch's decode step, gives the
    model's own last-position logits (float32 rounding), in rows and feature-major; greedy tokens as the plain path."""
    from softprompt.generation import generate

    bb = make_backbone("llama")
    texts = ["the movie was", "a film is", "hello world", "what is the capital of france ?", "it was fun"] * 2
    switched(bb, FastPathConfig(enabled=False))
    plain = generate(bb, None, texts, max_new_tokens=6).tokens
    switched(bb, config)
    assert generate(bb, None, texts, max_new_tokens=6).tokens == plain
    # feature-major: no packed weights made (the self-check's, for the rows layout, are dropped after it)
    assert bool(sp.runtime(bb).fastpath.packed.store) == (not config.transposed_products)
    _prefills_give_the_models_own_logits(bb, texts, running_rows=3)


def test_transposed_products_are_taken_only_for_float32_inference_on_cpu(switched):
    """The lean forward's feature-major layout (`transposed_products`) is chosen for float32 inference on a CPU
    only: never with gradients on, under autocast, for bfloat16 weights, or with the switch off."""
    bb = make_backbone("llama")
    switched(bb, FastPathConfig(transposed_products=True))
    fp = sp.runtime(bb).fastpath
    with torch.no_grad():
        assert fp._flipped()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fp._flipped()
    assert not fp._flipped()  # gradients on
    switched(bb, ROWS)
    with torch.no_grad():
        assert not fp._flipped()
    half = make_backbone("llama", dtype=torch.bfloat16)
    switched(half, FastPathConfig(transposed_products=True))
    with torch.no_grad():
        assert not sp.runtime(half).fastpath._flipped()


def _tiny_mistral(sliding_window=None):
    from transformers import AutoModelForCausalLM, MistralConfig

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                        sliding_window=sliding_window, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.config._name_or_path = "tiny-mistral"
    return sp.CausalLMBackbone(model, make_tokenizer())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lean_decode_steps_give_the_models_own_logits(arch, switched):
    """The lean decode step (Llama, Qwen2 with its q/k/v biases, Mistral), in rows and feature-major (weight-first
    products), gives each step the logits of the model's forward, for rows of different lengths (left padding) with
    embedding and key/value prompts mixed, at 2 rows (plain products) and 5 rows (packed products in rows);
    generation's tokens are the same."""
    from softprompt.generation import Decoding, Row, Sampling, encode, prompt_of

    bb = _tiny_mistral() if arch == "mistral" else make_backbone(arch)
    rt = sp.runtime(bb)
    texts = ["the movie was", "a film is", "hello world", "what is the capital of france ?", "it was fun"]
    prompts = [sp.get_method("prompt_tuning").create(bb, num_virtual_tokens=3, init="random", seed=1),
               sp.get_method("prefix_tuning").create(bb, num_virtual_tokens=2, seed=2), None]
    for n, grad in ((2, False), (5, False), (5, True)):  # with gradients on: never packed
        with torch.set_grad_enabled(grad):
            ids, mask = encode(bb, texts[:n])
            softs = [prompt_of(prompts[i % 3]) for i in range(n)]
            configs = {"plain": FastPathConfig().without("lean_decode"), "rows": ROWS,
                       "feature-major": FastPathConfig(transposed_products=True)}
            decodings = {}
            for name, config in configs.items():
                switched(bb, config)
                dec = Decoding(bb, softs, ids, mask, [Row(Sampling(max_new_tokens=5, ignore_eos=True)) for _ in softs])
                dec.pick()
                decodings[name] = dec
            for _ in range(4):
                for name, dec in decodings.items():
                    switched(bb, configs[name])
                    dec.advance()
                plain = decodings["plain"].logits
                for name in ("rows", "feature-major"):
                    assert (plain - decodings[name].logits).abs().max() < 1e-4 * max(1.0, float(plain.abs().max()))
                for dec in decodings.values():
                    dec.pick()
            for name in ("rows", "feature-major"):
                assert [r.tokens for r in decodings[name].rows] == [r.tokens for r in decodings["plain"].rows]
    assert rt.fastpath.decode_step() is not None  # taken: the layout is known and passed its self-check


def test_lean_decode_is_not_taken_where_it_does_not_apply_or_fails_its_check(switched, capsys):
    """GPT-2 and sliding-window Mistral decode through the model's forward; a Llama whose MLP does not do what its
    config says (the step's self-check fails) too, with a one-line notice, and generates what the plain path does."""
    from softprompt.generation import generate

    assert sp.runtime(make_backbone("gpt2")).fastpath.decode_step() is None
    assert sp.runtime(_tiny_mistral(sliding_window=16)).fastpath.decode_step() is None
    bb = make_backbone("llama")
    for layer in bb.model.model.layers:
        layer.mlp.act_fn = torch.nn.GELU()  # the config still says silu: the lean step would compute SiLU
    switched(bb, FastPathConfig().without("lean_decode"))
    plain = generate(bb, None, TEXTS, max_new_tokens=5).tokens
    switched(bb, FastPathConfig())
    capsys.readouterr()
    assert sp.runtime(bb).fastpath.decode_step() is None
    assert "lean decode step differs" in capsys.readouterr().err
    assert generate(bb, None, TEXTS, max_new_tokens=5).tokens == plain


@pytest.mark.parametrize("broken", ["logits", "keys"])
def test_the_lean_forward_is_not_taken_when_its_prefill_fails_the_self_check(broken, switched, monkeypatch, capsys):
    """The self-check runs a prefill through the lean forward (alone and beside a decode step, after a prompt's
    cached prefix) against the model's own: a prefill that gives other logits, or leaves other keys in the cache
    for the next steps, turns the lean forward off (decode steps and prefills run the model's forward)."""
    from softprompt.fastpath import decode

    real = decode.LeanDecode.run

    def run(self, step, fresh, packed=None, dnnl=None, flipped=False, head=None):
        logits, theirs = real(self, step, fresh, packed, dnnl, flipped, head)
        if fresh is not None and broken == "logits":
            theirs = theirs + 1
        if fresh is not None and broken == "keys":
            fresh.cache.layers[-1].keys[..., -1, :] += 1
        return logits, theirs

    monkeypatch.setattr(decode.LeanDecode, "run", run)
    bb = make_backbone("llama")
    switched(bb, FastPathConfig())
    capsys.readouterr()
    fp = sp.runtime(bb).fastpath
    assert fp.joint_forward() is None and fp.decode_step() is None
    assert "lean decode step differs" in capsys.readouterr().err
    monkeypatch.setattr(decode.LeanDecode, "run", real)
    switched(bb, FastPathConfig(enabled=False))  # installed afresh: checked again
    switched(bb, FastPathConfig())
    assert fp.joint_forward() is not None
