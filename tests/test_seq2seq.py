"""Encoder-decoders (T5, BART) as backbones, on tiny random models: the prompt in front of the encoder input
against the model's own forward, padding on either side, label words and targets through the decoder, generation,
training and prompt files."""

from __future__ import annotations

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone, make_tokenizer, synthetic_splits

from softprompt import SoftPromptError
from softprompt.backbones import Seq2SeqBackbone, load_backbone
from softprompt.files import save_prompt
from softprompt.generation import generate
from softprompt.methods import PromptTuning, load_method
from softprompt.model import PromptedModel
from softprompt.tasks.spec import TaskSpec, task_encoder


def make_seq2seq(arch: str = "t5", seed: int = 0, init: float | None = None) -> Seq2SeqBackbone:
    from transformers import AutoModelForSeq2SeqLM, BartConfig, T5Config

    torch.manual_seed(seed)
    if arch == "t5":
        cfg = T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4, pad_token_id=0,
                       eos_token_id=2, decoder_start_token_id=0, dropout_rate=0.1,
                       initializer_factor=init or 1.0)
    else:
        cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                         scale_embedding=True, init_std=init or 0.02)
    model = AutoModelForSeq2SeqLM.from_config(cfg)
    model.config._name_or_path = f"tiny-{arch}-{seed}"
    return Seq2SeqBackbone(model, make_tokenizer(template="$A </s>"))


def batch(bb, texts, side="left"):
    bb.tokenizer.padding_side = side
    b = bb.tokenizer(texts, padding=True, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


ARCHES = ["t5", "bart"]


@pytest.mark.parametrize("arch", ARCHES)
def test_the_prompt_goes_before_the_encoder_input_and_rows_are_alone_in_a_padded_batch(arch):
    bb = make_seq2seq(arch)
    method = PromptTuning.create(bb, num_virtual_tokens=3, init="random")
    model = PromptedModel(bb, method)
    texts = ["the movie was great", "bad"]
    dec = torch.tensor([[bb.decoder_start_token_id, 5, 6]] * 2)
    for side in ("left", "right"):
        got = model(*batch(bb, texts, side), decoder_input_ids=dec).logits
        for i, text in enumerate(texts):
            ids, _ = batch(bb, [text])
            x = torch.cat([method.weight[None], bb.embed(ids)], 1)  # BART: its embedding module scales them
            ref = bb.model(inputs_embeds=x, decoder_input_ids=dec[:1]).logits
            assert torch.allclose(got[i], ref[0], atol=1e-5), (side, i)


@pytest.mark.parametrize("arch", ARCHES)
def test_label_words_are_scored_as_decoder_targets(arch):
    bb = make_seq2seq(arch)
    method = PromptTuning.create(bb, num_virtual_tokens=2, init="random")
    model = PromptedModel(bb, method)
    task = TaskSpec(name="t", data="x", template="{text} sentiment :",
                    verbalizer={"positive": ["yes", "very good"], "negative": "no"})
    enc = task_encoder(task, bb, 2)
    rows = [{"text": "the movie was fun", "label": "positive"}, {"text": "boring", "label": "negative"}]
    scores = enc.label_scores(model, enc.batch(rows))
    start = bb.decoder_start_token_id
    tok = bb.tokenizer
    for i, row in enumerate(rows):
        ids = torch.tensor([tok(f"{row['text']} sentiment :")["input_ids"]])
        x = torch.cat([method.weight[None], bb.embed(ids)], 1)

        def word(w, x=x):
            t = tok(w, add_special_tokens=False)["input_ids"]
            logp = bb.model(inputs_embeds=x, decoder_input_ids=torch.tensor([[start] + t[:-1]])).logits[0]
            return sum(logp[j].log_softmax(-1)[t[j]] for j in range(len(t)))

        want = torch.stack([torch.logsumexp(torch.stack([word("yes"), word("very good")]), 0), word("no")])
        assert torch.allclose(scores[i], want, atol=1e-5)
    single = TaskSpec(name="t", data="x", template="{text}", verbalizer={"positive": "yes", "negative": "no"})
    enc1 = task_encoder(single, bb, 2)
    s1 = enc1.label_scores(model, enc1.batch(rows))
    ids = torch.tensor([tok(rows[0]["text"])["input_ids"]])
    x = torch.cat([method.weight[None], bb.embed(ids)], 1)
    logp = bb.model(inputs_embeds=x, decoder_input_ids=torch.tensor([[start]])).logits[0, 0].log_softmax(-1)
    assert torch.allclose(s1[0], logp[[tok.convert_tokens_to_ids(w) for w in ("yes", "no")]], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHES)
def test_the_target_loss_is_the_decoders_cross_entropy_on_the_target(arch):
    bb = make_seq2seq(arch)
    method = PromptTuning.create(bb, num_virtual_tokens=2, init="random")
    task = TaskSpec(name="g", data="x", template="question : {q} answer :", target_field="a")
    enc = task_encoder(task, bb, 2)
    rows = [{"q": "what is the capital of france ?", "a": "paris"}, {"q": "who ?", "a": "the dog and the cat"}]
    b = enc.batch(rows)
    got = PromptedModel(bb, method).target_loss(b["input_ids"], b["attention_mask"], b["labels"])
    want = 0.0
    for row in rows:
        ids = torch.tensor([bb.tokenizer(f"question : {row['q']} answer :")["input_ids"]])
        target = torch.tensor([bb.tokenizer(row["a"])["input_ids"]])  # the answer and </s>
        x = torch.cat([method.weight[None], bb.embed(ids)], 1)
        want = want + bb.model(inputs_embeds=x, labels=target).loss * target.shape[1]
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHES)
def test_generation_equals_greedy_decoding_by_hand(arch):
    bb = make_seq2seq(arch, init=5.0 if arch == "t5" else 0.5)  # weights large enough to say something: at the
    method = PromptTuning.create(bb, num_virtual_tokens=3, init="random")  # defaults T5 says only <pad>, BART </s>
    texts = ["the movie was great", "hello world"]
    out = generate(bb, method, texts, max_new_tokens=6)
    assert all(len(t) >= 3 and set(t) != {bb.pad_token_id} for t in out.tokens), out.tokens
    for text, toks in zip(texts, out.tokens, strict=True):
        ids = torch.tensor([bb.tokenizer(text)["input_ids"]])
        x = torch.cat([method.weight[None], bb.embed(ids)], 1)
        dec = [bb.decoder_start_token_id]
        forced_eos = bb.model.generation_config.forced_eos_token_id is not None  # BART: EOS forced as the 6th
        with torch.no_grad():
            for step in range(6):  # the full forward each step: no cache
                if step == 5 and forced_eos:
                    break
                nxt = int(bb.model(inputs_embeds=x, decoder_input_ids=torch.tensor([dec])).logits[0, -1].argmax())
                if nxt in bb.eos_token_ids:
                    break
                dec.append(nxt)
        assert toks == dec[1:], (toks, dec)
        assert out.texts[texts.index(text)] == bb.tokenizer.decode(dec[1:], skip_special_tokens=True)


def test_seeded_sampling_repeats_and_leaves_the_process_random_state_alone():
    bb = make_seq2seq("t5", init=5.0)
    method = PromptTuning.create(bb, num_virtual_tokens=3, init="random")

    def sample(seed):
        return generate(bb, method, ["the movie was great"], max_new_tokens=8, do_sample=True, seed=seed).tokens

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a = sample(7)
    assert torch.equal(torch.rand(3), want)  # the global generator is where it was
    assert sample(7) == a and any(sample(s) != a for s in (8, 9, 10))


def test_a_tiny_t5_learns_the_synthetic_task_and_its_prompt_file_is_checked(tmp_path):
    from softprompt.train.config import build_config
    from softprompt.train.loop import fit

    bb = make_seq2seq("t5")
    cfg = build_config({"task": SYNTH_TASK, "out_dir": str(tmp_path / "run"), "seed": 0,
                        "method": {"num_virtual_tokens": 4, "init": "random"},
                        "train": {"steps": 60, "batch_size": 16, "lr": 0.1, "eval_every": 60, "precision": "float32"}})
    res = fit(cfg, backbone=bb, splits=synthetic_splits(), quiet=True)
    assert res.best["accuracy"] >= 0.7, res.best  # chance 0.5
    assert load_method(res.prompt_path, bb).num_virtual_tokens == 4
    with pytest.raises(SoftPromptError, match=r"'seq2seq' model.*'causal_lm' model") as e:
        load_method(res.prompt_path, make_backbone("llama"))
    assert "\n" not in str(e.value)


def test_compare_on_a_tiny_t5_gives_every_row_it_can(tmp_path):
    """compare on an encoder-decoder: zero-shot, the prompt methods whose kind it joins, LoRA and full fine-tuning
    on the same rows; a row it has no join for is refused in one line."""
    from softprompt.compare import compare
    from softprompt.train.config import build_config

    bb = make_seq2seq("t5")
    cfg = build_config({"task": SYNTH_TASK, "out_dir": str(tmp_path / "cmp"), "seed": 0,
                        "method": {"num_virtual_tokens": 4, "init": "random"},
                        "train": {"steps": 60, "batch_size": 16, "lr": 0.1, "eval_every": 60, "precision": "float32",
                                  "finetune_lr": 1e-3}})
    rows = ("zero_shot", "prompt_tuning", "residual", "p_tuning", "lora", "fine_tune")
    result = compare(cfg, baselines=rows, backbone=bb, splits=synthetic_splits(), out=str(tmp_path / "cmp"),
                     say=lambda *a: None, search_steps=0)
    by = {r["key"]: r for r in result["rows"]}
    assert list(by) == list(rows)
    assert by["prompt_tuning"]["accuracy"] >= 0.7 and by["prompt_tuning"]["trainable_params"] == 4 * 32
    assert by["fine_tune"]["trainable_params"] > by["lora"]["trainable_params"] > 0
    assert all(0 <= r["accuracy"] <= 1 and r["n"] == len(synthetic_splits()["test"]) for r in by.values())


def test_a_seq2seq_folder_loads_as_an_encoder_decoder(tmp_path):
    bb = make_seq2seq("bart")
    bb.model.save_pretrained(tmp_path / "m")
    bb.tokenizer.save_pretrained(tmp_path / "m")
    again = load_backbone(str(tmp_path / "m"))
    assert isinstance(again, Seq2SeqBackbone) and again.max_positions == 64 and again.decoder_start_token_id == 2
    assert again.fingerprint_id() == bb.fingerprint_id()
    path = save_prompt(tmp_path / "p.safetensors", PromptTuning.create(bb, num_virtual_tokens=2), bb)
    assert load_method(path, again).num_virtual_tokens == 2


def test_peft_seq2seq_folders_both_ways(tmp_path):
    """Our T5 prompt exported (SEQ_2_SEQ_LM, the prompt on the encoder input) gives PEFT's forward and generate
    our logits and tokens; a folder PEFT makes itself (two sets: encoder and decoder) imports as the encoder set,
    which is what PEFT's generate uses: the same tokens."""
    from peft import PeftModel, PromptTuningConfig, TaskType, get_peft_model

    from softprompt.files import export_peft, import_peft
    from softprompt.methods import from_file

    bb = make_seq2seq("t5")
    method = PromptTuning.create(bb, num_virtual_tokens=3, init="random")
    path = save_prompt(tmp_path / "p.safetensors", method, bb)
    from softprompt.files import read_prompt

    folder = export_peft(read_prompt(path), tmp_path / "peft", bb)
    peft = PeftModel.from_pretrained(make_seq2seq("t5").model, str(folder)).eval()
    ids, mask = batch(bb, ["the movie was great"])
    dec = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        theirs = peft(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        ours = PromptedModel(bb, method)(ids, mask, decoder_input_ids=dec).logits
        assert torch.allclose(theirs, ours, atol=1e-5)
        gen = peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert generate(bb, method, ["the movie was great"], max_new_tokens=5).tokens[0] == \
        [t for t in gen[0, 1:].tolist()][:5]

    base = make_seq2seq("t5", seed=0).model
    made = get_peft_model(base, PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=4))
    with torch.no_grad():
        made.prompt_encoder["default"].embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(3))
    made.save_pretrained(str(tmp_path / "made"))
    pf = import_peft(tmp_path / "made")
    assert pf.tensors["prompt"].shape == (4, 32) and pf.metadata["backbone"]["kind"] == "seq2seq"
    imported = from_file(pf)
    with torch.no_grad():
        gen = made.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert generate(bb, imported, ["the movie was great"], max_new_tokens=5).tokens[0] == gen[0, 1:].tolist()[:5]
    from softprompt.files import check_prompt

    with pytest.raises(SoftPromptError, match="'seq2seq' model"):
        check_prompt(pf, make_backbone("llama"))


def test_serving_an_encoder_decoder_completes_and_classifies_as_offline(tmp_path):
    from fastapi.testclient import TestClient

    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine

    bb = make_seq2seq("t5", init=5.0)  # weights large enough that greedy decoding says something
    folder = tmp_path / "prompts"
    folder.mkdir()
    gen = PromptTuning.create(bb, num_virtual_tokens=3, init="random", seed=1)
    cls = PromptTuning.create(bb, num_virtual_tokens=2, init="random", seed=2)
    save_prompt(folder / "gen.safetensors", gen, bb)
    save_prompt(folder / "cls.safetensors", cls, bb, task=SYNTH_TASK)
    engine = Engine(PromptBank(bb, folder), max_batch=8, window_ms=30).start()
    try:
        with TestClient(create_app(engine)) as client:
            r = client.post("/v1/completions", json={"model": "gen", "prompt": "the movie was", "max_tokens": 5,
                                                          "temperature": 0})
            assert r.status_code == 200, r.text
            want = generate(bb, gen, ["the movie was"], max_new_tokens=5)
            assert want.texts[0] and r.json()["choices"][0]["text"] == want.texts[0]
            assert r.json()["choices"][0]["finish_reason"] == want.stats["finish_reasons"][0]
            texts = ["the movie was", "hello world", "a good film"]  # three greedy requests: one generate call
            r = client.post("/v1/completions", json={"model": "gen", "prompt": texts, "max_tokens": 5,
                                                      "temperature": 0})
            assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == \
                [generate(bb, gen, [t], max_new_tokens=5).texts[0] for t in texts]
            r = client.post("/v1/classify", json={"model": "cls", "input": ["the movie was great", "bad"]})
            assert r.status_code == 200, r.text
            enc = task_encoder(TaskSpec(**SYNTH_TASK), bb, 2)
            rows = [{"text": t, "label": "positive"} for t in ("the movie was great", "bad")]
            with torch.no_grad():
                scores = enc.label_scores(PromptedModel(bb, cls), enc.batch(rows))
            for d, s in zip(r.json()["data"], scores, strict=True):
                assert [d["scores"][k] for k in ("positive", "negative")] == pytest.approx(s.tolist(), abs=1e-5)
    finally:
        engine.stop()
