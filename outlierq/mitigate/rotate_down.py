"""Online rotation of the MLP output projection's input (QuaRot / SpinQuant "R4").

down_proj's input (act(gate) * up) carries the largest activations of a layer, and split +
SmoothQuant cannot shrink them enough for one static per-tensor scale: measured on SmolLM2
(results/static_diagnosis_smollm2-135m.md), static W8A8 loses almost all of its KL there, and
an orthogonal rotation of that input takes fully static activations to per-token quality.

down_proj's weight W becomes W R and the Linear computes (x R)(W R)^T = x W^T: the same function,
but what gets quantized is x R, whose outliers are spread over every channel. R is applied at run
time (nothing upstream can absorb it: the SiLU/GELU product is not linear in the rotated basis).

R = diag(s) (A (x) B) with n = a b, a <= b as close to sqrt(n) as the width factors, random signs
s, and A, B randomized Hadamard matrices where outlierq has a construction for their order (see
rotate.py), random orthogonal ones otherwise. Applied as A^T X B on the [a, b] view of x: n (a + b)
multiply-adds per token instead of n^2 for a dense R (SmolLM2 split to 1612 = 31 x 52: 83 per
channel, ~14% of down_proj's own 1612 x 576; Gemma-3 2048 = 32 x 64: 96 per channel, ~15%).

Statistics of down_proj's input do not carry over (a per-tensor maximum of x R is not a function
of x's per-channel maxima), so this step marks them stale and `outlierq.compress` recalibrates
the mitigated model once (it has the windows). It must be the last step: smoothing or splitting
down_proj's input channels after the rotation would act on the rotated basis.

In memory only. compressed-tensors 0.20 can describe an online rotation (`transform_config`), but
transformers 5.24 does not apply it when loading, so a checkpoint would reload as another
function; `outlierq.export` refuses rotated models with one line instead."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OutlierqError, OutlierqNotice
from ..models.arch import decoder_layers, get_arch, resolve
from .registry import register
from .rotate import Rotate, rotation


@dataclass(frozen=True)
class RotateDown:
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, float)) or self.seed != int(self.seed):
            raise OutlierqError(f"rotate_down seed must be an integer, got {self.seed!r}")


class InputRotation(nn.Module):
    """x -> x diag(s) (A (x) B), an orthogonal map of the last dimension, a * b wide."""

    def __init__(self, signs: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("signs", signs)
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = self.a.dtype
        xs = (x.to(dt) * self.signs).reshape(*x.shape[:-1], self.a.shape[0], self.b.shape[0])
        y = (xs @ self.b).transpose(-1, -2) @ self.a  # (X B)^T A: two plain GEMMs, no batched ones
        return y.transpose(-1, -2).reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.a.shape[0]} x {self.b.shape[0]}"


class RotatedLinear(nn.Linear):
    """An nn.Linear whose input is rotated first (its weight is already W R). Calibration records
    the rotated input (what the int8 twin quantizes); `Int8Linear.from_linear` keeps the rotation."""

    input_rotation: InputRotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_rotation(x), self.weight, self.bias)


def _factors(n: int) -> tuple[int, int]:
    """n = a * b with a <= b and a + b smallest (a = 1 for a prime n: a dense rotation)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def kron_rotation(n: int, seed: int) -> tuple[InputRotation, str]:
    """The rotation of width n (float64) and what it is made of."""
    a, b = _factors(n)
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    ra, what_a = rotation(a, Rotate(seed=seed * 2 + 1))
    rb, what_b = rotation(b, Rotate(seed=seed * 2 + 2))
    return InputRotation(signs, ra, rb), what_b if a == 1 else f"{what_a} x {what_b}"


@torch.no_grad()
def apply_rotate_down(model: nn.Module, stats, cfg: RotateDown, only: list[int] | None = None):
    spec = get_arch(model)
    consumers = [p.consumer for p in spec.pairs if p.kind == "mlp"]
    if not consumers:
        warnings.warn(f"rotate_down: the {spec.family} layout has no dense MLP output projection; "
                      "not rotated", OutlierqNotice, stacklevel=3)
        return stats
    stale, what = [], set()
    for i, layer in enumerate(decoder_layers(model, spec)):
        if only is not None and i not in only:
            continue
        for name in consumers:
            lin = resolve(layer, name)
            if isinstance(lin, RotatedLinear):
                raise OutlierqError(f"rotate_down: {spec.layers}.{i}.{name} is rotated already")
            rot, desc = kron_rotation(lin.in_features, int(cfg.seed) * 100003 + i)
            what.add(desc)
            new = RotatedLinear(lin.in_features, lin.out_features, lin.bias is not None,
                                device="meta")
            new.weight = nn.Parameter(rot(lin.weight.detach().double()).to(lin.weight.dtype),
                                      requires_grad=lin.weight.requires_grad)
            new.bias = lin.bias
            # float32 factors: at run time the rotation costs as much as a float32 matmul, and its
            # rounding (~1e-7 relative) is far below int8's
            new.input_rotation = InputRotation(*(t.float() for t in (rot.signs, rot.a, rot.b))).to(
                lin.weight.device)
            parent, _, child = name.rpartition(".")
            setattr(resolve(layer, parent) if parent else layer, child, new)
            stale.append(f"{spec.layers}.{i}.{name}")
    if stats is not None:
        stats.meta = dict(stats.meta, recalibrate=sorted(set(stats.meta.get("recalibrate", [])) | set(stale)),
                          down_rotation=" / ".join(sorted(what)))
    return stats


def rotated_linears(model: nn.Module) -> list[str]:
    """Names of the modules that rotate their input online (in memory only)."""
    return [n for n, m in model.named_modules() if getattr(m, "input_rotation", None) is not None]


register("rotate_down", RotateDown, apply_rotate_down, recalibrates=True)
