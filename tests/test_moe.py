"""MoE done right: every expert gets statistics, one smoothing scale covers router and experts,
every expert is quantized and exported under its original checkpoint name."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from outlierq import calibrate
from outlierq.mitigate.recipe import mitigate
from outlierq.mitigate.smoothquant import SmoothQuant
from outlierq.models.arch import decoder_layers, get_arch, resolve
from outlierq.quant import Int8Experts, W8A8, quantize_
from conftest import MOE, tiny_model, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")


@pytest.mark.parametrize("family", MOE)
def test_every_expert_sees_every_token(family):
    model = tiny_model(family, outliers=True)
    spec = get_arch(model)
    batch = token_batch(4, 16)
    seen = []
    ex0 = resolve(decoder_layers(model)[0], spec.experts.path)
    h = ex0.register_forward_hook(lambda m, a, o: seen.append((a[0].clone(), a[1].clone())))
    stats = calibrate(model, batch, batch_size=2, progress=False)
    h.remove()
    x = torch.cat([s[0] for s in seen])
    routed = torch.cat([s[1] for s in seen])
    name = f"{spec.layers}.0.{spec.experts.path}"
    assert torch.equal(stats.inputs[f"{name}.gate_up"].absmax, x.abs().amax(0))
    for e in range(ex0.gate_up_proj.shape[0]):  # brute force: all 64 tokens through expert e
        gate, up = F.linear(x, ex0.gate_up_proj[e]).chunk(2, dim=-1)
        want = (ex0.act_fn(gate) * up).abs().amax(0)
        torch.testing.assert_close(stats.inputs[f"{name}.{e}.down"].absmax, want)
        assert stats.inputs[f"{name}.{e}.down"].tokens == 64
    counts = stats.meta["expert_tokens"][name]
    assert counts == torch.bincount(routed.reshape(-1), minlength=len(counts)).tolist()
    assert sum(counts) == 64 * model.config.num_experts_per_tok


@pytest.mark.parametrize("family", MOE)
def test_one_scale_covers_router_and_experts(family):
    """The router reads the smoothed norm too: its logits (so the routing) must not change."""
    model = tiny_model(family, outliers=True)
    spec = get_arch(model)
    x = token_batch(2, 24)
    stats = calibrate(model, x, progress=False)
    logits = {}

    def grab(tag, m):
        def hook(mod, args, out):
            logits[tag] = out[0]
        return resolve(decoder_layers(m)[1], spec.groups[-1].router).register_forward_hook(hook)
    h = grab("before", model)
    model(input_ids=x)
    h.remove()
    m = copy.deepcopy(model)
    mitigate(m, stats, [SmoothQuant(0.5)])
    h = grab("after", m)
    m(input_ids=x)
    h.remove()
    torch.testing.assert_close(logits["after"], logits["before"], rtol=1e-4, atol=1e-4)
    assert not torch.equal(resolve(decoder_layers(m)[1], spec.groups[-1].router).weight,
                           resolve(decoder_layers(model)[1], spec.groups[-1].router).weight)


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("act", ["token", "tensor"])
def test_experts_quantized_match_oracle_and_beat_plain(family, act):
    model = tiny_model(family, outliers=True)
    calib, test = token_batch(8, 32, seed=1), token_batch(4, 32, seed=2)
    stats = calibrate(model, calib, keep_rows=128, progress=False)
    ref = model(input_ids=test).logits

    def run(recipe, fake=False):
        m = copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = mitigate(m, stats, recipe)
        quantize_(m, W8A8(act=act, fake=fake), s, progress=False)
        return m, m(input_ids=test).logits

    q, out = run([])
    assert all(isinstance(resolve(layer, get_arch(q).experts.path), Int8Experts)
               for layer in decoder_layers(q))
    plain = (out - ref).pow(2).mean()
    # the search scores "no smoothing" too, so it never loses to plain W8A8 on its own rows
    assert (run([SmoothQuant(None, act=act)])[1] - ref).pow(2).mean() < plain


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_int8_experts_match_fake_quant_oracle(act):
    """Same routing, same inputs: the int8 GEMM path equals dequantize-and-matmul."""
    ex = resolve(decoder_layers(tiny_model("MixtralForCausalLM", outliers=True))[0], "mlp.experts")
    torch.manual_seed(0)
    x = torch.randn(40, ex.gate_up_proj.shape[2])
    idx = torch.randint(0, ex.gate_up_proj.shape[0], (40, 2))
    w = torch.rand(40, 2)
    scales = (torch.full((4,), x.abs().max().item() / 127), torch.full((4,), 0.05))
    real = Int8Experts.from_experts(ex, (act, act), scales)(x, idx, w)
    fake = Int8Experts.from_experts(ex, (act, act), scales, fake=True)(x, idx, w)
    torch.testing.assert_close(real, fake, rtol=1e-4, atol=1e-4)
    if act == "token":  # (the static scales above are arbitrary, so only per-token vs float)
        ref = ex(x, idx, w)
        assert ((real - ref).norm() / ref.norm()).item() < 0.1


@pytest.mark.parametrize("fmt", ["pack-quantized", "int-quantized"])
def test_both_expert_layouts_reload_bit_identically(fmt, tmp_path):
    import json

    from outlierq import export, load

    model = tiny_model("Qwen3MoeForCausalLM", outliers=True)
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    q = quantize_(model, W8A8(act="tensor"), stats, progress=False)
    out = export(q, tmp_path / "ckpt", expert_format=fmt)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    name = "model.layers.0.mlp.experts.2.down_proj"
    assert (f"{name}.weight_packed" in keys) == (fmt == "pack-quantized")
    assert (f"{name}.weight" in keys) == (fmt == "int-quantized") and f"{name}.input_scale" in keys
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert fmt in {g["format"] for g in groups.values()}
    assert torch.equal(load(out)[0](input_ids=x).logits, q(input_ids=x).logits)
