"""Carry calibration statistics through a mitigation without another calibration pass.

Per-channel maxima and sums transform exactly under a positive per-channel scale or a channel
split, so static input scales and the alpha search stay correct. Counts above thresholds, the
token histogram and the top-k values do not transform exactly: they describe the model as
calibrated (recalibrate to see them after a mitigation, as `outlierq report` does). Kept rows
and the Hessians (sum x x^T) transform exactly too: the channel map applies to each row / side."""
from __future__ import annotations

import copy

import torch

from ..calibration import ActivationStats, TensorStats


def _transformed(stats: ActivationStats, names: list[str], col_fn) -> ActivationStats:
    out = copy.copy(stats)
    out.inputs = dict(stats.inputs)
    out.samples = dict(stats.samples)
    out.hessians = dict(stats.hessians)
    done: dict[int, torch.Tensor] = {}
    for n in names:
        st = stats.inputs[n]
        out.inputs[n] = TensorStats(col_fn(st.absmax.double()).float(), col_fn(st.abssum.double()),
                                    st.counts, st.token_hist, st.top_values, st.top_where, st.tokens)
        if n in stats.samples:
            rows = stats.samples[n]
            if id(rows) not in done:  # rows shared by q/k/v stay shared
                done[id(rows)] = col_fn(rows.double().t()).t().float()
            out.samples[n] = done[id(rows)]
        if n in stats.hessians:  # sum x x^T: the channel map applies to both sides
            h = stats.hessians[n]
            if id(h) not in done:
                done[id(h)] = col_fn(col_fn(h).t()).t().contiguous()
            out.hessians[n] = done[id(h)]
    return out


def rescale_inputs(stats: ActivationStats, names: list[str], s: torch.Tensor) -> ActivationStats:
    """Statistics after the inputs of `names` were divided by s (per channel, s > 0)."""
    s = s.double()
    return _transformed(stats, names, lambda v: v / (s if v.dim() == 1 else s[:, None]))


def split_inputs(stats: ActivationStats, names: list[str], parts: torch.Tensor,
                 new_size: int) -> ActivationStats:
    """Statistics after channel j was split into parts[j] equal copies (appended in channel
    order) and zero channels padded up to `new_size`."""
    extra = torch.repeat_interleave(torch.arange(parts.numel()), parts - 1)

    def fn(v: torch.Tensor) -> torch.Tensor:
        p = parts.double() if v.dim() == 1 else parts.double()[:, None]
        v = v / p
        v = torch.cat([v, v[extra]])
        pad = new_size - v.shape[0]
        return torch.cat([v, v.new_zeros(pad, *v.shape[1:])]) if pad else v

    return _transformed(stats, names, fn)
