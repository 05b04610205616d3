import pytest
import torch
from torch import nn

from outlierq import ActivationStats, calibrate
from outlierq.errors import OutlierqError
from conftest import tiny_model, token_batch


def _brute_force(model, batch):
    """Capture every Linear input with plain hooks, then reduce naively."""
    seen: dict[str, list] = {}
    hs = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(
        a[0].reshape(-1, a[0].shape[-1]).clone())) for n, m in model.named_modules()
        if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for i in range(0, batch.shape[0], 2):
            model(input_ids=batch[i:i + 2], use_cache=False)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_stats_equal_brute_force(family):
    model = tiny_model(family, outliers=True)
    batch = token_batch(4, 16)
    stats = calibrate(model, batch, thresholds=(1.0, 6.0), batch_size=2, progress=False)
    ref = _brute_force(model, batch)
    linears = {n for n in stats.inputs if ".experts." not in n}  # experts: tests/test_moe.py
    ref = {n: v for n, v in ref.items() if n in linears}  # vision towers stay out of calibration
    assert linears == set(ref)
    for name, x in ref.items():
        st = stats.inputs[name]
        a = x.abs()
        assert st.tokens == 64
        assert torch.equal(st.absmax, a.amax(0)), name
        torch.testing.assert_close(st.mean_abs, a.mean(0), rtol=1e-5, atol=1e-6)
        assert torch.equal(st.counts[1], (a > 6.0).sum(0))
        top = a.amax(1).topk(len(st.top_values)).values
        torch.testing.assert_close(st.top_values, top)
        s, p, c = st.top_where[0].tolist()
        assert a[s * 16 + p, c] == st.top_values[0]
    assert len(stats.residual) == 2
    assert all(s.tokens == 64 for s in stats.residual.values())


def test_hooks_removed_even_on_error():
    model = tiny_model("LlamaForCausalLM")
    bad = torch.full((2, 8), 10_000)  # token ids beyond the vocabulary: forward fails
    with pytest.raises(IndexError):
        calibrate(model, bad, progress=False)
    assert all(not m._forward_hooks for m in model.modules())


def test_merge_is_exact():
    model = tiny_model("Qwen2ForCausalLM", outliers=True)
    batch = token_batch(4, 16)
    whole = calibrate(model, batch, batch_size=4, progress=False)
    a = calibrate(model, batch[:2], batch_size=2, progress=False)
    b = calibrate(model, batch[2:], batch_size=2, progress=False)
    merged = a.merge(b)
    for n, st in whole.inputs.items():
        assert torch.equal(merged.inputs[n].absmax, st.absmax)
        assert torch.equal(merged.inputs[n].counts, st.counts)
        torch.testing.assert_close(merged.inputs[n].abssum, st.abssum, rtol=1e-6, atol=0)  # fp32 partial sums


def test_save_load_roundtrip_and_mismatch(tmp_path):
    model = tiny_model("LlamaForCausalLM")
    stats = calibrate(model, token_batch(2, 16), keep_rows=8, progress=False)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    back = ActivationStats.load(path)
    back.check_matches(model)
    for n in stats.inputs:
        assert torch.equal(back.inputs[n].absmax, stats.inputs[n].absmax)
        assert torch.equal(back.samples[n], stats.samples[n])
    assert back.samples["model.layers.0.self_attn.q_proj"] is back.samples["model.layers.0.self_attn.k_proj"]
    other = tiny_model("OPTForCausalLM")
    with pytest.raises(OutlierqError, match="do not match"):
        back.check_matches(other)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OutlierqError, match="not an outlierq statistics file"):
        ActivationStats.load(tmp_path / "junk.safetensors")


def test_head_skipped_during_calibration_and_restored():
    model = tiny_model("LlamaForCausalLM")
    batch = token_batch(2, 16)
    with torch.no_grad():
        before = model(input_ids=batch).logits
    stats = calibrate(model, batch, progress=False)
    assert "forward" not in vars(model.lm_head)  # the class forward is back
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, before)
    assert stats.inputs["lm_head"].absmax.max() > 0


def test_head_instance_forward_is_restored():
    # accelerate's device-map hooks install an instance-level forward on modules; keep it
    model = tiny_model("LlamaForCausalLM")
    wrapped = model.lm_head.forward
    model.lm_head.forward = lambda x: wrapped(x)
    mine = model.lm_head.forward
    calibrate(model, token_batch(2, 16), progress=False)
    assert model.lm_head.forward is mine


def test_calibrating_some_inputs_matches_the_full_calibration():
    model, w = tiny_model("LlamaForCausalLM", outliers=True), token_batch(8, 16)
    name = "model.layers.1.mlp.down_proj"
    full = calibrate(model, w, batch_size=4, keep_rows=32, hessians=True, progress=False)
    some = calibrate(model, w, batch_size=4, keep_rows=32, hessians=True, progress=False, names=[name])
    assert set(some.inputs) == set(some.samples) == set(some.hessians) == {name}
    assert torch.equal(some.inputs[name].absmax, full.inputs[name].absmax)
    assert torch.equal(some.samples[name], full.samples[name])
    assert torch.equal(some.hessians[name], full.hessians[name])
    assert set(some.residual) == set(full.residual)
