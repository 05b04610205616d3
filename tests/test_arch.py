import pytest
from torch import nn

from outlierq.errors import OutlierqError
from outlierq.models.arch import ARCHS, decoder_layers, get_arch, resolve
from conftest import FAMILIES, tiny_model


def test_every_family_has_a_test_row():
    assert set(ARCHS) == set(FAMILIES)


def test_description_resolves(family):
    model = tiny_model(family)
    spec = get_arch(model)
    layers = decoder_layers(model, spec)
    assert len(layers) == 2
    for layer in layers:
        for g in spec.groups:
            assert isinstance(resolve(layer, g.norm), nn.Module)
            widths = {resolve(layer, n).in_features for n in g.linears}
            assert widths == {model.config.hidden_size}
        for p in spec.pairs:
            prod, cons = resolve(layer, p.producer), resolve(layer, p.consumer)
            assert isinstance(prod, nn.Linear) and isinstance(cons, nn.Linear)
        assert resolve(layer, spec.mlp.down).in_features == getattr(model.config, spec.mlp.size_attr)


def test_unknown_architecture_lists_supported():
    model = nn.Module()
    model.config = type("C", (), {"architectures": ["BertForMaskedLM"]})()
    with pytest.raises(OutlierqError, match="supported: .*LlamaForCausalLM"):
        get_arch(model)
