"""Pictures of what was learned: a pixel prompt as an image, a confusion matrix as a heat map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import SoftPromptError


def pixel_prompt_image(pf: Any, scale: int = 4):
    """A PIL image of a pixel prompt file: the learned pixels in image colours (de-normalised with the file's
    mean/std) where its mask is on; a grey checkerboard where the input image shows through."""
    from PIL import Image

    if "pixels" not in pf.tensors:
        raise SoftPromptError(f"{pf.path}: a {pf.method} prompt has no pixels to draw; --png draws pixel prompts")
    pre = pf.metadata.get("preprocessing") or {}
    pixels = pf.tensors["pixels"].float().numpy()  # (C, S, S), normalised units
    mask = pf.tensors["mask"].bool().numpy()
    C, S, _ = pixels.shape
    mean = np.array(pre.get("mean", [0.5] * C), dtype=np.float32)[:, None, None]
    std = np.array(pre.get("std", [0.5] * C), dtype=np.float32)[:, None, None]
    rgb = np.clip(mean + pixels * std, 0, 1)  # what the prompt adds, drawn on a mean image
    yy, xx = np.mgrid[0:S, 0:S]
    checker = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 0.85, 0.7).astype(np.float32)
    out = np.where(mask[None], rgb, checker[None])
    if C == 1:
        out = np.repeat(out, 3, axis=0)
    img = Image.fromarray((out.transpose(1, 2, 0) * 255).round().astype(np.uint8), "RGB")
    return img.resize((S * scale, S * scale), Image.NEAREST)


def confusion_png(metrics: dict, path: str | Path, title: str = "") -> Path:
    """A confusion matrix (rows: gold, columns: predicted) as a heat map with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = metrics["confusion"]["labels"], np.array(metrics["confusion"]["matrix"])
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    top = matrix.max() or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > top / 2 else "black")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.1%} (n={metrics['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
