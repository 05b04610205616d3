"""The 8-bit modules quantize_ puts in place of float ones: Int8Linear (one 8-bit weight [out, in],
int8 or FP8 E4M3 (`fmt`), with one fp32 scale per output channel; input quantized to the same
format per token, dynamic, or per tensor, with a static scale from calibration; an 8-bit GEMM
with an fp32 scale epilogue, or `fake=True`, the dequantizing test oracle) and Int8Experts (fused
MoE experts, int8); LLM.int8's bitsandbytes module. Nothing quantizes implicitly on `.to()`: only
`quantize_` does. (Int8Linear keeps its name for FP8 too: its checkpoints and tests know it.)"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..errors import OutlierqError
from ..models.arch import ArchSpec
from ..ops.gemm import fp8_matmul, fp8_operand
from .formats import FP8, INT8, Format, get_format
from .weights import quantize_weight, stored_scale


class TokenKeys:
    """The input ids of the model's forward pass in progress, flattened [B*T], for Int8Linears
    with a static range keyed by token id (W8A8.quiet_tokens): a pre-hook on the model sets them,
    a hook clears them. Rows and ids line up because every Linear sees [B, T, K]."""

    def __init__(self):
        self.ids: torch.Tensor | None = None

    def enter(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.ids = ids.reshape(-1) if isinstance(ids, torch.Tensor) else None

    def leave(self, module, args, kwargs, out) -> None:
        self.ids = None


class Int8Linear(nn.Module):
    outlierq_quantized = True  # (what models.prepare refuses to calibrate)

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 act: Literal["token", "tensor", "none"] = "token", fake: bool = False,
                 backend: str = "auto", dtype: torch.dtype = torch.float32, fmt: str = "int8"):
        super().__init__()
        if act not in ("token", "tensor", "none"):
            raise OutlierqError(f"unknown activation quantization {act!r}: token | tensor | none")
        self.in_features, self.out_features = in_features, out_features
        self.act, self.fake, self.backend = act, fake, backend
        self.fmt: Format = get_format(fmt)
        self.weight_strategy = "channel"  # or "tensor": weight_scale holds one value, repeated
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=self.fmt.dtype))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("input_scale", torch.ones(1) if act == "tensor" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._wt: torch.Tensor | None = None  # contiguous [K, N] copy: _int_mm runs faster on it
        self.input_rotation: nn.Module | None = None  # rotate_down's online rotation, kept as is
        # W8A8.quiet_tokens: rows of these token ids take the static range token_scale; the ids of
        # the pass in progress come from the model's TokenKeys (set by `key_quiet_tokens`)
        self.register_buffer("token_ids", None)
        self.register_buffer("token_scale", None)
        self.token_keys: TokenKeys | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, act="token", input_scale: float | None = None,
                    fake: bool = False, backend: str = "auto", clip: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, fmt: str = "int8",
                    weight_strategy: str = "channel") -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, fake, backend,
                dtype=lin.weight.dtype, fmt=fmt)
        q, s = quantize_weight(lin.weight, backend, clip, hessian, m.fmt, per_tensor=weight_strategy == "tensor")
        m.weight_strategy = weight_strategy
        m.weight.copy_(q)
        m.weight_scale.copy_(s)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach())
        if getattr(lin, "input_rotation", None) is not None:
            m.input_rotation = lin.input_rotation
        if act == "tensor":
            if input_scale is None:
                raise OutlierqError("static per-tensor activations need calibration statistics")
            m.input_scale.copy_(stored_scale(float(input_scale), lin.weight.dtype).reshape(m.input_scale.shape))
        return m.to(lin.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.input_rotation is not None:
            x = self.input_rotation(x)
        x2 = x.reshape(-1, self.in_features)
        if not self.fake and self.act != "none" and (self._wt is None or self._wt.device != x.device):
            # int8 codes, or the codes as fp32 where that GEMM is faster
            self._wt = ops.gemm_operand(self.weight.t()) if self.fmt is INT8 else fp8_operand(self.weight)
        keyed = self._keyed_rows(x2)
        if keyed is not None:
            y = self._keyed_linear(x2, keyed)
        else:
            y = w8a8_linear(x2, self.weight, self.weight_scale, self.act, self.input_scale, self.fake,
                            self.backend, self._wt, self.fmt)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _keyed_rows(self, x2: torch.Tensor) -> torch.Tensor | None:
        """[M] bool: the rows of `x2` whose token id has its own static range, or None (no such
        row, or no ids: a call with inputs_embeds keeps the plain static range)."""
        if self.token_ids is None or self.token_keys is None or self.act != "tensor":
            return None
        ids = self.token_keys.ids
        if ids is None or ids.numel() != x2.shape[0]:
            return None
        keyed = torch.isin(ids.to(x2.device), self.token_ids)
        return keyed if bool(keyed.any()) else None

    def _keyed_linear(self, x2: torch.Tensor, keyed: torch.Tensor) -> torch.Tensor:
        """w8a8_linear's static path, with the keyed rows at token_scale (still a constant)."""
        q = ops.quantize_per_tensor(x2, self.input_scale, backend=self.backend)
        q[keyed] = torch.round(x2[keyed].float() * self.token_scale.float().reciprocal()).clamp_(-127, 127).to(q.dtype)
        s = torch.where(keyed, self.token_scale.float(), self.input_scale.float())
        if self.fake:
            return (q.float() * s[:, None]) @ self.dequantized_weight().t()
        return ops.int8_matmul(q, s, self._wt, self.weight_scale)

    def _apply(self, fn, recurse=True):
        self._wt = None  # device/dtype moves invalidate the cached transpose (buffers move as-is)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"act={self.act}, fake={self.fake}" + ("" if self.fmt is INT8 else f", fmt={self.fmt.name}"))


def w8a8_linear(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, act: str,
                input_scale: torch.Tensor | None, fake: bool = False, backend: str = "auto",
                wt: torch.Tensor | None = None, fmt: Format = INT8) -> torch.Tensor:
    """x2 [M, K] float @ 8-bit weight [N, K] (per-row scales) -> fp32 [M, N], activations
    quantized to `fmt` per token / per tensor (or not: act="none"). `wt`: the cached GEMM operand."""
    deq = lambda: weight.float() * weight_scale[:, None]  # noqa: E731
    if act == "none":
        return F.linear(x2.float(), deq())
    if fmt is FP8:
        q, s = fp8_activations(x2, act, input_scale, backend)
        if fake:
            return (q.float() * s[:, None]) @ deq().t()
        return fp8_matmul(q, s, fp8_operand(weight) if wt is None else wt, weight_scale)
    if act == "token":
        q, s, _ = ops.quantize_per_token(x2, backend=backend)
    else:
        q = ops.quantize_per_tensor(x2, input_scale, backend=backend)
        s = input_scale.expand(x2.shape[0])
    if fake:
        return (q.float() * s[:, None]) @ deq().t()
    return ops.int8_matmul(q, s, ops.gemm_operand(weight.t()) if wt is None else wt, weight_scale)


def fp8_activations(x2: torch.Tensor, act: str, input_scale: torch.Tensor | None,
                    backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 codes of x2 [M, K] and their row scales [M]: per token, scale = absmax/448
    (dynamic); per tensor, the static input_scale (ops.quantize_fp8: Triton on CUDA, the native
    kernel on CPUs, the torch twin otherwise)."""
    return ops.quantize_fp8(x2, input_scale if act == "tensor" else None, backend=backend)


class Int8Experts(nn.Module):
    """int8 twin of transformers-5 fused MoE experts: per expert, gate|up [2I, H] and down [H, I]
    int8 codes with per-row scales, the same routed forward (only the experts the router picked
    run, weighted by its scores). Static activation scales: one per expert and projection."""

    outlierq_quantized = True

    def __init__(self, num_experts: int, hidden: int, inter: int, act_fn: nn.Module,
                 act: tuple[str, str] = ("token", "token"), fake: bool = False, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.act_fn, self.act, self.fake, self.backend = act_fn, tuple(act), fake, backend
        self.register_buffer("gate_up", torch.zeros(num_experts, 2 * inter, hidden, dtype=torch.int8))
        self.register_buffer("gate_up_scale", torch.ones(num_experts, 2 * inter))
        self.register_buffer("down", torch.zeros(num_experts, hidden, inter, dtype=torch.int8))
        self.register_buffer("down_scale", torch.ones(num_experts, hidden))
        self.register_buffer("gate_up_input_scale", torch.ones(num_experts) if act[0] == "tensor" else None)
        self.register_buffer("down_input_scale", torch.ones(num_experts) if act[1] == "tensor" else None)
        self._wt: dict[tuple[str, int], torch.Tensor] = {}  # per (projection, expert) GEMM operand

    @classmethod
    def from_experts(cls, ex: nn.Module, act: tuple[str, str], scales: tuple | None = None,
                     fake: bool = False, backend: str = "auto") -> "Int8Experts":
        n, two_i, h = ex.gate_up_proj.shape
        m = cls(n, h, two_i // 2, ex.act_fn, act, fake, backend)
        for e in range(n):
            m.gate_up[e], m.gate_up_scale[e] = quantize_weight(ex.gate_up_proj[e], backend)
            m.down[e], m.down_scale[e] = quantize_weight(ex.down_proj[e], backend)
        for buf, sc in zip((m.gate_up_input_scale, m.down_input_scale), scales or (None, None)):
            if buf is not None:
                if sc is None:
                    raise OutlierqError("static per-tensor activations need calibration statistics")
                buf.copy_(stored_scale(sc, ex.gate_up_proj.dtype))
        return m.to(ex.gate_up_proj.device)

    def _mm(self, x: torch.Tensor, e: int, which: str) -> torch.Tensor:
        w, ws = (self.gate_up, self.gate_up_scale) if which == "gate_up" else (self.down, self.down_scale)
        act = self.act[0] if which == "gate_up" else self.act[1]
        ins = getattr(self, f"{which}_input_scale")
        wt = None
        if not self.fake and act != "none":
            if (which, e) not in self._wt or self._wt[which, e].device != x.device:
                self._wt[which, e] = ops.gemm_operand(w[e].t())
            wt = self._wt[which, e]
        return w8a8_linear(x, w[e], ws[e], act, None if ins is None else ins[e: e + 1], self.fake,
                           self.backend, wt)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            if e == self.num_experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = self._mm(hidden_states[tok], e, "gate_up").chunk(2, dim=-1)
            h = self._mm((self.act_fn(gate) * up).to(hidden_states.dtype), e, "down")
            out.index_add_(0, tok, (h * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def _apply(self, fn, recurse=True):
        self._wt = {}  # device moves invalidate the cached operands
        return super()._apply(fn, recurse)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.gate_up.float() * self.gate_up_scale[..., None],
                self.down.float() * self.down_scale[..., None])

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, act={self.act}"


def _llm_int8(lin: nn.Linear, threshold: float) -> nn.Module:
    import bitsandbytes as bnb

    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None,
                            has_fp16_weights=False, threshold=threshold)
    m.weight = bnb.nn.Int8Params(lin.weight.detach().float().clone(), requires_grad=False,
                                 has_fp16_weights=False)
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return m.to(lin.weight.device)  # bitsandbytes quantizes on this move


def expert_names(spec: ArchSpec, layer: str, e: int) -> tuple[str, str, str]:
    """Expert e's (gate, up, down) Linear names as the family's original checkpoints spell them."""
    return tuple(f"{layer}.{spec.experts.ckpt}.{e}.{n}" for n in spec.experts.names)
