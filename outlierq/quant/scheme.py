"""The quantization scheme: which Linears get int8 weights and which activation mode (W8A8), and
the LLM.int8 baseline's settings; target matching as compressed-tensors does it."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal


from ..errors import OutlierqError


@dataclass(frozen=True)
class W8A8:
    """8-bit weights (int8 or FP8) per output channel or per tensor; 8-bit activations per token
    (dynamic) or per tensor (static), or none (weights only).

    Shaped like a compressed-tensors scheme: Linears matching `token_for` get per-token
    activations, every other quantizable Linear gets `act`, and `skip` (ignore) stays float.
    Patterns are fnmatch globs on module names ("*down_proj", "model.layers.0.*") or "re:" regexes,
    matched by `matches`, the one matcher quantize_, export and load share."""
    act: Literal["token", "tensor", "none"] = "token"   # "none": weight-only int8
    # the number format of weights and activations (quant/formats.py): "int8", or "fp8" (E4M3,
    # what H100-class GPUs serve). FP8 runs the Linears (act="none": FP8 weights only, in memory);
    # MoE experts, act_clip (its error model is int8's uniform steps), range_tune and quiet tokens
    # are int8 only for now.
    format: Literal["int8", "fp8"] = "int8"
    # one weight scale per output channel, or one per tensor (compressed-tensors' FP8 preset: an
    # E4M3 code carries its own exponent, so one scale loses little; and vLLM's CPU fallback for
    # static FP8 activations runs only with per-tensor weight scales)
    weight_strategy: Literal["channel", "tensor"] = "channel"
    # Linears kept float. The output head is float by default (llm-compressor's and vLLM's
    # convention); `skip=()` quantizes it too (`--scheme W8A8:head=true`): with a large vocabulary it is a
    # third of the prefill here, and a tied head is untied (the embeddings stay float).
    skip: tuple[str, ...] = ("lm_head",)
    fake: bool = False                                  # dequantize-and-matmul reference
    backend: str = "auto"
    # with act="tensor": Linears that keep per-token dynamic activations. Static per-tensor
    # scales cannot follow down_proj's token-to-token range (SwiGLU products), so
    # ("*down_proj",) buys most of the accuracy back while everything else stays static.
    token_for: tuple[str, ...] = ()
    # The tuning steps' settings (registered in quant/tuning.py TUNING, which says what each needs;
    # what each does and measured: docs/guide.md, "Tuning steps"):
    weight_clip: bool = False        # a clip ratio per output channel of the weights (kept rows)
    gptq: bool = False               # GPTQ's error feedback through the calibration Hessians
    # static ranges of inputs rotated online (rotate_down) at the clip of least int8 error; None:
    # on wherever a static Linear reads a rotated input
    act_clip: bool | None = None
    # what act_clip weighs: every value alike, every token alike, or "auto" ("token" where the
    # family normalises each sublayer's output, ArchSpec.output_norms)
    act_clip_objective: Literal["auto", "token", "value"] = "auto"
    range_tune: int = 0              # > 0: scale each kind's static ranges for least KL on N windows
    range_tune_each: tuple[str, ...] = ()  # then each Linear of these kinds on its own
    # a second static range for these kinds' quiet token ids (in memory only: keyed by token id)
    quiet_tokens: tuple[str, ...] = ()
    quiet_tune: int = 0              # tune the quiet range on N windows instead of range_tune's
    # leave float the N Linears (of these kinds; () every kind) whose int8 error costs most KL,
    # scored one by one on keep_float_windows calibration windows; exported in `ignore`
    keep_float: int = 0
    keep_float_kinds: tuple[str, ...] = ()
    keep_float_windows: int = 2

    def __post_init__(self):
        for field in ("skip", "token_for", "keep_float_kinds"):  # a bare string would be read letter by letter
            if isinstance(getattr(self, field), str):
                raise OutlierqError(f"W8A8({field}=...) takes a tuple of target patterns, got the string "
                                    f"{getattr(self, field)!r}: write ({getattr(self, field)!r},)")
        if self.weight_strategy not in ("channel", "tensor"):
            raise OutlierqError(f"W8A8(weight_strategy={self.weight_strategy!r}): choose channel or tensor")
        if self.weight_strategy == "tensor" and self.weight_clip:
            raise OutlierqError("W8A8(weight_clip=True) searches a clip per output channel: use weight_strategy='channel'")
        if self.format not in ("int8", "fp8"):
            raise OutlierqError(f"W8A8(format={self.format!r}): choose int8 or fp8")
        if self.format == "fp8" and (self.act_clip or self.range_tune):
            raise OutlierqError("W8A8(format='fp8') runs without act_clip, range_tune or quiet tokens "
                                "(int8 only for now)")
        if self.act_clip and self.act != "tensor":
            raise OutlierqError("W8A8(act_clip=True) sets static input ranges: use act='tensor'")
        if self.range_tune and self.act != "tensor":
            raise OutlierqError("W8A8(range_tune=N) tunes static input ranges: use act='tensor'")
        if self.range_tune_each and not self.range_tune:
            raise OutlierqError("W8A8(range_tune_each=...) refines range_tune's factors: set range_tune=N too")
        if self.quiet_tokens and not self.range_tune:
            raise OutlierqError("W8A8(quiet_tokens=...) tunes the quiet tokens' range on range_tune's windows: "
                                "set range_tune=N too")
        if self.range_tune < 0:
            raise OutlierqError(f"range_tune must be >= 0 windows, got {self.range_tune}")
        if self.quiet_tune and not self.quiet_tokens:
            raise OutlierqError("W8A8(quiet_tune=N) tunes the quiet tokens' range: set quiet_tokens=(kinds) too")
        if self.quiet_tune < 0:
            raise OutlierqError(f"quiet_tune must be >= 0 windows, got {self.quiet_tune}")
        if self.keep_float < 0 or self.keep_float_windows < 1:
            raise OutlierqError(f"keep_float must be >= 0 Linears on >= 1 windows, got {self.keep_float} on "
                                f"{self.keep_float_windows}")
        if self.act_clip_objective not in ("auto",) + ACT_CLIP_OBJECTIVES:
            raise OutlierqError(f"act_clip_objective must be auto, token or value, got {self.act_clip_objective!r}")

    def act_for(self, name: str) -> str | None:
        """The activation mode of Linear `name`, or None when it stays float."""
        if matches(name, self.skip):
            return None
        return "token" if self.token_for and matches(name, self.token_for) else self.act


# Presets by their compressed-tensors names (W8A8_STATIC and W8A16 are outlierq's names for the
# static int8 and weight-only int8 schemes; llm-compressor spells them as options of W8A8).
PRESETS = {"W8A8": dict(act="token"), "W8A8_STATIC": dict(act="tensor"), "W8A16": dict(act="none"),
           "FP8_DYNAMIC": dict(act="token", format="fp8"),
           "FP8": dict(act="tensor", format="fp8", weight_strategy="tensor")}


def preset(name: str, **over) -> "W8A8":
    """A scheme by preset name (`PRESETS`), with fields overridden by `over`."""
    if name not in PRESETS:
        raise OutlierqError(f"unknown scheme {name!r}: choose one of {', '.join(PRESETS)}")
    return W8A8(**{**PRESETS[name], **over})


def parse_scheme(spec: str) -> tuple[str, dict]:
    """`--scheme` as (preset name, field overrides): a name of PRESETS, or "float" (no quantization:
    the mitigated float model), then per-target options as in recipes, lists joined by '|':
    "W8A8_STATIC:token_for=down_proj" (these Linears keep per-token activations),
    "W8A8:head=true" (quantize the output head too)."""
    name, _, opts = spec.partition(":")
    if name != "float" and name not in PRESETS:
        raise OutlierqError(f"unknown scheme {name!r}: choose one of {', '.join(PRESETS)}, or float")
    over: dict = {}
    for o in filter(None, opts.split(",")):
        k, _, v = o.partition("=")
        if name != "float" and k == "token_for" and v:
            over["token_for"] = tuple(f"*{t}" for t in v.split("|") if t)
        elif name != "float" and k == "head" and v in ("true", "false"):
            over["skip"] = () if v == "true" else ("lm_head",)
        else:
            raise OutlierqError(f"--scheme {spec!r}: option {o!r}; a preset takes token_for=<kind>|<kind> and "
                                "head=true|false" + ("; float takes none" if name == "float" else ""))
    return name, over


def _glob_regex(glob: str) -> str:
    """An fnmatch glob as a plain regex (fnmatch.translate emits atomic groups, which RE2 lacks)."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        j = glob.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif j != -1:
            body = glob[i + 1:j]
            neg = body.startswith("!")
            body = (body[1:] if neg else body).replace("\\", "\\\\").replace("^", "\\^")
            out.append(f"[{'^' if neg else ''}{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def _target(pattern: str):
    """A target compiled: "re:<regex>" as is, anything else an fnmatch glob; a bare name also
    matches as a suffix after a dot ("lm_head", "down_proj").

    Patterns come from checkpoints too (an export's ignore and transform targets), so they run on
    RE2, which matches in time linear in the name whatever the pattern: a crafted pattern cannot
    hang a load as catastrophic backtracking in Python's re would. RE2 lacks backreferences and
    lookaround, which no compressed-tensors pattern needs."""
    import re2

    if not isinstance(pattern, str):
        raise OutlierqError(f"target pattern {pattern!r} is not a string")
    if pattern.startswith("re:"):
        rx = pattern[3:]
    else:
        g = _glob_regex(pattern)
        rx = f"(?:{g}|.*\\.{g})$" if not any(c in pattern for c in "*?[") else f"(?:{g})$"
    opts = re2.Options()
    opts.log_errors = False
    try:
        return re2.compile(rx, options=opts)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise OutlierqError(f"target pattern {pattern!r} is not a regular expression outlierq runs ({why}): "
                            "patterns run on RE2, in linear time, without backreferences or lookaround") from None


def matches(name: str, targets) -> bool:
    """True if module `name` matches any target: compressed-tensors' rule for "re:" regexes
    (a match from the start of the full name), fnmatch globs, and exact names or name suffixes."""
    return any(_target(t).match(name) is not None for t in targets)


@dataclass(frozen=True)
class LLMInt8:
    """bitsandbytes LLM.int8 (mixed int8/fp16 decomposition above `threshold`), as a baseline."""
    threshold: float = 6.0
    skip: tuple[str, ...] = ("lm_head",)


ACT_CLIP_OBJECTIVES = ("value", "token")  # the rows of a `calibration.value_histogram`
ACT_CLIP_GRID = tuple(round(1.0 - 0.01 * i, 2) for i in range(91))  # 1.00, 0.99, ..., 0.10
