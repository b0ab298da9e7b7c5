"""A small search on validation, so that a first run on new data is not a guess: every combination of the given
values trained as a full run (``out_dir/search/<trial>``), the best on validation kept (its prompt and report
copied to ``out_dir``), every trial recorded in ``out_dir/search.json``.

    softprompt train CONFIG --search lr=1e-3,3e-3,1e-2 --search method.num_virtual_tokens=10,20
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError
from .config import RunConfig, apply_overrides, build_config, parse_value

SHORT = {"lr": "train.lr", "tokens": "method.num_virtual_tokens", "steps": "train.steps",
         "method": "method.name", "batch_size": "train.batch_size"}


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """["lr=1e-3,3e-3", "method.num_virtual_tokens=10,20"] -> {"train.lr": [...], "method.num_virtual_tokens": [...]}."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        key, eq, values = spec.partition("=")
        if not eq or not values.strip():
            raise SoftPromptError(f"--search {spec!r}: write KEY=V1,V2,... (e.g. lr=1e-3,3e-3,1e-2)")
        key = SHORT.get(key.strip(), key.strip())
        grid[key] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def _value(text: str) -> Any:
    """A number where it reads as one (YAML would keep '1e-4' a string), else as YAML reads it."""
    for t in (int, float):
        try:
            return t(text)
        except ValueError:
            pass
    return parse_value(text)


def search(cfg: RunConfig, grid: dict[str, list[Any]], *, backbone: Any = None, splits: dict | None = None,
           overwrite: bool = False, say=None) -> dict:
    from .loop import fit

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(cfg.out_dir)
    if (out / "search.json").exists() and not overwrite:
        raise SoftPromptError(f"{out} already holds a search; pass --overwrite to replace it, or choose another "
                              "--out-dir")
    keys = list(grid)
    trials = []
    for values in itertools.product(*(grid[k] for k in keys)):
        tag = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in zip(keys, values, strict=True))
        overrides = [a for k, v in zip(keys, values, strict=True) for a in (f"--{k}", str(v))]
        trial_cfg = build_config(apply_overrides({**cfg.to_dict(), "out_dir": str(out / "search" / tag)}, overrides))
        say(f"search: {tag} ...")
        res = fit(trial_cfg, backbone=backbone, splits=splits, overwrite=True, quiet=True)
        metric = res.report.get("selected_on") or "accuracy"
        score = (res.best or {}).get(metric)
        trials.append({"trial": tag, "values": dict(zip(keys, values, strict=True)), "score": score,
                       "selected_on": metric, "best_step": res.best_step, "validation": res.best,
                       "prompt": str(res.prompt_path)})
        say(f"search: {tag}: validation {metric} {score:.4f} (step {res.best_step})")
    best = max(trials, key=lambda t: t["score"] if t["score"] is not None else float("-inf"))
    src = Path(best["prompt"]).parent
    out.mkdir(parents=True, exist_ok=True)
    for name in ("prompt.safetensors", "summary.json", "metrics.jsonl", "plot.png", "config.json"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    result = {"grid": grid, "trials": trials, "best": best, "prompt": str(out / "prompt.safetensors")}
    (out / "search.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result
