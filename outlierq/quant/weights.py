"""Per-output-channel symmetric int8 weights: rounding (to nearest, clipped, or GPTQ's), the
stored activation scale, and the weight clip search."""
from __future__ import annotations


import torch

from .. import ops
from ..gptq import gptq_codes
from .formats import INT8, Format


def quantize_weight(w: torch.Tensor, backend: str = "auto", clip: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, fmt: Format = INT8,
                    per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric 8-bit weights: (codes [N, K] in `fmt`'s dtype, scale [N] f32),
    scale = absmax/qmax, or clip[n] * absmax/qmax with a clip ratio per output channel (values
    beyond it saturate). With the input Hessian [K, K] the codes on that scale come from GPTQ
    (`gptq_codes`). per_tensor: one scale for the whole matrix (absmax/qmax), repeated per row.

    A bf16/fp16 weight gets its scale rounded to that dtype first (the checkpoint stores scales in
    the model dtype) and its codes from the rounded scale, so the model outlierq evaluates is the
    one it exports."""
    if hessian is not None:
        _, scale = quantize_weight(w, backend, clip, fmt=fmt, per_tensor=per_tensor)
        return gptq_codes(w, hessian, scale, fmt=fmt), scale
    low = w.dtype in (torch.bfloat16, torch.float16)
    if clip is None and not low and fmt is INT8 and not per_tensor:
        q, scale, _ = ops.quantize_per_token(w.detach().float(), backend=backend)
        return q, scale
    wf = w.detach().to(torch.float32, copy=True)  # scaled in place below: never the caller's tensor
    amax = wf.abs().amax().expand(wf.shape[0]) if per_tensor else wf.abs().amax(1)
    scale = (amax * (1.0 if clip is None else clip.float()) / fmt.qmax).clamp(min=1e-12)
    if low:
        scale = scale.to(w.dtype).float().clamp(min=torch.finfo(w.dtype).tiny)
    return fmt.codes(wf.mul_(scale.reciprocal()[:, None])), scale


def stored_scale(value: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An activation scale as the checkpoint stores it (in the model dtype), back in float32."""
    return torch.as_tensor(value, dtype=torch.float32).clamp(min=1e-12).to(dtype).float()


CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00, 0.98, ..., 0.80


@torch.no_grad()
def clip_search(w: torch.Tensor, rows: torch.Tensor, grid: tuple[float, ...] = CLIP_GRID,
                fmt: Format = INT8) -> torch.Tensor:
    """Per output channel, the clip ratio of `grid` whose `fmt` weights give the least squared
    output error on calibration rows [R, K] (float activations, as AWQ's clip search): output
    channel n depends on weight row n only, so each channel picks its own ratio. Returns [N]."""
    wf, x = w.detach().float(), rows.float()
    best_err = torch.full((wf.shape[0],), float("inf"))
    best = torch.ones(wf.shape[0])
    for r in grid:
        q, s = quantize_weight(wf, clip=torch.full_like(best, r), fmt=fmt)
        err = (x @ (wf - q.float() * s[:, None]).t()).pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best
