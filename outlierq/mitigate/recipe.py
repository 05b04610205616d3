"""A recipe: an ordered list of mitigation configs, serializable to JSON or YAML.

    [{"smoothquant": {"alpha": 0.5}}, {"split": {"expand": 0.05}}]"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..calibrate import ActivationStats
from ..errors import OutlierqError
from .smoothquant import SmoothQuant, apply_smoothquant
from .split import ChannelSplit, apply_split

# name -> (config class, apply function). One line per mitigation.
MITIGATIONS: dict[str, tuple[type, Callable]] = {
    "smoothquant": (SmoothQuant, apply_smoothquant),
    "split": (ChannelSplit, apply_split),
}


def _name_of(cfg) -> str:
    for name, (cls, _) in MITIGATIONS.items():
        if isinstance(cfg, cls):
            return name
    raise OutlierqError(f"not a mitigation config: {cfg!r}")


def recipe_to_list(recipe: list) -> list[dict[str, Any]]:
    return [{_name_of(c): dataclasses.asdict(c)} for c in recipe]


def recipe_from_list(items: list[dict[str, Any]]) -> list:
    out = []
    for item in items:
        if not isinstance(item, dict) or len(item) != 1:
            raise OutlierqError(f"recipe entry {item!r} must be a one-key mapping like "
                                '{"smoothquant": {"alpha": 0.5}}')
        (name, kw), = item.items()
        if name not in MITIGATIONS:
            raise OutlierqError(f"unknown mitigation {name!r}; known: {', '.join(MITIGATIONS)}")
        kw = dict(kw or {})
        if "alpha_grid" in kw:
            kw["alpha_grid"] = tuple(kw["alpha_grid"])
        try:
            out.append(MITIGATIONS[name][0](**kw))
        except TypeError as e:
            raise OutlierqError(f"bad options for {name}: {e}") from None
    return out


def parse_recipe(spec: str) -> list:
    """A recipe from a .json/.yaml file or an inline string like 'smoothquant:alpha=0.5,split'."""
    p = Path(spec)
    if p.suffix in (".json", ".yaml", ".yml"):
        if not p.is_file():
            raise OutlierqError(f"recipe file not found: {p}")
        text = p.read_text()
        if p.suffix == ".json":
            items = json.loads(text)
        else:
            import yaml
            items = yaml.safe_load(text)
        return recipe_from_list(items or [])
    items = []
    for part in filter(None, (s.strip() for s in spec.split("+"))):
        name, _, opts = part.partition(":")
        kw: dict[str, Any] = {}
        for o in filter(None, opts.split(",")):
            k, _, v = o.partition("=")
            kw[k] = None if v in ("none", "search") else (float(v) if v.replace(".", "").isdigit() else v)
        items.append({name: kw})
    return recipe_from_list(items)


def mitigate(model: nn.Module, stats: ActivationStats, recipe: list) -> ActivationStats:
    """Apply each mitigation in order (in place); returns the statistics of the mitigated model."""
    stats.check_matches(model)
    for cfg in recipe:
        stats = MITIGATIONS[_name_of(cfg)][1](model, stats, cfg)
    return stats
