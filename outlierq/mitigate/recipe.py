"""A recipe: an ordered list of mitigation configs, serializable to JSON or YAML.

    [{"smoothquant": {"alpha": 0.5}}, {"split": {"expand": 0.05}}]"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import warnings
from typing import Any

import torch
from torch import nn

from ..calibration import ActivationStats
from ..errors import OutlierqError, OutlierqNotice
from ..models.arch import decoder_layers, get_arch
from ..models.prepare import fingerprint, prepare
from . import rotate, rotate_down, smoothquant, split  # noqa: F401  (each registers itself)
from .registry import MITIGATIONS, Skipped, lookup


# what a recipe resolved to, kept in the statistics' meta and in the export's outlierq.json
CHOSEN = ("rotation", "head_rotation", "down_rotation", "smoothquant_alpha", "split_intermediate_size",
          "split_channels", "expert_tokens")


def name_of(cfg) -> str:
    return lookup(cfg).name


def recipe_to_list(recipe: list) -> list[dict[str, Any]]:
    return [{name_of(c): dataclasses.asdict(c)} for c in recipe]


def applied(model: nn.Module, recipe: list) -> tuple[list, dict[str, str]]:
    """(the steps of `recipe` that changed `model`, {skipped step: why}): what a record lists."""
    skipped = getattr(model, "outlierq_skipped", {})
    return [c for c in recipe if name_of(c) not in skipped], dict(skipped)


def _apply(model: nn.Module, stats, cfg, only):
    m = lookup(cfg)
    try:
        return m.apply(model, stats, cfg, only)
    except Skipped as e:
        skipped = getattr(model, "outlierq_skipped", {})
        if m.name not in skipped:  # (layer by layer: said once, not per layer)
            warnings.warn(f"{m.name}: {e}; skipped", OutlierqNotice, stacklevel=4)
            model.outlierq_skipped = {**skipped, m.name: str(e)}
        return stats


def recipe_from_list(items: list[dict[str, Any]]) -> list:
    out = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            raise OutlierqError(f"recipe entry {item!r} must be a one-key mapping like "
                                '{"smoothquant": {"alpha": 0.5}}')
        (name, kw), = item.items()
        if name not in MITIGATIONS:
            raise OutlierqError(f"unknown mitigation {name!r}; known: {', '.join(MITIGATIONS)}")
        if kw is not None and not isinstance(kw, dict):
            raise OutlierqError(f"options of {name} must be a mapping, got {kw!r}")
        kw = dict(kw or {})
        if isinstance(kw.get("alpha_grid"), (list, tuple)):
            kw["alpha_grid"] = tuple(kw["alpha_grid"])
        try:
            out.append(MITIGATIONS[name].config(**kw))
        except TypeError as e:
            raise OutlierqError(f"bad options for {name}: {e}") from None
    return out


def parse_recipe(spec: str) -> list:
    """A recipe from a .json/.yaml file or an inline string like 'smoothquant:alpha=0.5,split'."""
    p = Path(spec)
    if p.suffix in (".json", ".yaml", ".yml"):
        if not p.is_file():
            raise OutlierqError(f"recipe file not found: {p}")
        try:
            text = p.read_text()
            if p.suffix == ".json":
                items = json.loads(text)
            else:
                import yaml
                items = yaml.safe_load(text)
        except Exception as e:  # noqa: BLE001  (json's ValueError, yaml.YAMLError, bad UTF-8)
            raise OutlierqError(f"recipe file {p} does not parse: {str(e).splitlines()[0]}") from None
        if items is not None and not isinstance(items, list):
            raise OutlierqError(f"recipe file {p} must hold a list of mitigations, got {type(items).__name__}")
        return recipe_from_list(items or [])
    items = []
    for part in (s.strip() for s in spec.split("+")):
        if not part:
            raise OutlierqError(f"recipe {spec!r} has an empty step (two '+' in a row, or one at an end)")
        name, _, opts = part.partition(":")
        kw: dict[str, Any] = {}
        for o in filter(None, opts.split(",")):
            k, eq, v = o.partition("=")
            if not eq or not k:
                raise OutlierqError(f"recipe option {o!r} in {part!r}: write key=value, e.g. alpha=0.5")
            kw[k] = _value(v)
        items.append({name: kw})
    return recipe_from_list(items)


def _value(v: str) -> Any:
    """An inline option value: none/search -> None, true/false, numbers, else the string."""
    low = v.lower()
    if low in ("none", "search"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return float(v)
    except ValueError:
        return v


def mitigate(model: nn.Module, stats: ActivationStats | None, recipe: list,
             check_stats: bool = True, only: list[int] | None = None) -> ActivationStats:
    """Apply each mitigation in order (in place); returns the statistics of the mitigated model.
    What the family's layout does not allow (see its ArchSpec notes) is skipped with a notice.

    bf16/fp16 models are mitigated one decoder layer at a time held in float32 (each surgery
    step computes in float64) and cast back once (`mitigate_layer`), so a weight that two steps
    rescale is rounded to bf16 once, not twice.
    only: change just these decoder layers (the layer-by-layer pipeline, whose other layers are
    not in memory); the caller has checked the statistics, and the result has no fingerprint."""
    free = [lookup(c) for c in recipe if lookup(c).data_free]
    if free and (stats is not None or len(free) < len(recipe)):
        raise OutlierqError(f"{free[0].name} needs no statistics and changes what they describe: apply it "
                            f"alone before calibrating, mitigate(model, None, [{free[0].config.__name__}()]) "
                            "(outlierq.compress does this for leading data-free steps)")
    for k, cfg in enumerate(recipe[:-1]):
        if lookup(cfg).recalibrates:
            raise OutlierqError(f"{lookup(cfg).name} must be the last step of the recipe (after "
                                f"{lookup(recipe[k + 1]).name}): the steps after it would act on its "
                                "rotated basis; reorder it")
    if stats is None:
        if len(free) < len(recipe):
            raise OutlierqError("this recipe needs calibration statistics (mitigate(model, stats, recipe))")
        if only is None:
            prepare(model)
        for cfg in recipe:
            _apply(model, None, cfg, only)
        return None
    if only is None:
        prepare(model)
        stats.check_matches(model, exact=check_stats)
    if not recipe:
        return stats
    if only is None or 0 in only:
        for note in get_arch(model).notes:
            warnings.warn(note, OutlierqNotice, stacklevel=2)
    if only is None and _low_precision(model):
        out = layer_result(stats)
        for i in range(len(decoder_layers(model))):
            mitigate_layer(model, stats, recipe, i, out)
        out.meta = dict(out.meta, fingerprint=fingerprint(model))
        return out
    for cfg in recipe:
        m = lookup(cfg)
        if m.needs_rows(cfg) and not stats.samples:
            raise OutlierqError(f"{m.name} {cfg} needs kept calibration rows: calibrate with "
                                "keep_rows > 0 (CLI: --keep-rows 256)")
        stats = _apply(model, stats, cfg, only)
    stats.meta = dict(stats.meta, fingerprint=fingerprint(model) if only is None else None)
    return stats


def _low_precision(model: nn.Module) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in decoder_layers(model).parameters())


def check_layer_major(recipe: list, in_memory: bool = False) -> None:
    """Layer by layer, a step that plans over every layer must see the statistics as calibrated:
    `split` (padded to the largest split) has to come first. in_memory: one layer at a time but
    the whole model held (bf16 mitigation), where a recalibration can follow."""
    for k, cfg in enumerate(recipe):
        if lookup(cfg).recalibrates and not in_memory:
            raise OutlierqError(f"{lookup(cfg).name} needs a second calibration of the mitigated model, "
                                "which the layer-by-layer pipeline cannot run: drop --sequential")
        if lookup(cfg).data_free:
            raise OutlierqError(f"{lookup(cfg).name} is applied to the whole model before calibrating: it runs "
                                "in memory, not layer by layer (drop --sequential)")
        if lookup(cfg).name == "split" and k > 0:
            raise OutlierqError("layer by layer (--sequential, or a bf16/fp16 model) split must come first "
                                "in the recipe: its padded size comes from every layer's statistics as "
                                "calibrated; reorder it")


def layer_result(stats: ActivationStats) -> ActivationStats:
    """A copy of `stats` for `mitigate_layer` to fill in, one layer at a time."""
    return ActivationStats(stats.thresholds, dict(stats.inputs), dict(stats.residual), dict(stats.meta),
                           dict(stats.samples), dict(stats.hessians))


@torch.no_grad()
def mitigate_layer(model: nn.Module, stats: ActivationStats, recipe: list, i: int,
                   out: ActivationStats) -> ActivationStats:
    """Apply the whole recipe to decoder layer i only, its parameters held in float32 meanwhile
    (not float64: a 3B model's layer would take 1 GB) and cast back once; `stats` as calibrated
    (every layer). Layer i's entries of the result go into `out` (alphas chosen merged); returns
    the result."""
    check_layer_major(recipe, in_memory=True)
    layer = decoder_layers(model)[i]
    own = {id(p): p.dtype for p in layer.parameters()}
    low = set(own.values()) & {torch.bfloat16, torch.float16}
    dtype = low.pop() if low else None
    if dtype is not None:  # float32 holds every intermediate rounding far below a bf16/fp16 ulp
        for p in layer.parameters():
            p.data = p.data.float()
    s = mitigate(model, stats, recipe, only=[i])
    if dtype is not None:  # modules a step replaced were built in float32 too
        for p in layer.parameters():
            p.data = p.data.to(own.get(id(p), dtype))
    prefix = f"{get_arch(model).layers}.{i}."
    out.inputs.update({k: v for k, v in s.inputs.items() if k.startswith(prefix)})
    out.samples.update({k: v for k, v in s.samples.items() if k.startswith(prefix)})
    out.hessians.update({k: v for k, v in s.hessians.items() if k.startswith(prefix)})
    alphas = {**out.meta.get("smoothquant_alpha", {}), **s.meta.get("smoothquant_alpha", {})}
    stale = sorted(set(out.meta.get("recalibrate", [])) | set(s.meta.get("recalibrate", [])))
    out.meta.update(s.meta)
    if alphas:
        out.meta["smoothquant_alpha"] = alphas
    if stale:
        out.meta["recalibrate"] = stale
    return s
