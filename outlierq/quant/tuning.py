"""Tuning steps on top of plain rounding: the static-range clip of rotated inputs (act_clip), the
end-to-end range tune by kind (range_tune), a second static range for quiet tokens (quiet_tokens,
in memory only), and the Linears left float where int8 costs most (keep_float)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import value_bin_centres
from ..errors import OutlierqError
from ..evaluate import coarse_kl_sum, kl_sum, log_probs_
from ..mitigate.rotate_down import BlockRotation
from ..mitigate.surgery import set_module
from ..models.arch import ArchSpec
from .modules import Int8Linear, TokenKeys
from .scheme import ACT_CLIP_GRID, W8A8


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


# factors on each kind's static ranges that range_tune tries: a coarse grid in ratio (1.0 is the
# ranges as calibrated), both ways
RANGE_TUNE_GRID = (0.55, 0.7, 0.85, 1.0, 1.15, 1.3)


@torch.no_grad()
def _logits(model: nn.Module, window: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of `window` [L], at `positions` only if given (transformers' logits_to_keep:
    the output head, the largest Linear of a big-vocabulary model, runs on those rows alone)."""
    device = next(model.parameters()).device
    if positions is None:
        return model(input_ids=window[None].to(device), use_cache=False).logits[0]
    try:
        return model(input_ids=window[None].to(device), use_cache=False, logits_to_keep=positions.to(device)).logits[0]
    except TypeError:  # (a model class without logits_to_keep)
        return model(input_ids=window[None].to(device), use_cache=False).logits[0, positions.to(device)]


def _log_probs(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    return log_probs_(_logits(model, window).float())


@torch.no_grad()
def _mean_kl(model: nn.Module, windows: torch.Tensor, ref: list, positions: torch.Tensor | None = None) -> float:
    """Mean KL per token of the model's next-token distribution from `ref` on `windows` (at
    `positions` of each, if given): each reference full log-probabilities (`kl_sum`) or a
    `top_log_probs` tuple (`coarse_kl_sum`)."""
    n = windows.numel() if positions is None else len(windows) * len(positions)
    return sum((coarse_kl_sum if isinstance(r, tuple) else kl_sum)(_logits(model, w, positions), r)
               for w, r in zip(windows, ref)) / n


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
# keep_float scores every KEEP_FLOAT_STRIDE-th position of its windows
KEEP_FLOAT_STRIDE = 4


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
    from 0.01718 to 0.01499; keying it in every down_proj, as the probe of results/quiet_tokens_gemma3-270m.md did, gave
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


@torch.no_grad()
def keep_float(model: nn.Module, originals: dict[str, nn.Module], n: int, windows: torch.Tensor, ref: list,
               positions: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Put back to float the `n` quantized Linears whose int8 error costs the model most: each
    Linear of `originals` (name -> the float Linear it replaced) in turn is swapped back, the mean KL
    from `ref` (the float model's `top_log_probs` on `windows`) scored, and swapped out again; the
    `n` of largest KL drop stay float (plain Linears: a block rotation is folded back into the
    weight, so a checkpoint lists them in `ignore` with no transform). Returns {"linears": [names],
    "kl_drop": {name: drop}, "kl": [before, after]}.

    Why one pass, each Linear alone: (Linears) passes, not (Linears x n); the drops of two Linears
    need not add up (their errors interact), which the record's kl after shows. `positions`: the
    rows of each window scored (every position's hidden state is still computed; the head runs
    on these alone: on Gemma-3's 262k-token vocabulary it costs more than the decoder layers)."""
    before = _mean_kl(model, windows, ref, positions)
    drop = {}
    for name, lin in tqdm(originals.items(), desc="keep float", unit="linear", disable=not progress):
        q = model.get_submodule(name)
        set_module(model, name, lin)
        drop[name] = before - _mean_kl(model, windows, ref, positions)
        set_module(model, name, q)
    kept = sorted(drop, key=lambda k: -drop[k])[:n]
    for name in kept:
        lin = originals[name]
        rot = getattr(lin, "input_rotation", None)
        if isinstance(rot, BlockRotation):  # x R W^T = x (W R^T)^T
            plain = nn.Linear(lin.in_features, lin.out_features, lin.bias is not None,
                              device=lin.weight.device, dtype=lin.weight.dtype)
            plain.weight.copy_(rot.fold(lin.weight, transpose=True))
            if lin.bias is not None:
                plain.bias.copy_(lin.bias)
            lin = plain
        set_module(model, name, lin)
    return {"linears": kept, "kl_drop": {k: drop[k] for k in kept}, "kl": [before, _mean_kl(model, windows, ref, positions)]}


# --- the registry: what each step needs, and where it can run -----------------------------------

NEEDS = {"rows": "kept calibration rows (calibrate with keep_rows > 0)",
         "hessians": "calibration Hessians (calibrate with hessians=True, `outlierq calibrate --hessians`)",
         "windows": "calibration token windows [S, L] (outlierq.compress passes its own; with a statistics "
                    "file, recalibrate_on=windows; CLI: drop --stats)"}


@dataclass(frozen=True)
class TuningStep:
    """A tuning step on top of plain rounding, by the name `--tune` gives it. Its settings are fields
    of the scheme (W8A8 stays plain data); this says what turns it on and off, what it needs, and
    whether a checkpoint carries its result and the layer-by-layer pipeline can run it. What it
    chose lands in `model.outlierq_tuning[name]`, which CompressResult.record and the export's
    outlierq.json both copy."""
    name: str
    on: dict[str, Any]              # the scheme fields `--tune <name>` sets
    off: dict[str, Any]             # the fields that leave it out
    active: Callable[[W8A8], bool]  # does a scheme run it?
    options: dict[str, str] = field(default_factory=dict)  # `--tune name:option=v` -> scheme field
    needs: tuple[str, ...] = ()     # keys of NEEDS
    exported: bool = True           # a checkpoint carries its result
    layer_by_layer: bool = True     # runs in the layer-by-layer pipeline (`outlierq.sequential`)
    help: str = ""


TUNING: dict[str, TuningStep] = {s.name: s for s in (
    TuningStep("gptq", {"gptq": True}, {"gptq": False}, lambda s: s.gptq, needs=("hessians",),
               layer_by_layer=False,  # (every Linear's Hessian of a big model at once would not fit)
               help="round the weights with GPTQ's error feedback through the calibration Hessians "
                    "(calibration takes ~1.7x as long)"),
    TuningStep("weight_clip", {"weight_clip": True}, {"weight_clip": False}, lambda s: s.weight_clip,
               needs=("rows",), help="a clip ratio per output channel of the weights, searched on kept rows"),
    TuningStep("act_clip", {"act_clip": True}, {"act_clip": False},
               lambda s: s.act == "tensor" and s.format == "int8" and s.act_clip is not False,
               options={"objective": "act_clip_objective"},
               help="static ranges of inputs rotated online (rotate_down) at the clip with the least int8 "
                    "error, not at the max; objective=value|token|auto"),
    TuningStep("range_tune", {"range_tune": 4}, {"range_tune": 0, "range_tune_each": ()},
               lambda s: s.range_tune > 0, options={"windows": "range_tune", "each": "range_tune_each"},
               needs=("windows",), layer_by_layer=False,
               help="scale each kind's static ranges by the factor of least KL from the float model on "
                    "`windows` calibration windows (4); each=down_proj|...: then each Linear of those kinds"),
    TuningStep("quiet_tokens", {"quiet_tokens": ("down_proj",)}, {"quiet_tokens": (), "quiet_tune": 0},
               lambda s: bool(s.quiet_tokens), options={"kinds": "quiet_tokens", "windows": "quiet_tune"},
               needs=("windows",), exported=False, layer_by_layer=False,
               help="a second static range for token ids far below the range (kinds=down_proj|...), tuned "
                    "on range_tune's windows or `windows`; in memory only"),
    TuningStep("keep_float", {"keep_float": 2}, {"keep_float": 0, "keep_float_kinds": (), "keep_float_windows": 2},
               lambda s: s.keep_float > 0,
               options={"n": "keep_float", "kinds": "keep_float_kinds", "windows": "keep_float_windows"},
               needs=("windows",), layer_by_layer=False,
               help="leave float the n Linears (2; of kinds=down_proj|...) whose int8 error costs most KL, "
                    "each scored alone on `windows` calibration windows (2); a checkpoint lists them in ignore"),
)}


def steps_of(scheme) -> list[TuningStep]:
    """The tuning steps a scheme runs (none for LLM.int8 or a float export)."""
    return [s for s in TUNING.values() if isinstance(scheme, W8A8) and s.active(scheme)]


def parse_tune(spec: str, layer_by_layer: bool = False, saved_stats: bool = False) -> dict[str, Any]:
    """`--tune` as scheme fields: "auto" (the steps measured to help wherever they run: GPTQ, which
    needs the Hessians that neither the layer-by-layer pipeline nor a statistics file holds, and
    act_clip, which acts only where a static input is rotated), "none", or steps joined by '+' with options as in recipes,
    list values joined by '|': "gptq+range_tune:windows=4,each=down_proj". Steps not named are off."""
    fields: dict[str, Any] = {k: v for s in TUNING.values() for k, v in s.off.items()}
    if spec == "auto":
        fields.update(gptq=not layer_by_layer and not saved_stats, act_clip=None)
        return fields
    if spec in ("none", ""):
        return fields
    for part in spec.split("+"):
        name, _, opts = part.strip().partition(":")
        step = TUNING.get(name)
        if step is None:
            raise OutlierqError(f"unknown tuning step {name!r} in --tune {spec!r}; known: auto, none, "
                                f"{', '.join(TUNING)}")
        fields.update(step.on)
        for o in filter(None, opts.split(",")):
            k, eq, v = o.partition("=")
            if not eq or k not in step.options:
                raise OutlierqError(f"--tune {name}: option {o!r}; write key=value with key one of "
                                    f"{', '.join(step.options) or '(none: it takes no options)'}")
            target = step.options[k]
            like = getattr(W8A8(), target)  # (the field's default says its type)
            if isinstance(like, tuple):
                fields[target] = tuple(x for x in v.split("|") if x)
            elif isinstance(like, int) and not isinstance(like, bool):
                if not v.isdigit():
                    raise OutlierqError(f"--tune {name}: {k}={v!r} must be a whole number >= 0")
                fields[target] = int(v)
            else:
                fields[target] = v  # (a name: the scheme checks it)
    return fields


def check_needs(scheme, stats, windows, layer_by_layer: bool) -> None:
    """One line, before any Linear is replaced, for a step the run cannot feed."""
    if layer_by_layer:
        check_layer_by_layer(scheme)
    for s in steps_of(scheme):
        for need in s.needs:
            have = {"rows": stats is not None and bool(stats.samples),
                    "hessians": stats is not None and bool(stats.hessians),
                    "windows": windows is not None and getattr(windows, "ndim", 0) == 2}[need]
            if not have:
                raise OutlierqError(f"tuning step {s.name} needs {NEEDS[need]}")


def check_layer_by_layer(scheme) -> None:
    stray = [s.name for s in steps_of(scheme) if not s.layer_by_layer]
    if stray:
        raise OutlierqError(f"tuning step {stray[0]} is not available layer by layer (--sequential, or a model "
                            "too big for memory): quantize in memory, or leave it out of --tune")


def check_exported(scheme) -> None:
    """A checkpoint cannot carry what an in-memory-only step chose."""
    stray = [s.name for s in steps_of(scheme) if not s.exported]
    if stray:
        raise OutlierqError(f"tuning step {stray[0]} lives in memory only (no checkpoint format carries it): "
                            "leave it out of --tune to export")
