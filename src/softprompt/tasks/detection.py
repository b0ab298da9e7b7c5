"""Object detection tasks: boxes with class names on images; a built-in synthetic set; the loss (DETR's Hungarian
matching, transformers' own implementation) and mean average precision at IoU 0.5.

A row is ``{"image": ..., "objects": [{"label": name, "box": [x0, y0, x1, y1]}, ...]}`` with boxes in pixels of
the image as given. Built-in: ``shapes``, a seeded synthetic set (no detection data ships offline): 1 to 3 filled
squares of three colours (the classes) on a noisy background.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..errors import SoftPromptError
from .images import preprocess, to_tensor

SHAPE_LABELS = ["red", "green", "blue"]


@dataclass
class DetectionTaskSpec:
    name: str = "shapes"
    data: Any = "shapes"  # built-in name, or {"train": rows, ...} given in Python
    labels: list[str] = field(default_factory=lambda: list(SHAPE_LABELS))
    image_size: int | None = 64  # side in pixels the model sees
    modality: str = "detection"
    label_field: str = "objects"
    image_field: str = "image"

    @property
    def kind(self) -> str:
        return "detection"

    @property
    def verbalizer(self) -> dict[str, list[str]]:
        return {x: [x] for x in self.labels}

    def to_dict(self) -> dict:
        return asdict(self)


def shapes(seed: int = 0, n: tuple[int, int, int] = (1200, 200, 400), size: int = 64) -> dict[str, list[dict]]:
    """Seeded synthetic detection data: 1-3 squares (side 10-24 px) of a class colour on noise."""
    colours = {"red": (220, 40, 40), "green": (40, 200, 40), "blue": (40, 60, 220)}
    out = {}
    for split, count, offset in zip(("train", "validation", "test"), n, (0, 1, 2), strict=True):
        rng = np.random.RandomState(seed * 10 + offset)
        rows = []
        for _ in range(count):
            img = rng.randint(0, 90, (size, size, 3)).astype(np.uint8)
            objects = []
            for _ in range(rng.randint(1, 4)):
                side = rng.randint(10, 25)
                x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
                label = SHAPE_LABELS[rng.randint(3)]
                img[y0:y0 + side, x0:x0 + side] = colours[label]
                objects.append({"label": label, "box": [int(x0), int(y0), int(x0 + side), int(y0 + side)]})
            rows.append({"image": img, "objects": objects})
        out[split] = rows
    return out


def load_detection_splits(task: DetectionTaskSpec, seed: int = 0) -> dict[str, list[dict]]:
    if task.data == "shapes":
        return shapes(seed)
    if isinstance(task.data, dict):
        return task.data
    raise SoftPromptError(f"detection data must be the built-in 'shapes' or rows given in Python, not {task.data!r}")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of corner boxes (x0, y0, x1, y1)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter).clamp(min=1e-9)


def corners(cxcywh: torch.Tensor) -> torch.Tensor:
    c, wh = cxcywh[..., :2], cxcywh[..., 2:]
    return torch.cat([c - wh / 2, c + wh / 2], dim=-1)


def average_precision(preds: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                      gold: list[tuple[torch.Tensor, torch.Tensor]], classes: int, iou: float = 0.5) -> dict:
    """Mean over classes of the area under the precision-recall curve (all points, VOC 2010+) at one IoU.
    preds: per image (boxes (N, 4) corners, scores (N,), labels (N,)); gold: per image (boxes, labels)."""
    aps = []
    for k in range(classes):
        scored, n_gold = [], 0
        for (pb, ps, pl), (gb, gl) in zip(preds, gold, strict=True):
            g = gb[gl == k]
            n_gold += len(g)
            mine = pl == k
            for box, score in zip(pb[mine], ps[mine], strict=True):
                scored.append((float(score), box, g, id(g)))
        if n_gold == 0:
            continue
        scored.sort(key=lambda t: -t[0])
        used: dict[int, set] = {}
        tp = []
        for _, box, g, key in scored:
            hit = 0
            if len(g):
                ious = box_iou(box[None], g)[0]
                j = int(ious.argmax())
                if float(ious[j]) >= iou and j not in used.setdefault(key, set()):
                    used[key].add(j)
                    hit = 1
            tp.append(hit)
        tp_c = np.cumsum(tp)
        recall = np.concatenate([[0.0], tp_c / n_gold]) if tp else np.array([0.0])
        precision = np.concatenate([[1.0], tp_c / np.arange(1, len(tp) + 1)]) if tp else np.array([1.0])
        for i in range(len(precision) - 2, -1, -1):  # the precision envelope
            precision[i] = max(precision[i], precision[i + 1])
        aps.append(float(np.sum((recall[1:] - recall[:-1]) * precision[1:])) if tp else 0.0)
    return {"map": float(np.mean(aps)) if aps else 0.0, "ap_per_class": aps}


class DetectionEncoder:
    """Rows of a detection task -> pixels and targets (class indices, normalised centre/size boxes)."""

    unit = "images"

    def __init__(self, task: DetectionTaskSpec, preprocessing: dict):
        self.task = task
        self.size = int(task.image_size or preprocessing["image_size"])
        self.mean, self.std = preprocessing["mean"], preprocessing["std"]
        self.channels = int(preprocessing.get("channels", 3))

    @property
    def preprocessing(self) -> dict:
        return {"image_size": self.size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

    def row_problem(self, row: dict) -> str | None:
        if row.get(self.task.image_field) is None:
            return f"missing field {self.task.image_field!r}"
        for o in row.get(self.task.label_field) or []:
            if o.get("label") not in self.task.labels:
                return f"object label {o.get('label')!r} is not one of {', '.join(self.task.labels)}"
        return None

    def check_rows(self, rows: list[dict], split: str, skip_bad_rows: bool = False):
        from .encode import check_rows

        return check_rows(rows, split, self.row_problem, skip_bad_rows)

    def target(self, row: dict) -> dict:
        h, w = np.asarray(row["image"]).shape[:2]
        boxes = torch.tensor([o["box"] for o in row["objects"]], dtype=torch.float32).view(-1, 4)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        xyxy = boxes / scale
        cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], dim=1)
        labels = torch.tensor([self.task.labels.index(o["label"]) for o in row["objects"]], dtype=torch.long)
        return {"class_labels": labels, "boxes": cxcywh}

    def pixels(self, images: list, device=None) -> torch.Tensor:
        return preprocess(images, self.size, self.mean, self.std, self.channels, device)

    def read(self, image: Any, device=None) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image (array, PIL image, path or encoded bytes) -> its pixels (1, C, S, S) and its (width, height)."""
        x = to_tensor(image, self.channels)
        return self.pixels([x.permute(1, 2, 0).numpy()], device), (int(x.shape[2]), int(x.shape[1]))

    def objects(self, logits: torch.Tensor, boxes: torch.Tensor, width: int, height: int,
                threshold: float = 0.5) -> list[dict]:
        """One image's detections: each detection token's most likely class (not "no object") and its probability,
        kept at >= threshold, best first; boxes as corners (x0, y0, x1, y1) in the image's pixels."""
        probs = logits.float().softmax(-1)[..., :-1]
        scores, labels = probs.max(-1)
        xyxy = corners(boxes.float()) * torch.tensor([width, height, width, height], dtype=torch.float32,
                                                     device=boxes.device)
        keep = (scores >= threshold).nonzero().flatten().tolist()
        keep.sort(key=lambda i: -float(scores[i]))
        return [{"label": self.task.labels[int(labels[i])], "score": round(float(scores[i]), 4),
                 "box": [round(float(v), 1) for v in xyxy[i]]} for i in keep]

    def batch(self, rows: list[dict], device=None) -> dict:
        px = preprocess([r["image"] for r in rows], self.size, self.mean, self.std, self.channels, device)
        targets = [{k: v.to(device) for k, v in self.target(r).items()} for r in rows]
        return {"pixel_values": px, "targets": targets}

    def count(self, rows: list[dict]) -> int:
        return len(rows)

    def units(self, batch: dict, num_virtual_tokens: int = 0) -> torch.Tensor:
        return torch.tensor(float(batch["pixel_values"].shape[0]))

    def lengths(self, rows: list[dict]) -> None:
        return None

    def loss(self, model, batch: dict) -> torch.Tensor:
        """DETR's set loss (Hungarian matching on class, L1 and GIoU costs; cross-entropy with "no object" weighted
        0.1, L1 x 5, GIoU x 2), summed over the batch's images."""
        from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss

        logits, boxes = model.detect(batch["pixel_values"])
        cfg = SimpleNamespace(class_cost=1, bbox_cost=5, giou_cost=2, num_labels=len(self.task.labels),
                              eos_coefficient=0.1, auxiliary_loss=False, bbox_loss_coefficient=5,
                              giou_loss_coefficient=2)
        loss, _, _ = ForObjectDetectionLoss(logits.float(), batch["targets"], logits.device, boxes.float(), cfg)
        return loss * len(batch["targets"])


@torch.no_grad()
def evaluate_detection(model: Any, enc: DetectionEncoder, rows: list[dict], precision: str = "float32",
                       batch_size: int = 16) -> dict:
    from ..precision import autocast

    device = model.backbone.device
    preds, gold, loss = [], [], 0.0
    for i in range(0, len(rows), batch_size):
        batch = enc.batch(rows[i:i + batch_size], device)
        with autocast(precision, device):
            logits, boxes = model.detect(batch["pixel_values"])
            loss += float(enc.loss(model, batch))
        probs = logits.float().softmax(-1)[..., :-1]  # the last class is "no object"
        scores, labels = probs.max(-1)
        for b, t in enumerate(batch["targets"]):
            preds.append((corners(boxes[b].float()).cpu(), scores[b].cpu(), labels[b].cpu()))
            gold.append((corners(t["boxes"]).cpu(), t["class_labels"].cpu()))
    out = average_precision(preds, gold, len(enc.task.labels))
    return {**out, "n": len(rows), "loss": loss / max(1, len(rows))}


