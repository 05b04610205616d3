"""SmoothQuant (Xiao et al., 2023): migrate activation range into the weights.

s_j = max|X_j|^alpha / max|W_j|^(1-alpha) per input channel j; X is divided by s (folded into the
preceding norm, or into the producer Linear's rows for pairs with no norm between them) and the
consumers' weight columns are multiplied by s. Function-preserving in exact arithmetic.

alpha=None searches alpha per smoothing group on the kept calibration rows, scoring each candidate
(and "no smoothing") by the group's W8A8 output error: what Intel Neural Compressor 2.x offered."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .. import ops
from ..calibration import ActivationStats
from ..errors import OutlierqError
from ..models.arch import ArchSpec, decoder_layers, get_arch, resolve, text_config
from ..quant.formats import INT8, Format, get_format
from . import surgery
from .registry import is_number, register
from ._stats import rescale_inputs

ALPHA_GRID = tuple(round(0.05 * i, 2) for i in range(21))


@dataclass(frozen=True)
class SmoothQuant:
    alpha: float | None = 0.5            # None: search per group over alpha_grid
    pairs: bool = True                   # also smooth v->o and up->down (no norm between)
    # the quantizer the alpha search scores for; None: the scheme's activation mode (filled in by
    # `pipeline.resolve_recipe`), per token when mitigating on its own
    act: Literal["token", "tensor"] | None = None
    # the number format it scores for (quant/formats.py); None: the scheme's (int8 on its own)
    format: Literal["int8", "fp8"] | None = None
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    clamp: float = 1e-5                  # floor for both maxima: a zero channel gives no inf/NaN
    # the search's score: "sum" = total squared output error / total output energy over the kept
    # rows (a few massive-activation rows dominate it); "token" = each row's relative error,
    # averaged, so every token weighs alike, as in perplexity
    objective: Literal["sum", "token"] = "sum"

    def __post_init__(self):
        num = is_number
        if self.alpha is not None and not (num(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise OutlierqError(f"SmoothQuant alpha must be a number in [0, 1] or search, got {self.alpha!r}")
        if self.act not in ("token", "tensor", None):
            raise OutlierqError(f"SmoothQuant act must be token or tensor, got {self.act!r}")
        if self.format not in ("int8", "fp8", None):
            raise OutlierqError(f"SmoothQuant format must be int8 or fp8, got {self.format!r}")
        if not isinstance(self.pairs, bool):
            raise OutlierqError(f"SmoothQuant pairs must be true or false, got {self.pairs!r}")
        if not self.alpha_grid or not all(num(a) and 0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise OutlierqError(f"SmoothQuant alpha_grid must be numbers in [0, 1], got {self.alpha_grid!r}")
        if self.objective not in ("sum", "token"):
            raise OutlierqError(f"SmoothQuant objective must be sum or token, got {self.objective!r}")
        if not (num(self.clamp) and 0 < self.clamp < 1):
            raise OutlierqError(f"SmoothQuant clamp must be in (0, 1), got {self.clamp!r}")


def _factors(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float, clamp: float) -> torch.Tensor:
    x_max = x_max.double().clamp(min=clamp)
    w_max = w_max.double().clamp(min=clamp)
    return (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=clamp, max=1.0 / clamp)


def _fake_q_rows(x: torch.Tensor, fmt: Format = INT8) -> torch.Tensor:
    """Rows quantized per row (symmetric, absmax) to `fmt` and dequantized."""
    if fmt is INT8:
        q, s, _ = ops.quantize_per_token(x)
        return q.float() * s[:, None]
    s = (x.float().abs().amax(1) / fmt.qmax).clamp(min=1e-12)[:, None]
    return fmt.snap(x.float() / s) * s


def _group_error(x: torch.Tensor, ws: list[torch.Tensor], s: torch.Tensor, act: str,
                 x_max: torch.Tensor, objective: str = "sum", fmt: Format = INT8) -> float:
    """Relative W8A8 output error (in `fmt`) of consumers `ws` on rows x when smoothed by s: over
    all rows ("sum"), or per row then averaged ("token")."""
    s = s.float()
    xs = x / s
    if act == "token":
        xq = _fake_q_rows(xs, fmt)
    elif fmt is INT8:
        scale = (x_max / s).max() / 127.0
        xq = ops.quantize_per_tensor(xs, scale.reshape(1)).float() * scale
    else:
        scale = (x_max / s).max() / fmt.qmax
        xq = fmt.snap(xs.float() / scale) * scale
    num = den = 0.0
    rows_num = torch.zeros(x.shape[0], dtype=torch.float64)
    rows_den = torch.zeros(x.shape[0], dtype=torch.float64)
    for w in ws:
        ref = x @ w.float().t()
        out = xq @ _fake_q_rows(w.float() * s[None, :], fmt).t()
        if objective == "token":
            rows_num += (out - ref).double().pow(2).sum(1)
            rows_den += ref.double().pow(2).sum(1)
        else:
            num += (out - ref).pow(2).sum().item()
            den += ref.pow(2).sum().item()
    if objective == "token":
        return (rows_num / rows_den.clamp(min=1e-30)).mean().item()
    return num / max(den, 1e-30)


def _choose(cfg: SmoothQuant, xr: torch.Tensor, wr: torch.Tensor, ws: list[torch.Tensor],
            sample: torch.Tensor | None, x_max: torch.Tensor, cmap: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, float | None]:
    """Smoothing factors over rows (xr/wr: per-row maxima; `cmap` maps consumer input channels to
    rows, None = identity): a fixed alpha, or the best of the grid, where None = no smoothing."""
    if cfg.alpha is not None:
        return _factors(xr, wr, cfg.alpha, cfg.clamp), cfg.alpha
    if sample is None:
        raise OutlierqError("SmoothQuant alpha search needs kept calibration rows: calibrate with "
                            "keep_rows > 0 (CLI: --keep-rows 256)")
    expand = (lambda f: f) if cmap is None else (lambda f: f[cmap])
    act, fmt = cfg.act or "token", get_format(cfg.format or "int8")
    best_err, best_a = _group_error(sample, ws, torch.ones_like(x_max), act, x_max, cfg.objective, fmt), None
    for a in cfg.alpha_grid:
        err = _group_error(sample, ws, expand(_factors(xr, wr, a, cfg.clamp)), act, x_max, cfg.objective, fmt)
        if err < best_err:
            best_err, best_a = err, a
    if best_a is None:
        return torch.ones_like(xr, dtype=torch.float64), None
    return _factors(xr, wr, best_a, cfg.clamp), best_a


def _row_maxima(cmap: torch.Tensor, x_max: torch.Tensor, w_max: torch.Tensor):
    """Reduce per-consumer-channel maxima onto the producer rows feeding them (`cmap[c]` = row of
    channel c): (rows used, channel -> position in rows, x maxima per row, w maxima per row)."""
    rows, inv = torch.unique(cmap, return_inverse=True)
    xr = torch.zeros(rows.numel()).scatter_reduce(0, inv, x_max.float(), "amax", include_self=False)
    wr = torch.zeros(rows.numel()).scatter_reduce(0, inv, w_max.float(), "amax", include_self=False)
    return rows, inv, xr, wr


@torch.no_grad()
def apply_smoothquant(model: nn.Module, stats: ActivationStats, cfg: SmoothQuant,
                      only: list[int] | None = None) -> ActivationStats:
    """Fold SmoothQuant into `model`'s weights (only decoder layers `only` if given); returns
    statistics of the smoothed model."""
    spec: ArchSpec = get_arch(model)
    chosen: dict[str, float | None] = {}
    cfg_text = text_config(model)
    for i, layer in enumerate(decoder_layers(model, spec)):
        if only is not None and i not in only:
            continue
        pre = f"{spec.layers}.{i}."
        for g in spec.groups:
            if not g.applies(i):
                continue
            ex = resolve(layer, g.experts) if g.experts else None
            names = [pre + n for n in g.linears] + ([f"{pre}{g.experts}.gate_up"] if ex is not None else [])
            quantized = [resolve(layer, n).weight.detach() for n in g.linears if n not in spec.keep_float]
            if ex is not None:
                quantized += list(ex.gate_up_proj.detach())
            x_max = stats.input_absmax(names[0])
            w_max = torch.stack([w.abs().amax(0).float() for w in quantized]).amax(0)
            s, a = _choose(cfg, x_max, w_max, quantized, stats.samples.get(names[0]), x_max)
            surgery.scale_norm_output(resolve(layer, g.norm), g.kind or spec.norm_kind, s)
            for n in g.linears:
                surgery.scale_linear_input(resolve(layer, n), s)
            if g.router:  # the router reads the same norm: same scale, or routing changes
                surgery.scale_linear_input(resolve(layer, g.router), s)
            if ex is not None:
                surgery.scale_experts_input(ex, s)
            stats = rescale_inputs(stats, names, s)
            chosen[pre + g.norm] = a
        if not cfg.pairs:
            continue
        for p in spec.pairs:
            if not p.applies(i):
                continue
            prod, cons = resolve(layer, p.producer), resolve(layer, p.consumer)
            name = pre + p.consumer
            x_max = stats.input_absmax(name)
            w_max = cons.weight.detach().abs().amax(0).float()
            cmap = p.rows(cfg_text) if p.rows else torch.arange(x_max.numel())
            rows, inv, xr, wr = _row_maxima(cmap, x_max, w_max)
            sr, a = _choose(cfg, xr, wr, [cons.weight.detach()], stats.samples.get(name), x_max, inv)
            s_prod = torch.ones(prod.weight.shape[0], dtype=torch.float64)
            s_prod[rows] = sr.double()
            surgery.scale_linear_output(prod, s_prod)
            surgery.scale_linear_input(cons, sr[inv])
            stats = rescale_inputs(stats, [name], sr[inv])
            chosen[name] = a
        if spec.experts is not None:  # each expert's up rows -> its down_proj columns
            ex = resolve(layer, spec.experts.path)
            factors = []  # expert e's factors depend on its own down_proj only: apply all at once
            for e in range(ex.down_proj.shape[0]):
                name = f"{pre}{spec.experts.path}.{e}.down"
                x_max = stats.input_absmax(name)
                down = ex.down_proj[e].detach()
                s, a = _choose(cfg, x_max, down.abs().amax(0).float(), [down],
                               stats.samples.get(name), x_max)
                factors.append(s)
                stats = rescale_inputs(stats, [name], s)
                chosen[name] = a
            surgery.scale_expert_pairs(ex, torch.stack(factors))
    stats.meta = dict(stats.meta, smoothquant_alpha=chosen)
    return stats


register("smoothquant", SmoothQuant, apply_smoothquant, needs_rows=lambda c: c.alpha is None)
