"""Decoder MLPs on the positions that need them: the real tokens only (never padding), the answer column only
in the last layer (classification), and, while training, a gated MLP that keeps two tensors for backward instead
of three. Same values at every real position and the same gradients (tests/test_fastpath.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class MLPPlan:
    last: nn.Module | None  # the MLP that computes the last column only (classification), or None
    real: torch.Tensor | None  # flat indices of the real (non-padding) positions of the (B, T) rows, or None
    shape: tuple[int, int]  # (B, T) of the rows' forward; other inputs (a prompt's batch-1 run) run plain
    gated: bool  # training: keep the gate's and up projections' outputs only, recompute the activation


class GatedActivation(torch.autograd.Function):
    """act(gate) * up, keeping only gate and up for backward (the activation's derivative is computed there with
    torch's own backward kernel): one (tokens, intermediate) tensor less per layer than autograd's act + mul, same
    values and gradients. `kind` is one of ACTIVATIONS (SiLU: Llama, Qwen, SmolLM; GELU-tanh: Gemma)."""

    @staticmethod
    def forward(ctx, gate, up, act, kind):
        ctx.act, ctx.kind = act, kind
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = grad * ctx.act(gate) if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = (torch.ops.aten.silu_backward(grad * up, gate) if ctx.kind == "silu" else
                         torch.ops.aten.gelu_backward(grad * up, gate, approximate=ctx.kind.removeprefix("gelu_")))
        return grad_gate, grad_up, None, None


class Scatter(torch.autograd.Function):
    """Rows (N, H) into zeros (n, H) at `index`; backward gathers. Keeps only the index (index_copy keeps the rows)."""

    @staticmethod
    def forward(ctx, rows, index, n):
        ctx.save_for_backward(index)
        return rows.new_zeros(n, rows.shape[-1]).index_copy_(0, index, rows)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


ACTIVATIONS = {"silu": nn.functional.silu,
               "gelu_none": lambda x: nn.functional.gelu(x),
               "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh")}


def activation_kind(act: nn.Module) -> str | None:
    """Which of ACTIVATIONS `act` computes, checked by behaviour on a probe (not by class name), or None: an MLP
    with another activation runs its own forward."""
    probe = torch.linspace(-4, 4, 17)
    for kind, fn in ACTIVATIONS.items():
        try:
            if torch.allclose(act(probe), fn(probe), atol=1e-6):
                return kind
        except Exception:
            return None
    return None


def gated_parts(mlp: nn.Module):
    """(gate, up, down, act, activation kind) of a gated MLP (Llama, Qwen2/3, Mistral, Gemma, SmolLM) whose
    activation is one of ACTIVATIONS, else None."""
    parts = [getattr(mlp, k, None) for k in ("gate_proj", "up_proj", "down_proj", "act_fn")]
    if not all(isinstance(m, nn.Module) for m in parts):
        return None
    kind = activation_kind(parts[3])
    return (*parts, kind) if kind else None


def planned_rows(run, x: torch.Tensor, plan: MLPPlan, last: bool) -> torch.Tensor:
    """A position-wise `run` (B, T, H) -> (B, T, H') on the positions the plan needs: the last column only, or the
    real tokens only (padding positions get zeros: no real position attends to them), or all."""
    B, T, H = x.shape
    if last:  # the answer column only; nothing after the last MLP mixes positions
        y = run(x[:, -1:])  # (B, 1, H')
        return torch.cat([y.new_zeros(B, T - 1, y.shape[-1]), y], dim=1)
    if plan.real is None:
        return run(x)
    y = run(x.reshape(B * T, H).index_select(0, plan.real))  # (N, H') real tokens only
    return Scatter.apply(y, plan.real, B * T).view(B, T, -1)


def planned_mlp(mlp: nn.Module, x: torch.Tensor, plan: MLPPlan, parts) -> torch.Tensor:
    """`parts`: the MLP's gated_parts (resolved once, at install), or None for an MLP that is not gated."""
    if parts is None or not (plan.gated and torch.is_grad_enabled()):
        def run(h):
            return type(mlp).forward(mlp, h)
    else:
        gate, up, down, act, kind = parts

        def run(h):
            return down(GatedActivation.apply(gate(h), up(h), act, kind))

    return planned_rows(run, x, plan, mlp is plan.last)
