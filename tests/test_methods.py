"""Every method on tiny Llama / GPT-2 / Qwen2, left and right padding, against a naive reference: the plain model
with the prompt put in by hand (embeddings prepended to each unpadded row, or a key/value cache built from the
per-layer tensors), no prompt cache, one row at a time. Same loss, same gradient of every trainable tensor, same
greedy tokens. Then files, resume, mixed batches and bad input, per method."""

import json

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone, make_learnable_backbone, synthetic_splits

import softprompt as sp
from softprompt.tasks.encode import TaskEncoder
from softprompt.tasks.spec import TaskSpec
from softprompt.train.loop import classification_loss, generation_loss

METHODS = ["prompt_tuning", "residual", "p_tuning", "prefix_tuning", "p_tuning_v2"]
TEXTS = ["the movie was great and fun", "bad", "this plot is not very good !"]


def make(bb, name, P=4, seed=3, **kw):
    m = sp.get_method(name).create(bb, num_virtual_tokens=P, init="vocab", seed=seed, **kw)
    if name == "residual":  # move off the exact-identity start, so that the MLP's path is exercised
        torch.nn.init.normal_(m.norm.weight, std=0.5, generator=torch.Generator().manual_seed(seed))
    return m


def reference_logits(bb, prompt, ids: list[int]) -> torch.Tensor:
    """(T, V) logits of one unpadded row with the prompt put in by hand; plus (V,) predicting the first token
    (None for a key/value prompt: nothing before the row predicts it)."""
    ids_t = torch.tensor(ids)[None]
    if prompt.kind == "embeddings":
        P = prompt.embeddings.shape[0]
        x = torch.cat([prompt.embeddings, bb.model.get_input_embeddings()(ids_t[0])])[None]
        logits = bb.model(inputs_embeds=x).logits[0]
        return logits[P:], logits[P - 1]
    from transformers import DynamicCache

    kv = prompt.kv  # (L, 2, h, P, d)
    cache = DynamicCache([(kv[i, 0][None], kv[i, 1][None]) for i in range(kv.shape[0])], config=bb.model.config)
    return bb.model(input_ids=ids_t, cache=cache, use_cache=True).logits[0], None


def rows_of(ids, mask):
    return [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]


def grads(method):
    return {k: p.grad.clone() for k, p in method.named_parameters()}


def batch(bb, texts, side):
    bb.tokenizer.padding_side = side
    enc = bb.tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", METHODS)
def test_logits_equal_the_naive_reference(backbone, name, side):
    method = make(backbone, name)
    ids, mask = batch(backbone, TEXTS, side)
    with torch.no_grad():
        ours = sp.PromptedModel(backbone, method)(ids, mask).logits
        prompt = method()
        for b, row in enumerate(rows_of(ids, mask)):
            ref, _ = reference_logits(backbone, prompt, row)
            torch.testing.assert_close(ours[b][mask[b].bool()], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("case", ["classification", "generation"])
def test_loss_and_gradient_equal_the_naive_reference(backbone, name, case):
    """The training loss (the lean path: label rows only / target positions only) and the gradient of every
    trainable tensor of the method, reparameterisations included, against the hand-built reference."""
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), backbone.tokenizer, 4, backbone.max_positions, backbone.pad_token_id)
    gen = TaskEncoder(TaskSpec(template="question : {q} answer :", target_field="a"), backbone.tokenizer, 4,
                      backbone.max_positions, backbone.pad_token_id)
    data = [{"text": t, "q": t, "label": lab, "a": a} for t, lab, a in
            zip(TEXTS, ["positive", "negative", "negative"], ["it is", "no", "the plot was not good"], strict=True)]
    b = enc.classification_batch(data) if case == "classification" else gen.generation_batch(data)
    method = make(backbone, name)
    model = sp.PromptedModel(backbone, method)
    loss = classification_loss(enc, model, b, "options") if case == "classification" else generation_loss(model, b)
    loss.backward()
    ours = grads(method)
    method.zero_grad()
    prompt = method()
    ref = torch.zeros(())
    words = [c[0] for c in enc.candidates]
    for i, row in enumerate(rows_of(b["input_ids"], b["attention_mask"])):
        logits, first = reference_logits(backbone, prompt, row)
        if case == "classification":
            ref = ref + torch.nn.functional.cross_entropy(logits[-1, words][None], b["y"][i:i + 1], reduction="sum")
        else:
            labels = b["labels"][i][b["attention_mask"][i].bool()]
            pred = logits[:-1] if first is None else torch.cat([first[None], logits[:-1]])
            target = labels[1:] if first is None else labels
            ref = ref + torch.nn.functional.cross_entropy(pred, target, ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    for k, g in grads(method).items():
        torch.testing.assert_close(ours[k], g, atol=1e-6, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("name", METHODS)
def test_greedy_tokens_equal_the_naive_reference(backbone, name):
    method = make(backbone, name)
    texts = ["the movie was", "what is the capital of france ?"]
    out = sp.generate(backbone, method, texts, max_new_tokens=6).tokens
    prompt = method()
    eos = set(backbone.eos_token_ids)
    with torch.no_grad():
        for text, got in zip(texts, out, strict=True):
            ids = backbone.tokenizer(text)["input_ids"]
            want = []
            for _ in range(6):
                t = int(reference_logits(backbone, prompt, ids + want)[0][-1].argmax())
                if t in eos:
                    break
                want.append(t)
            assert got == want


@pytest.mark.parametrize("name", METHODS)
def test_activation_checkpointing_keeps_loss_and_gradient(name):
    """Prefix tuning included (PEFT's cannot: its issue #869): the same loss and gradients, layers recomputed."""
    bb = make_backbone("llama")
    enc = TaskEncoder(TaskSpec(**SYNTH_TASK), bb.tokenizer, 4, bb.max_positions, bb.pad_token_id)
    b = enc.classification_batch([{"text": t, "label": "positive"} for t in TEXTS])
    got = []
    for ckpt in (False, True):
        method = make(bb, name)
        loss = classification_loss(enc, sp.PromptedModel(bb, method, activation_checkpointing=ckpt), b, "options")
        loss.backward()
        got.append((loss.detach(), grads(method)))
    torch.testing.assert_close(got[0][0], got[1][0])
    for k in got[0][1]:
        torch.testing.assert_close(got[0][1][k], got[1][1][k])


@pytest.mark.parametrize("name", METHODS)
def test_file_holds_the_collapsed_prompt_and_gives_the_same_outputs(tmp_path, llama, name):
    method = make(llama, name)
    path = sp.save_prompt(tmp_path / "p.safetensors", method, llama)
    pf = sp.load_prompt(path, backbone=llama)
    assert pf.method == name and set(pf.tensors) == ({"kv"} if "prefix" in name or name == "p_tuning_v2"
                                                       else {"prompt"})
    loaded = sp.from_file(pf)
    assert sum(p.numel() for p in loaded.parameters()) <= sum(p.numel() for p in method.parameters())
    ids, mask = batch(llama, TEXTS, "left")
    with torch.no_grad():
        a = sp.PromptedModel(llama, method)(ids, mask).logits
        b = sp.PromptedModel(llama, loaded)(ids, mask).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert sp.generate(llama, pf, ["the movie"], max_new_tokens=4).tokens == \
        sp.generate(llama, method, ["the movie"], max_new_tokens=4).tokens


def config(tmp_path, name, *overrides):
    return sp.load_config(None, ["--task", json.dumps(SYNTH_TASK), "--out_dir", str(tmp_path / "run"),
                                 "--method.name", name, "--method.num_virtual_tokens", "4", "--method.init", "vocab",
                                 "--train.batch_size", "8", "--train.lr", "0.01", "--train.eval_every", "4",
                                 "--train.eval_examples", "16", "--train.precision", "float32", *overrides])


@pytest.mark.parametrize("name", METHODS)
def test_resume_reaches_the_same_prompt_bit_for_bit(tmp_path, name):
    """Killed after step 6 of 8 (last checkpoint: step 4) and resumed: the prompt equals an uninterrupted run's,
    reparameterisation and optimizer state included (they are in the checkpoint)."""
    splits = synthetic_splits()
    args = ("--train.steps", "8", "--train.save_every", "4")
    full = sp.fit(config(tmp_path / "a", name, *args), backbone=make_learnable_backbone(), splits=splits, quiet=True)

    def crash(step, loss):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sp.fit(config(tmp_path / "b", name, *args), backbone=make_learnable_backbone(), splits=splits, quiet=True,
               on_step=crash)
    resumed = sp.fit(config(tmp_path / "b", name, *args), backbone=make_learnable_backbone(), splits=splits,
                     quiet=True, resume=True)
    a, b = (sp.load_prompt(r.prompt_path).tensors for r in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_reparameterised_checkpoint_resumed_as_another_method_is_refused(tmp_path):
    splits = synthetic_splits()
    sp.fit(config(tmp_path, "prefix_tuning", "--train.steps", "2"), backbone=make_learnable_backbone(),
           splits=splits, quiet=True)
    with pytest.raises(sp.SoftPromptError, match="different config.*method.name: 'prefix_tuning' -> 'p_tuning'"):
        sp.fit(config(tmp_path, "p_tuning", "--train.steps", "4"), backbone=make_learnable_backbone(),
               splits=splits, quiet=True, resume=True)
    from softprompt.train.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run" / "checkpoint.safetensors")["method"]
    other = make(make_learnable_backbone(), "p_tuning")
    with pytest.raises(sp.SoftPromptError, match="a p_tuning state needs tensors .* resume with the method"):
        other.load_state_tensors(state)


def test_mixed_batch_of_prompt_and_prefix_tasks_gives_each_row_its_own_result(llama):
    """Prompt-tuned, prefix-tuned, P-tuned tasks and the bare model in one batch: every row gets the tokens it gets
    alone."""
    methods = [make(llama, "prompt_tuning", P=3), make(llama, "prefix_tuning", P=5), make(llama, "p_tuning_v2", P=2),
               None, make(llama, "p_tuning", P=4)]
    texts = ["the movie was", "a film is", "hello world", "the plot and actors", "it was very"]
    mixed = sp.generate(llama, methods, texts, max_new_tokens=5).tokens
    for m, text, got in zip(methods, texts, mixed, strict=True):
        assert got == sp.generate(llama, m, [text], max_new_tokens=5).tokens[0]


def test_a_prompt_for_another_join_or_layout_is_refused_with_both_sides_named(tmp_path, llama):
    prefix = make(llama, "prefix_tuning")
    mod = sp.ModuleBackbone(torch.nn.Linear(32, 32), hidden_size=32, name="plain-linear")
    with pytest.raises(sp.SoftPromptError, match="prefix_tuning prompt is for 2 layers x 2 key/value heads x 8 dims "
                                                 "but backbone 'plain-linear' has no attention layers"):
        sp.PromptedModel(mod, prefix)
    with pytest.raises(sp.SoftPromptError, match="a 'kv' prompt cannot go into a 'module' backbone"):
        sp.get_join("kv", "module")
    gpt2 = make_backbone("gpt2")  # 2 layers x 4 heads x 8 dims
    with pytest.raises(sp.SoftPromptError, match="2 layers x 2 key/value heads x 8 dims but backbone 'tiny-gpt2-0' "
                                                 "has 2 layers x 4 key/value heads x 8 dims"):
        sp.PromptedModel(gpt2, prefix)
    path = sp.save_prompt(tmp_path / "prefix.safetensors", prefix, llama)
    with pytest.raises(sp.SoftPromptError, match="is a prefix_tuning prompt for 2 layers x 2 key/value heads x 8 dims "
                                                 r"\(trained on 'tiny-llama-0'\) but backbone 'tiny-gpt2-0' has 2 "
                                                 "layers x 4 key/value heads x 8 dims"):
        sp.load_prompt(path, backbone=gpt2, check_backbone=False)
    with pytest.raises(sp.SoftPromptError, match="method.encoder does not apply to prefix_tuning.*applies to: "
                                                 "p_tuning"):
        config(tmp_path, "prefix_tuning", "--method.encoder", "lstm").method.method_config([], 0)


@pytest.mark.parametrize("name", ["p_tuning", "prefix_tuning"])
def test_peft_folders_both_ways_give_the_same_logits(tmp_path, name):
    """P_TUNING and PREFIX_TUNING folders written by softprompt load in the real PEFT with the same logits, and a
    folder PEFT wrote after training imports back to the same outputs."""
    import peft

    bb = make_backbone("llama")
    method = make(bb, name)
    out = sp.export_peft(method, tmp_path / "to_peft", bb)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"p_tuning": "P_TUNING", "prefix_tuning": "PREFIX_TUNING"}[name]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ours = sp.PromptedModel(bb, method)(ids).logits
        theirs_model = peft.PeftModel.from_pretrained(make_backbone("llama").model, str(out))
        theirs = theirs_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    P = 4 if name == "p_tuning" else 0  # PEFT's P-tuning logits keep the virtual positions
    torch.testing.assert_close(theirs[:, P:], ours, atol=1e-5, rtol=1e-5)
    back = sp.from_file(sp.import_peft(out))
    with torch.no_grad():
        torch.testing.assert_close(sp.PromptedModel(bb, back)(ids).logits, ours, atol=1e-5, rtol=1e-5)
    # a folder PEFT itself wrote, trained a step (its reparameterisation collapsed by PEFT on save)
    base = make_backbone("llama", seed=1)
    peft_cfg = (peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=16)
                if name == "p_tuning" else
                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                        encoder_hidden_size=16))
    pm = peft.get_peft_model(base.model, peft_cfg)
    pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    pm.save_pretrained(tmp_path / "from_peft")
    pm.eval()
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    got_method = sp.from_file(sp.import_peft(tmp_path / "from_peft"))
    with torch.no_grad():
        got = sp.PromptedModel(make_backbone("llama", seed=1), got_method)(ids).logits
    torch.testing.assert_close(want[:, 3 if name == "p_tuning" else 0:], got, atol=1e-5, rtol=1e-5)
