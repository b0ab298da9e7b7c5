"""Image prompts on tiny random vision models: VPT (shallow, deep) and pixel prompts against a reference computed
by hand, mixed batches, files, training and resume, the CLI on a folder of images, and bad input."""

import json
import threading

import numpy as np
import pytest
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from softprompt.backbones import ImageBackbone, ViTBackbone
from softprompt.errors import SoftPromptError
from softprompt.files import load_prompt, save_prompt
from softprompt.joins.vision import uninstall_hooks
from softprompt.methods import VPT, PixelPrompting, load_method
from softprompt.model import MixedPromptedModel, PromptedModel
from softprompt.tasks.images import ImageEncoder, ImageTaskSpec, image_folder, select_shots, to_tensor
from softprompt.train.config import build_config
from softprompt.train.loop import fit

LABELS = ["stripe0", "stripe1", "stripe2"]


def tiny_dinov2(layers=3, seed=0):
    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                       patch_size=4, image_size=16, layerscale_value=0.5)
    return ViTBackbone(Dinov2Model(cfg), name=f"tiny-dinov2-{layers}-{seed}")


def tiny_vit():
    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=4,
                    image_size=16)
    return ViTBackbone(ViTModel(cfg, add_pooling_layer=False), name="tiny-vit")


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.pool(torch.relu(self.conv(x))).flatten(1)  # (B, 32)


def stripes(n, seed=0, size=16):
    """Grey images with a bright band whose position is the class."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        c = i % 3
        img = rng.randint(0, 60, (size, size)).astype(np.uint8)
        img[c * 5:(c + 1) * 5, :] += 150
        rows.append({"image": img, "label": LABELS[c]})
    return rows


def reference_logits(bb: ViTBackbone, tokens: torch.Tensor, head_w, head_b, pixels: torch.Tensor) -> torch.Tensor:
    """VPT by hand, no hooks: [CLS][prompt][patches] after the embeddings; deep: the prompt slots overwritten before
    every later layer; the final norm's CLS through the head."""
    m = bb.model
    h = m.embeddings(pixels)
    P = tokens.shape[1]
    h = torch.cat([h[:, :1], tokens[0].expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
    for i, layer in enumerate(bb.layers):
        if i > 0 and tokens.shape[0] > 1:
            h = torch.cat([h[:, :1], tokens[i].expand(h.shape[0], -1, -1), h[:, 1 + P:]], dim=1)
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    return m.layernorm(h)[:, 0] @ head_w.T + head_b


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_equals_tokens_inserted_by_hand_with_the_same_gradient(deep):
    bb = tiny_dinov2()
    vpt = VPT.create(bb, num_virtual_tokens=5, deep=deep, dropout=0.0, init_labels=LABELS)
    assert vpt.tokens.shape == ((3 if deep else 1), 5, 32)
    bound = (6 / (3 * 4 * 4 + 32)) ** 0.5  # the paper's uniform Xavier
    assert vpt.tokens.abs().max() <= bound and vpt.tokens.abs().max() > 0.8 * bound
    model = PromptedModel(bb, vpt)
    x = torch.randn(4, 3, 16, 16)
    got = model.classify(x)
    got.square().sum().backward()
    g_tokens, g_head = vpt.tokens.grad.clone(), vpt.head_weight.grad.clone()
    t = vpt.tokens.detach().clone().requires_grad_(True)
    w = vpt.head_weight.detach().clone().requires_grad_(True)
    want = reference_logits(bb, t, w, vpt.head_bias.detach(), x)
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_tokens, t.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_head, w.grad, rtol=1e-4, atol=1e-6)
    assert g_tokens.abs().sum() > 0
    if deep:  # every layer's tokens get gradient (each set is read by its own layer)
        assert all(g_tokens[i].abs().sum() > 0 for i in range(3))


def test_the_model_itself_is_untouched_outside_a_prompted_forward():
    bb = tiny_dinov2()
    x = torch.randn(2, 3, 16, 16)
    before = bb.model(pixel_values=x).last_hidden_state
    model = PromptedModel(bb, VPT.create(bb, num_virtual_tokens=3, deep=True, init_labels=LABELS))
    model.classify(x)
    after = bb.model(pixel_values=x).last_hidden_state  # the hooks are installed, and do nothing here
    torch.testing.assert_close(before, after)
    assert after.shape[1] == 1 + 16  # no prompt tokens
    uninstall_hooks(bb)
    assert not bb.model.embeddings._forward_hooks and not any(layer._forward_pre_hooks
                                                               for layer in bb.layers)
    torch.testing.assert_close(model.classify(x).shape, torch.Size([2, 3]))  # re-installed on demand


def test_vpt_on_a_transformers_vit_and_a_linear_probe(tmp_path):
    bb = tiny_vit()
    vpt = VPT.create(bb, num_virtual_tokens=2, deep=True, dropout=0.0, init_labels=LABELS)
    x = torch.randn(2, 3, 16, 16)
    got = PromptedModel(bb, vpt).classify(x)
    m = bb.model
    h = m.embeddings(x)
    h = torch.cat([h[:, :1], vpt.tokens[0].expand(2, -1, -1), h[:, 1:]], 1)
    for i, layer in enumerate(bb.layers):
        if i:
            h = torch.cat([h[:, :1], vpt.tokens[i].expand(2, -1, -1), h[:, 3:]], 1)
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    want = m.layernorm(h)[:, 0] @ vpt.head_weight.T + vpt.head_bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    probe = VPT.create(bb, num_virtual_tokens=0, init_labels=LABELS)  # zero tokens: the head alone
    torch.testing.assert_close(PromptedModel(bb, probe).classify(x),
                               m(pixel_values=x).last_hidden_state[:, 0] @ probe.head_weight.T + probe.head_bias)
    from softprompt.files import load_prompt, save_prompt
    from softprompt.methods import from_file

    path = save_prompt(tmp_path / "probe.safetensors", probe, bb)  # a head-only file loads back (no tokens)
    again = from_file(load_prompt(path, backbone=bb))
    torch.testing.assert_close(PromptedModel(bb, again).classify(x), PromptedModel(bb, probe).classify(x))


def test_pixel_prompt_border_and_patch_on_a_cnn():
    bb = ImageBackbone(TinyCNN(), name="tiny-cnn", image_size=16)
    assert bb.hidden_size == 32
    for shape, on in (("border", 16 * 16 - 12 * 12), ("patch", 9)):
        pp = PixelPrompting.create(bb, shape=shape, width=2 if shape == "border" else 3, init_labels=LABELS)
        assert int(pp.mask.sum()) == on and float(pp.pixels.detach().abs().sum()) == 0.0  # starts as the image itself
        with torch.no_grad():
            pp.pixels.normal_()
        x = torch.randn(3, 3, 16, 16)
        got = PromptedModel(bb, pp).classify(x)
        want = bb.model(x + pp.pixels * pp.mask) @ pp.head_weight.T + pp.head_bias
        torch.testing.assert_close(got, want)
        got.sum().backward()
        assert float(pp.pixels.grad[:, ~pp.mask].abs().sum()) == 0.0 and float(pp.pixels.grad.abs().sum()) > 0


def test_mixed_batch_each_row_as_alone():
    """Rows with different VPT prompts (shallow, deep, another length, the bare head) and pixel prompts share
    forwards; each row gets what it gets alone, with its own task's number of classes."""
    bb = tiny_dinov2()
    methods = [VPT.create(bb, num_virtual_tokens=4, init_labels=LABELS, seed=1),
               VPT.create(bb, num_virtual_tokens=4, init_labels=LABELS, seed=2),
               VPT.create(bb, num_virtual_tokens=4, deep=True, init_labels=LABELS[:2], seed=3),
               VPT.create(bb, num_virtual_tokens=2, init_labels=LABELS, seed=4),
               VPT.create(bb, num_virtual_tokens=0, init_labels=LABELS, seed=5),
               PixelPrompting.create(bb, width=2, init_labels=LABELS, image_size=16, seed=6)]
    for m in methods:
        m.eval()
    with torch.no_grad():
        methods[-1].pixels.normal_()
    order = [0, 1, 2, 3, 4, 5, 1, 0]
    x = torch.randn(len(order), 3, 16, 16)
    mixed = MixedPromptedModel(bb, [methods[i]() for i in order]).classify(x)
    for row, i in enumerate(order):
        with torch.no_grad():
            alone = PromptedModel(bb, methods[i]).classify(x[row:row + 1])[0]
        assert mixed[row].shape == alone.shape
        torch.testing.assert_close(mixed[row], alone, rtol=1e-5, atol=1e-5)


def test_file_holds_tokens_head_preprocessing_and_a_weight_fingerprint(tmp_path):
    bb = tiny_dinov2()
    vpt = VPT.create(bb, num_virtual_tokens=3, deep=True, init_labels=LABELS).eval()
    path = save_prompt(tmp_path / "t.safetensors", vpt, bb, task=ImageTaskSpec(labels=LABELS).to_dict(),
                       extra={"preprocessing": bb.preprocessing})
    pf = load_prompt(path, backbone=bb)
    assert set(pf.tensors) == {"tokens", "head.weight", "head.bias"} and pf.metadata["depth"] == 3
    assert pf.metadata["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert pf.metadata["task"]["labels"] == LABELS and pf.metadata["backbone"]["kind"] == "vit"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(PromptedModel(bb, load_method(path, bb)).classify(x),
                               PromptedModel(bb, vpt).classify(x))
    other = tiny_dinov2(seed=1)  # the same shape, other weights: not the same backbone
    with pytest.raises(SoftPromptError, match="fingerprint"):
        load_prompt(path, backbone=other)
    shallower = tiny_dinov2(layers=2)
    with pytest.raises(SoftPromptError, match="VPT-deep prompt for 3 layers does not fit backbone 'tiny-dinov2-2-0' "
                                               "with 2 layers"):
        PromptedModel(shallower, load_method(path, shallower, check_backbone=False))


def test_image_prompts_and_text_models_refuse_each_other(tmp_path):
    from conftest import make_backbone

    from softprompt.methods import PromptTuning

    vit = tiny_dinov2()
    lm = make_backbone("llama")
    path = save_prompt(tmp_path / "v.safetensors", VPT.create(vit, init_labels=LABELS), vit)
    with pytest.raises(SoftPromptError) as e:
        load_prompt(path, backbone=lm)
    assert "cannot go into backbone" in str(e.value) and "'causal_lm' model" in str(e.value) and "vit" in str(e.value)
    text = save_prompt(tmp_path / "t.safetensors", PromptTuning.create(lm, num_virtual_tokens=2, init="random"), lm)
    with pytest.raises(SoftPromptError, match="cannot go into backbone 'tiny-dinov2-3-0', a 'vit' model"):
        load_prompt(text, backbone=vit)
    with pytest.raises(SoftPromptError, match="vpt puts tokens into a vision transformer"):
        VPT.create(lm, init_labels=LABELS)


def test_images_in_every_form_and_bad_ones(tmp_path, capsys):
    from PIL import Image

    import softprompt.tasks.images as images

    images._SAID.clear()  # said once per process: an earlier test may have said it

    grey = (np.arange(64).reshape(8, 8) * 3).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    rgba = Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA")
    for img in (grey, tmp_path / "g.png", str(tmp_path / "g.png"), (tmp_path / "g.png").read_bytes(),
                Image.open(tmp_path / "g.png"), rgba):
        t = to_tensor(img, 3)
        assert t.shape == (3, 8, 8) and t.dtype == torch.float32 and float(t.max()) <= 1.0
    torch.testing.assert_close(to_tensor(grey, 3)[0], torch.from_numpy(grey).float() / 255)
    assert "channel repeated" in capsys.readouterr().err
    with pytest.raises(SoftPromptError, match="not an image PIL can read"):
        to_tensor(b"not an image", 3)
    with pytest.raises(SoftPromptError, match="2 channels cannot go into a model that takes 3"):
        to_tensor(np.zeros((8, 8, 2), np.uint8), 3)
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "dog").mkdir()
    Image.fromarray(grey).save(tmp_path / "data" / "cat" / "1.png")
    with pytest.raises(SoftPromptError, match="class folder .*dog holds no images"):
        image_folder(tmp_path / "data")


def test_few_shot_selection_is_k_per_class_and_seeded():
    rows = [{**r, "id": i} for i, r in enumerate(stripes(60))]
    picked = select_shots(rows, 4, seed=0)
    assert len(picked) == 12 and {lab: sum(r["label"] == lab for r in picked) for lab in LABELS} == dict.fromkeys(LABELS, 4)
    ids = [r["id"] for r in picked]
    assert ids == [r["id"] for r in select_shots(rows, 4, seed=0)] != [r["id"] for r in select_shots(rows, 4, seed=1)]


def _cfg(tmp_path, name, method, steps=40):
    task = ImageTaskSpec(name="stripes", data="none", labels=LABELS, image_size=16).to_dict()
    return build_config({"model": "tiny", "task": task, "out_dir": str(tmp_path / name), "method": method,
                         "train": {"steps": steps, "batch_size": 12, "lr": 3e-2, "eval_every": 20,
                                   "precision": "float32", "save_every": 10}})


@pytest.mark.parametrize("method", [{"name": "vpt", "num_virtual_tokens": 4},
                                    {"name": "vpt", "num_virtual_tokens": 4, "deep": True},
                                    {"name": "pixel_prompt", "width": 2}])
def test_training_learns_and_resumes_exactly(tmp_path, method):
    bb = tiny_dinov2()
    splits = {"train": stripes(120), "validation": stripes(30, 1), "test": stripes(30, 2)}
    full = fit(_cfg(tmp_path, "full", method), backbone=bb, splits=splits, quiet=True)
    assert full.best["accuracy"] >= 0.6  # chance is 1/3 (shallow and pixel reach 0.9, deep ~0.67 in 40 steps)

    def crash(step, loss):
        if step == 25:
            raise KeyboardInterrupt  # killed between checkpoints (last one: step 20), dropout's RNG mid-stream

    cfg = _cfg(tmp_path, "half", method)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, backbone=bb, splits=splits, on_step=crash, quiet=True)
    resumed = fit(cfg, backbone=bb, splits=splits, resume=True, quiet=True)
    a, b = load_prompt(full.prompt_path).tensors, load_prompt(resumed.prompt_path).tensors
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    meta = load_prompt(full.prompt_path).metadata
    assert meta["preprocessing"]["image_size"] == 16 and meta["task"]["labels"] == LABELS
    n = meta["training"]["trainable_params"]
    assert n == sum(t.numel() for k, t in a.items() if k != "mask")


def test_head_init_probe_starts_the_head_as_the_linear_probe_of_the_prompted_model(tmp_path):
    from softprompt.train.loop import _setup
    from softprompt.train.probe import fit_probe

    bb = tiny_dinov2()
    splits = {"train": stripes(24), "validation": stripes(12, 1), "test": stripes(12, 2)}
    method = {"name": "vpt", "num_virtual_tokens": 3, "deep": True}
    run = _setup(_cfg(tmp_path, "probe", method), False, False, bb, splits, None, True)  # head_init auto: probe
    vpt = run.trainable.method
    enc = run.enc

    def by_hand(rows):  # the prompted model's features, computed without hooks, through an identity head
        eye = torch.eye(bb.hidden_size)
        return reference_logits(bb, vpt.tokens.detach(), eye, torch.zeros(bb.hidden_size),
                                enc.batch(rows)["pixel_values"]).detach()

    y = lambda rows: torch.tensor([enc.label_index(r) for r in rows])  # noqa: E731
    head, mean, std, _ = fit_probe(by_hand(splits["train"]), y(splits["train"]), by_hand(splits["validation"]),
                                   y(splits["validation"]), LABELS)
    test = enc.batch(splits["test"])["pixel_values"]
    want = head((by_hand(splits["test"]) - mean) / std)
    with torch.no_grad():
        got = run.model.eval().classify(test)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # the probe, folded onto raw features
    assert (got.argmax(-1) == y(splits["test"])).float().mean() >= 0.9  # it already classifies the stripes

    random_start = _setup(build_config({**_cfg(tmp_path, "random", method).to_dict(), "train": {
        **_cfg(tmp_path, "random", method).to_dict()["train"], "head_init": "random"}}), False, False, bb, splits,
        None, True).trainable.method
    fresh = VPT.create(bb, num_virtual_tokens=3, deep=True, init_labels=LABELS, seed=0)
    assert torch.equal(random_start.head_weight, fresh.head_weight)  # random: nn.Linear's seeded start

    cnn = ImageBackbone(TinyCNN(), name="tiny-cnn", image_size=16)  # auto on a CNN: random (measured better there)
    pixel = {"name": "pixel_prompt", "width": 2}
    starts = {init: _setup(build_config({**_cfg(tmp_path, f"cnn_{init}", pixel).to_dict(), "train": {
        **_cfg(tmp_path, f"cnn_{init}", pixel).to_dict()["train"], "head_init": init}}), False, False, cnn, splits,
        None, True).trainable.method.head_weight for init in ("auto", "probe")}
    assert torch.equal(starts["auto"], PixelPrompting.create(cnn, width=2, init_labels=LABELS, seed=0).head_weight)
    assert not torch.equal(starts["auto"], starts["probe"])
    with pytest.raises(SoftPromptError, match="head_init must be auto, probe or random"):
        build_config({"model": "tiny", "task": {"builtin": "sst2"}, "train": {"head_init": "linear"}})


def test_train_and_eval_through_the_cli_on_a_folder_of_images(tmp_path, capsys):
    from PIL import Image

    from softprompt.cli import main

    bb = tiny_dinov2()
    bb.model.save_pretrained(tmp_path / "model")
    for split, n, seed in (("train", 60, 0), ("test", 30, 1)):
        for i, r in enumerate(stripes(n, seed)):
            folder = tmp_path / split / r["label"]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(r["image"]).save(folder / f"{i}.png")
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": str(tmp_path / "model"), "out_dir": str(tmp_path / "run"),
        "task": {"name": "stripes", "modality": "image", "image_size": 16,
                 "data": {"train": str(tmp_path / "train"), "test": str(tmp_path / "test")}},
        "method": {"name": "vpt", "num_virtual_tokens": 4},
        "train": {"steps": 30, "batch_size": 12, "lr": 3e-2, "eval_every": 15, "precision": "float32"}}))
    assert main(["train", str(tmp_path / "run.yaml")]) == 0
    assert "saved" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "run" / "prompt.safetensors"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["n"] == 30 and m["accuracy"] > 0.6 and m["confusion"]["labels"] == LABELS
    assert main(["eval", str(tmp_path / "run" / "prompt.safetensors"), "--png", str(tmp_path / "conf.png")]) == 0
    assert Image.open(tmp_path / "conf.png").size[0] > 100 and "accuracy" in capsys.readouterr().out
    files = sorted(str(f) for f in (tmp_path / "test").rglob("*.png"))[:4]
    assert main(["predict", str(tmp_path / "run" / "prompt.safetensors"), *files, "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in pred] == files and all(set(r["scores"]) == set(LABELS) for r in pred)
    with torch.no_grad():  # the same as the model on the same pixels
        enc = ImageEncoder(ImageTaskSpec(labels=LABELS, image_size=16), bb.preprocessing)
        model = PromptedModel(bb, load_method(tmp_path / "run" / "prompt.safetensors", bb))
        want = model.classify(enc.pixels(files)).log_softmax(-1)
    assert [r["label"] for r in pred] == [LABELS[int(i)] for i in want.argmax(-1)]
    assert main(["predict", str(tmp_path / "run" / "prompt.safetensors"), str(tmp_path / "run.yaml")]) == 2
    assert "is not an image PIL can read" in capsys.readouterr().err


def test_inspect_draws_a_pixel_prompt(tmp_path, capsys):
    from PIL import Image

    from softprompt.cli import main

    bb = ImageBackbone(TinyCNN(), name="tiny-cnn", image_size=16)
    pp = PixelPrompting.create(bb, width=3, init_labels=LABELS)
    with torch.no_grad():
        pp.pixels.uniform_(-1, 1)
    save_prompt(tmp_path / "p.safetensors", pp, bb, extra={"preprocessing": bb.preprocessing})
    assert main(["inspect", str(tmp_path / "p.safetensors"), "--png", str(tmp_path / "p.png")]) == 0
    img = np.asarray(Image.open(tmp_path / "p.png"))
    assert img.shape == (64, 64, 3)
    inner = img[16:48, 16:48]  # inside the 3 px border (x4): the checkerboard, two greys only
    assert set(np.unique(inner)) <= {178, 217} and len(np.unique(img[:12].reshape(-1, 3), axis=0)) > 20
    vpt_file = save_prompt(tmp_path / "v.safetensors", VPT.create(tiny_dinov2(), init_labels=LABELS), tiny_dinov2())
    assert main(["inspect", str(vpt_file), "--png", str(tmp_path / "v.png")]) == 2
    assert "has no pixels to draw" in capsys.readouterr().err


def test_encoder_batches_are_normalised_pixels():
    task = ImageTaskSpec(labels=LABELS, image_size=8)
    enc = ImageEncoder(task, {"image_size": 224, "mean": [0.5] * 3, "std": [0.25] * 3})
    batch = enc.batch(stripes(3, size=16))
    assert batch["pixel_values"].shape == (3, 3, 8, 8) and batch["y"].tolist() == [0, 1, 2]
    flat = np.full((16, 16), 255, np.uint8)
    x = enc.pixels([flat])
    torch.testing.assert_close(x, torch.full((1, 3, 8, 8), 2.0))  # (1 - 0.5) / 0.25


def test_compare_image_rows_side_by_side(tmp_path):
    """Every image row in one table: a linear probe on frozen features, VPT-shallow, VPT-deep, a pixel prompt, LoRA
    on the ViT and full fine-tuning (each with a head that trains with it), learning rates chosen on validation."""
    from softprompt.compare import compare, markdown_table

    bb = tiny_dinov2()
    splits = {"train": stripes(120), "validation": stripes(30, 1), "test": stripes(60, 2)}
    cfg = _cfg(tmp_path, "cmp", {"name": "vpt", "num_virtual_tokens": 4}, steps=30)
    rows = ("linear_probe", "vpt", "vpt_deep", "pixel_prompt", "lora", "fine_tune")
    grids = {"vpt": (1e-3, 3e-2), "vpt_deep": (1e-3, 3e-2), "pixel_prompt": (1e-3, 3e-2), "lora": (1e-3, 1e-2),
             "fine_tune": (1e-4, 1e-3)}
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    result = compare(cfg, baselines=rows, out=str(tmp_path / "cmp"), backbone=bb, splits=splits,
                     say=lambda *a: None, search_steps=6, lr_grids=grids)
    by = {r["key"]: r for r in result["rows"]}
    assert list(by) == list(rows) and result["test_rows"] == 60
    assert all(by[k]["accuracy"] > 0.5 for k in rows), {k: by[k]["accuracy"] for k in rows}  # chance: 1/3
    assert by["vpt_deep"]["trainable_params"] == 3 * 4 * 32 + 3 * 32 + 3 > by["vpt"]["trainable_params"]
    assert by["fine_tune"]["trainable_params"] > sum(p.numel() for p in bb.model.parameters())  # + the head
    assert by["lora"]["shares_batch"].startswith("no") and by["vpt"]["shares_batch"] == "yes"
    assert by["vpt_deep"]["method"] == "VPT-deep (4 tokens per layer)"
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())  # the shared ViT untouched
    assert "| pixel prompt (border) |" in markdown_table(result)
    with pytest.raises(SoftPromptError, match="need a text task"):
        compare(cfg, baselines=("zero_shot", "vpt"), backbone=bb, splits=splits, say=lambda *a: None)


def test_serving_image_tasks_mixed_in_one_batch_over_http(tmp_path):
    """POST /v1/classify with base64 images (JSON) and with uploads (multipart): each image's scores are its task's
    log-probabilities computed alone; three image tasks (VPT-shallow, VPT-deep, pixel prompt) share a batch; bad
    images and text generation on an image model get a 400 with one line."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine

    bb = tiny_dinov2()
    folder = tmp_path / "prompts"
    folder.mkdir()
    task = ImageTaskSpec(name="stripes", labels=LABELS, image_size=16).to_dict()
    methods = {"shallow": VPT.create(bb, num_virtual_tokens=3, init_labels=LABELS, seed=1),
               "deep": VPT.create(bb, num_virtual_tokens=3, deep=True, init_labels=LABELS, seed=2),
               "pixels": PixelPrompting.create(bb, width=2, image_size=16, init_labels=LABELS, seed=3)}
    with torch.no_grad():
        methods["pixels"].pixels.normal_()
    for name, m in methods.items():
        save_prompt(folder / f"{name}.safetensors", m.eval(), bb, task=task, extra={"preprocessing": {
            "image_size": 16, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}})
    images = [r["image"] for r in stripes(6)]
    pngs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    enc = ImageEncoder(ImageTaskSpec(labels=LABELS, image_size=16), {"image_size": 16, "mean": [0.5] * 3,
                                                                      "std": [0.25] * 3})
    engine = Engine(PromptBank(bb, folder), max_batch=8, window_ms=200).start()
    try:
        with TestClient(create_app(engine)) as client:
            results: dict = {}

            def ask(name, i):
                results[(name, i)] = client.post("/v1/classify", json={
                    "model": name, "input": {"image": base64.b64encode(pngs[i]).decode()}})

            threads = [threading.Thread(target=ask, args=(name, i)) for i in range(2) for name in methods]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert engine.metrics.snapshot()["batches"] < len(threads)  # the tasks shared batches
            for (name, i), r in results.items():
                assert r.status_code == 200, r.text
                got = r.json()["data"][0]
                with torch.no_grad():
                    want = PromptedModel(bb, methods[name]).classify(enc.pixels([images[i]]))[0].log_softmax(-1)
                assert got["label"] == LABELS[int(want.argmax())]
                for k, label in enumerate(LABELS):
                    assert abs(got["scores"][label] - float(want[k])) < 1e-4
            listed = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
            assert listed["deep"]["kind"] == "classification" and listed["deep"]["labels"] == LABELS
            assert listed["deep"]["modality"] == "image"
            r = client.post("/v1/classify", data={"model": "deep"},
                            files=[("image", ("a.png", pngs[0], "image/png")), ("image", ("b.png", pngs[1], "image/png"))])
            assert r.status_code == 200, r.text
            assert [d["label"] for d in r.json()["data"]] == [results[("deep", i)].json()["data"][0]["label"]
                                                              for i in range(2)]
            bad = client.post("/v1/classify", json={"model": "deep", "input": {"image": base64.b64encode(b"no").decode()}})
            assert bad.status_code == 400 and "not an image PIL can read" in bad.json()["error"]["message"]
            text = client.post("/v1/classify", json={"model": "deep", "input": "hello"})
            assert text.status_code == 400 and "classifies images" in text.json()["error"]["message"]
            gen = client.post("/v1/completions", json={"model": "deep", "prompt": "hi"})
            assert gen.status_code == 400 and "image model" in gen.json()["error"]["message"]
    finally:
        engine.stop()
