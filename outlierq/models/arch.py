"""One structural description per model family, shared by calibration, every mitigation and export.

Paths are attribute paths relative to one decoder layer ("self_attn.q_proj"), resolved by attribute
access, never by regex over module names. Adding a family = one `ArchSpec` entry + one tiny-model
test row (tests/models/test_arch.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import OutlierqError

NormKind = Literal["rms", "rms_offset", "layernorm"]


@dataclass(frozen=True)
class NormGroup:
    """A norm and the Linears that read its output (a SmoothQuant group)."""
    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class LinearPair:
    """producer -> consumer with no norm between them; the producer's output rows map 1:1 (or,
    for attention with grouped KV heads, 1:n) onto the consumer's input channels."""
    producer: str
    consumer: str
    kind: Literal["attn_vo", "mlp"]


@dataclass(frozen=True)
class MLPSpec:
    """The MLP, for outlier channel splitting (OCS) folded into the producer."""
    up: str                    # rows scaled when a channel is split
    gate: str | None           # gated MLPs: rows copied unscaled (act(gate) * up is linear in up)
    down: str                  # columns copied
    size_attr: str             # config field holding the intermediate size


@dataclass(frozen=True)
class ArchSpec:
    family: str
    layers: str                # path from the CausalLM to its list of decoder layers
    norm_kind: NormKind
    groups: tuple[NormGroup, ...]
    pairs: tuple[LinearPair, ...]
    mlp: MLPSpec


_LLAMA_LIKE = dict(
    layers="model.layers",
    norm_kind="rms",
    groups=(
        NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    pairs=(
        LinearPair("self_attn.v_proj", "self_attn.o_proj", "attn_vo"),
        LinearPair("mlp.up_proj", "mlp.down_proj", "mlp"),
    ),
    mlp=MLPSpec(up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj",
                size_attr="intermediate_size"),
)

ARCHS: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(family="llama", **_LLAMA_LIKE),
    "MistralForCausalLM": ArchSpec(family="mistral", **_LLAMA_LIKE),
    "Qwen2ForCausalLM": ArchSpec(family="qwen2", **_LLAMA_LIKE),
    "Qwen3ForCausalLM": ArchSpec(family="qwen3", **_LLAMA_LIKE),
    # Gemma 3: RMSNorm computes x * (1 + weight); the MLP reads pre_feedforward_layernorm, while
    # post_attention_layernorm / post_feedforward_layernorm normalise the sublayer *outputs*.
    "Gemma3ForCausalLM": ArchSpec(
        family="gemma3", layers="model.layers", norm_kind="rms_offset",
        groups=(
            NormGroup("input_layernorm",
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ),
        pairs=_LLAMA_LIKE["pairs"], mlp=_LLAMA_LIKE["mlp"],
    ),
    # OPT (pre-LN variants): LayerNorm with bias; fc1 -> ReLU -> fc2, and ReLU is positively
    # homogeneous, so fc1 rows can be scaled (and split) against fc2 columns.
    "OPTForCausalLM": ArchSpec(
        family="opt", layers="model.decoder.layers", norm_kind="layernorm",
        groups=(
            NormGroup("self_attn_layer_norm",
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            NormGroup("final_layer_norm", ("fc1",)),
        ),
        pairs=(LinearPair("self_attn.v_proj", "self_attn.out_proj", "attn_vo"),
               LinearPair("fc1", "fc2", "mlp")),
        mlp=MLPSpec(up="fc1", gate=None, down="fc2", size_attr="ffn_dim"),
    ),
}


def arch_key(model: nn.Module) -> str:
    """`config.architectures[0]`, falling back to the class name (GGUF loads leave it unset)."""
    archs = getattr(model.config, "architectures", None)
    return archs[0] if archs else type(model).__name__


def get_arch(model: nn.Module) -> ArchSpec:
    key = arch_key(model)
    if key not in ARCHS:
        raise OutlierqError(f"unsupported architecture {key!r}; supported: {', '.join(sorted(ARCHS))}")
    spec = ARCHS[key]
    if spec.family == "opt" and not getattr(model.config, "do_layer_norm_before", True):
        raise OutlierqError("OPT with post-LayerNorm (do_layer_norm_before=False, e.g. opt-350m) is "
                            "not supported: its norms do not feed the Linears; use a pre-LN OPT")
    return spec


def resolve(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def decoder_layers(model: nn.Module, spec: ArchSpec | None = None) -> nn.ModuleList:
    return resolve(model, (spec or get_arch(model)).layers)


def layer_prefix(spec: ArchSpec, i: int) -> str:
    return f"{spec.layers}.{i}"


def kv_groups(model: nn.Module) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of the model's attention."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim
