import pytest
import torch
from torch import nn

from outlierq.errors import OutlierqError
from outlierq.models.arch import ARCHS, MULTIMODAL, decoder_layers, get_arch, resolve, text_config
from conftest import FAMILIES, tiny_model


def test_every_family_has_a_test_row():
    assert set(ARCHS) | set(MULTIMODAL) == set(FAMILIES)


def test_description_resolves(family):
    model = tiny_model(family)
    spec = get_arch(model)
    cfg = text_config(model)
    layers = decoder_layers(model, spec)
    assert len(layers) == 2
    assert isinstance(resolve(model, spec.embed), nn.Embedding)
    assert isinstance(resolve(model, spec.final_norm), nn.Module)
    for layer in layers:
        for g in spec.groups:
            assert isinstance(resolve(layer, g.norm), nn.Module)
            widths = {resolve(layer, n).in_features for n in g.linears}
            assert widths <= {cfg.hidden_size}
            if g.router:
                assert resolve(layer, g.router).weight.shape[1] == cfg.hidden_size
        for p in spec.pairs:
            prod, cons = resolve(layer, p.producer), resolve(layer, p.consumer)
            assert isinstance(prod, nn.Linear) and isinstance(cons, nn.Linear)
            rows = p.rows(cfg) if p.rows else None
            if rows is not None:  # the row map covers every consumer channel, inside the producer
                assert rows.numel() == cons.in_features and int(rows.max()) < prod.out_features
        for w in spec.writers:
            assert resolve(layer, w).out_features == cfg.hidden_size
        if spec.mlp:
            assert resolve(layer, spec.mlp.down).in_features == getattr(cfg, spec.mlp.size_attr)
        if spec.experts:
            ex = resolve(layer, spec.experts.path)
            assert ex.gate_up_proj.dim() == 3 and ex.down_proj.shape[1] == cfg.hidden_size


def test_a_model_without_decoder_layers_gets_one_line():
    model = nn.Module()
    model.config = type("C", (), {"architectures": ["BertForMaskedLM"]})()
    with pytest.raises(OutlierqError, match="found no list of decoder layers"):
        get_arch(model)


@pytest.mark.parametrize("over, note", [
    (dict(activation_function="gelu"), "not positively homogeneous"),
    (dict(layer_norm_elementwise_affine=False), "without weights"),
    (dict(do_layer_norm_before=False), "post-LayerNorm"),
])
def test_opt_layouts_say_what_is_skipped(over, note):
    spec = get_arch(tiny_model("OPTForCausalLM", **over))
    assert any(note in n for n in spec.notes)
    if "activation_function" in over:  # GeLU: norm smoothing only, no fc1->fc2 pair, no split
        assert spec.groups and spec.mlp is None and [p.kind for p in spec.pairs] == ["attn_vo"]
    else:
        assert spec.groups == ()


def test_every_entry_point_takes_a_family_without_a_description(tmp_path):
    """BLOOM was refused by every entry point; now its structure is inferred and proven, and the
    whole chain runs: calibrate, mitigate, quantize, export, load (bit-identical)."""
    from transformers import BloomConfig, BloomForCausalLM

    from outlierq import compress, export, load
    from outlierq.quant import W8A8

    torch.manual_seed(0)
    cfg = BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=64)
    model = BloomForCausalLM(cfg).eval().requires_grad_(False)
    spec = get_arch(model)
    assert spec.inferred and spec.groups  # input_layernorm -> query_key_value, post-attention -> dense_h_to_4h
    x = torch.randint(0, 64, (2, 16))
    q = compress(model, calibration=x, scheme=W8A8(act="tensor"), progress=False)
    ref = q.model(input_ids=x).logits
    ckpt = export(q.model, tmp_path / "x", recipe=q.recipe, stats=q.stats)
    assert torch.equal(load(ckpt)[0](input_ids=x).logits, ref)
