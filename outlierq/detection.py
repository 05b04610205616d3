"""Outlier detection on calibration statistics: four criteria, each on one layer's vector of
per-channel absmax values, shown side by side.

- absolute: max|x_j| > threshold (LLM.int8's 6.0)
- zscore:   (max|x_j| - mean) / std > z, within the layer
- iqr:      max|x_j| > Q3 + k * (Q3 - Q1) (Tukey's fences)
- ratio:    max|x_j| / median_j max|x_j| > r
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .calibration import ActivationStats, TensorStats

CRITERIA = ("absolute", "zscore", "iqr", "ratio")


@dataclass(frozen=True)
class Criteria:
    absolute: float = 6.0
    zscore: float = 4.0
    iqr_k: float = 3.0
    ratio: float = 20.0


def flags(absmax: torch.Tensor, c: Criteria = Criteria()) -> dict[str, torch.Tensor]:
    """Boolean mask per criterion over the channels of one layer."""
    a = absmax.double()
    std = a.std() if a.numel() > 1 else a.new_tensor(0.0)
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype))
    med = a.median().clamp(min=1e-12)
    return {
        "absolute": a > c.absolute,
        "zscore": (a - a.mean()) / std.clamp(min=1e-12) > c.zscore,
        "iqr": a > q3 + c.iqr_k * (q3 - q1),
        "ratio": a / med > c.ratio,
    }


@dataclass
class OutlierReport:
    criteria: Criteria
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)   # per tensor: flags + numbers
    recurring: dict[str, list[dict]] = field(default_factory=dict)    # kind -> channels in many layers
    top_tokens: dict[str, list[dict]] = field(default_factory=dict)   # kind -> largest values

    def as_dict(self) -> dict[str, Any]:
        return {"criteria": asdict(self.criteria), "layers": self.layers,
                "recurring": self.recurring, "top_tokens": self.top_tokens}


def _layer_entry(st: TensorStats, c: Criteria) -> dict[str, Any]:
    f = flags(st.absmax, c)
    a = st.absmax
    return {"channels": a.numel(), "absmax": a.max().item(), "median": a.median().item(),
            "argmax": int(a.argmax()),
            **{f"flagged_{k}": torch.nonzero(v).flatten().tolist() for k, v in f.items()}}


def detect(stats: ActivationStats, criteria: Criteria = Criteria(), top: int = 10) -> OutlierReport:
    rep = OutlierReport(criteria)
    groups = {"residual": stats.residual,
              **{k: {n: s for n, s in stats.inputs.items() if n.rpartition(".")[2] == k}
                 for k in _input_kinds(stats)}}
    for kind, table in groups.items():
        counts: Counter = Counter()
        for name, st in table.items():
            entry = _layer_entry(st, criteria)
            rep.layers[name] = entry
            counts.update(entry["flagged_ratio"])
        n = max(len(table), 1)
        rep.recurring[kind] = [{"channel": ch, "layers": k, "fraction": k / n}
                               for ch, k in counts.most_common() if k >= max(2, n // 4)][:top]
        tops = []
        for name, st in table.items():
            for v, (s, p, ch) in zip(st.top_values.tolist(), st.top_where.tolist()):
                tops.append({"layer": name, "value": v, "sample": s, "position": p, "channel": ch})
        tops.sort(key=lambda d: -d["value"])
        rep.top_tokens[kind] = tops[:top]
    return rep


def _input_kinds(stats: ActivationStats) -> list[str]:
    """Linear names by their last component (q_proj, down_proj, ...), in first-seen order."""
    seen: dict[str, None] = {}
    for n in stats.inputs:
        seen.setdefault(n.rpartition(".")[2], None)
    return list(seen)
