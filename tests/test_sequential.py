"""The layer-by-layer pipeline equals the in-memory one, bit for bit: statistics, weight codes,
scales and config, on every family, for both activation modes and a searched alpha."""
import json

import pytest
import torch
from safetensors.torch import load_file

from outlierq import load_model
from outlierq.checkpoint import export
from outlierq.pipeline import compress
from outlierq.quant import W8A8
from outlierq import sequential
from conftest import FAMILIES, tiny_model_dir, token_batch

RECIPE = "split:ratio=4+smoothquant:alpha=search,act={act}"


def _tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_stats_equal(a, b):
    assert a.inputs.keys() == b.inputs.keys() and a.residual.keys() == b.residual.keys()
    for ta, tb in [(a.inputs, b.inputs), (a.residual, b.residual)]:
        for k in ta:
            for f in ("absmax", "abssum", "counts", "token_hist", "top_values", "top_where"):
                assert torch.equal(getattr(ta[k], f), getattr(tb[k], f)), (k, f)
            assert ta[k].tokens == tb[k].tokens
    assert a.samples.keys() == b.samples.keys()
    for k in a.samples:
        assert torch.equal(a.samples[k], b.samples[k]), k


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_export_is_bit_identical(family, tmp_path):
    src = tiny_model_dir(tmp_path / "src", family)
    windows = token_batch(20, 24, seed=3)  # 3 batches of the default 8
    for act in ("token", "tensor"):
        scheme = W8A8(act=act)
        model, tok = load_model(str(src))
        ref = compress(model, tok, RECIPE, scheme, windows, progress=False)
        export(model, tmp_path / f"mem-{act}", tok, recipe=ref.recipe, stats=ref.stats)
        got = sequential.run(src, tmp_path / f"seq-{act}", tok, RECIPE, scheme, windows,
                             progress=False)
        assert_stats_equal(ref.stats_before, got["stats"])
        assert ref.stats_before.meta["fingerprint"] == got["stats"].meta["fingerprint"]
        a, b = _tensors(tmp_path / f"mem-{act}"), _tensors(tmp_path / f"seq-{act}")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        ca = json.loads((tmp_path / f"mem-{act}" / "config.json").read_text())
        cb = json.loads((tmp_path / f"seq-{act}" / "config.json").read_text())
        assert ca == cb
        ja = json.loads((tmp_path / f"mem-{act}" / "outlierq.json").read_text())
        jb = json.loads((tmp_path / f"seq-{act}" / "outlierq.json").read_text())
        assert ja["chosen"] == jb["chosen"] and ja["recipe"] == jb["recipe"]


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_cli_sequential_matches_in_memory_and_is_chosen_when_too_big(tmp_path, monkeypatch):
    from outlierq.cli import main

    src = tiny_model_dir(tmp_path / "src", "Gemma3ForCausalLM")
    # (one recipe for all three: in memory, auto adds rotate_down, which layer by layer leaves out)
    quick = ["--samples", "6", "--seqlen", "32", "--batch-size", "4", "--model", str(src),
             "--recipe", "smoothquant:alpha=0.8"]
    # (GPTQ, on by default in memory, does not run layer by layer: compare round-to-nearest)
    assert main(["quantize", "--out", str(tmp_path / "mem"), "--tune", "none"] + quick) == 0
    assert main(["quantize", "--out", str(tmp_path / "seq"), "--sequential"] + quick) == 0
    monkeypatch.setattr(sequential, "available_bytes", lambda: 1000)  # "the model does not fit"
    with pytest.warns(UserWarning, match="would not fit"):
        assert main(["quantize", "--out", str(tmp_path / "auto")] + quick) == 0
    a = _tensors(tmp_path / "mem")
    for d in ("seq", "auto"):
        b = _tensors(tmp_path / d)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    info = json.loads((tmp_path / "auto" / "outlierq.json").read_text())
    assert info["pipeline"] == "sequential" and info["scheme"]["gptq"] is False
    assert json.loads((tmp_path / "mem" / "outlierq.json").read_text())["scheme"]["gptq"] is False


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_sequential_refuses_split_after_a_step_that_changes_its_statistics(tmp_path):
    from outlierq.errors import OutlierqError

    src = tiny_model_dir(tmp_path / "src", "LlamaForCausalLM")
    model, tok = load_model(str(src))
    with pytest.raises(OutlierqError, match="split must come first"):
        sequential.run(src, tmp_path / "out", tok, "smoothquant+split", W8A8(), token_batch(4, 16))
    with pytest.raises(OutlierqError, match="keeps the output head float"):
        sequential.run(src, tmp_path / "out", tok, "smoothquant", W8A8(skip=()), token_batch(4, 16))
    with pytest.raises(OutlierqError, match="gptq is not available layer by layer"):
        sequential.run(src, tmp_path / "out", tok, "smoothquant", W8A8(gptq=True), token_batch(4, 16))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["Olmo2ForCausalLM", "FalconForCausalLM"])
def test_hidden_states_spilled_to_disk_give_the_same_statistics(family, tmp_path):
    """Olmo 2's q/k/v read the layer input directly: the reduction shared with the previous
    layer's output must survive the copy into the memory-mapped file."""
    src = tiny_model_dir(tmp_path / "src", family)
    windows = token_batch(20, 24, seed=3)
    mem = sequential.run(src, None, None, "smoothquant:alpha=search", W8A8(), windows, progress=False)
    disk = sequential.run(src, None, None, "smoothquant:alpha=search", W8A8(), windows, progress=False,
                          spill_bytes=0)
    assert_stats_equal(mem["stats"], disk["stats"])


def test_model_dispatched_by_accelerate_calibrates_like_the_in_memory_one(tmp_path):
    """device_map="auto" with every weight offloaded to disk: the same statistics and fingerprint."""
    from transformers import AutoModelForCausalLM

    from outlierq import calibrate

    src = tiny_model_dir(tmp_path / "src", "LlamaForCausalLM")
    windows = token_batch(8, 16)
    ref = calibrate(load_model(str(src))[0], windows, keep_rows=16, progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, device_map="auto", max_memory={"cpu": "100KB"},
                                                 offload_folder=str(tmp_path / "offload"))
    assert set(model.hf_device_map.values()) == {"disk"}
    got = calibrate(model.eval().requires_grad_(False), windows, keep_rows=16, progress=False)
    assert_stats_equal(ref, got)
    assert ref.meta["fingerprint"] == got.meta["fingerprint"]
