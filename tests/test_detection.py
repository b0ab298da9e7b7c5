"""VPT on a ViT detector (a tiny random YOLOS): tokens into the detector equal to insertion by hand, mean average
precision on hand-made cases, and training on the synthetic shapes set (the class head trains with the tokens,
the box head stays the detector's own)."""

import pytest
import torch
from transformers import YolosConfig, YolosForObjectDetection

from softprompt.backbones.vision import DetectorBackbone
from softprompt.errors import SoftPromptError
from softprompt.methods import VPT
from softprompt.model import PromptedModel
from softprompt.tasks.detection import SHAPE_LABELS, DetectionTaskSpec, average_precision, shapes
from softprompt.train.config import build_config
from softprompt.train.loop import fit


def tiny_yolos(seed=0):
    torch.manual_seed(seed)
    cfg = YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      image_size=[32, 32], patch_size=8, num_detection_tokens=6, use_mid_position_embeddings=False,
                      num_labels=5)
    return DetectorBackbone(YolosForObjectDetection(cfg), name=f"tiny-yolos-{seed}")


@pytest.mark.parametrize("deep", [False, True])
def test_vpt_tokens_into_the_detector_equal_insertion_by_hand(deep):
    bb = tiny_yolos()
    vpt = VPT.create(bb, num_virtual_tokens=3, deep=deep, dropout=0.0, init_labels=SHAPE_LABELS)
    assert vpt.head_weight.shape == (4, 32)  # three classes and "no object"
    x = torch.randn(2, 3, 32, 32)
    logits, boxes = PromptedModel(bb, vpt).detect(x)
    vit = bb.model.vit
    h = vit.embeddings(x)
    h = torch.cat([h[:, :1], vpt.tokens[0].expand(2, -1, -1), h[:, 1:]], 1)
    for i, layer in enumerate(bb.layers):
        if i and deep:
            h = torch.cat([h[:, :1], vpt.tokens[i].expand(2, -1, -1), h[:, 4:]], 1)
        h = layer(h)
        h = h[0] if isinstance(h, tuple) else h
    det = vit.layernorm(h)[:, -6:]
    torch.testing.assert_close(logits, det @ vpt.head_weight.T + vpt.head_bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boxes, bb.model.bbox_predictor(det).sigmoid(), rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 6, 4) and boxes.shape == (2, 6, 4)


def test_mean_average_precision_on_hand_made_cases():
    gold = [(torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30.]]), torch.tensor([0, 1]))]
    perfect = [(gold[0][0], torch.tensor([0.9, 0.8]), torch.tensor([0, 1]))]
    assert average_precision(perfect, gold, 2)["map"] == 1.0
    # class 0 found, class 1's box misplaced: AP 1 and 0
    half = [(torch.tensor([[0, 0, 10, 10], [0, 20, 5, 25.]]), torch.tensor([0.9, 0.8]), torch.tensor([0, 1]))]
    assert average_precision(half, gold, 2)["ap_per_class"] == [1.0, 0.0]
    # a confident false positive before the true one: precision 1/2 at recall 1
    extra = [(torch.tensor([[40, 40, 50, 50], [0, 0, 10, 10.]]), torch.tensor([0.9, 0.8]), torch.tensor([0, 0]))]
    assert average_precision(extra, gold[:1] and [(gold[0][0][:1], gold[0][1][:1])], 1)["map"] == 0.5
    # a duplicate of a found box is a false positive, after it: AP stays 1
    dup = [(torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.]]), torch.tensor([0.9, 0.5]), torch.tensor([0, 0]))]
    assert average_precision(dup, [(gold[0][0][:1], gold[0][1][:1])], 1)["map"] == 1.0


def test_training_on_shapes_lowers_the_set_loss_and_the_box_head_stays(tmp_path):
    """On a random detector the frozen box head cannot place boxes (mAP stays near 0, as it should); the class head
    and the tokens learn which detection tokens hold which class: DETR's set loss falls."""
    bb = tiny_yolos()
    data = shapes(0, n=(240, 40, 40), size=32)
    task = DetectionTaskSpec(image_size=32).to_dict()
    box_head = {k: v.clone() for k, v in bb.model.bbox_predictor.state_dict().items()}
    cfg = build_config({"model": "tiny", "task": task, "out_dir": str(tmp_path / "det"),
                        "method": {"name": "vpt", "num_virtual_tokens": 4, "deep": True},
                        "train": {"steps": 1, "batch_size": 8, "lr": 1e-2, "eval_every": 1, "precision": "float32"}})
    before = fit(cfg, backbone=bb, splits=data, quiet=True).best
    cfg = build_config({**cfg.to_dict(), "out_dir": str(tmp_path / "det2"),
                        "train": {**cfg.to_dict()["train"], "steps": 40, "eval_every": 40}})
    after = fit(cfg, backbone=bb, splits=data, quiet=True)
    assert after.best["loss"] < 0.97 * before["loss"] and 0 <= after.best["map"] <= 1, (before, after.best)
    assert all(torch.equal(v, bb.model.bbox_predictor.state_dict()[k]) for k, v in box_head.items())
    with pytest.raises(SoftPromptError, match="needs a detector"):
        from test_vision import tiny_dinov2

        fit(build_config({**cfg.to_dict(), "out_dir": str(tmp_path / "x")}), backbone=tiny_dinov2(), splits=data,
            quiet=True)
