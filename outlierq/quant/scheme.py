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
    """int8 weights per output channel; int8 activations per token (dynamic) or per tensor (static).

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
    # convention); `skip=()` quantizes it too (`--int8-head`): with a large vocabulary it is a
    # third of the prefill here, and a tied head is untied (the embeddings stay float).
    skip: tuple[str, ...] = ("lm_head",)
    fake: bool = False                                  # dequantize-and-matmul reference
    backend: str = "auto"
    # with act="tensor": Linears that keep per-token dynamic activations. Static per-tensor
    # scales cannot follow down_proj's token-to-token range (SwiGLU products), so
    # ("*down_proj",) buys most of the accuracy back while everything else stays static.
    token_for: tuple[str, ...] = ()
    # search a clip ratio per output channel of each Linear's int8 weights on the kept
    # calibration rows (`clip_search`); needs statistics with kept rows
    weight_clip: bool = False
    # round the int8 weights with GPTQ's error feedback (`outlierq.gptq`) instead of to nearest,
    # on the scale above; needs statistics calibrated with hessians=True. MoE experts stay
    # round-to-nearest.
    gptq: bool = False
    # with act="tensor": the static range of each input rotated online (rotate_down) is set
    # at the clip ratio of its max that gives the least int8 squared error over the calibration
    # values (`act_clip_search`), not at the max. After the rotation no single channel carries the
    # range, so a clip cuts a few large-norm tokens a little and refines everyone else's step
    # (results/ppl_*.md: SmolLM2 static +0.86% -> +0.49%, Gemma-3 +4.19% -> +1.72% with the
    # "token" objective below). Unrotated inputs keep their max:
    # there a clip cuts the massive channels (results/static_diagnosis_smollm2-135m.md: x0.5 on
    # down_proj takes KL from 0.034 to 0.187). None (the default): on wherever a static Linear
    # reads a rotated input, without a notice where none does.
    act_clip: bool | None = None
    # what act_clip's search weighs: "value" every value alike (the plain MSE, where the few
    # large-norm tokens decide the range), "token" every token alike (each value's squared error
    # over its token's mean square). "auto": "token" where the family normalises each sublayer's
    # output per token (`ArchSpec.output_norms`: there a token's error counts relative to its own
    # norm), else "value". Measured: the "+ act clip" rows ("value") against the "+ act clip
    # per token" rows of results/ppl_*.md.
    act_clip_objective: Literal["auto", "token", "value"] = "auto"
    # with act="tensor", > 0: once every static range is set (at its max, or act_clip's ratio),
    # scale the ranges of each kind of Linear (q_proj, ..., down_proj) by the factor of
    # RANGE_TUNE_GRID that gives the least KL of the model's next-token distribution from the
    # float model's on this many calibration windows (`tune_ranges`). act_clip scores each input's
    # own error; this scores what the model outputs. Needs the windows (outlierq.compress passes
    # its calibration windows) and the whole model (not layer by layer). The ranges stay plain
    # input scales: an exported checkpoint carries them.
    range_tune: int = 0
    # with range_tune: kinds (e.g. ("down_proj",)) whose Linears are then tuned one at a time on
    # the same windows, each by a factor of the grid on top of its kind's (one more pass of
    # coordinate descent, layer by layer). On Gemma-3's best static recipe down_proj's static
    # ranges are what is left (results/static_losses_gemma3-270m.md, 2 windows): every down_proj
    # per-token takes KL from 0.0179 to 0.0068, no other kind per-token helps. Its
    # large-norm tokens differ from layer to layer (results/static_diagnosis_gemma3-270m.md), so one
    # factor for every layer is coarse. But one layer's down_proj per-token alone never helps much
    # (0.0160 at best): the layers' errors interact, which a one-at-a-time descent may not undo.
    range_tune_each: tuple[str, ...] = ()
    # with range_tune: kinds (e.g. ("down_proj",)) whose static Linears get a second static range
    # for their kind's "quiet tokens" (`key_quiet_tokens`): token ids whose rows into some Linear of
    # the kind are often far below its range on the calibration windows. Which range a row takes is
    # looked up from the model's input ids, so no activation is measured at run time: the scales
    # stay constants. Why: on Gemma-3 the lone space token ' ' (3% of tokens) is bimodal in
    # down_proj (layers 7 and 9-15 most): most of its rows are among the largest, ~1 in 6 sit below
    # 1/16 of the range (down to 1/100), on a few of int8's steps, and the post-feedforward norm
    # scales that rounding noise back to full size. In a 2-window probe
    # (results/quiet_tokens_gemma3-270m.md), its rows per-token take the static KL from 0.0179 to
    # 0.0113, at a keyed static range x0.3 to 0.0134.
    # The quiet range's factor (on the Linear's range) is tuned per kind on range_tune's windows.
    # In memory only: a checkpoint has no place for a scale keyed by token id.
    quiet_tokens: tuple[str, ...] = ()
    # with quiet_tokens: tune the quiet range's factor on this many calibration windows instead of
    # range_tune's, scored by `coarse_kl_sum` against the float model's top QUIET_TOPK tokens per
    # position (full log-probabilities are 537 MB per 512-token window on Gemma-3's vocabulary).
    # Why: range_tune's 4 windows hold ~10 quiet ' ' rows on Gemma-3; there they pick factor 0.7
    # where the held-out probe (results/quiet_tokens_gemma3-270m.md) favours 0.3. Measured: 32
    # windows pick 0.7 too (results/ppl_gemma3-270m.md), so the study's best row keeps the default.
    quiet_tune: int = 0

    def __post_init__(self):
        for field in ("skip", "token_for"):  # a bare string would be read letter by letter
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
