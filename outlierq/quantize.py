"""W8A8 int8 quantization with plain tensors.

Int8Linear holds an int8 weight [out, in] with one fp32 scale per output channel (symmetric,
scale = absmax/127, round half to even) and quantizes its input per token (dynamic) or per tensor
(static scale from calibration). The GEMM is int8 x int8 -> int32 (`torch._int_mm`) with an fp32
scale epilogue; `fake=True` dequantizes instead and is the test oracle. Nothing quantizes
implicitly on `.to()`: only `quantize_` does."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .calibrate import ActivationStats
from .errors import OutlierqError


@dataclass(frozen=True)
class W8A8:
    """int8 weights per output channel; int8 activations per token (dynamic) or per tensor (static)."""
    act: Literal["token", "tensor", "none"] = "token"   # "none": weight-only int8
    skip: tuple[str, ...] = ("lm_head",)               # fnmatch patterns of Linears kept float
    fake: bool = False                                  # dequantize-and-matmul reference
    backend: str = "auto"
    # with act="tensor": Linears (fnmatch patterns) that keep per-token dynamic activations. Static
    # per-tensor scales cannot follow down_proj's token-to-token range (SwiGLU products), so
    # ("*down_proj",) buys most of the accuracy back while everything else stays static.
    token_for: tuple[str, ...] = ()


@dataclass(frozen=True)
class LLMInt8:
    """bitsandbytes LLM.int8 (mixed int8/fp16 decomposition above `threshold`), as a baseline."""
    threshold: float = 6.0
    skip: tuple[str, ...] = ("lm_head",)


def quantize_weight(w: torch.Tensor, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (codes [N, K] int8, scale [N] f32), scale = absmax/127."""
    q, scale, _ = ops.quantize_per_token(w.detach().float(), backend=backend)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act: Literal["token", "tensor", "none"] = "token", fake: bool = False,
                 backend: str = "auto", dtype: torch.dtype = torch.float32):
        super().__init__()
        if act not in ("token", "tensor", "none"):
            raise OutlierqError(f"unknown activation quantization {act!r}: token | tensor | none")
        self.in_features, self.out_features = in_features, out_features
        self.act, self.fake, self.backend = act, fake, backend
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("input_scale", torch.ones(1) if act == "tensor" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._wt: torch.Tensor | None = None  # contiguous [K, N] copy: _int_mm runs faster on it

    @classmethod
    def from_linear(cls, lin: nn.Linear, act="token", input_scale: float | None = None,
                    fake: bool = False, backend: str = "auto") -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, fake, backend,
                dtype=lin.weight.dtype)
        q, s = quantize_weight(lin.weight, backend)
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        if act == "tensor":
            if input_scale is None:
                raise OutlierqError("static per-tensor activations need calibration statistics")
            m.input_scale.fill_(max(float(input_scale), 1e-12))
        return m.to(lin.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.act == "none":
            y = F.linear(x2.float(), self.dequantized_weight())
        else:
            if self.act == "token":
                q, s, _ = ops.quantize_per_token(x2, backend=self.backend)
            else:
                q = ops.quantize_per_tensor(x2, self.input_scale, backend=self.backend)
                s = self.input_scale.expand(x2.shape[0])
            if self.fake:
                y = (q.float() * s[:, None]) @ self.dequantized_weight().t()
            else:
                if self._wt is None or self._wt.device != q.device:
                    self._wt = self.weight.t().contiguous()
                y = ops.int8_matmul(q, s, self._wt, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):
        self._wt = None  # device/dtype moves invalidate the cached transpose (buffers move as-is)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act={self.act}, fake={self.fake}")


def _skipped(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) or name.endswith("." + p) or name == p for p in patterns)


def _llm_int8(lin: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    m.weight = bnb.nn.Int8Params(lin.weight.detach().float().clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return m.to(lin.weight.device)  # bitsandbytes quantizes on this move


@torch.no_grad()
def quantize_(model: nn.Module, config: W8A8 | LLMInt8, stats: ActivationStats | None = None,
              progress: bool = True) -> nn.Module:
    """Replace every nn.Linear not in `config.skip` in place; returns the model."""
    if isinstance(config, W8A8) and config.act == "tensor" and stats is None:
        raise OutlierqError("W8A8(act='tensor') needs calibration statistics for the input scales")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _skipped(n, config.skip)]
    for name, lin in tqdm(targets, desc="quantize", unit="linear", disable=not progress):
        if isinstance(config, LLMInt8):
            new = _llm_int8(lin, config.threshold)
        else:
            act = "token" if config.token_for and _skipped(name, config.token_for) else config.act
            scale = None
            if act == "tensor":
                scale = stats.input_absmax(name).max().item() / 127.0
            new = Int8Linear.from_linear(lin, act, scale, config.fake, config.backend)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
