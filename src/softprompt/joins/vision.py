"""Image prompts into image backbones: VPT tokens into a vision transformer, pixel prompts into any image model.
Each ends in the prompt's own classification head, so ``classify`` gives a task's logits (B, K).

VPT tokens go in through hooks on the model's own modules (no model code copied, nothing patched): a forward hook
on the embeddings module puts the tokens after CLS, and for deep prompts a forward pre-hook on every later layer
replaces the previous layer's prompt outputs with that layer's tokens. The hooks are installed once per backbone
and do nothing unless a forward asks for tokens (a context variable: another thread or a plain call of the model
sees the model as it is). ``uninstall_hooks`` removes them.

Rows of one batch may each have their own prompt (serving): patch prompts with the same depth and length run in
one forward with a token set per row, pixel prompts in one forward with a learned image per row; each row then
gets its own head.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from functools import partial
from typing import Any

import torch

from ..errors import SoftPromptError
from ..prompts import Head, PatchPrompt, PixelPrompt
from ..runtime import runtime
from .base import JOINS, Join, register

_TOKENS: ContextVar[torch.Tensor | None] = ContextVar("softprompt_patch_tokens", default=None)  # (B|1, D, P, H)
_DEEP: ContextVar[torch.Tensor | None] = ContextVar("softprompt_deep_rows", default=None)  # (B,) bool, or None: all


def _after_embeddings(module, args, output):
    tokens = _TOKENS.get()
    if tokens is None:
        return None
    B = output.shape[0]
    first = tokens[:, 0].to(output.dtype).expand(B, -1, -1)  # (B, P, H)
    return torch.cat([output[:, :1], first, output[:, 1:]], dim=1)  # [CLS][prompt][patches]


def _before_layer(index: int, module, args, kwargs):
    tokens = _TOKENS.get()
    if tokens is None or tokens.shape[1] == 1:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    B, P = hidden.shape[0], tokens.shape[2]
    fresh = tokens[:, index].to(hidden.dtype).expand(B, -1, -1)
    deep = _DEEP.get()
    if deep is not None:  # shallow rows in the batch keep their prompt outputs
        fresh = torch.where(deep[:, None, None], fresh, hidden[:, 1:1 + P])
    hidden = torch.cat([hidden[:, :1], fresh, hidden[:, 1 + P:]], dim=1)  # this layer's tokens replace the last's
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def install_hooks(backbone: Any) -> None:
    rt = runtime(backbone)
    if "patch_tokens" in rt.extensions:
        return
    handles = [backbone.embeddings.register_forward_hook(_after_embeddings)]
    handles += [layer.register_forward_pre_hook(partial(_before_layer, i), with_kwargs=True)
                for i, layer in enumerate(backbone.layers) if i > 0]
    rt.extensions["patch_tokens"] = handles


def uninstall_hooks(backbone: Any) -> None:
    for h in runtime(backbone).extensions.pop("patch_tokens", []):
        h.remove()


def apply_head(head: Head, features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(features.to(head.weight.dtype), head.weight, head.bias)


def apply_heads(prompts: list, features: torch.Tensor) -> list[torch.Tensor]:
    """Each row through its own prompt's head (features (B, F), or (B, N, F) per detection token): one batched
    product when the heads have the same shape."""
    if len(prompts) == 1:
        return [apply_head(prompts[0].head, features)]
    shapes = {tuple(p.head.weight.shape) for p in prompts}
    if len(shapes) > 1:
        return [apply_head(p.head, features[i:i + 1]) for i, p in enumerate(prompts)]
    w = torch.stack([p.head.weight for p in prompts])  # (B, K, F)
    b = torch.stack([p.head.bias for p in prompts])  # (B, K)
    logits = torch.einsum("b...f,bkf->b...k", features.to(w.dtype), w)
    logits = logits + b.view(b.shape[0], *[1] * (logits.ndim - 2), b.shape[1])
    return list(logits.unsqueeze(1).unbind(0))  # B x (1, [N,] K)


@contextmanager
def patch_tokens(backbone: Any, tokens: torch.Tensor, deep: torch.Tensor | None = None):
    """Within it, the backbone's forwards take VPT tokens (D, P, H) for every row, or (B, D, P, H) a set per row;
    `deep` (B,) marks the rows whose later-layer tokens apply (the others are shallow prompts padded to D layers)."""
    tokens = tokens.unsqueeze(0) if tokens.ndim == 3 else tokens
    if tokens.shape[2] == 0:
        yield
        return
    D = tokens.shape[1]
    if D not in (1, backbone.num_layers):
        raise SoftPromptError(f"a VPT prompt of depth {D} does not fit backbone {backbone.name!r} with "
                              f"{backbone.num_layers} layers")
    install_hooks(backbone)
    reset, reset_deep = _TOKENS.set(tokens), _DEEP.set(deep)
    try:
        yield
    finally:
        _TOKENS.reset(reset)
        _DEEP.reset(reset_deep)


def vit_features(backbone: Any, tokens: torch.Tensor, pixel_values: torch.Tensor,
                 deep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H) final CLS states with VPT tokens (see `patch_tokens`)."""
    with patch_tokens(backbone, tokens, deep):
        return backbone.features(pixel_values)


def check_images(backbone: Any, pixel_values: torch.Tensor, size: int | None = None) -> None:
    if pixel_values.ndim != 4 or pixel_values.shape[1] != backbone.channels:
        raise SoftPromptError(f"images must be (B, {backbone.channels}, S, S) for backbone {backbone.name!r}; got "
                              f"{tuple(pixel_values.shape)}")
    if size is not None and tuple(pixel_values.shape[-2:]) != (size, size):
        raise SoftPromptError(f"this pixel prompt is for {size} x {size} images; got "
                              f"{pixel_values.shape[-2]} x {pixel_values.shape[-1]}: resize them to {size} px")


class ImageJoin(Join):
    """What the image joins share: ``classify`` = features of the prompted images, through the prompt's head."""

    def classify(self, model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classify_rows(model.backbone, [model.method()], pixel_values)[0]

    def classify_rows(self, backbone: Any, prompts: list, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One forward for rows that each have a prompt of this join's kind (one prompt: every row); a list with
        the logits of each prompt's rows ((B, K) for one prompt)."""
        raise NotImplementedError

    def group(self, prompt) -> tuple:
        """Rows whose prompts have the same group run in one forward."""
        return ()


@register
class PatchTokensIntoViT(ImageJoin):
    prompt_kind = "patch_tokens"
    backbone_kind = "vit"

    def group(self, prompt: PatchPrompt) -> tuple:
        return (prompt.num_virtual_tokens,)  # shallow and deep prompts of one length share a forward

    def classify_rows(self, backbone, prompts: list[PatchPrompt], pixel_values):
        check_images(backbone, pixel_values)
        tokens, deep = row_tokens(prompts)
        return apply_heads(prompts, vit_features(backbone, tokens, pixel_values, deep))


def row_tokens(prompts: list[PatchPrompt]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token sets of rows whose VPT prompts have one length: (D, P, H) for one prompt (every row), else
    (B, D, P, H) a set per row, shallow rows padded to every layer and the deep rows marked ((B,) bool)."""
    if len(prompts) == 1:
        return prompts[0].tokens, None
    if len({p.depth for p in prompts}) == 1:
        return torch.stack([p.tokens for p in prompts]), None
    L = max(p.depth for p in prompts)
    tokens = torch.stack([p.tokens if p.depth == L else
                          torch.cat([p.tokens, p.tokens.new_zeros(L - 1, *p.tokens.shape[1:])]) for p in prompts])
    return tokens, torch.tensor([p.depth == L for p in prompts], device=tokens.device)


@register
class PixelsIntoImage(ImageJoin):
    prompt_kind = "pixels"
    backbone_kind = "image"

    def group(self, prompt: PixelPrompt) -> tuple:
        return (tuple(prompt.pixels.shape),)

    def classify_rows(self, backbone, prompts: list[PixelPrompt], pixel_values):
        check_images(backbone, pixel_values, prompts[0].pixels.shape[-1])
        if len(prompts) == 1:
            pixels = prompts[0].pixels.unsqueeze(0)
        else:
            pixels = torch.stack([p.pixels for p in prompts])
        x = pixel_values + pixels.to(pixel_values.dtype)  # zero outside each mask
        return apply_heads(prompts, backbone.features(x))


@register
class PixelsIntoViT(PixelsIntoImage):
    backbone_kind = "vit"


def classify_mixed(backbone: Any, prompts: list, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Row i's logits (K_i,) under prompts[i]: rows whose prompts share a join and a group run in one forward."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        join = JOINS.get((p.kind, backbone.kind))
        if not isinstance(join, ImageJoin):
            raise SoftPromptError(f"a {p.kind!r} prompt cannot classify images on a {backbone.kind!r} backbone")
        groups.setdefault((p.kind, join.group(p)), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    for (kind, _), rows in groups.items():
        logits = JOINS[(kind, backbone.kind)].classify_rows(backbone, [prompts[i] for i in rows], pixel_values[rows])
        if len(rows) == 1:
            logits = [logits[0]]
        for i, row in zip(rows, logits, strict=True):
            out[i] = row[0] if row.ndim == 2 and row.shape[0] == 1 else row
    return out


@register
class PatchTokensIntoDetector(ImageJoin):
    """VPT tokens into a ViT detector (YOLOS): after CLS, before the patches and the detection tokens; each
    detection token's state goes through the prompt's class head and the detector's own (frozen) box head."""

    prompt_kind = "patch_tokens"
    backbone_kind = "detector"

    def group(self, prompt: PatchPrompt) -> tuple:
        return (prompt.num_virtual_tokens,)

    def detect(self, model: Any, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, N, K + 1), boxes (B, N, 4) normalised centre x, centre y, width, height)."""
        return self.detect_rows(model.backbone, [model.method()], pixel_values)[0]

    def detect_rows(self, backbone: Any, prompts: list[PatchPrompt],
                    pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward for rows that each have a VPT prompt of one length (one prompt: every row); per prompt its
        rows' (logits, boxes)."""
        check_images(backbone, pixel_values)
        if any(p.num_virtual_tokens for p in prompts) and \
                getattr(backbone.model.config, "use_mid_position_embeddings", False):
            raise SoftPromptError(f"{backbone.name!r} adds position embeddings between its layers (YOLOS small/base): "
                                  "tokens cannot be inserted there; use a YOLOS without them (yolos-tiny)")
        tokens, deep = row_tokens(prompts)
        with patch_tokens(backbone, tokens, deep):
            states = backbone.detection_states(pixel_values)
        boxes = backbone.boxes(states)
        logits = apply_heads(prompts, states)
        if len(prompts) == 1:
            return [(logits[0], boxes)]
        return [(x, boxes[i:i + 1]) for i, x in enumerate(logits)]


def detect_mixed(backbone: Any, prompts: list, pixel_values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Row i's (logits (N, K_i + 1), boxes (N, 4)) under prompts[i]: rows whose prompts have one length share a
    forward."""
    join = JOINS.get(("patch_tokens", backbone.kind))
    if not isinstance(join, PatchTokensIntoDetector) or any(p.kind != "patch_tokens" for p in prompts):
        raise SoftPromptError(f"detection needs VPT prompts on a detector backbone; got "
                              f"{sorted({p.kind for p in prompts})} on a {backbone.kind!r} backbone")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(join.group(p), []).append(i)
    out: list = [None] * len(prompts)
    for rows in groups.values():
        for i, (logits, boxes) in zip(rows, join.detect_rows(backbone, [prompts[i] for i in rows],
                                                             pixel_values[rows]), strict=True):
            out[i] = (logits[0], boxes[0])
    return out
