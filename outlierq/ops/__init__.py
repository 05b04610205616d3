"""One dispatcher per op: backend="auto" | "torch" | "native" | "triton".

"auto" takes the Triton kernel for CUDA tensors, the native one-pass C kernel (native.py) for CPU
tensors where it is built, and the torch twin otherwise. The torch twins stay the reference the
others are tested against. "triton" on a tensor Triton cannot serve raises, unless
TRITON_INTERPRET=1 (the CPU interpreter, for tests); "native" where it is not built raises."""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from ..errors import OutlierqError
from . import native, torch_ops
from .gemm import fp8_gemm_path, gemm_operand

BACKENDS = ("auto", "torch", "native", "triton")


class ChannelStats(NamedTuple):
    col_absmax: torch.Tensor   # f32 [N]
    col_abssum: torch.Tensor   # f32 [N]
    col_count: torch.Tensor    # i32 [T, N], |x| > thresholds[t]
    row_absmax: torch.Tensor   # f32 [M]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise OutlierqError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend in ("torch", "native") or (backend == "auto" and not x.is_cuda):
        return False  # (checked first: a decode step dispatches some 200 of these per token)
    servable = triton_available() and (x.is_cuda or _interpret())
    if backend == "triton":
        if not servable:
            raise OutlierqError("backend='triton' needs a CUDA tensor and triton installed "
                                "(or TRITON_INTERPRET=1 for the CPU interpreter); use backend='auto'")
        return True
    return servable and x.is_cuda  # auto never picks the (slow) interpreter


def _use_native(x: torch.Tensor, backend: str) -> bool:
    if backend == "native":
        if not native.serves(x):
            raise OutlierqError("backend='native' needs a CPU tensor (float32/bf16/fp16) and the native "
                                "kernels built (a C compiler; see outlierq.ops.native); use backend='auto'")
        return True
    return backend == "auto" and native.serves(x)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.is_contiguous():
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.is_contiguous() else x2.contiguous()


def channel_stats(x: torch.Tensor, thresholds=(6.0,), backend: str = "auto") -> ChannelStats:
    """Per-channel absmax, sum |x|, counts above each threshold, and per-token absmax of x [..., N]."""
    x2 = _as_2d(x)
    thr = torch.as_tensor(thresholds, dtype=torch.float32, device=x2.device).reshape(-1)
    if _use_triton(x2, backend):
        from ..kernels.channel_stats import channel_stats as k
        return ChannelStats(*k(x2, thr))
    if _use_native(x2, backend):
        return ChannelStats(*native.channel_stats(x2, thr))
    return ChannelStats(*torch_ops.channel_stats(x2, thr))


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None,
                       want_col_absmax: bool = False, backend: str = "auto"):
    """x [..., K] -> (int8 codes [M, K], f32 scales [M], col_absmax [K] or None)."""
    x2 = _as_2d(x)
    if _use_triton(x2, backend):
        from ..kernels.quant_per_token import quantize_per_token as k
        return k(x2, smooth, want_col_absmax)
    if _use_native(x2, backend):
        return native.quantize_per_token(x2, smooth, want_col_absmax)
    return torch_ops.quantize_per_token(x2, smooth, want_col_absmax)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None = None,
                        backend: str = "auto") -> torch.Tensor:
    x2 = _as_2d(x)
    if _use_triton(x2, backend):
        from ..kernels.quant_per_token import quantize_per_tensor as k
        return k(x2, scale, smooth)
    if _use_native(x2, backend):
        return native.quantize_per_tensor(x2, scale, smooth)
    return torch_ops.quantize_per_tensor(x2, scale, smooth)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (FP8 E4M3 codes [M, K], f32 scales [M]): per token (scale None) or with the
    static `scale`. The codes are float8, or their exact float32 values where the native kernel
    ran: it runs only where FP8 GEMMs multiply the codes as fp32 (gemm.fp8_gemm_path)."""
    x2 = _as_2d(x)
    if scale is None and _use_triton(x2, backend):
        from ..kernels.quant_per_token import quantize_per_token_fp8 as k
        return k(x2)
    if _use_native(x2, backend) and (backend == "native" or fp8_gemm_path() == "fp32"):
        return native.quantize_fp8(x2, scale)
    return torch_ops.quantize_fp8(x2, scale)


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq_t: torch.Tensor, w_scale: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] -> fp32 [M, N] * x_scale[M, 1] * w_scale[N] (see torch_ops).
    "auto" keeps torch (cuBLASLt / oneDNN) until the Triton GEMM is measured faster on a GPU."""
    if backend == "triton":
        _use_triton(xq, "triton")  # raises where Triton cannot serve
        if wq_t.is_floating_point():
            raise OutlierqError("the Triton int8 GEMM needs int8 weight codes, not the fp32 operand")
        from ..kernels.int8_gemm import int8_gemm
        return int8_gemm(xq, wq_t, x_scale, w_scale)
    return torch_ops.int8_matmul(xq, x_scale, wq_t, w_scale)


__all__ = ["BACKENDS", "ChannelStats", "channel_stats", "gemm_operand", "int8_matmul", "quantize_fp8", "quantize_per_tensor",
           "quantize_per_token", "triton_available"]
