"""W8A8 int8 quantization with plain tensors.

Int8Linear holds an int8 weight [out, in] with one fp32 scale per output channel (symmetric,
scale = absmax/127, round half to even) and quantizes its input per token (dynamic) or per tensor
(static scale from calibration). The GEMM is int8 x int8 -> int32 (`torch._int_mm`) with an fp32
scale epilogue; `fake=True` dequantizes instead and is the test oracle. Nothing quantizes
implicitly on `.to()`: only `quantize_` does."""
from __future__ import annotations

import fnmatch
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .calibration import ActivationStats, module_name, output_head, rotated_input, value_bin_centres
from .errors import OutlierqError, OutlierqNotice
from .evaluate import coarse_kl_sum, kl_sum, log_probs_, top_log_probs
from .gptq import gptq_codes
from .mitigate.surgery import set_module
from .models.arch import ArchSpec, decoder_layers, get_arch, quantizable, resolve
from .models.prepare import prepare


@dataclass(frozen=True)
class W8A8:
    """int8 weights per output channel; int8 activations per token (dynamic) or per tensor (static).

    Shaped like a compressed-tensors scheme: Linears matching `token_for` get per-token
    activations, every other quantizable Linear gets `act`, and `skip` (ignore) stays float.
    Patterns are fnmatch globs on module names ("*down_proj", "model.layers.0.*") or "re:" regexes,
    matched by `matches`, the one matcher quantize_, export and load share."""
    act: Literal["token", "tensor", "none"] = "token"   # "none": weight-only int8
    # Linears kept float. The output head is float by default (llm-compressor's and vLLM's
    # convention); `skip=()` quantizes it too (`--int8-head`): with a large vocabulary it is a
    # third of the prefill here, and a tied head is untied (the embeddings stay float).
    skip: tuple[str, ...] = ("lm_head",)
    fake: bool = False                                  # dequantize-and-matmul reference
    backend: str = "auto"
    # with act="tensor": Linears that keep per-token dynamic activations. Static per-tensor
    # scales cannot follow down_proj's token-to-token range (SwiGLU products), so
    # ("*down_proj",) buys most of the accuracy back while everything else stays static.
    token_for: tuple[str, ...] = ()
    # search a clip ratio per output channel of each Linear's int8 weights on the kept
    # calibration rows (`clip_search`); needs statistics with kept rows
    weight_clip: bool = False
    # round the int8 weights with GPTQ's error feedback (`outlierq.gptq`) instead of to nearest,
    # on the scale above; needs statistics calibrated with hessians=True. MoE experts stay
    # round-to-nearest.
    gptq: bool = False
    # with act="tensor": the static range of each input rotated online (rotate_down) is set
    # at the clip ratio of its max that gives the least int8 squared error over the calibration
    # values (`act_clip_search`), not at the max. After the rotation no single channel carries the
    # range, so a clip cuts a few large-norm tokens a little and refines everyone else's step
    # (results/ppl_*.md: SmolLM2 static +0.86% -> +0.49%, Gemma-3 +4.19% -> +1.72% with the
    # "token" objective below). Unrotated inputs keep their max:
    # there a clip cuts the massive channels (results/static_diagnosis_smollm2-135m.md: x0.5 on
    # down_proj takes KL from 0.034 to 0.187). None (the default): on wherever a static Linear
    # reads a rotated input, without a notice where none does.
    act_clip: bool | None = None
    # what act_clip's search weighs: "value" every value alike (the plain MSE, where the few
    # large-norm tokens decide the range), "token" every token alike (each value's squared error
    # over its token's mean square). "auto": "token" where the family normalises each sublayer's
    # output per token (`ArchSpec.output_norms`: there a token's error counts relative to its own
    # norm), else "value". Measured: the "+ act clip" rows ("value") against the "+ act clip
    # per token" rows of results/ppl_*.md.
    act_clip_objective: Literal["auto", "token", "value"] = "auto"
    # with act="tensor", > 0: once every static range is set (at its max, or act_clip's ratio),
    # scale the ranges of each kind of Linear (q_proj, ..., down_proj) by the factor of
    # RANGE_TUNE_GRID that gives the least KL of the model's next-token distribution from the
    # float model's on this many calibration windows (`tune_ranges`). act_clip scores each input's
    # own error; this scores what the model outputs. Needs the windows (outlierq.compress passes
    # its calibration windows) and the whole model (not layer by layer). The ranges stay plain
    # input scales: an exported checkpoint carries them.
    range_tune: int = 0
    # with range_tune: kinds (e.g. ("down_proj",)) whose Linears are then tuned one at a time on
    # the same windows, each by a factor of the grid on top of its kind's (one more pass of
    # coordinate descent, layer by layer). On Gemma-3's best static recipe down_proj's static
    # ranges are what is left (results/static_losses_gemma3-270m.md, 2 windows): every down_proj
    # per-token takes KL from 0.0179 to 0.0068, no other kind per-token helps. Its
    # large-norm tokens differ from layer to layer (results/static_diagnosis_gemma3-270m.md), so one
    # factor for every layer is coarse. But one layer's down_proj per-token alone never helps much
    # (0.0160 at best): the layers' errors interact, which a one-at-a-time descent may not undo.
    range_tune_each: tuple[str, ...] = ()
    # with range_tune: kinds (e.g. ("down_proj",)) whose static Linears get a second static range
    # for their kind's "quiet tokens" (`key_quiet_tokens`): token ids whose rows into some Linear of
    # the kind are often far below its range on the calibration windows. Which range a row takes is
    # looked up from the model's input ids, so no activation is measured at run time: the scales
    # stay constants. Why: on Gemma-3 the lone space token ' ' (3% of tokens) is bimodal in
    # down_proj (layers 7 and 9-15 most): most of its rows are among the largest, ~1 in 6 sit below
    # 1/16 of the range (down to 1/100), on a few of int8's steps, and the post-feedforward norm
    # scales that rounding noise back to full size. In a 2-window probe
    # (results/quiet_tokens_gemma3-270m.md), its rows per-token take the static KL from 0.0179 to
    # 0.0113, at a keyed static range x0.3 to 0.0134.
    # The quiet range's factor (on the Linear's range) is tuned per kind on range_tune's windows.
    # In memory only: a checkpoint has no place for a scale keyed by token id.
    quiet_tokens: tuple[str, ...] = ()
    # with quiet_tokens: tune the quiet range's factor on this many calibration windows instead of
    # range_tune's, scored by `coarse_kl_sum` against the float model's top QUIET_TOPK tokens per
    # position (full log-probabilities are 537 MB per 512-token window on Gemma-3's vocabulary).
    # Why: range_tune's 4 windows hold ~10 quiet ' ' rows on Gemma-3; there they pick factor 0.7
    # where the held-out probe (results/quiet_tokens_gemma3-270m.md) favours 0.3. Measured: 32
    # windows pick 0.7 too (results/ppl_gemma3-270m.md), so the study's best row keeps the default.
    quiet_tune: int = 0

    def __post_init__(self):
        for field in ("skip", "token_for"):  # a bare string would be read letter by letter
            if isinstance(getattr(self, field), str):
                raise OutlierqError(f"W8A8({field}=...) takes a tuple of target patterns, got the string "
                                    f"{getattr(self, field)!r}: write ({getattr(self, field)!r},)")
        if self.act_clip and self.act != "tensor":
            raise OutlierqError("W8A8(act_clip=True) sets static input ranges: use act='tensor'")
        if self.range_tune and self.act != "tensor":
            raise OutlierqError("W8A8(range_tune=N) tunes static input ranges: use act='tensor'")
        if self.range_tune_each and not self.range_tune:
            raise OutlierqError("W8A8(range_tune_each=...) refines range_tune's factors: set range_tune=N too")
        if self.quiet_tokens and not self.range_tune:
            raise OutlierqError("W8A8(quiet_tokens=...) tunes the quiet tokens' range on range_tune's windows: "
                                "set range_tune=N too")
        if self.range_tune < 0:
            raise OutlierqError(f"range_tune must be >= 0 windows, got {self.range_tune}")
        if self.quiet_tune and not self.quiet_tokens:
            raise OutlierqError("W8A8(quiet_tune=N) tunes the quiet tokens' range: set quiet_tokens=(kinds) too")
        if self.quiet_tune < 0:
            raise OutlierqError(f"quiet_tune must be >= 0 windows, got {self.quiet_tune}")
        if self.act_clip_objective not in ("auto",) + ACT_CLIP_OBJECTIVES:
            raise OutlierqError(f"act_clip_objective must be auto, token or value, got {self.act_clip_objective!r}")

    def act_for(self, name: str) -> str | None:
        """The activation mode of Linear `name`, or None when it stays float."""
        if matches(name, self.skip):
            return None
        return "token" if self.token_for and matches(name, self.token_for) else self.act


def _target_regex(pattern: str) -> str:
    """A target as a regex: "re:<regex>" as is, anything else an fnmatch glob; a bare name also
    matches as a suffix after a dot ("lm_head", "down_proj")."""
    if pattern.startswith("re:"):
        return pattern[3:]
    glob = fnmatch.translate(pattern)  # "(?s:...)\\Z" -> keep the body, anchor ourselves
    glob = glob[glob.index(":") + 1: glob.rindex(")")]
    bare = not any(c in pattern for c in "*?[")
    return f"(?:{glob}|.*\\.{glob})$" if bare else f"(?:{glob})$"


def matches(name: str, targets) -> bool:
    """True if module `name` matches any target: compressed-tensors' rule for "re:" regexes
    (re.match on the full name), fnmatch globs, and exact names or name suffixes."""
    return any(re.match(_target_regex(t), name) for t in targets)


@dataclass(frozen=True)
class LLMInt8:
    """bitsandbytes LLM.int8 (mixed int8/fp16 decomposition above `threshold`), as a baseline."""
    threshold: float = 6.0
    skip: tuple[str, ...] = ("lm_head",)


def quantize_weight(w: torch.Tensor, backend: str = "auto", clip: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (codes [N, K] int8, scale [N] f32), scale = absmax/127,
    or clip[n] * absmax/127 with a clip ratio per output channel (values beyond it saturate).
    With the input Hessian [K, K] the codes on that scale come from GPTQ (`gptq_codes`).

    A bf16/fp16 weight gets its scale rounded to that dtype first (the checkpoint stores scales in
    the model dtype) and its codes from the rounded scale, so the model outlierq evaluates is the
    one it exports."""
    if hessian is not None:
        _, scale = quantize_weight(w, backend, clip)
        return gptq_codes(w, hessian, scale), scale
    low = w.dtype in (torch.bfloat16, torch.float16)
    if clip is None and not low:
        q, scale, _ = ops.quantize_per_token(w.detach().float(), backend=backend)
        return q, scale
    wf = w.detach().to(torch.float32, copy=True)  # scaled in place below: never the caller's tensor
    scale = (wf.abs().amax(1) * (1.0 if clip is None else clip.float()) / 127.0).clamp(min=1e-12)
    if low:
        scale = scale.to(w.dtype).float().clamp(min=torch.finfo(w.dtype).tiny)
    return wf.mul_(scale.reciprocal()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


def stored_scale(value: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An activation scale as the checkpoint stores it (in the model dtype), back in float32."""
    return torch.as_tensor(value, dtype=torch.float32).clamp(min=1e-12).to(dtype).float()


CLIP_GRID = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00, 0.98, ..., 0.80


@torch.no_grad()
def clip_search(w: torch.Tensor, rows: torch.Tensor, grid: tuple[float, ...] = CLIP_GRID) -> torch.Tensor:
    """Per output channel, the clip ratio of `grid` whose int8 weights give the least squared
    output error on calibration rows [R, K] (float activations, as AWQ's clip search): output
    channel n depends on weight row n only, so each channel picks its own ratio. Returns [N]."""
    wf, x = w.detach().float(), rows.float()
    best_err = torch.full((wf.shape[0],), float("inf"))
    best = torch.ones(wf.shape[0])
    for r in grid:
        q, s = quantize_weight(wf, clip=torch.full_like(best, r))
        err = (x @ (wf - q.float() * s[:, None]).t()).pow(2).sum(0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


ACT_CLIP_OBJECTIVES = ("value", "token")  # the rows of a `calibration.value_histogram`
ACT_CLIP_GRID = tuple(round(1.0 - 0.01 * i, 2) for i in range(91))  # 1.00, 0.99, ..., 0.10


def act_clip_search(hist: torch.Tensor, amax: float, grid: tuple[float, ...] = ACT_CLIP_GRID) -> float:
    """The ratio r of `grid` whose static int8 step s = r * amax / 127 gives the least expected
    squared error over the (weighted) values in `hist` (one row of a `calibration.value_histogram`,
    each bin at its centre): values above 127 s saturate, values below s/2 round to zero, the rest carry the
    uniform rounding error s^2/12. The MSE calibration of TensorRT and AMD Quark, on a histogram
    of every value rather than a sample."""
    v, n = value_bin_centres(), hist.double()
    r = torch.tensor(grid, dtype=torch.float64)[:, None]
    s = r * amax / 127.0
    err = torch.where(v > 127 * s, (v - 127 * s) ** 2, torch.where(v < s / 2, v * v, s * s / 12))
    return grid[int((err * n).sum(1).argmin())]


def act_clip_objective(config: W8A8, spec: ArchSpec) -> str:
    """The objective W8A8.act_clip_objective stands for on a family ("auto" resolved)."""
    if config.act_clip_objective != "auto":
        return config.act_clip_objective
    return "token" if spec.output_norms else "value"


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
        self.input_rotation: nn.Module | None = None  # rotate_down's online rotation, kept as is
        # W8A8.quiet_tokens: rows of these token ids take the static range token_scale; the ids of
        # the pass in progress come from the model's TokenKeys (set by `key_quiet_tokens`)
        self.register_buffer("token_ids", None)
        self.register_buffer("token_scale", None)
        self.token_keys: TokenKeys | None = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, act="token", input_scale: float | None = None,
                    fake: bool = False, backend: str = "auto", clip: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None) -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act, fake, backend,
                dtype=lin.weight.dtype)
        q, s = quantize_weight(lin.weight, backend, clip, hessian)
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
            self._wt = ops.gemm_operand(self.weight.t())  # int8 codes, or fp32 codes where faster
        keyed = self._keyed_rows(x2)
        if keyed is not None:
            y = self._keyed_linear(x2, keyed)
        else:
            y = w8a8_linear(x2, self.weight, self.weight_scale, self.act, self.input_scale, self.fake,
                            self.backend, self._wt)
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
                f"act={self.act}, fake={self.fake}")


def w8a8_linear(x2: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, act: str,
                input_scale: torch.Tensor | None, fake: bool = False, backend: str = "auto",
                wt: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] float @ int8 weight [N, K] (per-row scales) -> fp32 [M, N], activations
    quantized per token / per tensor (or not: act="none"). `wt`: a cached contiguous weight.t()."""
    deq = lambda: weight.float() * weight_scale[:, None]  # noqa: E731
    if act == "none":
        return F.linear(x2.float(), deq())
    if act == "token":
        q, s, _ = ops.quantize_per_token(x2, backend=backend)
    else:
        q = ops.quantize_per_tensor(x2, input_scale, backend=backend)
        s = input_scale.expand(x2.shape[0])
    if fake:
        return (q.float() * s[:, None]) @ deq().t()
    return ops.int8_matmul(q, s, ops.gemm_operand(weight.t()) if wt is None else wt, weight_scale)


class Int8Experts(nn.Module):
    """int8 twin of transformers-5 fused MoE experts: per expert, gate|up [2I, H] and down [H, I]
    int8 codes with per-row scales, the same routed forward (only the experts the router picked
    run, weighted by its scores). Static activation scales: one per expert and projection."""

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


def quantizes_head(config: W8A8 | LLMInt8 | None) -> bool:
    """Whether the scheme quantizes the output head too (W8A8 with lm_head not skipped)."""
    return isinstance(config, W8A8) and not matches("lm_head", config.skip)


def _head_name(model: nn.Module) -> str | None:
    head = output_head(model)
    return None if head is None else module_name(model, head)


def _untie(model: nn.Module) -> None:
    """The head gets its own int8 codes: the checkpoint must not tie it back to the embeddings."""
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def quantize_(model: nn.Module, config: W8A8 | LLMInt8, stats: ActivationStats | None = None,
              progress: bool = True, check_stats: bool = True, only: list[int] | None = None,
              tune_windows: torch.Tensor | None = None) -> nn.Module:
    """Replace the decoder layers' Linears (and MoE experts) that the scheme targets, in place;
    returns the model. `stats` (needed for static activations) must describe this model as it is
    now: statistics from before a mitigation are refused unless check_stats=False, which risks
    static scales that no longer fit the weights. only: just these decoder layers (the
    layer-by-layer pipeline; the caller has checked the statistics). tune_windows: calibration
    token windows [S, L] for W8A8(range_tune=N) (the first N are used)."""
    if only is None:
        prepare(model)
    tune = isinstance(config, W8A8) and config.range_tune > 0
    if tune and only is not None:
        raise OutlierqError("W8A8(range_tune=N) scores the whole model's output: not available "
                            "layer by layer (--sequential)")
    if tune and (tune_windows is None or tune_windows.ndim != 2):
        raise OutlierqError("W8A8(range_tune=N) needs calibration token windows [S, L] "
                            "(quantize_(..., tune_windows=...); outlierq.compress passes its calibration windows, "
                            "or recalibrate_on= with statistics)")
    needed = max(config.range_tune, config.quiet_tune) if tune else 0
    if tune and needed > len(tune_windows):
        raise OutlierqError(f"W8A8 tunes on {needed} calibration windows, but {len(tune_windows)} were given: "
                            "calibrate on more (--samples) or tune on fewer")
    spec = get_arch(model)
    if isinstance(config, W8A8) and config.act == "tensor" and stats is None:
        raise OutlierqError("W8A8(act='tensor') needs calibration statistics for the input scales")
    if stats is not None and only is None:
        stats.check_matches(model, exact=check_stats)
    if stats is not None and stats.meta.get("recalibrate"):
        raise OutlierqError(f"the statistics of {stats.meta['recalibrate'][0]} (and "
                            f"{len(stats.meta['recalibrate']) - 1} more) are stale after rotate_down: "
                            "recalibrate the mitigated model (outlierq.compress does)")
    if isinstance(config, LLMInt8) and any(getattr(m, "input_rotation", None) is not None for m in model.modules()):
        raise OutlierqError("LLM.int8 (bitsandbytes) Linears cannot rotate their input online: drop "
                            "rotate_down from the recipe")
    if isinstance(config, W8A8) and config.weight_clip and (stats is None or not stats.samples):
        raise OutlierqError("W8A8(weight_clip=True) searches clip ratios on kept calibration rows: "
                            "calibrate with keep_rows > 0")
    if isinstance(config, W8A8) and config.gptq and (stats is None or not stats.hessians):
        raise OutlierqError("W8A8(gptq=True) rounds weights through the calibration Hessians: "
                            "calibrate with hessians=True (`outlierq calibrate --hessians`; compress and "
                            "--gptq without --stats do this)")
    if isinstance(config, LLMInt8) and spec.experts is not None:
        raise OutlierqError("LLM.int8 (bitsandbytes) quantizes nn.Linear only; MoE experts are "
                            "fused tensors here: use W8A8")
    names = quantizable(model, spec)
    head = _head_name(model) if isinstance(config, W8A8) and only is None else None
    if head is not None and not matches(head, config.skip):
        names.append(head)
        _untie(model)
    if isinstance(config, W8A8) and (only is None or 0 in only):  # (layer 0 first: all still float)
        unmatched = [p for p in config.token_for if not any(matches(n, (p,)) for n in names)]
        if unmatched:
            raise OutlierqError(f"token_for pattern {unmatched[0]!r} matches no quantizable Linear "
                                "(e.g. 'down_proj', '*mlp.down_proj', 're:.*layers\\.0\\..*')")
    mine = None if only is None else tuple(f"{spec.layers}.{i}." for i in only)
    targets = [(n, model.get_submodule(n)) for n in names
               if not matches(n, config.skip) and (mine is None or n.startswith(mine))]
    if tune:
        kinds = {n.rsplit(".", 1)[-1] for n, _ in targets if config.act_for(n) == "tensor"}
        for field in ("range_tune_each", "quiet_tokens"):
            stray = [k for k in getattr(config, field) if k not in kinds]
            if stray:
                raise OutlierqError(f"{field}: {stray[0]!r} is not the kind of any static Linear "
                                    f"(kinds: {', '.join(sorted(kinds))})")
    # act_clip: the static Linears whose input is rotated (`rotated_input`); histograms checked
    # before any Linear is replaced
    clipped = {n for n, lin in targets if isinstance(config, W8A8) and config.act_clip is not False
               and rotated_input(lin) and config.act_for(n) == "tensor"}
    if isinstance(config, W8A8) and config.act_clip is True and not clipped and (only is None or 0 in only):
        warnings.warn("act_clip: no static Linear reads a rotated input (add rotate_down to the recipe); "
                      "every static range stays at its max", OutlierqNotice, stacklevel=2)
    missing = sorted(n for n in clipped if getattr(stats.value_hists.get(n), "ndim", 0) != 2)
    if missing:
        raise OutlierqError(f"W8A8(act_clip=True): the statistics have no value histograms (or ones from an older outlierq) of "
                            f"{missing[0]}'s rotated input; recalibrate the mitigated model")
    act_clips: dict[str, float] = {}
    if clipped:
        row = ACT_CLIP_OBJECTIVES.index(act_clip_objective(config, spec))
    if tune:  # the float model's answer on the tuning windows, before any Linear is replaced
        calib_windows, tune_windows = tune_windows, tune_windows[:config.range_tune]
        ref = [_log_probs(model, w) for w in tune_windows]
        quiet_windows, quiet_ref = tune_windows, ref
        if config.quiet_tune:
            quiet_windows = calib_windows[:config.quiet_tune]
            quiet_ref = [top_log_probs(_logits(model, w), QUIET_TOPK) for w in quiet_windows]
    for name, lin in tqdm(targets, desc="quantize", unit="linear", disable=not progress):
        if isinstance(config, LLMInt8):
            new = _llm_int8(lin, config.threshold)
        else:
            act = config.act_for(name)
            scale = stats.input_absmax(name).max().item() / 127.0 if act == "tensor" else None
            if name in clipped:
                ratio = act_clip_search(stats.value_hists[name][row], scale * 127.0)
                scale *= ratio
                act_clips[name] = ratio
            clip = clip_search(lin.weight, stats.samples[name]) if config.weight_clip else None
            hess = stats.hessians[name] if config.gptq else None
            new = Int8Linear.from_linear(lin, act, scale, config.fake, config.backend, clip, hess)
        set_module(model, name, new)
    if spec.experts is not None:
        for i, layer in enumerate(decoder_layers(model, spec)):
            if only is not None and i not in only:
                continue
            pre = f"{spec.layers}.{i}"
            gate, _, down = expert_names(spec, pre, 0)
            acts = (config.act_for(gate) or "none", config.act_for(down) or "none")
            scales = None
            if "tensor" in acts:
                name = f"{pre}.{spec.experts.path}"
                n = resolve(layer, spec.experts.path).gate_up_proj.shape[0]
                scales = (torch.full((n,), stats.input_absmax(f"{name}.gate_up").max().item() / 127.0),
                          torch.tensor([stats.input_absmax(f"{name}.{e}.down").max().item() / 127.0
                                        for e in range(n)]))
            ex = resolve(layer, spec.experts.path)
            set_module(layer, spec.experts.path,
                       Int8Experts.from_experts(ex, acts, scales, config.fake, config.backend))
    if act_clips:  # the chosen static-range clips, for the record (compress, study rows)
        model.outlierq_act_clip = dict(getattr(model, "outlierq_act_clip", {}), **act_clips)
    if tune:
        model.outlierq_range_tune = tune_ranges(model, tune_windows, ref, progress=progress,
                                                each=config.range_tune_each)
        if config.quiet_tokens:
            model.outlierq_quiet_tokens = key_quiet_tokens(model, calib_windows, quiet_windows, quiet_ref,
                                                           config.quiet_tokens, progress=progress)
    return model


# factors on each kind's static ranges that range_tune tries: a coarse grid in ratio (1.0 is the
# ranges as calibrated), both ways
RANGE_TUNE_GRID = (0.55, 0.7, 0.85, 1.0, 1.15, 1.3)


@torch.no_grad()
def _logits(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(input_ids=window[None].to(device), use_cache=False).logits[0]


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    return log_probs_(_logits(model, window).float())


@torch.no_grad()
def _mean_kl(model: nn.Module, windows: torch.Tensor, ref: list) -> float:
    """Mean KL per token of the model's next-token distribution from `ref` on `windows`: each
    reference full log-probabilities (`kl_sum`) or a `top_log_probs` tuple (`coarse_kl_sum`)."""
    return sum((coarse_kl_sum if isinstance(r, tuple) else kl_sum)(_logits(model, w), r)
               for w, r in zip(windows, ref)) / windows.numel()


@torch.no_grad()
def tune_ranges(model: nn.Module, windows: torch.Tensor, ref: list[torch.Tensor],
                grid: tuple[float, ...] = RANGE_TUNE_GRID, progress: bool = True,
                each: tuple[str, ...] = ()) -> dict[str, float]:
    """Scale the static input ranges (`Int8Linear.input_scale`) of each kind of Linear (the last
    part of its name: every layer's down_proj together) by the factor of `grid` that gives the
    least mean KL of the model's next-token distribution from `ref` (the float model's
    log-probabilities on each of `windows`), one kind at a time in module order, the kinds before
    it at their chosen factor (coordinate descent, one pass). Then each Linear of the kinds in
    `each`, in module order, by a factor of `grid` on top of its kind's. Returns {kind: factor},
    and {Linear name: its own factor} for the Linears of `each`; MoE experts' ranges are left as
    they are.

    Why by kind first: (kinds) x (grid) forward passes, 36 on Gemma-3, rather than a hundred
    times that; and a factor shared by 18 layers is hard to overfit on a few windows. `each` adds
    (Linears of those kinds) x (grid - 1) passes where the numbers say one factor is too coarse."""

    # (name, Linear, its kind, its range as set before tuning)
    static = [(n, m, n.rsplit(".", 1)[-1], m.input_scale.clone()) for n, m in model.named_modules()
              if isinstance(m, Int8Linear) and m.act == "tensor"]
    chosen = dict.fromkeys((k for _, _, k, _ in static), 1.0)
    own = {n: 1.0 for n, _, k, _ in static if k in each}

    def set_factors(factors: dict[str, float], own: dict[str, float]) -> None:
        for n, m, k, base in static:
            m.input_scale.copy_(base * factors[k] * own.get(n, 1.0))

    def score(factors: dict[str, float], own: dict[str, float]) -> float:
        set_factors(factors, own)
        return _mean_kl(model, windows, ref)

    best = score(chosen, own)
    bar = tqdm(total=(len(chosen) + len(own)) * (len(grid) - 1), desc="range tune", unit="pass",
               disable=not progress)
    for kind in chosen:
        for f in grid:
            if f == chosen[kind]:
                continue
            kl = score(dict(chosen, **{kind: f}), own)
            bar.update()
            if kl < best:
                best, chosen[kind] = kl, f
    for name in own:
        for f in grid:
            if f == 1.0:
                continue
            kl = score(chosen, dict(own, **{name: f}))
            bar.update()
            if kl < best:
                best, own[name] = kl, f
    bar.close()
    set_factors(chosen, own)  # leave the chosen factors in place
    return {**chosen, **own}


# key_quiet_tokens: a row is quiet in a Linear when its largest value is below QUIET_LEVEL of the
# static range (fewer than 8 of int8's 127 steps); a token id is keyed when at least QUIET_SHARE of
# its QUIET_MIN_ROWS or more calibration rows are quiet in some Linear of the kind. The quiet
# range's factors on the Linear's range, tried from 1.0 (the plain static range) down.
QUIET_LEVEL, QUIET_SHARE, QUIET_MIN_ROWS = 1 / 16, 0.1, 8
QUIET_GRID = (1.0, 0.7, 0.5, 0.3, 0.2, 0.1)
# W8A8.quiet_tune's reference: each position's top tokens kept (`top_log_probs`)
QUIET_TOPK = 256


@torch.no_grad()
def key_quiet_tokens(model: nn.Module, windows: torch.Tensor, tune_windows: torch.Tensor,
                     ref: list, kinds: tuple[str, ...], grid: tuple[float, ...] = QUIET_GRID,
                     progress: bool = True) -> dict:
    """Give each static Int8Linear of `kinds` a second static range for its kind's quiet token ids.

    The ids: those whose rows (a Linear's input as it quantizes it, rotated where it rotates) fall
    below QUIET_LEVEL of its range in at least QUIET_SHARE of their occurrences on `windows` (the
    calibration windows) in at least one Linear of the kind; every Linear of the kind keys them.
    The range: the Linear's own times one factor per kind from `grid`, the one of least KL against
    `ref` (the float model's log-probabilities on `tune_windows`, full or `top_log_probs`), kinds
    in turn (as `tune_ranges`). A kind whose best factor is 1.0 keeps no keys: the model is as it was.
    Returns {"factors": {kind: f}, "ids": {kind: [token ids]}, "quiet_in": {kind: [Linear names
    where some id met the threshold]}, "kl": {kind: {factor: the mean KL it scored}}}.

    Why the kind's ids in every Linear of it, not each Linear's own: on Gemma-3, keying ' ' only
    in the down_projs where it passed the threshold (5 of 18, all 142 windows) took the static KL
    from 0.01718 to 0.01499; keying it in every down_proj, as scripts/quiet_tokens.py does, gave
    more in its probe (results/quiet_tokens_gemma3-270m.md). A quiet share near the threshold is
    noise on calibration text, and a keyed row that is loud is clipped at the quiet range, which
    the factor's tune weighs."""

    # (name, Linear, its kind)
    lins = [(n, m, n.rsplit(".", 1)[-1]) for n, m in model.named_modules()
            if isinstance(m, Int8Linear) and m.act == "tensor" and n.rsplit(".", 1)[-1] in kinds]
    device = next(model.parameters()).device
    quiet: dict[str, list[torch.Tensor]] = {n: [] for n, _, _ in lins}

    def hook(name):
        def h(m, args):
            x = args[0] if m.input_rotation is None else m.input_rotation(args[0])
            amax = x.reshape(-1, m.in_features).abs().amax(-1).float()
            quiet[name].append((amax < QUIET_LEVEL * 127 * m.input_scale.float()).cpu())
        return h

    handles = [m.register_forward_pre_hook(hook(n)) for n, m, _ in lins]
    try:
        for w in tqdm(windows, desc="quiet tokens", unit="window", disable=not progress):
            model(input_ids=w[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    uniq, inv, count = torch.unique(windows.reshape(-1), return_inverse=True, return_counts=True)
    found: dict[str, torch.Tensor] = {}  # kind -> whether each of `uniq` is quiet somewhere in it
    quiet_in: dict[str, list[str]] = {}
    for n, _, kind in lins:
        share = torch.zeros(len(uniq)).index_add_(0, inv, torch.cat(quiet[n]).float()) / count
        hit = (count >= QUIET_MIN_ROWS) & (share >= QUIET_SHARE)
        found[kind] = found.get(kind, torch.zeros_like(hit)) | hit
        if hit.any():
            quiet_in.setdefault(kind, []).append(n)
    ids = {k: uniq[hit].tolist() for k, hit in found.items() if hit.any()}
    if not ids:
        return {"factors": {}, "ids": {}, "quiet_in": {}, "kl": {}}
    keys = TokenKeys()
    keyed = [(n, m, k) for n, m, k in lins if k in ids]
    for _, m, k in keyed:
        m.token_ids, m.token_scale, m.token_keys = torch.tensor(ids[k], device=device), m.input_scale.clone(), keys
    hooks = [model.register_forward_pre_hook(keys.enter, with_kwargs=True),
             model.register_forward_hook(keys.leave, with_kwargs=True)]
    factors = dict.fromkeys(ids, 1.0)

    def score(fs: dict[str, float]) -> float:
        for _, m, k in keyed:
            m.token_scale.copy_(m.input_scale * fs[k])
        return _mean_kl(model, tune_windows, ref)

    best = score(factors)
    tried: dict[str, dict[float, float]] = {}  # each factor's KL, the kinds before at their choice
    for kind in factors:
        tried[kind] = {factors[kind]: best}
        for f in grid:
            if f == factors[kind]:
                continue
            kl = tried[kind][f] = score(dict(factors, **{kind: f}))
            if kl < best:
                best, factors[kind] = kl, f
    score(factors)
    for n, m, k in keyed:  # a kind whose quiet range stayed the plain one keeps no keys
        if factors[k] == 1.0:
            m.token_ids = m.token_scale = m.token_keys = None
    ids = {k: v for k, v in ids.items() if factors[k] != 1.0}
    if not ids:
        for h in hooks:
            h.remove()
    return {"factors": factors, "ids": ids, "quiet_in": quiet_in, "kl": tried}
