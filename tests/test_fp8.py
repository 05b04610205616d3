"""FP8 (E4M3) as a second number format (issue 30): rounding against a brute-force search over
every E4M3 value, the real GEMM path against the dequantizing oracle, GPTQ in FP8, the export
(compressed-tensors float-quantized) reloaded bit-identically by outlierq and loaded by
transformers, and the presets on the CLI."""
import copy
import json
import warnings

import pytest
import torch

from outlierq import compress
from outlierq.checkpoint import export, load
from outlierq.quant import Int8Linear
from outlierq.quant.formats import FP8, INT8
from conftest import char_tokenizer, tiny_model, tiny_model_dir, token_batch


def _e4m3_values() -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[torch.isfinite(v)]


def _nearest_brute(x: torch.Tensor) -> torch.Tensor:
    """Each value's nearest E4M3 value by exhaustive search; ties to the even code (last bit 0)."""
    vals = _e4m3_values().unique()
    codes = vals.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
    d = (x.double()[:, None] - vals.double()[None, :]).abs()
    best = d.min(1, keepdim=True).values
    tied = d == best
    even = tied & (codes[None, :] % 2 == 0)
    pick = torch.where(even.any(1, keepdim=True), even, tied).float().argmax(1)
    return vals[pick]


def test_fp8_rounding_is_the_nearest_e4m3_value():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * s for s in (0.01, 1.0, 30.0, 300.0)])
    x = torch.cat([x, _e4m3_values(), (_e4m3_values()[1:] + _e4m3_values()[:-1]) / 2])  # (ties)
    x = x.clamp(-448, 448)
    assert torch.equal(FP8.snap(x), _nearest_brute(x))
    assert FP8.snap(torch.tensor([1e6, -1e6])).tolist() == [448.0, -448.0]  # saturates, no NaN


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_fp8_linear_equals_its_oracle_and_a_brute_force_reference(act):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g))
    x = torch.randn(10, 64, generator=g) * torch.linspace(0.1, 20, 64)
    m = Int8Linear.from_linear(lin, act, x.abs().max().item() / 448 if act == "tensor" else None, fmt="fp8")
    assert m.weight.dtype == torch.float8_e4m3fn
    oracle = copy.deepcopy(m)
    oracle.fake = True
    # the reference from first principles: scales, brute-force nearest codes, float64 matmul
    ws = lin.weight.abs().amax(1).double() / 448
    wq = _nearest_brute((lin.weight.double() / ws[:, None]).flatten().float()).view(48, 64).double() * ws[:, None]
    xs = (x.abs().amax(1, keepdim=True).double() / 448) if act == "token" else torch.tensor(x.abs().max().item() / 448).double()
    xq = _nearest_brute((x.double() / xs).flatten().float()).view(10, 64).double() * xs
    ref = (xq @ wq.t() + lin.bias.double()).float()
    y, yo = m(x), oracle(x)
    torch.testing.assert_close(y, yo, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(yo, ref, rtol=1e-4, atol=1e-3)


def test_fp8_weights_only_equal_a_brute_force_reference():
    """act="none" (the study's "FP8 weights only" rows): the inputs stay float."""
    from outlierq.quant import W8A8

    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(10, 64, generator=g) * 5
    m = Int8Linear.from_linear(lin, "none", fmt="fp8")
    ws = lin.weight.abs().amax(1).double() / 448
    wq = _nearest_brute((lin.weight.double() / ws[:, None]).flatten().float()).view(48, 64).double() * ws[:, None]
    torch.testing.assert_close(m(x), (x.double() @ wq.t() + lin.bias.double()).float(), rtol=1e-5, atol=1e-5)
    assert W8A8(act="none", format="fp8").act_for("model.layers.0.mlp.down_proj") == "none"


def test_gptq_in_fp8_lowers_the_output_error():
    from outlierq.quant import quantize_weight

    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs
    h = (x.double().t() @ x.double())
    q0, s = quantize_weight(w, fmt=FP8)
    q1, s1 = quantize_weight(w, hessian=h, fmt=FP8)
    assert q1.dtype == torch.float8_e4m3fn and torch.equal(s, s1)
    err = lambda q: ((x @ (w - q.float() * s[:, None]).t()).pow(2).sum()).item()  # noqa: E731
    assert err(q1) < 0.9 * err(q0)


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
@pytest.mark.parametrize("scheme", ["FP8_DYNAMIC", "FP8"])
def test_fp8_exports_reload_bit_identically_and_load_in_transformers(tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    model = tiny_model("LlamaForCausalLM", outliers=True)
    x = token_batch(2, 24)
    compress(model, None, "smoothquant:alpha=0.5", scheme, calibration=token_batch(4, 16, seed=3), progress=False)
    assert all(m.fmt is FP8 for m in model.modules() if isinstance(m, Int8Linear))
    y = model(input_ids=x).logits
    export(model, tmp_path / "c", char_tokenizer())
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "float-quantized"
    assert {g["weights"]["type"] for g in qc["config_groups"].values()} == {"float"}
    # exported from Python, the record has the scheme as the CLI's does (quantize_ records it)
    assert json.loads((tmp_path / "c" / "outlierq.json").read_text())["scheme"]["format"] == "fp8"
    again, _ = load(tmp_path / "c")
    assert torch.equal(again(input_ids=x).logits, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    torch.testing.assert_close(hf(input_ids=x).logits, y, rtol=1e-3, atol=1e-3)


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
@pytest.mark.parametrize("scheme", ["W8A8", "W8A8_STATIC", "FP8_DYNAMIC", "FP8"])
def test_presets_export_what_compressed_tensors_means_by_their_names(tmp_path, scheme):
    """The exported weights and input-activation args equal compressed-tensors' own preset of that
    name (W8A8_STATIC, outlierq's name: W8A8 with static per-tensor activations); per-tensor weight
    scales are stored as one value."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES

    model = tiny_model("LlamaForCausalLM")
    compress(model, None, "none", scheme, calibration=token_batch(4, 16, seed=3), progress=False)
    export(model, tmp_path / "c", char_tokenizer())
    (group,) = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["config_groups"].values()
    want = copy.deepcopy(PRESET_SCHEMES["W8A8" if scheme == "W8A8_STATIC" else scheme])
    if scheme == "W8A8_STATIC":
        want["input_activations"] = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                                                     dynamic=False)
    for part in ("weights", "input_activations"):
        for k in ("num_bits", "type", "symmetric", "strategy", "dynamic"):
            assert group[part][k] == getattr(want[part], k), (scheme, part, k)  # (str enums equal their values)
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "c" / "model.safetensors"))
    shape = (1,) if want["weights"].strategy == "tensor" else (64, 1)
    assert sd["model.layers.0.self_attn.q_proj.weight_scale"].shape == shape


def test_fp8_per_tensor_weights_equal_a_brute_force_reference():
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * torch.linspace(0.1, 3, 48)[:, None])
    m = Int8Linear.from_linear(lin, "none", fmt="fp8", weight_strategy="tensor")
    ws = lin.weight.abs().max().double() / 448
    wq = _nearest_brute((lin.weight.double() / ws).flatten().float()).view(48, 64).double() * ws
    torch.testing.assert_close(m.dequantized_weight().double(), wq, rtol=1e-6, atol=1e-9)


def test_smoothquant_searches_for_the_schemes_format():
    from outlierq.pipeline import resolve_recipe

    (sq,) = resolve_recipe("smoothquant:alpha=search", "tensor", fmt="fp8")
    assert (sq.act, sq.format) == ("tensor", "fp8")
    (sq,) = resolve_recipe("smoothquant:alpha=search,format=int8", "token", fmt="fp8")
    assert sq.format == "int8"  # (what the recipe says wins)


def test_scheme_presets_on_the_cli(tmp_path, capsys):
    from outlierq.cli import main

    src = tiny_model_dir(tmp_path / "m", "LlamaForCausalLM")
    quick = ["--samples", "2", "--seqlen", "16", "--batch-size", "2", "--recipe", "none"]
    assert main(["quantize", "--model", str(src), "--scheme", "FP8", "--out", str(tmp_path / "q")] + quick) == 0
    rec = json.loads((tmp_path / "q" / "outlierq.json").read_text())
    assert rec["scheme"]["format"] == "fp8" and rec["scheme"]["act"] == "tensor"
    capsys.readouterr()
    for bad, msg in ((["--scheme", "FP8", "--tune", "range_tune"], "without act_clip, range_tune"),
                     (["--scheme", "W8A16"], "no compressed-tensors export")):
        assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "r")] + bad + quick) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "r").exists()


def test_int8_is_unchanged_by_the_format_parameter():
    """The int8 path through the new format code gives the same codes as before it (INT8.codes
    is round-half-even and clamp, the native/torch per-token kernels' rule)."""
    from outlierq.quant import quantize_weight

    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(3))
    q, s = quantize_weight(w)
    q2, s2 = quantize_weight(w, clip=torch.ones(16), fmt=INT8)
    assert torch.equal(q, q2) and torch.equal(s, s2)
