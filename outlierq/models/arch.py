"""One structural description per model family, shared by calibration, every mitigation,
quantization, export, the report and the tests.

Paths are attribute paths relative to one decoder layer ("self_attn.q_proj"), resolved by attribute
access, never by regex over module names. A family is a function of the model's config (layouts
such as parallel residuals or post-LayerNorm are config switches) returning an `ArchSpec`.
Adding a family = one builder here + one tiny-model row in tests/conftest.py."""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
from torch import nn


NormKind = Literal["rms", "rms_offset", "layernorm"]
# activations f with f(s * x) = s * f(x) for s > 0: the MLP's first Linear can be rescaled
# (SmoothQuant pair) or split (OCS) against the second without changing the function.
HOMOGENEOUS = ("relu",)
RowMap = Callable[[Any], torch.Tensor]   # config -> producer row feeding each consumer input channel


@dataclass(frozen=True)
class NormGroup:
    """A norm and everything that reads its output (one SmoothQuant scale per channel covers all):
    Linears, and for MoE layers the router (`router.weight` [E, H]) and the fused experts."""
    norm: str
    linears: tuple[str, ...]
    router: str | None = None
    experts: str | None = None
    layers: tuple[int, ...] | None = None   # the decoder layers that have it; None: every layer
    kind: NormKind | None = None            # this norm's fold when it differs from ArchSpec.norm_kind

    def applies(self, i: int) -> bool:
        return self.layers is None or i in self.layers


@dataclass(frozen=True)
class LinearPair:
    """producer -> consumer with no norm between them. `rows(config)` gives, for each consumer
    input channel, the producer output row that feeds it (grouped KV heads share rows; fused
    producers such as qkv_proj or gate_up_proj feed the consumer from one block of rows).
    None: the identity."""
    producer: str
    consumer: str
    kind: Literal["attn_vo", "mlp"]
    rows: RowMap | None = None
    layers: tuple[int, ...] | None = None   # the decoder layers that have it; None: every layer

    def applies(self, i: int) -> bool:
        return self.layers is None or i in self.layers


@dataclass(frozen=True)
class MLPSpec:
    """A dense MLP whose intermediate channels can be split (OCS) by copying producer rows."""
    up: str                    # rows scaled when a channel is split
    gate: str | None           # gated MLPs: rows copied unscaled (act(gate) * up is linear in up)
    down: str                  # columns copied
    size_attr: str             # config field holding the intermediate size
    fused: bool = False        # `up` holds [gate | up] rows in one Linear (Phi-3's gate_up_proj)


@dataclass(frozen=True)
class ExpertsSpec:
    """transformers-5 fused experts: `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj`
    [E, H, I] parameters, called as experts(hidden [T, H], top_k_index, top_k_weights). On disk the
    family's original checkpoints keep one Linear per expert: `<ckpt>.<e>.<gate|up|down>.weight`."""
    path: str                          # the experts module, relative to the layer
    ckpt: str                          # per-expert prefix in original checkpoints, relative to the layer
    names: tuple[str, str, str]        # per-expert (gate, up, down) names in original checkpoints
    router_ckpt: str                   # the router's name in original checkpoints


@dataclass(frozen=True)
class ArchSpec:
    family: str
    layers: str                        # CausalLM -> its list of decoder layers
    embed: str                         # CausalLM -> token embedding
    final_norm: str                    # CausalLM -> norm before lm_head
    norm_kind: NormKind
    groups: tuple[NormGroup, ...]
    pairs: tuple[LinearPair, ...]
    writers: tuple[str, ...]           # Linears whose output is added to the residual stream
    act: str                           # MLP activation (config name)
    mlp: MLPSpec | None = None         # None: no channel split for this family/layout
    experts: ExpertsSpec | None = None
    keep_float: tuple[str, ...] = ()   # Linears never quantized (with the reason in `notes`)
    conv1d: tuple[str, ...] = ()       # GPT-2 Conv1D modules: held as nn.Linear, saved transposed
    notes: tuple[str, ...] = field(default=())   # what is not applied, and why (shown as warnings)
    # the residual stream is read by RMSNorms only (the groups' norms and the final norm) and
    # written by `writers` only, so it can be rotated offline (mitigate/rotate.py)
    rotatable: bool = False
    # each sublayer's output is normalised per token before it joins the residual stream
    # (Gemma-2/3's and OLMo-2's post norms): an error in a Linear counts relative to its token's norm
    output_norms: bool = False
    # found by probing the model (models/infer.py) rather than written for its family
    inferred: bool = False
    # Linears the model never calls (it reads their weight directly): float, and not calibrated
    uncalled: tuple[str, ...] = ()

    @property
    def router(self) -> str | None:
        """The MoE router's path (it reads the same norm as the experts), or None."""
        return next((g.router for g in self.groups if g.router), None)

    def input_kinds(self) -> dict[str, str]:
        """One representative Linear per distinct input tensor of a layer -> a readable label
        (Linears fed by one norm read the same tensor; the report draws it once)."""
        out = {g.linears[0]: f"{g.norm} output" for g in self.groups if g.linears}
        for p in self.pairs:
            out.setdefault(p.consumer, f"{p.consumer} input")
        for w in self.writers:
            out.setdefault(w, f"{w} input")
        return out


# ---- row maps for fused and grouped attention layouts ---------------------------------------
def _heads(cfg) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def _vo(offset: Callable[[Any], int] = lambda cfg: 0) -> RowMap:
    """Separate or [q | k | v]-fused v rows, grouped KV heads: query head h reads KV head
    h // (heads / kv)."""
    def rows(cfg):
        heads, kv, hd = _heads(cfg)
        c = torch.arange(heads * hd)
        return offset(cfg) + (c // hd) // (heads // kv) * hd + c % hd
    return rows


def _vo_interleaved(cfg) -> torch.Tensor:
    """Per-head [q | k | v] blocks (GPT-NeoX, multi-head Falcon)."""
    heads, _, hd = _heads(cfg)
    c = torch.arange(heads * hd)
    return (c // hd) * 3 * hd + 2 * hd + c % hd


def _vo_falcon_grouped(cfg) -> torch.Tensor:
    """Falcon's new decoder architecture: per KV group [q_1..q_n | k | v] blocks."""
    heads, _, hd = _heads(cfg)
    kv = cfg.num_kv_heads
    n = heads // kv
    c = torch.arange(heads * hd)
    return (c // hd) // n * (n + 2) * hd + (n + 1) * hd + c % hd


def _second_half(size_attr: str) -> RowMap:
    """Fused [gate | up] producer: the up rows are the second block."""
    return lambda cfg: getattr(cfg, size_attr) + torch.arange(getattr(cfg, size_attr))


def _act(cfg) -> str:
    return getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "?"


# ---- families --------------------------------------------------------------------------------
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")
_VO = LinearPair("self_attn.v_proj", "self_attn.o_proj", "attn_vo", _vo())
_UP_DOWN = LinearPair("mlp.up_proj", "mlp.down_proj", "mlp")
_GATED_MLP = MLPSpec(up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj",
                     size_attr="intermediate_size")
_LLAMA_WRITERS = ("self_attn.o_proj", "mlp.down_proj")
_POST_NORM = ("post-norm layout: no norm feeds the Linears, so only the v->o and up->down pairs "
              "are smoothed (nothing is folded into a norm)")


def _llama(cfg, family: str, norm_kind: NormKind = "rms", mlp_norm: str = "post_attention_layernorm",
           attn_norm: str = "input_layernorm") -> ArchSpec:
    groups = (NormGroup(attn_norm, _QKV + (_GATE_UP if mlp_norm == attn_norm else ())),)
    if mlp_norm != attn_norm:
        groups += (NormGroup(mlp_norm, _GATE_UP),)
    return ArchSpec(family=family, layers="model.layers", embed="model.embed_tokens",
                    final_norm="model.norm", norm_kind=norm_kind, groups=groups,
                    pairs=(_VO, _UP_DOWN), writers=_LLAMA_WRITERS, act=_act(cfg), mlp=_GATED_MLP,
                    rotatable=norm_kind == "rms")


def _gemma(cfg, family: str) -> ArchSpec:
    # RMSNorm computes x * (1 + weight); the MLP reads pre_feedforward_layernorm, while
    # post_attention_layernorm / post_feedforward_layernorm normalise the sublayer *outputs*.
    return dataclasses.replace(_llama(cfg, family, "rms_offset", mlp_norm="pre_feedforward_layernorm"),
                               output_norms=True)


def _stablelm(cfg) -> ArchSpec:
    # use_parallel_residual: attention and MLP both read input_layernorm (no second norm).
    mlp_norm = "input_layernorm" if cfg.use_parallel_residual else "post_attention_layernorm"
    return _llama(cfg, "stablelm", "layernorm", mlp_norm=mlp_norm)


def _olmo2(cfg) -> ArchSpec:
    return ArchSpec(family="olmo2", layers="model.layers", embed="model.embed_tokens",
                    final_norm="model.norm", norm_kind="rms", groups=(), pairs=(_VO, _UP_DOWN),
                    writers=_LLAMA_WRITERS, act=cfg.hidden_act, mlp=_GATED_MLP, notes=(_POST_NORM,),
                    output_norms=True)


def _phi3(cfg) -> ArchSpec:
    heads, kv, hd = _heads(cfg)
    return ArchSpec(
        family="phi3", layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
        norm_kind="rms",
        groups=(NormGroup("input_layernorm", ("self_attn.qkv_proj",)),
                NormGroup("post_attention_layernorm", ("mlp.gate_up_proj",))),
        pairs=(LinearPair("self_attn.qkv_proj", "self_attn.o_proj", "attn_vo",
                          _vo(lambda c: (heads + kv) * hd)),
               LinearPair("mlp.gate_up_proj", "mlp.down_proj", "mlp", _second_half("intermediate_size"))),
        writers=_LLAMA_WRITERS, act=cfg.hidden_act,
        mlp=MLPSpec(up="mlp.gate_up_proj", gate=None, down="mlp.down_proj",
                    size_attr="intermediate_size", fused=True), rotatable=True)


def _moe(cfg, family: str, ckpt: str, names: tuple[str, str, str], router_ckpt: str,
         shared: bool = False) -> ArchSpec:
    linears: tuple[str, ...] = ()
    pairs = (_VO,)
    keep: tuple[str, ...] = ()
    notes = ["MoE: no channel split (experts keep their width); the router stays float",
             "MoE calibration routes every token through every expert (statistics only; the "
             "model's output uses the router's choice)"]
    if shared:
        linears = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate")
        pairs += (LinearPair("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj", "mlp"),)
        keep = ("mlp.shared_expert_gate",)
        notes.append("shared_expert_gate (1 output) stays float: a sigmoid gate, too narrow for "
                     "an int8 GEMM")
    return ArchSpec(
        family=family, layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
        norm_kind="rms",
        groups=(NormGroup("input_layernorm", _QKV),
                NormGroup("post_attention_layernorm", linears, router="mlp.gate", experts="mlp.experts")),
        pairs=pairs, writers=("self_attn.o_proj",) + (("mlp.shared_expert.down_proj",) if shared else ()),
        act=cfg.hidden_act, experts=ExpertsSpec("mlp.experts", ckpt, names, router_ckpt),
        keep_float=keep, notes=tuple(notes))


_GELU_NOTE = ("{act} MLP: no {up}->{down} smoothing pair and no channel split ({act} is not "
              "positively homogeneous, so scaling {up} rows would change the function)")


def _relu_or_note(cfg_act: str, up: str, down: str, size_attr: str):
    """(pairs, mlp, notes) for a non-gated MLP: only ReLU lets its rows be rescaled/split."""
    if cfg_act in HOMOGENEOUS:
        return (LinearPair(up, down, "mlp"),), MLPSpec(up=up, gate=None, down=down, size_attr=size_attr), ()
    return (), None, (_GELU_NOTE.format(act=cfg_act, up=up, down=down),)


def _opt(cfg) -> ArchSpec:
    pairs, mlp, notes = _relu_or_note(cfg.activation_function, "fc1", "fc2", "ffn_dim")
    groups = (NormGroup("self_attn_layer_norm", _QKV), NormGroup("final_layer_norm", ("fc1",)))
    if not cfg.do_layer_norm_before:
        groups, notes = (), notes + ("OPT post-LayerNorm (do_layer_norm_before=False): " + _POST_NORM,)
    elif not getattr(cfg, "layer_norm_elementwise_affine", True):
        groups, notes = (), notes + ("LayerNorms without weights (layer_norm_elementwise_affine="
                                     "False): nothing to fold a scale into, so only pairs are smoothed",)
    return ArchSpec(family="opt", layers="model.decoder.layers", embed="model.decoder.embed_tokens",
                    final_norm="model.decoder.final_layer_norm", norm_kind="layernorm", groups=groups,
                    pairs=(LinearPair("self_attn.v_proj", "self_attn.out_proj", "attn_vo"),) + pairs,
                    writers=("self_attn.out_proj", "fc2"), act=cfg.activation_function, mlp=mlp,
                    notes=notes)


def _gpt2(cfg) -> ArchSpec:
    pairs, mlp, notes = _relu_or_note(cfg.activation_function, "mlp.c_fc", "mlp.c_proj", "n_inner")
    return ArchSpec(
        family="gpt2", layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
        norm_kind="layernorm",
        groups=(NormGroup("ln_1", ("attn.c_attn",)), NormGroup("ln_2", ("mlp.c_fc",))),
        pairs=(LinearPair("attn.c_attn", "attn.c_proj", "attn_vo",
                          lambda c: 2 * c.n_embd + torch.arange(c.n_embd)),) + pairs,
        writers=("attn.c_proj", "mlp.c_proj"), act=cfg.activation_function, mlp=mlp,
        conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), notes=notes)


def _neox(cfg) -> ArchSpec:
    pairs, mlp, notes = _relu_or_note(cfg.hidden_act, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h",
                                      "intermediate_size")
    return ArchSpec(
        family="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm", norm_kind="layernorm",
        groups=(NormGroup("input_layernorm", ("attention.query_key_value",)),
                NormGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",))),
        pairs=(LinearPair("attention.query_key_value", "attention.dense", "attn_vo", _vo_interleaved),)
        + pairs, writers=("attention.dense", "mlp.dense_4h_to_h"), act=cfg.hidden_act, mlp=mlp,
        notes=notes)


def _falcon(cfg) -> ArchSpec:
    qkv, up = "self_attention.query_key_value", "mlp.dense_h_to_4h"
    if cfg.new_decoder_architecture:
        two = (cfg.num_ln_in_parallel_attn or 2) == 2
        groups = ((NormGroup("ln_attn", (qkv,)), NormGroup("ln_mlp", (up,))) if two
                  else (NormGroup("input_layernorm", (qkv, up)),))
        rows = _vo_falcon_grouped
    else:
        groups = ((NormGroup("input_layernorm", (qkv, up)),) if cfg.parallel_attn else
                  (NormGroup("input_layernorm", (qkv,)), NormGroup("post_attention_layernorm", (up,))))
        heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        rows = (lambda c: heads * hd + hd + torch.arange(heads * hd) % hd) if cfg.multi_query \
            else _vo_interleaved
    return ArchSpec(
        family="falcon", layers="transformer.h", embed="transformer.word_embeddings",
        final_norm="transformer.ln_f", norm_kind="layernorm", groups=groups,
        pairs=(LinearPair(qkv, "self_attention.dense", "attn_vo", rows),),
        writers=("self_attention.dense", "mlp.dense_4h_to_h"), act=getattr(cfg, "activation", "gelu"),
        notes=(_GELU_NOTE.format(act="GeLU", up=up, down="mlp.dense_4h_to_h"),))


def _phi(cfg) -> ArchSpec:
    pairs, mlp, notes = _relu_or_note(cfg.hidden_act, "mlp.fc1", "mlp.fc2", "intermediate_size")
    return ArchSpec(
        family="phi", layers="model.layers", embed="model.embed_tokens", final_norm="model.final_layernorm",
        norm_kind="layernorm", groups=(NormGroup("input_layernorm", _QKV + ("mlp.fc1",)),),
        pairs=(LinearPair("self_attn.v_proj", "self_attn.dense", "attn_vo", _vo()),) + pairs,
        writers=("self_attn.dense", "mlp.fc2"), act=cfg.hidden_act, mlp=mlp, notes=notes)


def _cohere(cfg) -> ArchSpec:
    # Parallel block: one LayerNorm (weight, no bias) feeds attention and the MLP.
    return _llama(cfg, "cohere", "layernorm", mlp_norm="input_layernorm")


ARCHS: dict[str, Callable[[Any], ArchSpec]] = {
    "LlamaForCausalLM": lambda c: _llama(c, "llama"),
    "MistralForCausalLM": lambda c: _llama(c, "mistral"),
    "Qwen2ForCausalLM": lambda c: _llama(c, "qwen2"),
    "Qwen3ForCausalLM": lambda c: _llama(c, "qwen3"),
    "GraniteForCausalLM": lambda c: _llama(c, "granite"),
    "Gemma2ForCausalLM": lambda c: _gemma(c, "gemma2"),
    "Gemma3ForCausalLM": lambda c: _gemma(c, "gemma3"),
    "StableLmForCausalLM": _stablelm,
    "CohereForCausalLM": _cohere,
    "Olmo2ForCausalLM": _olmo2,
    "Phi3ForCausalLM": _phi3,
    "MixtralForCausalLM": lambda c: _moe(c, "mixtral", "block_sparse_moe.experts", ("w1", "w3", "w2"),
                                         "block_sparse_moe.gate"),
    "Qwen2MoeForCausalLM": lambda c: _moe(c, "qwen2_moe", "mlp.experts",
                                          ("gate_proj", "up_proj", "down_proj"), "mlp.gate", shared=True),
    "Qwen3MoeForCausalLM": lambda c: _moe(c, "qwen3_moe", "mlp.experts",
                                          ("gate_proj", "up_proj", "down_proj"), "mlp.gate"),
    "OPTForCausalLM": _opt,
    "GPT2LMHeadModel": _gpt2,
    "GPTNeoXForCausalLM": _neox,
    "FalconForCausalLM": _falcon,
    "PhiForCausalLM": _phi,
}
# Gemma 3 from 4B up is multimodal; outlierq quantizes its language model (the vision tower and
# projector stay float). Paths are the same as Gemma3ForCausalLM's under `model.language_model`.
MULTIMODAL = {"Gemma3ForConditionalGeneration": ("gemma3", "model.language_model")}


def arch_key(model: nn.Module) -> str:
    """The class transformers built: it decides the structure, never a config's `architectures`
    label alone (a Gemma 3n config labelled Gemma3ForCausalLM builds Gemma3nForCausalLM)."""
    return type(model).__name__


_INFERRED: "weakref.WeakKeyDictionary[nn.Module, ArchSpec]" = weakref.WeakKeyDictionary()


def get_arch(model: nn.Module) -> ArchSpec:
    """The family's hand-written description (the 20 families measured before inference existed:
    tests/test_infer.py holds inference equal to them), else the structure inferred from the
    model and proven on a probe forward (models/infer.py), computed once per model."""
    key = arch_key(model)
    if key in MULTIMODAL:
        family, root = MULTIMODAL[key]
        base = _gemma(text_config(model), family)
        return dataclasses.replace(
            base, family="gemma3_multimodal", layers=f"{root}.layers", embed=f"{root}.embed_tokens",
            final_norm=f"{root}.norm",
            notes=base.notes + ("multimodal Gemma 3: only the language model is mitigated and "
                                "quantized; the vision tower and projector stay float",))
    if key in ARCHS:
        return ARCHS[key](model.config)
    spec = _INFERRED.get(model)
    if spec is None:
        from .infer import infer_arch
        spec = infer_arch(model)
        if any("not probed" in n for n in spec.notes):
            return spec  # probe again once the weights are in memory
        _INFERRED[model] = spec
    return spec


def forget_arch(model: nn.Module) -> None:
    """Drop a cached inferred spec (after surgery that changes the structure)."""
    _INFERRED.pop(model, None)


def resolve(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    return resolve(model, (spec or get_arch(model)).layers)


def text_config(model: nn.Module):
    """The config holding hidden_size, heads and MLP sizes (the text config of a multimodal model)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def quantizable(model: nn.Module, spec: ArchSpec | None = None) -> list[str]:
    """Names of the Linears inside decoder layers (vision towers and lm_head are outside)."""
    spec = spec or get_arch(model)
    keep = {f"{spec.layers}.{i}.{k}" for i in range(len(decoder_layers(model, spec))) for k in spec.keep_float}
    pre = spec.layers + "."
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith(pre) and n not in keep]
