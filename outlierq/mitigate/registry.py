"""The mitigation registry: each mitigation's file registers its config class and apply function
once, with what the pipeline needs to know about it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import OutlierqError


@dataclass(frozen=True)
class Mitigation:
    name: str
    config: type
    # apply(model, stats, cfg, only=None) -> stats of the mitigated model; `only`: the decoder
    # layer indices to change (the layer-by-layer pipeline), None = all
    apply: Callable
    needs_rows: Callable[[Any], bool]     # does this config need kept calibration rows?
    data_free: bool = False               # needs no statistics: applied before calibration
    # some statistics cannot be carried over: the step names them in stats.meta["recalibrate"]
    # and `outlierq.compress` recalibrates the mitigated model once
    recalibrates: bool = False


MITIGATIONS: dict[str, Mitigation] = {}


class Skipped(Exception):
    """Raised by a mitigation's apply, before it changes anything, when the model's layout does not
    allow it. `mitigate` says so once and records it on the model, so that no record (the export's
    outlierq.json, CompressResult.record) lists a step that did nothing."""


def register(name: str, config: type, apply: Callable, needs_rows: Callable[[Any], bool] = lambda c: False,
             data_free: bool = False, recalibrates: bool = False) -> None:
    MITIGATIONS[name] = Mitigation(name, config, apply, needs_rows, data_free, recalibrates)


def is_number(v: Any) -> bool:
    """A real number from a recipe (bools are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def lookup(cfg) -> Mitigation:
    for m in MITIGATIONS.values():
        if isinstance(cfg, m.config):
            return m
    raise OutlierqError(f"not a mitigation config: {cfg!r}")
