"""CLIP context optimisation on a tiny random CLIP: CoOp (unified and class-specific) and CoCoOp against the text
rows built by hand, training, files, mixed batches, and bad input."""

import pytest
import torch
from conftest import WORDS
from test_vision import LABELS, stripes
from transformers import CLIPConfig, CLIPModel

from softprompt.backbones import CLIPBackbone
from softprompt.errors import SoftPromptError
from softprompt.files import load_prompt, save_prompt
from softprompt.joins.clip import uninstall_hooks
from softprompt.methods import CoCoOp, CoOp, load_method
from softprompt.model import MixedPromptedModel, PromptedModel
from softprompt.tasks.images import ImageTaskSpec
from softprompt.train.config import build_config
from softprompt.train.loop import fit

NAMES = ["cat", "dog", "movie"]  # words the tiny tokenizer knows (a name of two tokens: below)


def clip_tokenizer():
    """Words first, then the specials, end-of-text last: its id is the highest, as in CLIP's own vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*WORDS, "<unk>", "<pad>", "<s>", "</s>"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


TOK = clip_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32, bos_token_id=BOS,
                                      eos_token_id=EOS, pad_token_id=TOK.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=4), projection_dim=24)
    return CLIPBackbone(CLIPModel(cfg), clip_tokenizer(), name=f"tiny-clip-{seed}")


def by_hand(bb, ctx_rows, pixels):
    """CLIP on rows [SOS][ctx][name .][EOS] assembled outside the model: embeddings run by hand, features read at
    the end-of-text token, logits = scale * cos."""
    tm = bb.model.text_model
    tok = bb.tokenizer
    feats = []
    for k, name in enumerate(NAMES):
        tail = tok(f"{name}.", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[BOS] + [BOS] * ctx_rows.shape[-2] + tail + [EOS]])
        emb = tm.embeddings.token_embedding(ids)
        emb = torch.cat([emb[:, :1], ctx_rows[k][None], emb[:, 1 + ctx_rows.shape[-2]:]], 1)
        h = emb + tm.embeddings.position_embedding(torch.arange(ids.shape[1]))[None]
        causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for layer in tm.encoder.layers:
            h = layer(h, attention_mask=causal)
            h = h[0] if isinstance(h, tuple) else h
        pooled = tm.final_layer_norm(h)[0, -1]
        feats.append(torch.nn.functional.normalize(bb.model.text_projection(pooled), dim=-1))
    t = torch.stack(feats)
    f = torch.nn.functional.normalize(bb.model.visual_projection(bb.model.vision_model(pixel_values=pixels)
                                                                 .pooler_output), dim=-1)
    return bb.model.logit_scale.exp() * f @ t.T


@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_equals_the_rows_built_by_hand(class_specific):
    bb = tiny_clip()
    coop = CoOp.create(bb, num_virtual_tokens=3, init="random", class_specific=class_specific, init_labels=NAMES)
    assert coop.ctx.shape == ((3, 3, 32) if class_specific else (3, 32))
    x = torch.randn(2, 3, 16, 16)
    got = PromptedModel(bb, coop).classify(x)
    got.sum().backward()
    ctx = coop.ctx.detach().clone().requires_grad_(True)
    rows = ctx if class_specific else ctx[None].expand(3, -1, -1)
    want = by_hand(bb, rows, x)
    want.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(coop.ctx.grad, ctx.grad, rtol=1e-3, atol=1e-5)
    assert coop.ctx.grad.abs().sum() > 0
    uninstall_hooks(bb)
    assert not bb.token_embedding._forward_hooks


def test_context_starts_as_a_photo_of_a_when_it_has_that_many_tokens():
    bb = tiny_clip()
    coop = CoOp.create(bb, num_virtual_tokens=2, init_text="a movie", init_labels=NAMES)
    ids = bb.tokenizer("a movie", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(coop.ctx, bb.token_embedding.weight[torch.tensor(ids)])


def test_cocoop_starts_as_coop_and_shifts_the_context_per_image():
    bb = tiny_clip()
    co = CoCoOp.create(bb, num_virtual_tokens=3, init="random", init_labels=NAMES)
    plain = CoOp(co.ctx, NAMES, co.config.__class__(**{**co.config.__dict__, "conditional": False}))
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(PromptedModel(bb, co).classify(x), PromptedModel(bb, plain).classify(x))
    with torch.no_grad():
        co.meta[2].weight.normal_()
    got = PromptedModel(bb, co).classify(x)
    f = bb.features(x)
    shift = co.meta(f)  # (B, H)
    for b in range(3):
        want = by_hand(bb, (co.ctx + shift[b])[None].expand(3, -1, -1), x[b:b + 1])
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-4, atol=1e-4)


def test_files_mixed_batches_and_bad_input(tmp_path):
    bb = tiny_clip()
    a = CoOp.create(bb, num_virtual_tokens=3, init="random", init_labels=NAMES, seed=1)
    b = CoCoOp.create(bb, num_virtual_tokens=2, init="random", init_labels=NAMES[:2], seed=2)
    with torch.no_grad():
        b.meta[2].weight.normal_()
    pa = save_prompt(tmp_path / "a.safetensors", a, bb)
    pb = save_prompt(tmp_path / "b.safetensors", b, bb)
    la, lb = load_method(pa, bb), load_method(pb, bb)
    assert lb.class_names == tuple(NAMES[:2]) and lb.meta is not None and load_prompt(pb).metadata["conditional"]
    x = torch.randn(4, 3, 16, 16)
    mixed = MixedPromptedModel(bb, [la(), lb(), la(), lb()]).classify(x)
    for i, m in enumerate([a, b, a, b]):
        with torch.no_grad():
            torch.testing.assert_close(mixed[i], PromptedModel(bb, m).classify(x[i:i + 1])[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(SoftPromptError, match="fingerprint"):
        load_prompt(pa, backbone=tiny_clip(seed=1))
    with pytest.raises(SoftPromptError, match="coop puts context into CLIP's text encoder"):
        from test_vision import tiny_dinov2

        CoOp.create(tiny_dinov2(), init_labels=NAMES)


def test_training_coop_on_images(tmp_path):
    bb = tiny_clip()
    rename = dict(zip(LABELS, NAMES, strict=True))  # class names the tokenizer knows: the texts differ
    splits = {s: [{**r, "label": rename[r["label"]]} for r in rows]
              for s, rows in (("train", stripes(90)), ("validation", stripes(30, 1)), ("test", stripes(30, 2)))}
    task = ImageTaskSpec(name="stripes", labels=NAMES, image_size=16).to_dict()
    for name in ("coop", "cocoop"):
        cfg = build_config({"model": "tiny", "task": task, "out_dir": str(tmp_path / name),
                            # a context per class: on a random CLIP the class names alone do not align with images
                            "method": {"name": name, "num_virtual_tokens": 3, "class_specific": True},
                            "train": {"steps": 30, "batch_size": 15, "lr": 3e-2, "eval_every": 15,
                                      "precision": "float32"}})
        res = fit(cfg, backbone=bb, splits=splits, quiet=True)
        assert res.best["accuracy"] > 0.5, (name, res.best)  # chance: 1/3
        assert load_prompt(res.prompt_path).metadata["method"] == name


def test_class_names_that_read_the_same_are_refused_for_a_shared_context():
    bb = tiny_clip()
    coop = CoOp.create(bb, num_virtual_tokens=2, init_labels=["zebra", "okapi", "cat"])  # unknown words: <unk> x 2
    with pytest.raises(SoftPromptError, match="class names 'zebra' and 'okapi' give the same text"):
        PromptedModel(bb, coop).classify(torch.randn(1, 3, 16, 16))
    csc = CoOp.create(bb, num_virtual_tokens=2, class_specific=True, init_labels=["zebra", "okapi", "cat"])
    assert PromptedModel(bb, csc).classify(torch.randn(1, 3, 16, 16)).shape == (1, 3)  # a context per class
