"""The tuning-step registry (quant/tuning.py TUNING): `--tune` names the same scheme as Python, every
step says what it needs before any work, and what a step chose lands in one place, the same in
CompressResult.record and in the export's outlierq.json, from the CLI and from Python."""
import copy
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from outlierq import Calibration, compress, load_model
from outlierq.cli import main
from outlierq.errors import OutlierqError
from outlierq.quant import TUNING, W8A8, parse_tune, quantize_, steps_of
from conftest import tiny_model_dir

QUICK = ["--samples", "4", "--seqlen", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", "LlamaForCausalLM")


def test_each_step_alone_is_the_only_step_it_turns_on():
    for name, step in TUNING.items():
        extra = {"range_tune": 2} if name == "quiet_tokens" else {}  # (it builds on range_tune)
        scheme = W8A8(act="tensor", **{**parse_tune(name), **extra})
        want = {name, *(["range_tune"] if extra else [])}
        assert {s.name for s in steps_of(scheme)} == want, name
    assert not steps_of(W8A8(act="tensor", **parse_tune("none")))
    assert {s.name for s in steps_of(W8A8(act="tensor", **parse_tune("auto")))} == {"gptq", "act_clip"}
    # auto where GPTQ cannot run: layer by layer, or a statistics file
    assert not parse_tune("auto", layer_by_layer=True)["gptq"] and not parse_tune("auto", saved_stats=True)["gptq"]
    assert parse_tune("range_tune:windows=3,each=down_proj|o_proj") == {
        **parse_tune("none"), "range_tune": 3, "range_tune_each": ("down_proj", "o_proj")}


@pytest.mark.parametrize("scheme, have, msg", [
    (W8A8(weight_clip=True), dict(keep_rows=0), "kept calibration rows"),
    (W8A8(gptq=True), dict(hessians=False), "calibration Hessians"),
    (W8A8(act="tensor", range_tune=1), dict(windows=False), "calibration token windows"),
])
def test_a_step_the_run_cannot_feed_is_one_line_before_any_linear_changes(src, scheme, have, msg):
    from outlierq import calibrate

    model, _ = load_model(str(src))
    wins = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, wins, keep_rows=have.get("keep_rows", 8), hessians=have.get("hessians", True),
                      progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(OutlierqError, match=msg):
        quantize_(model, scheme, stats, progress=False, tune_windows=wins if have.get("windows", True) else None)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_cli_and_python_give_the_same_checkpoint_and_the_same_record(src, tmp_path):
    """`--tune gptq+weight_clip+range_tune:windows=2` from the CLI and W8A8(...) through compress +
    export from Python: bit-identical weights and scales, and one record in both places."""
    from outlierq import export

    out = tmp_path / "cli"
    assert main(["quantize", "--model", str(src), "--recipe", "none", "--scheme", "W8A8_STATIC",
                 "--tune", "gptq+weight_clip+range_tune:windows=2", "--out", str(out)] + QUICK) == 0
    model, tok = load_model(str(src))
    scheme = W8A8(act="tensor", gptq=True, weight_clip=True, act_clip=False, range_tune=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = compress(model, tok, "none", scheme, Calibration(samples=4, seqlen=32, batch_size=2), progress=False)
        export(res.model, tmp_path / "py", tok, recipe=res.recipe, stats=res.stats)
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "py" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cli_rec = json.loads((out / "outlierq.json").read_text())
    py_rec = json.loads((tmp_path / "py" / "outlierq.json").read_text())
    assert cli_rec["scheme"] == py_rec["scheme"] == json.loads(json.dumps(res.record["scheme"]))
    assert cli_rec["range_tune"] == py_rec["range_tune"] == res.record["range_tune"] == model.outlierq_tuning["range_tune"]
    assert set(res.record["range_tune"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_layer_by_layer_records_add_up_to_the_in_memory_one(src, tmp_path):
    """act_clip runs layer by layer: each layer's quantize_ adds its ratios to the one record."""
    from outlierq import calibrate
    from outlierq.mitigate.recipe import mitigate, parse_recipe
    from outlierq.pipeline import refresh

    model, _ = load_model(str(src))
    wins = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    stats = mitigate(model, calibrate(model, wins, progress=False), parse_recipe("rotate_down:block=32"))
    stats = refresh(stats, calibrate(model, wins, progress=False, names=stats.meta["recalibrate"]))
    scheme = W8A8(act="tensor", act_clip=True)
    whole = quantize_(copy.deepcopy(model), scheme, stats, progress=False).outlierq_tuning
    layered = copy.deepcopy(model)
    for i in range(2):
        quantize_(layered, scheme, stats, progress=False, only=[i])
    assert layered.outlierq_tuning == whole and len(whole["act_clip"]) == 2


def test_keep_float_leaves_float_the_linear_a_brute_force_finds_costs_most():
    """Against a brute force that quantizes the model once per Linear with that Linear skipped and
    scores the full KL from the float model at the same positions: keep_float picks the same
    Linear, and the model it leaves computes the same logits as that skip-one model."""
    from conftest import tiny_model, token_batch
    from outlierq import calibrate
    from outlierq.evaluate import log_probs_
    from outlierq.quant import Int8Linear
    from outlierq.quant.tuning import KEEP_FLOAT_STRIDE

    model = tiny_model("LlamaForCausalLM", outliers=True)
    wins = token_batch(4, 32, seed=3)
    stats = calibrate(model, wins, progress=False)
    m = copy.deepcopy(model)
    quantize_(m, W8A8(keep_float=1, keep_float_windows=2), stats, progress=False, tune_windows=wins)
    rec = m.outlierq_tuning["keep_float"]
    pos = torch.arange(0, 32, KEEP_FLOAT_STRIDE)
    with torch.no_grad():
        ref = [log_probs_(model(input_ids=w[None]).logits[0, pos]) for w in wins[:2]]

        def kl(q):
            return sum(float((r.exp() * (r - log_probs_(q(input_ids=w[None]).logits[0, pos]))).sum())
                       for w, r in zip(wins[:2], ref)) / (2 * len(pos))

        names = [n for n, x in m.named_modules() if isinstance(x, Int8Linear)] + rec["linears"]
        brute = {}
        for n in names:
            q = copy.deepcopy(model)
            quantize_(q, W8A8(skip=("lm_head", n)), stats, progress=False)
            brute[n] = (kl(q), q)
        best = min(brute, key=lambda n: brute[n][0])
        assert rec["linears"] == [best]
        assert type(m.get_submodule(best)) is torch.nn.Linear
        torch.testing.assert_close(rec["kl"][1], brute[best][0], rtol=1e-4, atol=1e-7)
        assert rec["kl"][1] < rec["kl"][0]
        x = token_batch(2, 24)
        assert torch.equal(m(input_ids=x).logits, brute[best][1](input_ids=x).logits)


def test_keep_float_folds_a_block_rotation_back_into_the_float_weight(tmp_path):
    """A kept rotated down_proj becomes a plain Linear computing the same function (no transform
    to export for it), and the export lists it in ignore and reloads with the same logits."""
    from conftest import tiny_model, token_batch
    from outlierq import export
    from outlierq.mitigate.rotate_down import rotated_linears

    model = tiny_model("LlamaForCausalLM", outliers=True)
    wins = token_batch(8, 24, seed=3)
    plain, kept = copy.deepcopy(model), copy.deepcopy(model)
    recipe = "split:ratio=4,multiple=32+smoothquant:alpha=0.5+rotate_down"
    compress(plain, None, recipe, None, wins, progress=False)  # the mitigated float model
    res = compress(kept, None, recipe, W8A8(keep_float=1, keep_float_kinds=("down_proj",), keep_float_windows=2),
                   wins, progress=False)
    name = res.record["keep_float"]["linears"][0]
    lin = kept.get_submodule(name)
    assert name.endswith("down_proj") and type(lin) is torch.nn.Linear and name not in rotated_linears(kept)
    x = torch.randn(2, 5, lin.in_features)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), plain.get_submodule(name)(x), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export(kept, tmp_path / "ckpt", fmt="compressed-tensors")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert name in cfg["ignore"]
    targets = [t for g in cfg["transform_config"]["config_groups"].values() for a in g["apply"] for t in a["targets"]]
    assert not any(re.fullmatch(t[3:], name) for t in targets)
    back, _ = load_model(str(tmp_path / "ckpt"))
    y = token_batch(2, 24)
    with torch.no_grad():
        assert torch.equal(back(input_ids=y).logits, kept(input_ids=y).logits)
    assert json.loads((tmp_path / "ckpt" / "outlierq.json").read_text())["keep_float"]["linears"] == [name]


def test_keep_float_on_the_cli():
    from conftest import tiny_model

    assert parse_tune("keep_float:n=3,kinds=down_proj|o_proj,windows=4") == {
        **parse_tune("none"), "keep_float": 3, "keep_float_kinds": ("down_proj", "o_proj"), "keep_float_windows": 4}
    with pytest.raises(OutlierqError, match="keep_float kinds: 'mlp'"):
        quantize_(tiny_model("LlamaForCausalLM"), W8A8(keep_float=1, keep_float_kinds=("mlp",)), None, progress=False,
                  tune_windows=torch.randint(3, 100, (2, 16)))
