"""quantize_: replace the Linears (and MoE experts) a scheme targets with their int8 twins, in
place, and run the tuning steps the scheme asks for."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import ActivationStats, module_name, output_head, rotated_input
from ..errors import OutlierqError, OutlierqNotice
from ..evaluate import top_log_probs
from ..mitigate.surgery import set_module
from ..models.arch import decoder_layers, get_arch, quantizable, resolve
from ..models.prepare import prepare
from .formats import get_format
from .modules import Int8Experts, Int8Linear, _llm_int8, expert_names
from .scheme import ACT_CLIP_OBJECTIVES, LLMInt8, W8A8, matches
from . import tuning
from .tuning import (_log_probs, _logits, act_clip_objective, act_clip_search, check_needs, key_quiet_tokens,
                     tune_ranges)
from .weights import clip_search


def _merged(old: dict, new: dict) -> dict:
    return {k: {**old[k], **v} if isinstance(v, dict) and isinstance(old.get(k), dict) else v
            for k, v in {**old, **new}.items()}


def quantizes_head(config: W8A8 | LLMInt8 | None) -> bool:
    """Whether the scheme quantizes the output head too (W8A8 with lm_head not skipped)."""
    return isinstance(config, W8A8) and not matches("lm_head", config.skip)


def _head_name(model: nn.Module) -> str | None:
    head = output_head(model)
    return None if head is None else module_name(model, head)


def _untie(model: nn.Module) -> None:
    """The head gets its own int8 codes: the checkpoint must not tie it back to the embeddings."""
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False


@torch.no_grad()
def quantize_(model: nn.Module, config: W8A8 | LLMInt8, stats: ActivationStats | None = None,
              progress: bool = True, check_stats: bool = True, only: list[int] | None = None,
              tune_windows: torch.Tensor | None = None) -> nn.Module:
    """Replace the decoder layers' Linears (and MoE experts) that the scheme targets, in place;
    returns the model. `stats` (needed for static activations) must describe this model as it is
    now: statistics from before a mitigation are refused unless check_stats=False, which risks
    static scales that no longer fit the weights. only: just these decoder layers (the
    layer-by-layer pipeline; the caller has checked the statistics). tune_windows: calibration
    token windows [S, L] for W8A8(range_tune=N) (the first N are used)."""
    if only is None:
        prepare(model)
    tune = isinstance(config, W8A8) and config.range_tune > 0
    check_needs(config, stats, tune_windows, layer_by_layer=only is not None)
    keep = isinstance(config, W8A8) and config.keep_float > 0
    needed = max(config.range_tune, config.quiet_tune) if tune else 0
    needed = max(needed, config.keep_float_windows if keep else 0)
    if needed and needed > len(tune_windows):
        raise OutlierqError(f"W8A8 tunes on {needed} calibration windows, but {len(tune_windows)} were given: "
                            "calibrate on more (--samples) or tune on fewer")
    spec = get_arch(model)
    if isinstance(config, W8A8) and config.act == "tensor" and stats is None:
        raise OutlierqError("W8A8(act='tensor') needs calibration statistics for the input scales")
    if stats is not None and only is None:
        stats.check_matches(model, exact=check_stats)
    if stats is not None and stats.meta.get("recalibrate"):
        raise OutlierqError(f"the statistics of {stats.meta['recalibrate'][0]} (and "
                            f"{len(stats.meta['recalibrate']) - 1} more) are stale after rotate_down: "
                            "recalibrate the mitigated model (outlierq.compress does)")
    if isinstance(config, LLMInt8) and any(getattr(m, "input_rotation", None) is not None for m in model.modules()):
        raise OutlierqError("LLM.int8 (bitsandbytes) Linears cannot rotate their input online: drop "
                            "rotate_down from the recipe")
    if isinstance(config, LLMInt8) and spec.experts is not None:
        raise OutlierqError("LLM.int8 (bitsandbytes) quantizes nn.Linear only; MoE experts are "
                            "fused tensors here: use W8A8")
    names = quantizable(model, spec)
    head = _head_name(model) if isinstance(config, W8A8) and only is None else None
    if head is not None and not matches(head, config.skip):
        names.append(head)
        _untie(model)
    if isinstance(config, W8A8) and (only is None or 0 in only):  # (layer 0 first: all still float)
        unmatched = [p for p in config.token_for if not any(matches(n, (p,)) for n in names)]
        if unmatched:
            raise OutlierqError(f"token_for pattern {unmatched[0]!r} matches no quantizable Linear "
                                "(e.g. 'down_proj', '*mlp.down_proj', 're:.*layers\\.0\\..*')")
    mine = None if only is None else tuple(f"{spec.layers}.{i}." for i in only)
    targets = [(n, model.get_submodule(n)) for n in names
               if not matches(n, config.skip) and (mine is None or n.startswith(mine))]
    if tune:
        kinds = {n.rsplit(".", 1)[-1] for n, _ in targets if config.act_for(n) == "tensor"}
        for field in ("range_tune_each", "quiet_tokens"):
            stray = [k for k in getattr(config, field) if k not in kinds]
            if stray:
                raise OutlierqError(f"{field}: {stray[0]!r} is not the kind of any static Linear "
                                    f"(kinds: {', '.join(sorted(kinds))})")
    # act_clip: the static Linears whose input is rotated (`rotated_input`); histograms checked
    # before any Linear is replaced
    clipped = {n for n, lin in targets if isinstance(config, W8A8) and config.act_clip is not False
               and config.format == "int8" and rotated_input(lin) and config.act_for(n) == "tensor"}
    if isinstance(config, W8A8) and config.act_clip is True and not clipped and (only is None or 0 in only):
        warnings.warn("act_clip: no static Linear reads a rotated input (add rotate_down to the recipe); "
                      "every static range stays at its max", OutlierqNotice, stacklevel=2)
    missing = sorted(n for n in clipped if getattr(stats.value_hists.get(n), "ndim", 0) != 2)
    if missing:
        raise OutlierqError(f"W8A8(act_clip=True): the statistics have no value histograms (or ones from an older outlierq) of "
                            f"{missing[0]}'s rotated input; recalibrate the mitigated model")
    if spec.experts is not None and isinstance(config, W8A8) and config.format != "int8":
        raise OutlierqError(f"{config.format} MoE experts are not supported yet: quantize this model with int8 (W8A8)")
    act_clips: dict[str, float] = {}
    tuned: dict[str, Any] = {}  # what each tuning step chose (TUNING), for every record
    if clipped:
        row = ACT_CLIP_OBJECTIVES.index(act_clip_objective(config, spec))
    originals: dict[str, nn.Module] = {}  # keep_float's candidates: the float Linears replaced
    if keep:
        kinds = config.keep_float_kinds
        stray = [k for k in kinds if not any(n.rsplit(".", 1)[-1] == k for n, _ in targets)]
        if stray:
            raise OutlierqError(f"keep_float kinds: {stray[0]!r} is not the kind of any quantized Linear")
        originals = {n: lin for n, lin in targets if not kinds or n.rsplit(".", 1)[-1] in kinds}
        # (each position's top tokens, as quiet_tune: a full vocabulary's log-probabilities per
        # window would take gigabytes on Gemma-3's 262k tokens)
        keep_windows = tune_windows[:config.keep_float_windows]
        keep_at = torch.arange(0, keep_windows.shape[1], tuning.KEEP_FLOAT_STRIDE)
        keep_ref = [top_log_probs(_logits(model, w, keep_at), tuning.QUIET_TOPK) for w in keep_windows]
    if tune:  # the float model's answer on the tuning windows, before any Linear is replaced
        calib_windows, tune_windows = tune_windows, tune_windows[:config.range_tune]
        ref = [_log_probs(model, w) for w in tune_windows]
        quiet_windows, quiet_ref = tune_windows, ref
        if config.quiet_tune:
            quiet_windows = calib_windows[:config.quiet_tune]
            quiet_ref = [top_log_probs(_logits(model, w), tuning.QUIET_TOPK) for w in quiet_windows]
    for name, lin in tqdm(targets, desc="quantize", unit="linear", disable=not progress):
        if isinstance(config, LLMInt8):
            new = _llm_int8(lin, config.threshold)
        else:
            act = config.act_for(name)
            qmax = get_format(config.format).qmax
            scale = stats.input_absmax(name).max().item() / qmax if act == "tensor" else None
            if name in clipped:
                ratio = act_clip_search(stats.value_hists[name][row], scale * qmax)
                scale *= ratio
                act_clips[name] = ratio
            clip = (clip_search(lin.weight, stats.samples[name], fmt=get_format(config.format))
                    if config.weight_clip else None)
            hess = stats.hessians[name] if config.gptq else None
            new = Int8Linear.from_linear(lin, act, scale, config.fake, config.backend, clip, hess, config.format,
                                         config.weight_strategy)
        set_module(model, name, new)
    if spec.experts is not None:
        for i, layer in enumerate(decoder_layers(model, spec)):
            if only is not None and i not in only:
                continue
            pre = f"{spec.layers}.{i}"
            gate, _, down = expert_names(spec, pre, 0)
            acts = (config.act_for(gate) or "none", config.act_for(down) or "none")
            scales = None
            if "tensor" in acts:
                name = f"{pre}.{spec.experts.path}"
                n = resolve(layer, spec.experts.path).gate_up_proj.shape[0]
                scales = (torch.full((n,), stats.input_absmax(f"{name}.gate_up").max().item() / 127.0),
                          torch.tensor([stats.input_absmax(f"{name}.{e}.down").max().item() / 127.0
                                        for e in range(n)]))
            ex = resolve(layer, spec.experts.path)
            set_module(layer, spec.experts.path,
                       Int8Experts.from_experts(ex, acts, scales, config.fake, config.backend))
    if act_clips:
        tuned.update(act_clip=act_clips, act_clip_objective=act_clip_objective(config, spec))
    if tune:
        tuned["range_tune"] = tune_ranges(model, tune_windows, ref, progress=progress, each=config.range_tune_each)
        if config.quiet_tokens:
            tuned["quiet_tokens"] = key_quiet_tokens(model, calib_windows, quiet_windows, quiet_ref,
                                                     config.quiet_tokens, progress=progress)
    if keep:  # last: it weighs each Linear's int8 error with every other step's choice in place
        tuned["keep_float"] = tuning.keep_float(model, originals, config.keep_float, keep_windows, keep_ref,
                                                keep_at, progress=progress)
    # layer by layer, quantize_ runs once per layer: the records add up
    model.outlierq_tuning = _merged(getattr(model, "outlierq_tuning", {}) if only is not None else {}, tuned)
    # the scheme, for every record (the export's outlierq.json, CompressResult.record), whoever
    # exports: the CLI, outlierq.export from Python, or the layer-by-layer pipeline
    model.outlierq_scheme = dataclasses.asdict(config)
    return model
