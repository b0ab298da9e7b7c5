"""Text encoders (BERT family) as backbones, on tiny random BERT and RoBERTa models with a masked-LM head: the
prompt and key/value joins against the model's own forward, padding, the task head and the masked-LM scorer,
training, prompt files, and the one-line refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backbone, make_tokenizer, synthetic_splits

from softprompt import SoftPromptError
from softprompt.backbones import EncoderBackbone, load_backbone
from softprompt.files import save_prompt
from softprompt.methods import DeepPrompt, Headed, PromptTuning, load_method
from softprompt.model import PromptedModel
from softprompt.tasks.spec import TaskSpec, task_encoder

SPECIALS = {"bert": ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"), "roberta": ("<s>", "<pad>", "</s>", "<mask>", "<unk>")}


def make_encoder_tokenizer(arch: str):
    specials = SPECIALS[arch]
    pad, cls, sep, mask = ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if arch == "bert" else ("<pad>", "<s>", "</s>", "<mask>")
    return make_tokenizer(specials, f"{cls} $A {sep}", pad_token=pad, cls_token=cls, sep_token=sep, mask_token=mask,
                          unk_token=specials[4])


def make_encoder(arch: str = "bert", seed: int = 0, mlm: bool = True, init_range: float = 0.02,
                 layers: int = 2) -> EncoderBackbone:
    from transformers import AutoModel, AutoModelForMaskedLM, BertConfig, RobertaConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  initializer_range=init_range)
    cfg = BertConfig(max_position_embeddings=64, pad_token_id=0, **common) if arch == "bert" else \
        RobertaConfig(max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common)
    model = (AutoModelForMaskedLM if mlm else AutoModel).from_config(cfg)
    model.config._name_or_path = f"tiny-{arch}-{seed}"
    return EncoderBackbone(model, make_encoder_tokenizer(arch))


def batch(bb, texts, side="right"):
    bb.tokenizer.padding_side = side
    b = bb.tokenizer(texts, padding=True, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


ARCHES = ["bert", "roberta"]


@pytest.mark.parametrize("arch", ARCHES)
def test_an_embedding_prompt_gives_the_models_own_outputs_on_the_prepended_embeddings(arch):
    bb = make_encoder(arch)
    method = PromptTuning.create(bb, num_virtual_tokens=3, init="random")
    ids, mask = batch(bb, ["the movie was great"])
    x = torch.cat([method.weight[None], bb.embed(ids)], 1)
    ref = bb.encoder(inputs_embeds=x).last_hidden_state[:, 3:]  # the model's own position ids (RoBERTa: offset 2)
    got = PromptedModel(bb, method)(ids, mask)
    assert torch.allclose(got, ref, atol=1e-5)
    bare = PromptedModel(bb, PromptTuning(torch.empty(0, 32)))(ids, mask)
    assert torch.allclose(bare, bb.encoder(input_ids=ids).last_hidden_state, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("kind", ["prompt_tuning", "p_tuning_v2"])
def test_a_row_gives_the_same_outputs_alone_and_in_a_padded_batch_either_side(arch, kind):
    bb = make_encoder(arch)
    cls = PromptTuning if kind == "prompt_tuning" else DeepPrompt
    method = Headed.create_for(cls.create(bb, num_virtual_tokens=4), bb, 3, seed=0, pooling="mean")
    model = PromptedModel(bb, method)
    texts = ["the movie was great and fun", "bad", "a plot it was <mask>".replace("<mask>", bb.tokenizer.mask_token)]
    alone = [model.classify_tokens(*batch(bb, [t])) for t in texts]
    for side in ("right", "left"):
        got = model.classify_tokens(*batch(bb, texts, side))
        for i in range(len(texts)):
            assert torch.allclose(got[i], alone[i][0], atol=1e-5), (side, i)
    cls_pool = PromptedModel(bb, Headed(method.inner, method.head_weight, method.head_bias, "cls"))
    assert not torch.allclose(cls_pool.classify_tokens(*batch(bb, texts)), model.classify_tokens(*batch(bb, texts)))


@pytest.mark.parametrize("arch", ARCHES)
def test_a_kv_prompt_equals_attention_written_out_over_the_prompts_keys_and_values(arch):
    """One layer computed by hand from the model's own modules: each query attends to [prompt keys; row keys],
    the row's tokens at positions 0..T-1; a padded batch gives the same as the hand-computed unpadded row."""
    bb = make_encoder(arch, layers=1)
    L, h, d = bb.kv_layout()
    assert (L, h, d) == (1, 4, 8)
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(L, 2, h, 5, d, generator=g)
    model = PromptedModel(bb, DeepPrompt(DeepPrompt.Config(hidden_size=32), kv=kv))
    texts = ["the movie was great", "bad film"]
    got = model(*batch(bb, texts, "left"))
    layer = bb.encoder.encoder.layer[0]
    att = layer.attention.self
    for i, text in enumerate(texts):
        ids, _ = batch(bb, [text])
        T = ids.shape[1]
        x = bb.encoder.embeddings(input_ids=ids, position_ids=torch.arange(T)[None] + bb.position_offset,
                                  token_type_ids=torch.zeros_like(ids))
        q, k, v = (p(x).view(1, T, h, d).transpose(1, 2) for p in (att.query, att.key, att.value))
        k, v = torch.cat([kv[0, 0][None], k], 2), torch.cat([kv[0, 1][None], v], 2)
        ctx = ((q @ k.transpose(-1, -2)) / d**0.5).softmax(-1) @ v
        a = layer.attention.output(ctx.transpose(1, 2).reshape(1, T, h * d), x)
        ref = layer.output(layer.intermediate(a), a)
        n = ids.shape[1]
        assert torch.allclose(got[i, -n:], ref[0], atol=1e-5), i
    empty = DeepPrompt(DeepPrompt.Config(hidden_size=32), kv=torch.zeros(L, 2, h, 0, d))
    ids, mask = batch(bb, texts)
    assert torch.allclose(PromptedModel(bb, empty)(ids, mask), PromptedModel(bb, PromptTuning(torch.empty(0, 32)))(ids, mask))


@pytest.mark.parametrize("arch", ARCHES)
def test_a_mask_template_scores_label_words_with_the_models_own_masked_lm_logits(arch):
    bb = make_encoder(arch)
    task = TaskSpec(name="m", data="x", template="{text} it was {mask} .",
                    verbalizer={"positive": "good", "negative": "bad"})
    enc = task_encoder(task, bb, 0)
    assert not enc.needs_head
    rows = [{"text": "the movie was fun", "label": "positive"}, {"text": "boring", "label": "negative"}]
    b = enc.batch(rows)
    model = PromptedModel(bb, PromptTuning(torch.empty(0, 32)))
    scores = enc.label_scores(model, b)  # (B, 2) log-probabilities
    words = [bb.tokenizer.convert_tokens_to_ids(w) for w in ("good", "bad")]
    for i, row in enumerate(rows):
        ids = bb.tokenizer(f"{row['text']} it was {bb.tokenizer.mask_token} .", return_tensors="pt")["input_ids"]
        logits = bb.model(input_ids=ids).logits[0]
        at = int((ids[0] == bb.tokenizer.mask_token_id).nonzero())
        ref = logits[at].log_softmax(-1)[words]
        assert torch.allclose(scores[i], ref, atol=1e-5)
    # a prompt changes them, and rows of a padded batch still score as alone
    prompted = PromptedModel(bb, PromptTuning.create(bb, num_virtual_tokens=4))
    both = enc.label_scores(prompted, b)
    assert not torch.allclose(both, scores)
    assert torch.allclose(both[1], enc.label_scores(prompted, enc.batch(rows[1:]))[0], atol=1e-5)


def _fit(tmp_path, bb, task, method="prompt_tuning", steps=80, resume=False, on_step=None, **train):
    from softprompt.train.config import build_config
    from softprompt.train.loop import fit

    cfg = build_config({"task": task, "out_dir": str(tmp_path / method), "seed": 0,
                               "method": {"name": method, "num_virtual_tokens": 4, "init": "random"},
                               "train": {"steps": steps, "batch_size": 16, "lr": 0.1, "eval_every": steps,
                                         "precision": "float32", **train}})
    return fit(cfg, backbone=bb, splits=synthetic_splits(), quiet=True, resume=resume, on_step=on_step)


HEAD_TASK = {"name": "synth", "data": "synthetic", "template": "{text}",
             "verbalizer": {"positive": "yes", "negative": "no"}, "max_length": 32}


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning_v2"])
def test_training_on_an_encoder_learns_a_task_head_saved_in_the_prompt_file(tmp_path, method):
    bb = make_encoder("bert")
    bb.pooling = "mean"  # a new head's default (a sentence-transformers folder says so itself)
    result = _fit(tmp_path, bb, HEAD_TASK, method)
    assert result.best["accuracy"] >= 0.7, result.best  # chance: 0.5
    from softprompt.files import read_prompt

    pf = read_prompt(result.prompt_path)
    assert {"head.weight", "head.bias"} <= set(pf.tensors) and pf.metadata["pooling"] == "mean"
    assert pf.metadata["backbone"]["kind"] == "encoder" and pf.tensors["head.weight"].shape == (2, 32)
    loaded = load_method(result.prompt_path, bb)
    assert isinstance(loaded, Headed) and loaded.name == method
    from softprompt.evaluate import evaluate

    enc = task_encoder(TaskSpec(**HEAD_TASK), bb, loaded.num_virtual_tokens)
    again = evaluate(PromptedModel(bb, loaded), enc, synthetic_splits()["validation"])
    assert again["accuracy"] == result.best["accuracy"]


def test_compare_on_a_tiny_bert_gives_every_row_with_a_head(tmp_path):
    """compare on a text encoder with a task head: the linear probe on pooled features, prompt methods, deep
    prompts, LoRA and full fine-tuning, each with its head; zero-shot and few-shot rows skipped (a new head knows
    nothing before training), said in the notes."""
    from softprompt.compare import compare
    from softprompt.train.config import build_config

    bb = make_encoder("bert")
    bb.pooling = "mean"
    cfg = build_config({"task": HEAD_TASK, "out_dir": str(tmp_path / "cmp"), "seed": 0,
                        "method": {"num_virtual_tokens": 4, "init": "random"},
                        "train": {"steps": 60, "batch_size": 16, "lr": 0.1, "eval_every": 60, "precision": "float32",
                                  "finetune_lr": 1e-3}})
    rows = ("zero_shot", "linear_probe", "prompt_tuning", "p_tuning_v2", "lora", "fine_tune")
    result = compare(cfg, baselines=rows, backbone=bb, splits=synthetic_splits(), out=str(tmp_path / "cmp"),
                     say=lambda *a: None, search_steps=0)
    by = {r["key"]: r for r in result["rows"]}
    assert set(by) == set(rows) - {"zero_shot"} and any("zero-shot" in n for n in result["notes"])
    assert by["prompt_tuning"]["accuracy"] >= 0.7 and by["linear_probe"]["accuracy"] > 0.5
    head = 2 * 32 + 2
    assert by["prompt_tuning"]["trainable_params"] == 4 * 32 + head and by["linear_probe"]["trainable_params"] == head


def test_training_on_a_mask_template_needs_no_head(tmp_path):
    bb = make_encoder("roberta", init_range=0.2)
    task = {**HEAD_TASK, "template": "{text} it was {mask}", "verbalizer": {"positive": "good", "negative": "bad"}}
    result = _fit(tmp_path, bb, task)
    from softprompt.files import read_prompt

    assert set(read_prompt(result.prompt_path).tensors) == {"prompt"}
    assert result.best["accuracy"] >= 0.65, result.best  # chance: 0.5; a random tiny masked LM is hard to steer


def test_a_run_on_an_encoder_resumes_exactly(tmp_path):
    """Prompt and task head: 12 steps in one go equal a run killed at step 9 (last checkpoint: 6) and resumed, bit
    for bit."""
    from softprompt.files import read_prompt

    def crash(step, loss):
        if step == 9:
            raise KeyboardInterrupt

    whole = _fit(tmp_path / "a", make_encoder(), HEAD_TASK, steps=12, eval_every=5, save_every=6)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", make_encoder(), HEAD_TASK, steps=12, eval_every=5, save_every=6, on_step=crash)
    resumed = _fit(tmp_path / "b", make_encoder(), HEAD_TASK, steps=12, eval_every=5, save_every=6, resume=True)
    a, b = read_prompt(whole.prompt_path).tensors, read_prompt(resumed.prompt_path).tensors
    assert set(a) == {"prompt", "head.weight", "head.bias"} and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_encoder_bad_input_is_one_line_naming_both_sides(tmp_path):
    enc_bb = make_encoder("bert")
    method = Headed.create_for(PromptTuning.create(enc_bb, num_virtual_tokens=2), enc_bb, 2, 0)
    path = save_prompt(tmp_path / "enc.safetensors", method, enc_bb)
    llama = make_backbone("llama")  # also 32 wide: only the kind tells them apart
    with pytest.raises(SoftPromptError, match=r"tiny-bert-0.*'encoder' model.*tiny-llama-0.*'causal_lm'") as e:
        load_method(path, llama)
    assert "\n" not in str(e.value)
    with pytest.raises(SoftPromptError, match=r"\{mask\} in the template is for masked-LM encoders"):
        task_encoder(TaskSpec(name="t", data="x", template="{text} {mask}", verbalizer={"a": " yes"}), llama, 0)
    bare = make_encoder("bert", mlm=False)
    assert bare.mlm_head is None
    with pytest.raises(SoftPromptError, match="has no masked-LM head"):
        task_encoder(TaskSpec(name="t", data="x", template="{text} {mask}", verbalizer={"a": "yes"}), bare, 0)
    with pytest.raises(SoftPromptError, match="is a text encoder; use a classification task"):
        task_encoder(TaskSpec(name="t", data="x", template="{text}", target_field="answer"), enc_bb, 0)
    with pytest.raises(SoftPromptError, match="more than one token"):
        task_encoder(TaskSpec(name="t", data="x", template="{text} {mask}", verbalizer={"a": "very good"}), enc_bb, 0)
    with pytest.raises(SoftPromptError, match="does not generate text"):
        PromptedModel(enc_bb, method).hidden_states(*batch(enc_bb, ["the movie"]))


def test_an_encoder_folder_loads_with_its_masked_lm_head_or_bare(tmp_path):
    for mlm in (True, False):
        bb = make_encoder("roberta", mlm=mlm)
        bb.model.save_pretrained(tmp_path / str(mlm))
        bb.tokenizer.save_pretrained(tmp_path / str(mlm))
        again = load_backbone(str(tmp_path / str(mlm)))
        assert again.kind == "encoder" and (again.mlm_head is not None) == mlm and again.position_offset == 2
        assert again.fingerprint_id() == bb.fingerprint_id()
        ids, mask = batch(bb, ["the movie was great"])
        assert torch.allclose(again.features(ids, mask), bb.features(ids, mask), atol=1e-6)


def test_serving_an_encoder_classifies_as_offline_and_refuses_generation(tmp_path):
    """/v1/classify on a text encoder: a head task and a {mask} task, mixed in one request stream, each answer equal
    to the offline scores of the task's encoder; /v1/completions refused in one line."""
    from fastapi.testclient import TestClient

    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine

    bb = make_encoder("bert")
    folder = tmp_path / "prompts"
    folder.mkdir()
    head = Headed.create_for(PromptTuning.create(bb, num_virtual_tokens=3, init="random"), bb, 2, 0, "mean")
    save_prompt(folder / "head.safetensors", head, bb, task=HEAD_TASK)
    mlm_task = {**HEAD_TASK, "template": "{text} it was {mask}", "verbalizer": {"positive": "good", "negative": "bad"}}
    mlm = DeepPrompt.create(bb, num_virtual_tokens=2, init="random")
    save_prompt(folder / "mlm.safetensors", mlm, bb, task=mlm_task)
    texts = ["the movie was great", "boring plot and actors", "bad"]
    engine = Engine(PromptBank(bb, folder), max_batch=8, window_ms=30).start()
    try:
        with TestClient(create_app(engine)) as client:
            for name, method, task in (("head", head, HEAD_TASK), ("mlm", mlm, mlm_task)):
                r = client.post("/v1/classify", json={"model": name, "input": texts})
                assert r.status_code == 200, r.text
                enc = task_encoder(TaskSpec(**task), bb, method.num_virtual_tokens)
                rows = [{"text": t, "label": "positive"} for t in texts]
                with torch.no_grad():
                    want = enc.label_scores(PromptedModel(bb, method.eval()), enc.batch(rows))
                for d, w in zip(r.json()["data"], want, strict=True):
                    assert [d["scores"][k] for k in ("positive", "negative")] == pytest.approx(w.tolist(), abs=1e-5)
            r = client.post("/v1/completions", json={"model": "head", "prompt": "the movie"})
            assert r.status_code == 400 and "is a text encoder: it classifies" in r.json()["error"]["message"]
    finally:
        engine.stop()
