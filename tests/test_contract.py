"""The contract for every causal-LM class transformers ships (tests/zoo.py builds a tiny random
model of each): SmoothQuant on the proven groups keeps the logits (1e-5 relative), per-token W8A8
leaves no decoder Linear float but the listed keeps, and the export reloads in outlierq
(bit-identical) and in transformers. results/families_tiny.md is the same check, as a table."""
import json
import warnings
from pathlib import Path

import pytest

from zoo import Unbuildable, contract, decoder_only, model_types

# Classes that fail the contract in the committed results/families_tiny.json, with the failure
# recorded there (the table and the README say it too): expected to fail until fixed, and flagged
# by pytest (XPASS) when one starts to pass. Every other class must pass.
_RESULTS = Path(__file__).resolve().parents[1] / "results" / "families_tiny.json"
_ROWS = {r["model_type"]: r for r in json.loads(_RESULTS.read_text()).get("rows", []) if "model_type" in r} \
    if _RESULTS.exists() else {}


def _failure(r: dict) -> str | None:
    """What the recorded row says fails (scripts/families.py's table), or None."""
    if "error" in r:
        return r["error"]
    if "skipped" in r:
        return None
    if not isinstance(r["transformers_rel"], float):
        return f"transformers: {r['transformers_rel']}"
    if r["smoothquant_rel"] > 1e-5 or r["float_linears_left"] or not r["reload_bit_identical"]:
        return "contract"
    return None


KNOWN = {mt: f for mt, r in _ROWS.items() if (f := _failure(r))}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("model_type", model_types())
def test_contract(model_type, tmp_path, request):
    why = decoder_only(model_type)
    if why:
        pytest.skip(why)
    if model_type not in _ROWS:
        pytest.skip("not in results/families_tiny.json yet: run python scripts/families.py")
    if _ROWS[model_type].get("heavy"):  # too slow or too big for a test machine: not run again
        pytest.skip(f"results/families_tiny.json: {KNOWN[model_type]}")
    if model_type in KNOWN:  # still run: a pass shows as XPASS
        request.applymarker(pytest.mark.xfail(reason=f"fails in results/families_tiny.json: {KNOWN[model_type]}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            row = contract(model_type, tmp_path)
        except Unbuildable as e:
            pytest.skip(f"tests/zoo.py cannot make a tiny model of it yet: {e}")
    assert row["smoothquant_rel"] <= 1e-5, row["groups"] + row["pairs"]
    assert not row["float_linears_left"]
    assert row["int8_linears"] > 0
    assert row["reload_bit_identical"]
    assert isinstance(row["transformers_rel"], float), row["transformers_rel"]
