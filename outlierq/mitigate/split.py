"""Outlier channel splitting (OCS, Zhao et al., ICML 2019), folded into the MLP.

An outlier channel j of the down projection's input is split into k equal parts: the producer row
(up_proj, or fc1 with its bias under ReLU) is divided by k and copied k-1 times, a gated MLP's
gate row is copied unscaled (act(gate) * up is linear in up), and down_proj's column j is copied
k-1 times. The function is unchanged; the quantizer sees max|x_j| / k. Every layer is then padded
with zero rows/columns to one new intermediate size and the config updated, so the result is still
a standard architecture that exports and loads anywhere.

Not supported, on purpose: splitting inputs fed by a norm (q/k/v, gate/up) would change
hidden_size, and splitting o_proj inputs would change the head layout; neither folds into a
standard checkpoint, so outlierq does not pretend to."""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import ActivationStats
from ..errors import OutlierqError
from ..models.arch import decoder_layers, get_arch, resolve, text_config
from . import surgery
from .registry import is_number, register
from ._stats import split_inputs


@dataclass(frozen=True)
class ChannelSplit:
    expand: float = 0.05    # at most this fraction of extra channels per layer
    ratio: float = 16.0     # stop once no channel exceeds ratio x the layer's median absmax
    # pad the new size up to a multiple of this (rotate_down's block must divide it)
    multiple: int = 1

    def __post_init__(self):
        if not (is_number(self.expand) and is_number(self.ratio)) or not 0 < self.expand <= 1 or not self.ratio >= 1:
            raise OutlierqError(f"split needs numbers 0 < expand <= 1 and ratio >= 1, got "
                                f"expand={self.expand!r}, ratio={self.ratio!r}")
        if not is_number(self.multiple) or self.multiple != int(self.multiple) or self.multiple < 1:
            raise OutlierqError(f"split multiple must be a whole number >= 1, got {self.multiple!r}")
        object.__setattr__(self, "multiple", int(self.multiple))


def split_plan(absmax: torch.Tensor, budget: int, ratio: float) -> torch.Tensor:
    """Parts per channel (>= 1): repeatedly split the channel with the largest max|x| / parts."""
    parts = torch.ones(absmax.numel(), dtype=torch.long)
    target = ratio * absmax.median().item()
    heap = [(-v, j) for j, v in enumerate(absmax.tolist())]
    heapq.heapify(heap)
    for _ in range(budget):
        neg, j = heap[0]
        if -neg <= target:
            break
        parts[j] += 1
        heapq.heapreplace(heap, (-absmax[j].item() / parts[j].item(), j))
    return parts


@torch.no_grad()
def apply_split(model: nn.Module, stats: ActivationStats, cfg: ChannelSplit,
                only: list[int] | None = None) -> ActivationStats:
    """Split outlier channels of every layer (only `only`'s weights if given: the plan, and so the
    padded size, still comes from every layer's statistics, which must be as calibrated)."""
    spec = get_arch(model)
    mlp = spec.mlp
    if mlp is None:  # the family's notes (shown by mitigate) say why
        return stats
    layers = decoder_layers(model, spec)
    cfg_text = text_config(model)
    names = [f"{spec.layers}.{i}.{mlp.down}" for i in range(len(layers))]
    # from the statistics, not the module: layer by layer, done layers already have the new size
    size = stats.input_absmax(names[0]).numel()  # (GPT-2's n_inner may be None: 4 * n_embd)
    budget = max(1, math.floor(cfg.expand * size))
    plans = [split_plan(stats.input_absmax(n), budget, cfg.ratio) for n in names]
    new_size = size + max(int((p - 1).sum()) for p in plans)
    if new_size == size:
        return stats
    new_size = -(-new_size // cfg.multiple) * cfg.multiple
    for i, (layer, parts) in enumerate(zip(layers, plans)):
        if only is not None and i not in only:
            continue
        extra = torch.repeat_interleave(torch.arange(size), parts - 1)
        pad = new_size - size - extra.numel()

        def rows(w: torch.Tensor, divide: bool) -> torch.Tensor:
            w = w.double()
            if divide:
                w = w / (parts.double() if w.dim() == 1 else parts.double()[:, None])
            return torch.cat([w, w[extra], w.new_zeros(pad, *w.shape[1:])])

        up = resolve(layer, mlp.up)
        if mlp.fused:  # one Linear holds [gate | up] rows: split both halves, keep the order
            g, u = up.weight.chunk(2)
            weight = torch.cat([rows(g, False), rows(u, True)])
            bias = None if up.bias is None else torch.cat([rows(b, d) for b, d in zip(up.bias.chunk(2), (False, True))])
        else:
            weight, bias = rows(up.weight, True), None if up.bias is None else rows(up.bias, True)
        surgery.set_module(layer, mlp.up, surgery.new_linear(weight, bias, up))
        if mlp.gate:
            gate = resolve(layer, mlp.gate)
            surgery.set_module(layer, mlp.gate, surgery.new_linear(
                rows(gate.weight, False), None if gate.bias is None else rows(gate.bias, False), gate))
        down = resolve(layer, mlp.down)
        surgery.set_module(layer, mlp.down, surgery.new_linear(
            rows(down.weight.t(), False).t(), down.bias, down))
        holder = resolve(layer, mlp.down.rpartition(".")[0]) if "." in mlp.down else layer
        if hasattr(holder, "intermediate_size"):
            holder.intermediate_size = new_size
        stats = split_inputs(stats, [f"{spec.layers}.{i}.{mlp.down}"], parts, new_size)
    setattr(cfg_text, mlp.size_attr, new_size)
    stats.meta = dict(stats.meta, split_intermediate_size=new_size,
                      split_channels={f"{spec.layers}.{i}": int((p > 1).sum()) for i, p in enumerate(plans)})
    return stats


register("split", ChannelSplit, apply_split)
