"""Quantization, one module per part: the scheme (scheme.py), weight rounding (weights.py), the
int8 modules that replace float ones (modules.py), the tuning steps on top of plain rounding
(tuning.py: each registered in TUNING with what it needs), and `quantize_`, which puts them in place (apply.py)."""
from .apply import quantize_, quantizes_head
from .modules import Int8Experts, Int8Linear, TokenKeys, expert_names, w8a8_linear
from .scheme import ACT_CLIP_GRID, ACT_CLIP_OBJECTIVES, LLMInt8, W8A8, matches
from .tuning import (QUIET_GRID, QUIET_LEVEL, QUIET_TOPK, RANGE_TUNE_GRID, TUNING, act_clip_objective,
                     act_clip_search, key_quiet_tokens, parse_tune, steps_of, tune_ranges)
from .weights import CLIP_GRID, clip_search, quantize_weight, stored_scale

__all__ = ["ACT_CLIP_GRID", "ACT_CLIP_OBJECTIVES", "CLIP_GRID", "QUIET_GRID", "QUIET_LEVEL", "QUIET_TOPK",
           "RANGE_TUNE_GRID", "TUNING", "Int8Experts", "Int8Linear", "LLMInt8", "TokenKeys", "W8A8", "act_clip_objective",
           "act_clip_search", "clip_search", "expert_names", "key_quiet_tokens", "matches", "parse_tune", "quantize_",
           "quantize_weight", "quantizes_head", "steps_of", "stored_scale", "tune_ranges", "w8a8_linear"]
