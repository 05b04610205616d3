"""GPTQ rounding of int8 weights: error feedback through the calibration Hessian.

Round-to-nearest rounds each weight on its own. GPTQ (Frantar et al., 2022) rounds one input
column at a time and moves the rounding error onto the columns not yet rounded, weighted by the
inverse of H = sum x x^T over calibration inputs, so the layer's output error ||(W - Q) X||
shrinks, not each weight's. The scale per output channel is fixed first (absmax/127, or the clip
search's ratio), so the codes stay a plain per-channel int8 checkpoint: nothing changes for
export or serving.

Columns go in order of decreasing H diagonal (the "act order" heuristic: the most active inputs
are rounded while the most columns are left to absorb their error); with a per-channel scale
that costs nothing at load time. The Hessian is accumulated during calibration
(`calibrate(hessians=True)`) and carried through mitigations like the other statistics."""
from __future__ import annotations

import torch

DAMP = 0.01  # fraction of the mean diagonal added to H (GPTQ's default): keeps it invertible


@torch.no_grad()
def gptq_codes(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, block: int = 128,
               damp: float = DAMP, act_order: bool = True, fmt=None) -> torch.Tensor:
    """8-bit codes [N, K] (int8, or `fmt`'s) for weight w [N, K] with per-output-channel `scale`
    [N], rounded with error feedback through the input Hessian h [K, K] (sum of x x^T over
    calibration rows). Codes saturate like round-to-nearest's; inputs never seen (zero diagonal)
    get round-to-nearest."""
    from .quant.formats import INT8

    fmt = fmt or INT8
    n, k = w.shape
    W = w.detach().to(torch.float64, copy=True)
    H = h.detach().to(W.device, torch.float64, copy=True)  # (Hessians are kept on the CPU)
    s = scale.detach().to(W.device, torch.float64)[:, None]
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    perm = (torch.argsort(H.diagonal(), descending=True, stable=True) if act_order
            else torch.arange(k, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * H.diagonal().mean())
    # upper Cholesky factor of H^-1: row j holds the feedback of column j onto columns > j
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.empty_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        Wb, Ub = W[:, i1:i2], U[i1:i2, i1:i2]
        err = torch.empty(n, i2 - i1, dtype=W.dtype, device=W.device)
        for j in range(i2 - i1):
            q = fmt.snap(Wb[:, j:j + 1] / s)
            Q[:, i1 + j] = q[:, 0]
            e = (Wb[:, j:j + 1] - q * s) / Ub[j, j]
            Wb[:, j:] -= e * Ub[j:j + 1, j:]
            err[:, j:j + 1] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
    return out.to(fmt.dtype)
