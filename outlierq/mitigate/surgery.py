"""All weight surgery in one place. Factors are computed in float64 and each weight is cast back
to its own dtype once; the caller's tensors are replaced, never mutated in place."""
from __future__ import annotations

import torch
from torch import nn

from ..models.arch import NormKind


def _set(p: nn.Parameter, value64: torch.Tensor) -> None:
    p.data = value64.to(p.dtype)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """A fresh float64 copy (never the caller's tensor), scaled in place below: one float64
    temporary per weight instead of two (a 3B model's MLP weight is 221 MB in float64)."""
    return t.detach().to(torch.float64, copy=True)


@torch.no_grad()
def scale_norm_output(norm: nn.Module, kind: NormKind, s: torch.Tensor) -> None:
    """Make `norm`'s output y become y / s (per channel)."""
    s = s.double()
    if kind == "rms_offset":  # Gemma: y = x_hat * (1 + w)  =>  1 + w' = (1 + w) / s
        _set(norm.weight, (1.0 + norm.weight.double()) / s - 1.0)
        return
    _set(norm.weight, norm.weight.double() / s)
    if kind == "layernorm" and getattr(norm, "bias", None) is not None:
        _set(norm.bias, norm.bias.double() / s)


@torch.no_grad()
def scale_linear_input(lin: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s_j, so that lin(x / s) == old lin(x) (any module with a `weight` [out, in],
    such as an MoE router)."""
    _set(lin.weight, _f64(lin.weight).mul_(s.double()[None, :]))


@torch.no_grad()
def scale_linear_output(lin: nn.Module, s: torch.Tensor) -> None:
    """Row j (and bias j) /= s_j: the Linear's output becomes y / s."""
    s = s.double()
    _set(lin.weight, _f64(lin.weight).div_(s[:, None]))
    if lin.bias is not None:
        _set(lin.bias, lin.bias.double() / s)


@torch.no_grad()
def scale_experts_input(ex: nn.Module, s: torch.Tensor) -> None:
    """Fused experts read x / s: every expert's gate and up columns *= s."""
    _set(ex.gate_up_proj, _f64(ex.gate_up_proj).mul_(s.double()[None, None, :]))


@torch.no_grad()
def scale_expert_pairs(ex: nn.Module, s: torch.Tensor) -> None:
    """Every expert e: up rows /= s[e] and down_proj columns *= s[e] (s: [E, I]; act(gate) * up
    is linear in up). One replacement of each fused tensor for all experts."""
    s = s.double()
    inter = ex.down_proj.shape[2]
    gu = _f64(ex.gate_up_proj)
    gu[:, inter:] /= s[:, :, None]
    _set(ex.gate_up_proj, gu)
    _set(ex.down_proj, _f64(ex.down_proj).mul_(s[:, None, :]))


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Linear:
    """A fresh nn.Linear of `like`'s weight dtype/device holding `weight` [out, in] (and `bias`)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                    device=like.weight.device, dtype=like.weight.dtype)
    lin.weight.data = weight.to(like.weight.dtype)
    if bias is not None:
        lin.bias.data = bias.to(like.weight.dtype)
    lin.requires_grad_(False)
    return lin


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
