"""Models: loading (built-in names, GGUF, HF dirs, hub ids) and per-family structure."""
from .arch import ARCHS, ArchSpec, LinearPair, MLPSpec, NormGroup, decoder_layers, get_arch, resolve
from ..cache import cache_dir
from .load import BUILTIN, load_model

__all__ = ["ARCHS", "ArchSpec", "LinearPair", "MLPSpec", "NormGroup", "BUILTIN", "cache_dir",
           "decoder_layers", "get_arch", "load_model", "resolve"]
