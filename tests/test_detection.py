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
    model = YolosForObjectDetection(cfg)
    with torch.no_grad():  # transformers starts these at zero: every detection token would say the same
        for p in (model.vit.embeddings.cls_token, model.vit.embeddings.detection_tokens,
                  model.vit.embeddings.position_embeddings):
            p.normal_(0.0, 0.5)
    return DetectorBackbone(model, name=f"tiny-yolos-{seed}")


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


def _png(image) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_served_detection_tasks_share_a_batch_and_each_equals_its_task_alone(tmp_path):
    """Two detection tasks (VPT-shallow, VPT-deep with another class list) and a bare head on one detector, asked
    at once over HTTP: the tasks share forwards, and each image's objects (labels, scores, boxes in the image's own
    pixels) equal its task's model alone."""
    import base64
    import threading

    from fastapi.testclient import TestClient

    from softprompt.files import save_prompt
    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine
    from softprompt.tasks.detection import DetectionEncoder

    bb = tiny_yolos()
    pre = {"image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    tasks = {"shallow": (SHAPE_LABELS, dict(num_virtual_tokens=3)),
             "deep": (["square", "other"], dict(num_virtual_tokens=3, deep=True)),
             "head": (SHAPE_LABELS, dict(num_virtual_tokens=0))}
    folder = tmp_path / "prompts"
    folder.mkdir()
    methods, encoders = {}, {}
    for i, (name, (labels, args)) in enumerate(tasks.items()):
        torch.manual_seed(i)
        m = VPT.create(bb, dropout=0.0, init_labels=labels, seed=i, **args).eval()
        spec = DetectionTaskSpec(labels=list(labels), image_size=32)
        save_prompt(folder / f"{name}.safetensors", m, bb, task=spec.to_dict(), extra={"preprocessing": pre})
        methods[name], encoders[name] = m, DetectionEncoder(spec, pre)
    images = [r["image"] for r in shapes(3, n=(0, 0, 4), size=48)["test"]]  # 48 px: boxes scale back from 32
    engine = Engine(PromptBank(bb, folder), max_batch=8, window_ms=200).start()
    try:
        with TestClient(create_app(engine)) as client:
            results: dict = {}

            def ask(name, i):
                results[(name, i)] = client.post("/v1/detect", json={
                    "model": name, "threshold": 0.0, "input": {"image": base64.b64encode(_png(images[i])).decode()}})

            threads = [threading.Thread(target=ask, args=(name, i)) for i in range(2) for name in tasks]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert engine.metrics.snapshot()["batches"] < len(threads)  # the tasks shared batches
            for (name, i), r in results.items():
                assert r.status_code == 200, r.text
                got = r.json()["data"][0]["objects"]
                enc = encoders[name]
                with torch.no_grad():
                    logits, boxes = PromptedModel(bb, methods[name]).detect(enc.read(_png(images[i]))[0])
                want = enc.objects(logits[0], boxes[0], 48, 48, threshold=0.0)
                assert len(got) == bb.num_detection_tokens == len(want)
                assert [o["label"] for o in got] == [o["label"] for o in want]
                assert all(o["label"] in tasks[name][0] for o in got)
                for a, b in zip(got, want, strict=True):
                    assert abs(a["score"] - b["score"]) < 1e-3
                    assert max(abs(x - y) for x, y in zip(a["box"], b["box"], strict=True)) < 0.2
            listed = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
            assert listed["deep"]["kind"] == "detection" and listed["deep"]["labels"] == ["square", "other"]
            high = client.post("/v1/detect", data={"model": "deep", "threshold": "0.99"},
                               files=[("image", ("a.png", _png(images[0]), "image/png"))])
            assert high.status_code == 200, high.text
            assert all(o["score"] >= 0.99 for o in high.json()["data"][0]["objects"])
            bad = client.post("/v1/detect", json={"model": "deep", "threshold": 2, "input": {"image": "eA=="}})
            assert bad.status_code == 400 and bad.json()["error"]["param"] in ("threshold", "body.threshold")
            wrong = client.post("/v1/classify", json={"model": "deep", "input": {"image": "eA=="}})
            assert wrong.status_code == 400 and "/v1/detect" in wrong.json()["error"]["message"]
            text = client.post("/v1/detect", json={"model": "deep", "input": {"text": "hello"}})
            assert text.status_code == 400 and "detects objects in images" in text.json()["error"]["message"]
    finally:
        engine.stop()


def test_compare_detection_rows_side_by_side(tmp_path):
    """compare on a detection task: the class head alone, VPT-shallow, VPT-deep, LoRA and full fine-tuning, each
    trained by DETR's set loss with its lr chosen on validation mAP, scored by mAP@0.5 on the same test images; the
    shared detector untouched; rows that do not apply to detection refused in one line."""
    from softprompt.compare import compare, markdown_table

    bb = tiny_yolos()
    data = shapes(0, n=(160, 24, 24), size=32)
    cfg = build_config({"model": "tiny", "task": DetectionTaskSpec(image_size=32).to_dict(),
                        "out_dir": str(tmp_path / "cmp"), "method": {"name": "vpt", "num_virtual_tokens": 3},
                        "train": {"steps": 24, "batch_size": 8, "lr": 1e-2, "eval_every": 12,
                                  "precision": "float32"}})
    rows = ("linear_probe", "vpt", "vpt_deep", "lora", "fine_tune")
    grids = {"linear_probe": (1e-2, 3e-2), "vpt": (1e-2, 3e-2), "vpt_deep": (1e-2, 3e-2), "lora": (1e-3, 1e-2),
             "fine_tune": (1e-4, 1e-3)}
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    result = compare(cfg, baselines=rows, out=str(tmp_path / "cmp"), backbone=bb, splits=data, say=lambda *a: None,
                     search_steps=4, lr_grids=grids)
    by = {r["key"]: r for r in result["rows"]}
    assert list(by) == list(rows) and result["test_rows"] == 24
    assert all(0 <= by[k]["map"] <= 1 and by[k]["accuracy"] is None for k in rows)
    assert all(len(by[k]["lr_validation"]) == 2 for k in rows)
    head = 4 * 32 + 4  # three classes and "no object" on 32 features
    assert by["linear_probe"]["trainable_params"] == head and by["linear_probe"]["method"].startswith("class head")
    assert by["vpt"]["trainable_params"] == head + 3 * 32 and by["vpt_deep"]["trainable_params"] == head + 2 * 3 * 32
    assert by["fine_tune"]["trainable_params"] > sum(p.numel() for p in bb.model.parameters())
    # full fine-tuning moves the box head as well: its set loss ends below the frozen detector's class head alone
    assert by["fine_tune"]["test_loss"] < by["linear_probe"]["test_loss"], {k: by[k]["test_loss"] for k in rows}
    assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())  # the shared detector untouched
    table = markdown_table(result)
    assert "| method | mAP@0.5 |" in table and "| VPT-deep (3 tokens per layer) |" in table
    assert "mAP" in result["notes"][0]
    with pytest.raises(SoftPromptError, match="do not apply to a detection task"):
        compare(cfg, baselines=("zero_shot", "vpt"), backbone=bb, splits=data, say=lambda *a: None)


def test_predict_finds_objects_in_image_files_through_the_cli(tmp_path, capsys):
    """`softprompt predict` on a detection task's prompt: each file's objects (label, score, box in the file's own
    pixels), equal to the model on the same pixels; --threshold drops the weaker ones."""
    import json

    from PIL import Image

    from softprompt.backbones import load_backbone
    from softprompt.cli import main
    from softprompt.files import save_prompt
    from softprompt.tasks.detection import DetectionEncoder

    bb = tiny_yolos()
    bb.model.save_pretrained(tmp_path / "yolos")
    bb = load_backbone(str(tmp_path / "yolos"), dtype="float32")
    pre = {"image_size": 32, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}
    spec = DetectionTaskSpec(image_size=32)
    vpt = VPT.create(bb, num_virtual_tokens=2, dropout=0.0, init_labels=SHAPE_LABELS, seed=1).eval()
    path = save_prompt(tmp_path / "shapes.safetensors", vpt, bb, task=spec.to_dict(), extra={"preprocessing": pre})
    files = []
    for i, row in enumerate(shapes(5, n=(0, 0, 2), size=40)["test"]):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(row["image"]).save(files[-1])
    args = ["predict", str(path), *files, "--model", str(tmp_path / "yolos"), "--json"]
    assert main([*args, "--threshold", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    enc = DetectionEncoder(spec, pre)
    for f, r in zip(files, got, strict=True):
        with torch.no_grad():
            logits, boxes = PromptedModel(bb, vpt).detect(enc.read(f)[0])
        want = enc.objects(logits[0], boxes[0], 40, 40, threshold=0.0)
        assert r["file"] == f and [o["label"] for o in r["objects"]] == [o["label"] for o in want]
        assert [o["box"] for o in r["objects"]] == [o["box"] for o in want]
    cut = sorted(o["score"] for o in got[0]["objects"])[len(got[0]["objects"]) // 2]
    assert main([*args, "--threshold", str(cut)]) == 0
    fewer = json.loads(capsys.readouterr().out)[0]["objects"]
    assert 0 < len(fewer) < len(got[0]["objects"]) and all(o["score"] >= cut for o in fewer)
