"""The whole chain in one call: calibrate -> mitigate -> quantize, for the CLI, every script and
users. In the spirit of llm-compressor's `oneshot`, with a short signature:

    result = outlierq.compress(model, tok)                        # default recipe, per-token W8A8
    result = outlierq.compress(model, tok, "smoothquant:alpha=0.8", W8A8(act="tensor"))
    outlierq.export(result.model, "ckpt/", tok, recipe=result.recipe, stats=result.stats)
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import ActivationStats, calibrate
from .errors import OutlierqError
from .mitigate.recipe import CHOSEN, applied, mitigate, parse_recipe, recipe_to_list
from .mitigate.registry import lookup
from .mitigate.smoothquant import SmoothQuant
from .models.prepare import prepare
from .models.arch import get_arch
from .quant import LLMInt8, W8A8, quantize_
from .quant.scheme import preset

# "auto": the best recipe measured for the model's family and the activation mode (16 windows of
# results/ppl_<model>.md; see DEFAULTS). Families with no built-in model measured get the
# Llama-family (SmolLM2) choice.
DEFAULT_RECIPE = "auto"
_SPLIT_SQ = "split:ratio=4+smoothquant:alpha=search,act={act}"
# rotate first, and rotate_down's exported block-128 rotation last (the split width padded for it)
_R4 = "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down"
DEFAULTS: dict[tuple[str, str], str] = {
    # results/ppl_smollm2-135m.md: best static row among the defaults measured on all windows;
    # the per-token choice for families that cannot be rotated
    ("*", "token"): _SPLIT_SQ,
    ("*", "tensor"): _SPLIT_SQ,
    # results/ppl_smollm2-135m.md (16 windows): rotating first takes per-token W8A8 from +0.84%
    # to +0.32% (KL 0.00925 -> 0.00724); then rotate_down's exported block-128 rotation, its
    # channels dealt to the blocks, to +0.14% (KL 0.00212), as good as the full-width rotation in
    # memory (+0.15%)
    ("rotatable", "token"): _R4,
    # the same with static activations, act_clip on the rotated inputs (W8A8's default): +0.56%
    # (KL 0.00572; undealt +1.19%; one dense block +0.85%, but vLLM serves it no faster than the
    # float model: results/serve_speed_smollm2-135m_static.md)
    ("rotatable", "tensor"): _R4,
    # results/ppl_gemma3-270m.md: a fixed alpha=0.8 beats the search for per-token activations
    # (+0.73% vs +1.40%); split + search is best static (+4.41% vs +6.34%). rotate_down's exported
    # block-128 rotation after alpha=0.8 + GPTQ: +0.74% (KL 0.00551, top-1 96.38%) against +1.49%
    # (KL 0.01272) without it, both calibrated on the text as text (the +0.32% of earlier rows was
    # calibrated on the `<unk>` ids, before 6f67b85); the full-width rotation in memory: +0.61%
    # (undealt, as measured: Gemma has no split, so dealing only spreads the largest channels).
    # Rotating every Linear input online by the same exported block (Gemma's post norms rule out
    # the offline rotation; q/k_proj's inputs were what keep_float found costliest): -0.07%
    # (KL 0.00204, top-1 97.74%), the KL 2.4x lower
    ("gemma", "token"): "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=false",
    # static: the same recipe; the rotation of every input lets act_clip reach every static
    # range: +1.17% (KL 0.01669) against +4.41% for split + searched SmoothQuant, the static
    # default before it. Dealt: +1.01% but KL 0.01774; the default follows KL
    ("gemma", "tensor"): "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=false",
}
KEEP_ROWS = 256  # rows kept per Linear input when a mitigation searches on them


@dataclass(frozen=True)
class Calibration:
    """Which text calibrates, and how much of it."""
    data: str = "wikitext2"        # built-in name (its calibration split) or a text file
    samples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8
    keep_rows: int | None = None   # None: KEEP_ROWS if a mitigation needs rows, else 0

    def __post_init__(self):
        for k in ("samples", "seqlen", "batch_size"):
            if getattr(self, k) < 1:
                raise OutlierqError(f"calibration {k} must be at least 1, got {getattr(self, k)}")


@dataclass
class CompressResult:
    model: nn.Module                   # mitigated and (unless scheme=None) quantized, in place
    recipe: list                       # the resolved mitigation configs
    scheme: W8A8 | LLMInt8 | None
    stats: ActivationStats             # statistics of the mitigated model
    stats_before: ActivationStats      # as calibrated, before any mitigation
    record: dict[str, Any] = field(default_factory=dict)  # provenance: recipe, alphas, timings


def default_recipe(spec, act: str = "token", layer_by_layer: bool = False) -> str:
    """The recipe "auto" stands for, for a family (its `ArchSpec`) and activation mode. Layer by
    layer, rotation (which changes the embeddings and every layer at once) and rotate_down are
    left out."""
    act = "tensor" if act == "tensor" else "token"
    group = ("gemma" if spec.family.startswith("gemma") else
             "rotatable" if spec.rotatable and not layer_by_layer else spec.family)
    recipe = DEFAULTS.get((group, act)) or DEFAULTS[("*", act)]
    if layer_by_layer:  # (rotate_down recalibrates the mitigated model, which needs all of it)
        recipe = "+".join(p for p in recipe.split("+") if p.partition(":")[0] != "rotate_down")
    return recipe


def resolve_recipe(recipe: str | list | None, act: str = "token", model: nn.Module | None = None,
                   layer_by_layer: bool = False, fmt: str = "int8") -> list:
    """A recipe from a list of configs, a spec string ("{act}" is the activation mode), "none",
    or "auto" (the family's default: needs `model`; without it, only checked to be "auto").
    `fmt`: the scheme's number format, which a SmoothQuant search scores for like `act`."""
    if recipe is None or recipe == "none" or recipe == "":
        return []
    if recipe == "auto":
        if model is None:
            return []
        recipe = default_recipe(get_arch(model), act, layer_by_layer)
    configs = parse_recipe(recipe.format(act=act)) if isinstance(recipe, str) else list(recipe)
    # a SmoothQuant search scores for the activations the scheme quantizes (unless the recipe says)
    return [dataclasses.replace(c, act=c.act or act, format=c.format or fmt) if isinstance(c, SmoothQuant) else c
            for c in configs]


def compress(model: nn.Module, tokenizer=None, recipe: str | list | None = DEFAULT_RECIPE,
             scheme: W8A8 | LLMInt8 | str | None = W8A8(),
             calibration: Calibration | torch.Tensor | ActivationStats | None = Calibration(),
             progress: bool = True, check_stats: bool = True,
             recalibrate_on: torch.Tensor | None = None) -> CompressResult:
    """Calibrate `model`, fold `recipe` into its weights and quantize it with `scheme`, in place.

    calibration: a `Calibration` (needs `tokenizer`), token windows [S, L], or statistics already
    taken on this model (kept rows included if the recipe searches); None when neither the recipe
    nor the scheme needs statistics. scheme=None: mitigate only. check_stats=False accepts
    statistics whose weight fingerprint differs from the model's (risk: wrong scales).
    recalibrate_on: with statistics passed in, the token windows a recalibrating step (rotate_down)
    records the mitigated model on, and W8A8(range_tune=N) tunes on (the ones the statistics
    came from)."""
    prepare(model)  # unsupported families fail here, before any work
    if isinstance(scheme, str):  # a preset by name ("FP8_DYNAMIC")
        scheme = preset(scheme)
    act = scheme.act if isinstance(scheme, W8A8) else "token"
    configs = resolve_recipe(recipe, act, model, fmt=getattr(scheme, "format", "int8"))
    # Data-free steps (rotation) go first and change what statistics describe: apply them before
    # calibrating. Statistics passed in must then describe the rotated model (the fingerprint).
    first = [c for c in itertools.takewhile(lambda c: lookup(c).data_free, configs)]
    if any(lookup(c).data_free for c in configs[len(first):]):
        raise OutlierqError("a data-free step (rotate) must come first in the recipe")
    if first:
        mitigate(model, None, first)
    configs = configs[len(first):]
    t0 = time.perf_counter()
    if calibration is None:
        if configs or (isinstance(scheme, W8A8) and scheme.act == "tensor"):
            raise OutlierqError("this recipe / static scheme needs calibration statistics")
        if scheme is not None:
            quantize_(model, scheme, None, progress=progress)
        return CompressResult(model, first, scheme, None, None,
                              {"recipe": recipe_to_list(first), "calibration": None})
    if isinstance(calibration, ActivationStats):
        if any(lookup(c).recalibrates for c in configs) and recalibrate_on is None:
            raise OutlierqError(f"{next(lookup(c).name for c in configs if lookup(c).recalibrates)} "
                                "recalibrates the mitigated model: pass calibration windows or a "
                                "Calibration, not statistics (or recalibrate_on=windows; CLI: drop --stats)")
        stats = calibration  # mitigate() below checks they describe this model
        windows = recalibrate_on
        calib_info: dict[str, Any] = {"stats": stats.meta.get("model")}
        keep = max((v.shape[0] for v in stats.samples.values()), default=0)
        run_calibration = lambda names=None: calibrate(  # noqa: E731
            model, recalibrate_on, keep_rows=keep, seed=stats.meta.get("seed", 0), progress=progress,
            meta=stats.meta, hessians=bool(stats.hessians), names=names)
    else:
        cal, windows, keep, meta = calibration_plan(model, tokenizer, calibration, configs, scheme)
        run_calibration = lambda names=None: calibrate(  # noqa: E731
            model, windows, batch_size=cal.batch_size, keep_rows=keep, seed=cal.seed, progress=progress,
            meta=meta, hessians=getattr(scheme, "gptq", False), names=names)
        stats = run_calibration()
        calib_info = asdict(cal) if isinstance(calibration, Calibration) else {"windows": list(windows.shape)}
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mitigated = mitigate(model, stats, configs, check_stats=check_stats)
    if mitigated is not None and mitigated.meta.get("recalibrate"):
        # (rotate_down) the named inputs' statistics do not carry over: take them from the
        # mitigated model itself, on the same windows
        t1 = time.perf_counter()
        mitigated = refresh(mitigated, run_calibration(mitigated.meta["recalibrate"]))
        calib_s += time.perf_counter() - t1
    if first:  # (the rotations ran before calibration: record them with the other choices)
        done = {k: getattr(model, f"outlierq_{k}", None) for k in ("rotation", "head_rotation")}
        mitigated.meta = dict(mitigated.meta, **{k: v for k, v in done.items() if v})
    if scheme is not None:
        quantize_(model, scheme, mitigated, progress=progress, check_stats=check_stats, tune_windows=windows)
    configs = first + configs
    steps, skipped = applied(model, configs)
    record = {"recipe": recipe_to_list(steps), **({"skipped": skipped} if skipped else {}),
              "scheme": asdict(scheme) if scheme is not None else None,
              "calibration": calib_info, "calibrate_seconds": calib_s,
              "mitigate_quantize_seconds": time.perf_counter() - t0,
              **{k: mitigated.meta[k] for k in CHOSEN if k in mitigated.meta}}
    record.update(getattr(model, "outlierq_tuning", {}))  # what each tuning step chose
    return CompressResult(model, configs, scheme, mitigated, stats, record)


def refresh(stats: ActivationStats, fresh: ActivationStats) -> ActivationStats:
    """`stats` with the entries it marks stale (meta["recalibrate"]) taken from `fresh`, a
    calibration of the model as it is now."""
    stale = stats.meta["recalibrate"]
    out = ActivationStats(stats.thresholds, dict(stats.inputs), dict(stats.residual),
                          {k: v for k, v in stats.meta.items() if k != "recalibrate"},
                          dict(stats.samples), dict(stats.hessians), dict(stats.value_hists))
    for table, new in ((out.inputs, fresh.inputs), (out.samples, fresh.samples), (out.hessians, fresh.hessians),
                       (out.value_hists, fresh.value_hists)):
        for name in stale:
            table.pop(name, None)
            if name in new:
                table[name] = new[name]
    out.meta["fingerprint"] = fresh.meta["fingerprint"]
    return out


def calibration_plan(model: nn.Module, tokenizer, calibration: Calibration | torch.Tensor, configs: list,
                     scheme) -> tuple[Calibration, torch.Tensor, int, dict]:
    """(settings, token windows, rows to keep, stats meta) for calibrating before `configs` and
    `scheme`: rows are kept (KEEP_ROWS unless set) only if a step or the weight clip searches."""
    cal = calibration if isinstance(calibration, Calibration) else Calibration()
    windows = calibration if isinstance(calibration, torch.Tensor) else calibration_windows(model, tokenizer, cal)
    needs_rows = any(lookup(c).needs_rows(c) for c in configs) or getattr(scheme, "weight_clip", False)
    keep = cal.keep_rows if cal.keep_rows is not None else (KEEP_ROWS if needs_rows else 0)
    meta = {"data": cal.data} if isinstance(calibration, Calibration) else {"data": "windows"}
    return cal, windows, keep, meta


def calibration_windows(model: nn.Module, tokenizer, cal: Calibration) -> torch.Tensor:
    """The token windows `cal` names, from the model's tokenizer."""
    from .data import calib_windows, check_seqlen, read_text, tokenize

    if tokenizer is None:
        raise OutlierqError("compress needs a tokenizer to read calibration text (or pass token "
                            "windows / statistics as `calibration`)")
    check_seqlen(model, cal.seqlen)
    return calib_windows(tokenize(tokenizer, read_text(cal.data, "calib")), cal.samples, cal.seqlen, cal.seed)
