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
            "GraniteForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "StableLmForCausalLM",
            "CohereForCausalLM", "Olmo2ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM",
            "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel",
            "GPTNeoXForCausalLM", "FalconForCausalLM", "PhiForCausalLM",
            "Gemma3ForConditionalGeneration"]
MOE = ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"]

_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, **_IDS)
_GQA = dict(_COMMON, intermediate_size=128, num_key_value_heads=2)
_MOE = dict(_GQA, num_experts_per_tok=2)


def _config(family: str, **over):
    """A tiny config of `family`; `over` changes layout switches (e.g. activation_function)."""
    gemma3 = dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                  layer_types=["sliding_attention", "full_attention"], **_GQA)
    make = {
        "LlamaForCausalLM": lambda: tf.LlamaConfig(**_GQA),
        "MistralForCausalLM": lambda: tf.MistralConfig(**_GQA),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(**_GQA),
        "Qwen3ForCausalLM": lambda: tf.Qwen3Config(**_GQA),
        "GraniteForCausalLM": lambda: tf.GraniteConfig(**_GQA),
        "Gemma2ForCausalLM": lambda: tf.Gemma2Config(head_dim=16, query_pre_attn_scalar=16, **_GQA),
        "Gemma3ForCausalLM": lambda: tf.Gemma3TextConfig(**gemma3),
        "StableLmForCausalLM": lambda: tf.StableLmConfig(**_GQA),
        "CohereForCausalLM": lambda: tf.CohereConfig(**_GQA),
        "Olmo2ForCausalLM": lambda: tf.Olmo2Config(**_GQA),
        "Phi3ForCausalLM": lambda: tf.Phi3Config(**_GQA),
        "MixtralForCausalLM": lambda: tf.MixtralConfig(num_local_experts=4, **_MOE),
        "Qwen2MoeForCausalLM": lambda: tf.Qwen2MoeConfig(num_experts=4, moe_intermediate_size=32,
                                                         shared_expert_intermediate_size=64, **_MOE),
        "Qwen3MoeForCausalLM": lambda: tf.Qwen3MoeConfig(num_experts=4, moe_intermediate_size=32,
                                                         head_dim=16, **_MOE),
        "OPTForCausalLM": lambda: tf.OPTConfig(ffn_dim=128, word_embed_proj_dim=64,
                                               do_layer_norm_before=True, **_COMMON),
        "GPT2LMHeadModel": lambda: tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                 n_positions=256, bos_token_id=1, eos_token_id=2),
        "GPTNeoXForCausalLM": lambda: tf.GPTNeoXConfig(intermediate_size=128, **_COMMON),
        "FalconForCausalLM": lambda: tf.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, **_IDS),
        "PhiForCausalLM": lambda: tf.PhiConfig(intermediate_size=128, **_COMMON),
        "Gemma3ForConditionalGeneration": lambda: tf.Gemma3Config(
            text_config=tf.Gemma3TextConfig(**gemma3),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126),
    }[family]
    cfg = make()
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, outliers: bool | str = False, seed: int = 0, **over):
    """outliers: True (norm-fed and MLP channels), "mlp" (MLP intermediate channels only) or
    False. Where to plant them comes from the family's ArchSpec."""
    from outlierq.models.arch import decoder_layers, get_arch, resolve
    from outlierq.models.prepare import prepare

    torch.manual_seed(seed)
    cfg = _config(family, **over)
    cfg.architectures = [family]
    model = getattr(tf, family)(cfg).eval().requires_grad_(False)
    prepare(model)
    spec = get_arch(model)
    offset = spec.norm_kind == "rms_offset"
    with torch.no_grad():
        for p in model.parameters():  # HF init is tiny (std 0.02); make activations lively
            if p.dim() >= 2:
                p.normal_(0, 0.2)
        for layer in decoder_layers(model, spec):
            for name, m in layer.named_modules():  # random norm weights, so folding shows
                if "norm" in name.lower() and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                    m.weight.uniform_(-0.5, 0.5) if offset else m.weight.uniform_(0.5, 1.5)
                    if getattr(m, "bias", None) is not None:
                        m.bias.uniform_(-0.1, 0.1)
            if outliers is True and spec.groups:  # a few channels 40x larger, as in real LLMs
                w = resolve(layer, spec.groups[0].norm).weight
                w[[3, 17]] = 40.0 if offset else w[[3, 17]] * 40.0
            if outliers:
                mlp_pairs = [p for p in spec.pairs if p.kind == "mlp"]
                if mlp_pairs:
                    p = mlp_pairs[0]
                    rows = p.rows(model.config.get_text_config()) if p.rows else torch.arange(128)
                    resolve(layer, p.producer).weight[rows[[5, 40]]] *= 40.0
                if spec.experts is not None:
                    ex = resolve(layer, spec.experts.path)
                    inter = ex.down_proj.shape[2]
                    ex.gate_up_proj[:, inter + 5] *= 40.0
    return model


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def token_batch(n: int = 4, seqlen: int = 32, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


def char_tokenizer(vocab: int = 128):
    """A character-level fast tokenizer whose ids fit a tiny model's vocabulary, so the CLI can
    read real calibration text with tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = {chr(32 + i): i + 3 for i in range(vocab - 3)}
    t = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "<unk>": 2, **chars}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>")


def tiny_model_dir(path, family: str, **over):
    """A tiny model of `family` with planted outliers and a character tokenizer, saved to `path`
    in the family's own checkpoint layout (GPT-2: Conv1D weights [in, out])."""
    from pathlib import Path

    from outlierq.checkpoint import MANIFEST, export

    export(tiny_model(family, outliers=True, **over), path, fmt="fp")
    for extra in ("outlierq.json", MANIFEST, ".outlierq"):  # a plain HF directory, not our export
        (Path(path) / extra).unlink(missing_ok=True)
    char_tokenizer().save_pretrained(path)
    return path


def abandoned_dir(path, pid: int | None = None):
    """A directory as a run killed outright leaves it: outlierq's in-progress marker naming `pid`
    (default: a process that has exited)."""
    import json
    import subprocess
    import sys

    if pid is None:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        pid = dead.pid
    path.mkdir()
    (path / ".outlierq-partial").write_text(json.dumps({"pid": pid}))
    return path
