import contextlib
import copy
import json

import pytest
import torch

from outlierq import calibrate
from outlierq.errors import OutlierqError
from outlierq.checkpoint import export, load
from outlierq.models.arch import get_arch
from outlierq.mitigate.recipe import mitigate
from outlierq.mitigate.smoothquant import SmoothQuant
from outlierq.mitigate.split import ChannelSplit
from outlierq.quant import W8A8, quantize_
from conftest import FAMILIES, tiny_model, token_batch


def _quantized(family, act, split=False):
    model = tiny_model(family, outliers=True)
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    recipe = [SmoothQuant(0.5)] + ([ChannelSplit(0.1, 2.0)] if split else [])
    with pytest.warns() if get_arch(model).notes else contextlib.nullcontext():
        stats = mitigate(model, stats, recipe)
    return quantize_(model, W8A8(act=act), stats, progress=False), x, recipe, stats


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_roundtrip_every_family(family, act, tmp_path):
    q, x, recipe, stats = _quantized(family, act, split=True)
    out = export(q, tmp_path / "ckpt", recipe=recipe, stats=stats)
    ref = q(input_ids=x).logits
    back, _ = load(out)
    assert torch.equal(back(input_ids=x).logits, ref)  # same int8 codes and scales: bit-exact

    from compressed_tensors.quantization import QuantizationConfig
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)  # the package's own schema accepts it
    for g in parsed.config_groups.values():
        assert g.weights.strategy == "channel" and g.input_activations.dynamic == (act == "token")
    assert "lm_head" in parsed.ignore and parsed.quantization_status == "compressed"
    info = json.loads((out / "outlierq.json").read_text())
    assert info["recipe"] and info["calibration"]["samples"] == x.shape[0]
    assert info["chosen"]["smoothquant_alpha"] and set(info["chosen"]["smoothquant_alpha"].values()) == {0.5}
    assert info["outliers"]["recurring"]["residual"] is not None and info["stats_summary"]["residual"]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "GPT2LMHeadModel"])
def test_transformers_loads_every_family(family, tmp_path):
    """transformers' compressed-tensors path re-quantizes activations itself (dynamic:
    absmax/127.5) and runs MoE experts dequantized, so logits agree to int8 noise: the same
    order as the int8 model's own distance from float."""
    from transformers import AutoModelForCausalLM

    q, x, recipe, stats = _quantized(family, "token")
    out = export(q, tmp_path / "ckpt", recipe=recipe, stats=stats)
    ref = q(input_ids=x).logits
    got = AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits
    assert ((got - ref).norm() / ref.norm()).item() < 0.2


def test_gpt2_conv1d_float_export_loads_in_transformers(tmp_path):
    """GPT-2 keeps Conv1D weights [in, out]: the fp export writes that layout back. (Its W8A8
    export reloads in outlierq.load only: compressed-tensors quantizes nn.Linear, not Conv1D.)"""
    from transformers import AutoModelForCausalLM

    model = tiny_model("GPT2LMHeadModel", outliers=True)
    x = token_batch(2, 16)
    stats = mitigate(model, calibrate(model, x, progress=False), [SmoothQuant(0.5)])
    out = export(model, tmp_path / "fp", fmt="fp", stats=stats)
    hf = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(hf(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize("act, tol", [("tensor", 0.02), ("token", 0.15)])
def test_transformers_loads_it(act, tol, tmp_path):
    from transformers import AutoModelForCausalLM

    q, x, recipe, stats = _quantized("LlamaForCausalLM", act)
    out = export(q, tmp_path / "ckpt", recipe=recipe, stats=stats)
    hf = AutoModelForCausalLM.from_pretrained(out)
    ref = q(input_ids=x).logits
    got = hf(input_ids=x).logits
    # transformers' compressed-tensors path re-quantizes activations itself (dynamic: absmax/127.5,
    # range -128..127) so logits agree to int8 noise; weights decode exactly.
    assert ((got - ref).norm() / ref.norm()).item() < tol
    torch.testing.assert_close(hf.model.layers[0].mlp.down_proj.weight,
                               q.model.layers[0].mlp.down_proj.dequantized_weight())


def test_fp_format_and_sharding(tmp_path):
    model = tiny_model("Gemma3ForCausalLM", outliers=True)
    x = token_batch(2, 16)
    stats = mitigate(model, calibrate(model, x, progress=False), [SmoothQuant(0.5)])
    out = export(model, tmp_path / "fp", fmt="fp", stats=stats, max_shard_bytes=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "model.safetensors.index.json").exists()
    back, _ = load(out)
    torch.testing.assert_close(back(input_ids=x).logits, model(input_ids=x).logits)


def test_tamper_overwrite_and_interrupt(tmp_path, monkeypatch):
    q, x, recipe, stats = _quantized("LlamaForCausalLM", "token")
    out = export(q, tmp_path / "ckpt")
    with pytest.raises(OutlierqError, match="not empty"):
        export(q, out)
    st = out / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[:-10])
    with pytest.raises(OutlierqError, match="model.safetensors fails its checksum"):
        load(out)
    st.write_bytes(data)
    load(out)

    import sys
    ex = sys.modules["outlierq.checkpoint"]  # the package attribute `export` is the function

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(ex, "_write_shards", boom)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(KeyboardInterrupt):
        export(q, out, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        export(q, tmp_path / "new")
    assert sorted(p.name for p in out.iterdir()) == before  # old target untouched
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


def test_mixed_static_and_dynamic_groups(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("LlamaForCausalLM", outliers=True)
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    q = quantize_(model, W8A8(act="tensor", token_for=("*down_proj",)), stats, progress=False)
    assert q.model.layers[1].mlp.down_proj.act == "token"
    assert q.model.layers[1].mlp.up_proj.act == "tensor"
    out = export(q, tmp_path / "mixed")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    back, _ = load(out)
    assert back.model.layers[1].mlp.down_proj.act == "token"
    assert torch.equal(back(input_ids=x).logits, q(input_ids=x).logits)
    hf = AutoModelForCausalLM.from_pretrained(out)
    ref = q(input_ids=x).logits
    assert ((hf(input_ids=x).logits - ref).norm() / ref.norm()).item() < 0.15


def test_state_bytes_counts_tied_tensors_once():
    from outlierq.checkpoint import state_bytes

    m = tiny_model("LlamaForCausalLM")
    m.lm_head.weight = m.model.embed_tokens.weight  # tie
    unique = {p.data_ptr(): p for p in m.parameters()}
    assert state_bytes(m) == sum(p.numel() * 4 for p in unique.values()) + sum(
        b.numel() * b.element_size() for n, b in m.named_buffers() if n in m.state_dict())


def test_layer_scoped_groups_reload(tmp_path):
    """token_for=("model.layers.0.*",) once exported two groups with identical targets, which
    load then rejected: quantize_ and export now share one matcher and groups are disjoint."""
    model = tiny_model("LlamaForCausalLM", outliers=True)
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    q = quantize_(model, W8A8(act="tensor", token_for=("model.layers.0.*",)), stats, progress=False)
    out = export(q, tmp_path / "ckpt")
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    targets = [set(g["targets"]) for g in groups.values()]
    assert len(targets) == 2 and not targets[0] & targets[1]
    back, _ = load(out)
    assert back.model.layers[0].mlp.up_proj.act == "token" and back.model.layers[1].mlp.up_proj.act == "tensor"
    assert torch.equal(back(input_ids=x).logits, q(input_ids=x).logits)


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_int8_head_unties_exports_and_reloads(act, tmp_path):
    """skip=() quantizes the output head too: a tied head gets its own int8 codes (the embeddings
    stay float and unchanged), the logits match the fake-quant oracle, and the export reloads
    bit-identically in outlierq.load and to int8 noise in transformers."""
    from transformers import AutoModelForCausalLM

    from outlierq.quant import Int8Linear

    model = tiny_model("LlamaForCausalLM", outliers=True, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    emb = model.model.embed_tokens.weight.detach().clone()
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    fake = quantize_(copy.deepcopy(model), W8A8(act=act, skip=(), fake=True), stats, progress=False)
    q = quantize_(model, W8A8(act=act, skip=()), stats, progress=False)
    assert isinstance(q.lm_head, Int8Linear) and not q.config.tie_word_embeddings
    assert torch.equal(q.model.embed_tokens.weight, emb)
    ref = q(input_ids=x).logits
    torch.testing.assert_close(ref, fake(input_ids=x).logits, rtol=1e-4, atol=1e-4)
    out = export(q, tmp_path / "ckpt", stats=stats)
    assert "lm_head" not in json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    back, _ = load(out)
    assert isinstance(back.lm_head, Int8Linear) and torch.equal(back(input_ids=x).logits, ref)
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(hf.model.embed_tokens.weight, emb)
    got = hf(input_ids=x).logits
    assert ((got - ref).norm() / ref.norm()).item() < 0.2
