"""Tiny models of every supported family, built from configs (hidden 64, 2 layers), optionally
with outliers planted on purpose."""
from __future__ import annotations

import os

import torch

# Triton decides interpreter vs compiler when a kernel is decorated: set it before any import of
# outlierq.kernels. On CPU the kernel tests then run in the interpreter; "auto" dispatch never
# picks the interpreter, so the rest of the suite is unaffected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import transformers as tf

FAMILIES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
            "Gemma3ForCausalLM", "OPTForCausalLM"]

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256)


def _config(family: str):
    if family == "OPTForCausalLM":
        return tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True,
                            **_COMMON)
    kw = dict(_COMMON, intermediate_size=128, num_key_value_heads=2)
    if family == "Gemma3ForCausalLM":
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"], **kw)
    cls = {"LlamaForCausalLM": tf.LlamaConfig, "MistralForCausalLM": tf.MistralConfig,
           "Qwen2ForCausalLM": tf.Qwen2Config, "Qwen3ForCausalLM": tf.Qwen3Config}[family]
    return cls(**kw)


def tiny_model(family: str, outliers: bool | str = False, seed: int = 0):
    """outliers: True (norm-fed and MLP channels), "mlp" (down_proj inputs only) or False."""
    torch.manual_seed(seed)
    cfg = _config(family)
    cfg.architectures = [family]
    model = getattr(tf, family)(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():  # HF init is tiny (std 0.02); make activations lively
            if p.dim() == 2:
                p.normal_(0, 0.2)
        layers = model.model.decoder.layers if family == "OPTForCausalLM" else model.model.layers
        for layer in layers:
            for name, m in layer.named_modules():  # random norm weights, so folding shows
                if "norm" in name and hasattr(m, "weight"):
                    m.weight.uniform_(0.5, 1.5) if family != "Gemma3ForCausalLM" else \
                        m.weight.uniform_(-0.5, 0.5)
                    if getattr(m, "bias", None) is not None:
                        m.bias.uniform_(-0.1, 0.1)
            if outliers is True:  # a few channels 40x larger, as in real LLMs
                norm = layer.self_attn_layer_norm if family == "OPTForCausalLM" else layer.input_layernorm
                if family == "Gemma3ForCausalLM":
                    norm.weight[[3, 17]] = 40.0
                else:
                    norm.weight[[3, 17]] *= 40.0
            if outliers:
                up = layer.fc1 if family == "OPTForCausalLM" else layer.mlp.up_proj
                up.weight[[5, 40]] *= 40.0
    return model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def token_batch(n: int = 4, seqlen: int = 32, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)
