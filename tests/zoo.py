"""Tiny random models of every causal-LM class transformers ships (its MODEL_FOR_CAUSAL_LM mapping):
each family's default config, shrunk field by field to hidden 64 and 2 layers. Used by the
contract suite (tests/test_contract.py) and scripts/families.py."""
from __future__ import annotations

import torch

SEED = 0
# Config fields set when the family's config has them (names as each config spells them;
# `attribute_map` aliases such as n_embd -> hidden_size resolve too).
SMALL = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=128, ffn_dim=128, n_inner=128, max_position_embeddings=256,
    moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_local_experts=4,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    sliding_window=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, state_size=16, ssm_state_size=16, mamba_d_state=16, mamba_n_heads=4,
    mamba_d_head=32, mamba_expand=2, n_groups=1, mamba_n_groups=1, conv_L_cache=3, block_dim=64,
    block_ff_dim=128, hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, laurel_rank=8,
    altup_num_inputs=2, num_kv_shared_layers=0, intermediate_size_mlp=128, topk_group=1, n_group=1,
    global_head_dim=16, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, rotary_dim=8,
    decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
    decoder_ffn_dim=128, encoder_ffn_dim=128, num_heads=4,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
)


def tiny_config(model_type: str):
    """The family's default config with every field of SMALL it has set to the small value."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    aliases = getattr(default, "attribute_map", {})
    keys = set(default.to_dict()) | set(aliases)
    over = {k: v for k, v in SMALL.items() if k in keys}
    for k, v in default.to_dict().items():  # other MLP widths and low ranks a family names its own way
        if isinstance(v, int) and not isinstance(v, bool) and k not in over:
            if k.endswith("intermediate_size") and v > 128:
                over[k] = 128
            elif k.endswith("_lora_rank") and v > 32:
                over[k] = 32
    if "kv_lora_rank" in keys:  # multi-head latent attention: the rotary part is the head dim
        over["head_dim"] = SMALL["qk_rope_head_dim"]
    if "mamba_expand" in keys or model_type.startswith("mamba"):
        over["num_heads"] = over.get("mamba_n_heads", 4)
        over["head_dim"] = 2 * SMALL["hidden_size"] // over["num_heads"]
    if "attention_types" in keys:  # GPT-Neo: [[kinds, repeats]]
        over["attention_types"] = [[["global", "local"], 1]]
    types = getattr(default, "layer_types", None)
    settable = not isinstance(getattr(type(default), "layer_types", None), property)
    if settable and isinstance(types, list) and types:  # hybrids: one layer of each of the first two kinds
        kinds = list(dict.fromkeys(types))[:2]
        if kinds == ["linear_attention"]:  # an all-recurrent default (Granite 4): add attention
            kinds.append("full_attention")
        over["layer_types"] = (kinds * 2)[:2]
    return AutoConfig.for_model(model_type, **over)


def build(model_type: str, seed: int = SEED, dtype=torch.float32):
    """A tiny random model of `model_type`'s causal-LM class, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(model_type)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def model_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def decoder_only(model_type: str) -> str | None:
    """Why the contract suite skips `model_type`, or None. The mapping also lists encoder-decoder
    decoders, masked LMs with an LM head, speech and music decoders and multimodal wrappers."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(model_type)
    except Exception as e:  # noqa: BLE001  (a few default configs fail their own validation)
        return f"its default config does not validate in this transformers ({type(e).__name__})"
    if getattr(cfg, "is_encoder_decoder", False) or model_type in ENCODER_FAMILIES:
        return "an encoder or an encoder-decoder's decoder, not a decoder-only LM"
    if getattr(cfg, "text_config", None) is not None and getattr(cfg, "text_config") is not cfg:
        return "a multimodal wrapper (its text model is listed on its own, or is not a causal LM here)"
    if model_type in TOO_BIG:
        return TOO_BIG[model_type]
    return None


# BERT-style encoders that transformers can run as decoders (is_decoder=True), and other
# non-decoder-only entries of the causal-LM mapping that their configs do not mark
ENCODER_FAMILIES = {
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie",
    "megatron-bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "xlm-roberta", "xlm-roberta-xl", "xmod", "xlm", "reformer", "prophetnet", "trocr", "whisper",
    "musicgen", "musicgen_melody", "moshi", "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small",
    "marian", "mbart", "mvp", "pegasus", "plbart", "git", "modernbert-decoder",
}


# families whose smallest config this file can make does not fit a test machine
TOO_BIG = {"blt": "byte-latent model: its hash embeddings alone take 12 GB at any hidden size set here",
           "emu3": "image-token vocabulary and VQ model allocated at full size", "fuyu": "multimodal wrapper"}


class Unbuildable(Exception):
    """This file could not make a tiny model of the family (a limit of the shrinking, not of outlierq)."""


def contract(model_type: str, tmp) -> dict:
    """The contract every causal LM must meet (tests/test_contract.py, scripts/families.py):
    SmoothQuant with the inferred groups keeps the logits (1e-5 relative), per-token W8A8 makes every
    decoder Linear int8 (but the float keeps), the export reloads in outlierq (bit-identical) and
    in transformers, and the report's input kinds resolve."""
    import copy
    import warnings
    from pathlib import Path

    from torch import nn
    from transformers import AutoModelForCausalLM

    from outlierq import calibrate, compress, export, load
    from outlierq.models.arch import decoder_layers, get_arch
    from outlierq.models.prepare import prepare
    from outlierq.quant import Int8Linear, W8A8

    try:
        model = build(model_type)
        with torch.no_grad():
            model(input_ids=torch.randint(3, 100, (1, 8)), use_cache=False)
    except Exception as e:  # noqa: BLE001
        raise Unbuildable(f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}") from None
    model = prepare(model)
    spec = get_arch(model)
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(3, min(vocab, 128), (4, 32), generator=g)
    test = torch.randint(3, min(vocab, 128), (2, 32), generator=g)
    row = {"model_type": model_type, "class": type(model).__name__, "family": spec.family,
           "groups": [f"{x.norm} -> {', '.join(x.linears)}" + (f" (layers {list(x.layers)})" if x.layers else "")
                      for x in spec.groups],
           "pairs": [f"{p.producer} -> {p.consumer}" + (f" (layers {list(p.layers)})" if p.layers else "")
                     for p in spec.pairs],
           "notes": list(spec.notes), "inferred": spec.inferred}
    with torch.no_grad():
        ref = model(input_ids=test, use_cache=False).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = calibrate(model, calib, keep_rows=64, progress=False)
        sq = compress(copy.deepcopy(model), None, "smoothquant:alpha=0.5", None, stats, progress=False).model
    with torch.no_grad():
        out = sq(input_ids=test, use_cache=False).logits
    row["smoothquant_rel"] = ((out - ref).abs().max() / ref.abs().max()).item()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = compress(copy.deepcopy(model), None, "smoothquant:alpha=0.5", W8A8(act="token"), stats, progress=False)
    layers = decoder_layers(q.model, spec)
    floats = [f"{i}.{n}" for i, layer in enumerate(layers) for n, m in layer.named_modules()
              if type(m) is nn.Linear and n not in spec.keep_float]
    row["float_linears_left"] = floats
    row["int8_linears"] = sum(isinstance(m, Int8Linear) for m in layers.modules())
    with torch.no_grad():
        qref = q.model(input_ids=test, use_cache=False).logits
    row["int8_vs_fp32_rel"] = ((qref - ref).norm() / ref.norm()).item()
    ckpt = export(q.model, Path(tmp) / f"ckpt-{model_type}", recipe=q.recipe, stats=q.stats)
    with torch.no_grad():
        row["reload_bit_identical"] = bool(torch.equal(load(ckpt)[0](input_ids=test, use_cache=False).logits, qref))
        try:
            hf = AutoModelForCausalLM.from_pretrained(ckpt)(input_ids=test, use_cache=False).logits
            row["transformers_rel"] = ((hf - qref).norm() / qref.norm()).item()
        except Exception as e:  # noqa: BLE001  (recorded, not hidden)
            row["transformers_rel"] = f"does not load: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return row
