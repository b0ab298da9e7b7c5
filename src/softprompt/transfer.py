"""Prompt transfer (SPoT, Vu et al. 2022): start a task's prompt from a prompt trained on another task.

A *library* is a folder of trained prompt files (``*.safetensors``, or run folders holding ``prompt.safetensors``).
``method.init: library`` with ``method.init_file: FOLDER`` picks the source the way SPoT's retrieval does: a probe
prompt is trained on the target task for a short while (a tenth of the steps, at least 10), each library prompt is
scored by the cosine similarity of its average token with the probe's, and the run starts from the most similar
one (``init: file``). The choice, with every score, is kept in the run folder (``transfer.json``), so ``--resume``
starts from the same source without probing again.

Only prompts that fit the backbone (its kind, width and fingerprint) and that are embeddings (a ``prompt``
tensor) are candidates; the others are listed with the reason they were left out.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .errors import SoftPromptError

PROBE_SHARE, PROBE_MIN = 0.1, 10
CHOICE_FILE = "transfer.json"


def library(folder: str | Path, backbone: Any) -> tuple[list[tuple[Path, torch.Tensor]], dict[str, str]]:
    """([(path, prompt (P, H))] of the library's prompts that fit `backbone`, {path: why left out})."""
    from .files import check_prompt, read_prompt

    root = Path(folder)
    if not root.is_dir():
        raise SoftPromptError(f"prompt library {root} is not a folder; give a folder of trained prompt files")
    paths = sorted({*root.glob("*.safetensors"), *root.glob("*/prompt.safetensors")})
    fit, left = [], {}
    for path in paths:
        try:
            pf = read_prompt(path)
            check_prompt(pf, backbone)
        except SoftPromptError as e:
            left[str(path)] = str(e)
            continue
        if "prompt" not in pf.tensors or pf.tensors["prompt"].ndim != 2:
            left[str(path)] = f"a {pf.method} prompt holds no embeddings to start from"
            continue
        fit.append((path, pf.tensors["prompt"].float()))
    return fit, left


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two prompts' average tokens (SPoT's best task-similarity measure)."""
    return float(torch.nn.functional.cosine_similarity(a.float().mean(0), b.float().mean(0), dim=0))


def rank(candidates: list[tuple[Path, torch.Tensor]], probe: torch.Tensor) -> list[tuple[str, float]]:
    """(path, similarity to the probe), most similar first."""
    return sorted(((str(p), similarity(t, probe)) for p, t in candidates), key=lambda x: -x[1])


def choose_source(cfg: Any, backbone: Any, splits: dict, out: Path, quiet: bool = True) -> dict:
    """The library prompt a run starts from (see the module's docstring); kept in out/transfer.json."""
    from .train.loop import fit

    kept = out / CHOICE_FILE
    folder = str(cfg.method.init_file or "")
    if kept.exists():
        choice = json.loads(kept.read_text())
        if choice.get("library") == folder:
            return choice
    if not folder:
        raise SoftPromptError("method.init library needs method.init_file: the folder of trained prompts")
    candidates, left = library(folder, backbone)
    if not candidates:
        why = f" ({next(iter(left.values()))})" if left else ""
        raise SoftPromptError(f"prompt library {folder} holds no prompt for backbone {backbone.name!r}{why}; train "
                              "some on this backbone first, or use another init")
    steps = max(PROBE_MIN, int(cfg.train.steps * PROBE_SHARE))
    probe_cfg = replace(cfg, out_dir=str(out / "probe"), method=replace(cfg.method, init="vocab", init_file=None),
                        train=replace(cfg.train, steps=steps, eval_every=steps, patience=0))
    res = fit(probe_cfg, backbone=backbone, splits=splits, overwrite=True, quiet=True)
    from .files import read_prompt

    probe = read_prompt(res.prompt_path).tensors["prompt"]
    scores = rank(candidates, probe)
    choice = {"library": folder, "source": scores[0][0], "probe_steps": steps, "scores": dict(scores),
              "left_out": left}
    out.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(choice, indent=2) + "\n")
    if not quiet:
        print(f"transfer: starting from {scores[0][0]} (similarity {scores[0][1]:.3f} after a {steps}-step probe; "
              f"{len(scores)} candidates)")
    return choice
