"""Data-parallel calibration on torch.distributed (2 gloo processes through torchrun, as
`--nproc 2` launches them) equals the one-process run: statistics (maxima, counts and kept rows
exactly, sums and Hessians to 1e-12) and the export, bit for bit; in memory and layer by layer.
The one-process run uses as many threads as each rank gets (`distributed.launch`): torch's fp32
reductions and matmuls may round differently with another thread count, so activations (and the
rows kept from them) can differ in their last bit, as they did after 6f67b85 changed the
calibration tokens."""
import json

import pytest
import torch
from safetensors.torch import load_file

from outlierq.calibration import ActivationStats
from outlierq.cli import main
from conftest import tiny_model_dir

QUICK = ["--samples", "6", "--seqlen", "32", "--batch-size", "2"]  # 3 batches: ranks get 2 and 1


@pytest.fixture
def rank_threads():
    """torch's thread count set to a rank's for the one-process run, and restored after."""
    import os

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", "Qwen2MoeForCausalLM")


def _close(a: ActivationStats, b: ActivationStats):
    for ta, tb in [(a.inputs, b.inputs), (a.residual, b.residual)]:
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k].absmax, tb[k].absmax), k
            assert torch.equal(ta[k].counts, tb[k].counts) and torch.equal(ta[k].token_hist, tb[k].token_hist)
            torch.testing.assert_close(ta[k].abssum, tb[k].abssum, rtol=1e-12, atol=0)
            assert torch.equal(ta[k].top_values, tb[k].top_values) and ta[k].tokens == tb[k].tokens
    assert a.samples.keys() == b.samples.keys()
    assert all(torch.equal(a.samples[k], b.samples[k]) for k in a.samples)
    assert a.meta["expert_tokens"] == b.meta["expert_tokens"]
    assert a.hessians.keys() == b.hessians.keys()
    for k in a.hessians:
        torch.testing.assert_close(a.hessians[k], b.hessians[k], rtol=1e-12, atol=1e-12 * a.hessians[k].abs().max().item())


@pytest.mark.parametrize("mode", [[], ["--sequential"]])
def test_two_gloo_processes_calibrate_like_one(src, tmp_path, mode, rank_threads):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    args = ["calibrate", "--model", str(src), "--keep-rows", "40"] + QUICK + (mode or ["--hessians"])
    assert main(args + ["--out", str(one)]) == 0
    assert main(args + ["--out", str(two), "--nproc", "2"]) == 0
    a = ActivationStats.load(one)
    assert bool(a.hessians) == (not mode)  # (in memory only: Hessians for GPTQ)
    _close(a, ActivationStats.load(two))


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_two_gloo_processes_export_bit_identical(src, tmp_path, rank_threads):
    args = ["quantize", "--model", str(src), "--scheme", "W8A8_STATIC"] + QUICK
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    assert main(args + ["--out", str(tmp_path / "two"), "--nproc", "2"]) == 0
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ja, jb = (json.loads((tmp_path / d / "outlierq.json").read_text()) for d in ("one", "two"))
    assert ja["chosen"] == jb["chosen"]
