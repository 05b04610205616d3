"""Bring a loaded model into the one shape every stage works on, and fingerprint its weights.

GPT-2 keeps its projections in transformers' Conv1D (weight [in, out], y = x @ W + b). outlierq
holds them as nn.Linear (weight [out, in]) so calibration, mitigation and quantization see one
kind of module; export writes float weights back in the Conv1D layout the family's checkpoints
use (`ArchSpec.conv1d`)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..errors import OutlierqError
from .arch import decoder_layers, get_arch, resolve


@torch.no_grad()
def prepare(model: nn.Module) -> nn.Module:
    """Validate the family (one error line if unsupported) and swap Conv1D for nn.Linear, in
    place; idempotent. Returns the model."""
    spec = get_arch(model)
    # (the int8 modules carry a marker: models/ does not import quantization)
    if any(getattr(m, "outlierq_quantized", False) for m in model.modules()):
        raise OutlierqError("this model is already int8-quantized (an outlierq W8A8 export?); "
                            "calibration, mitigation and quantization need the float model")
    if not spec.conv1d:
        return model
    from ..mitigate.surgery import new_linear, set_module

    for layer in decoder_layers(model, spec):
        for path in spec.conv1d:
            m = resolve(layer, path)
            if isinstance(m, nn.Linear) or not hasattr(m, "nf"):
                continue
            set_module(layer, path, new_linear(m.weight.t().contiguous(), m.bias, m))
    return model


@torch.no_grad()
def fingerprint(model: nn.Module) -> str:
    """A short hash of the decoder layers' float weights (sum and sum of squares per tensor, in
    float64, 9 significant digits): equal for the same weights, different after a mitigation
    rescaled them or for another model of the same shapes."""
    spec = get_arch(model)
    h = fingerprint_start(spec.family)
    for i, layer in enumerate(decoder_layers(model, spec)):
        fingerprint_layer(h, layer, i)
    return h.hexdigest()[:16]


def fingerprint_start(family: str):
    return hashlib.sha256(family.encode())


@torch.no_grad()
def fingerprint_layer(h, layer: nn.Module, i: int) -> None:
    """Add decoder layer i to fingerprint hash `h` (the layer-by-layer pipeline feeds the layers
    one at a time; `h.hexdigest()[:16]` then equals `fingerprint` of the whole model). Weights
    that accelerate offloaded (meta parameters) are read back module by module."""
    from contextlib import nullcontext

    for mod_name, mod in layer.named_modules(prefix=str(i)):
        own = list(mod.named_parameters(recurse=False))
        if not own:
            continue
        if any(p.is_meta for _, p in own):
            from accelerate.utils import align_module_device
            ctx = align_module_device(mod, torch.device("cpu"))
        else:
            ctx = nullcontext()
        with ctx:
            for name, p in mod.named_parameters(recurse=False):
                if p.is_floating_point():
                    d = p.detach().double()
                    h.update(f"{mod_name}.{name}:{tuple(p.shape)}:{d.sum().item():.9g}:"
                             f"{d.pow(2).sum().item():.9g};".encode())


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go: the first parameter that holds data (a model dispatched by accelerate
    may keep its first ones on the meta device, offloaded to CPU memory or disk)."""
    return next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
