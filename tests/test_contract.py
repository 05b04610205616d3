"""The contract for every causal-LM class transformers ships (tests/zoo.py builds a tiny random
model of each): SmoothQuant on the proven groups keeps the logits (1e-5 relative), per-token W8A8
leaves no decoder Linear float but the listed keeps, and the export reloads in outlierq
(bit-identical) and in transformers. results/families_tiny.md is the same check, as a table."""
import warnings

import pytest

from zoo import contract, decoder_only, model_types

# Classes whose tiny model this suite cannot build or run, with the reason; every one is a row of
# results/families_tiny.md. A class leaves this list when its test passes.
KNOWN = {}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", model_types())
def test_contract(model_type, tmp_path):
    why = decoder_only(model_type)
    if why:
        pytest.skip(why)
    if model_type in KNOWN:
        pytest.xfail(KNOWN[model_type])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = contract(model_type, tmp_path)
    assert row["smoothquant_rel"] <= 1e-5, row["groups"] + row["pairs"]
    assert not row["float_linears_left"]
    assert row["int8_linears"] > 0
    assert row["reload_bit_identical"]
    assert isinstance(row["transformers_rel"], float), row["transformers_rel"]
