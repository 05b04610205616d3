"""GPTQ rounding: the blocked, act-ordered algorithm against the textbook one-column-at-a-time
update, the Hessians calibration keeps against a brute-force sum, and their transformation
through mitigations against a fresh calibration of the mitigated model."""
import copy

import pytest
import torch

from outlierq import calibrate, compress
from outlierq.calibration import ActivationStats
from outlierq.errors import OutlierqError
from outlierq.gptq import gptq_codes
from outlierq.quant import W8A8, Int8Linear, quantize_, quantize_weight
from conftest import tiny_model


def _obs_reference(w, h, scale, order, damp=0.01):
    """Round columns in `order`; spread each rounding error over the columns left with the full
    inverse Hessian, then eliminate that column from the inverse (Frantar et al., eq. 2-3)."""
    W, H = w.double().clone(), h.double().clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    s = scale.double()
    Q = torch.zeros_like(W)
    left = list(order)
    for q in order:
        Q[:, q] = torch.round(W[:, q] / s).clamp(-127, 127)
        e = (W[:, q] - Q[:, q] * s) / Hinv[q, q]
        left.remove(q)
        W[:, left] -= e[:, None] * Hinv[q, left][None, :]
        Hinv = Hinv - Hinv[:, q:q + 1] @ Hinv[q:q + 1, :] / Hinv[q, q]
    return Q


def _problem(n=24, k=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(500, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(500, 1, generator=g)
    w = torch.randn(n, k, generator=g)
    return w, x.t() @ x, w.abs().amax(1) / 127 * 3  # a coarse grid: rounding errors matter


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_matches_the_textbook_update(act_order):
    w, h, scale = _problem()
    order = (torch.argsort(h.diagonal(), descending=True, stable=True).tolist() if act_order
             else list(range(w.shape[1])))
    got = gptq_codes(w, h, scale, block=7, act_order=act_order)  # several blocks, one partial
    assert got.dtype == torch.int8
    assert torch.equal(got.double(), _obs_reference(w, h, scale, order))


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest_and_lowers_output_error():
    w, h, scale = _problem()
    rtn = torch.round(w / scale[:, None]).clamp(-127, 127)
    assert torch.equal(gptq_codes(w, torch.diag(h.diagonal()), scale).float(), rtn)

    def err(q):
        d = w.double() - q.double() * scale.double()[:, None]
        return torch.einsum("nk,kl,nl->", d, h.double(), d).item()
    assert err(gptq_codes(w, h, scale)) < 0.7 * err(rtn)


def test_unseen_inputs_get_round_to_nearest():
    w, h, scale = _problem()
    h[:, 5] = h[5, :] = 0  # channel 5 never active (e.g. the split's zero padding)
    q = gptq_codes(w, h, scale)  # H stays invertible, and column 5 is decoupled from the rest
    assert torch.equal(q[:, 5].float(), torch.round(w[:, 5] / scale).clamp(-127, 127))


def _windows(n=6, t=24, seed=1):
    return torch.randint(3, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def test_calibration_hessians_are_the_sum_of_x_xT_and_shared():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    wins = _windows()
    stats = calibrate(model, wins, batch_size=4, progress=False, hessians=True)
    seen: dict[str, torch.Tensor] = {}

    def add(name, x):
        x2 = x.reshape(-1, x.shape[-1]).double()
        seen[name] = seen.get(name, 0) + x2.t() @ x2
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: add(n, a[0]))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n]
    with torch.no_grad():
        for b in range(0, 6, 4):  # the brute-force pass, same batches
            model(input_ids=wins[b:b + 4])
    for hk in hooks:
        hk.remove()
    assert seen.keys() <= stats.hessians.keys()
    for n, h in seen.items():
        torch.testing.assert_close(stats.hessians[n], h, rtol=1e-5, atol=1e-3 * h.abs().max().item())
    pre = "model.layers.0.self_attn."
    assert stats.hessians[pre + "q_proj"] is stats.hessians[pre + "v_proj"]


def test_hessians_survive_save_load_and_mitigation(tmp_path):
    model = tiny_model("LlamaForCausalLM", outliers=True)
    wins = _windows()
    stats = calibrate(model, wins, batch_size=4, progress=False, hessians=True)
    stats.save(tmp_path / "s.safetensors")
    back = ActivationStats.load(tmp_path / "s.safetensors")
    assert back.hessians.keys() == stats.hessians.keys()
    assert all(torch.equal(back.hessians[k], stats.hessians[k]) for k in stats.hessians)
    pre = "model.layers.1.mlp."
    assert back.hessians[pre + "gate_proj"] is back.hessians[pre + "up_proj"]
    # carried through smoothing and splitting = taken fresh on the mitigated model
    m = copy.deepcopy(model)
    res = compress(m, None, "split:ratio=4+smoothquant:alpha=0.5", None, stats, progress=False)
    fresh = calibrate(m, wins, batch_size=4, progress=False, hessians=True)
    for k, h in fresh.hessians.items():
        scale = h.abs().max()
        # (float32 forwards of the two models differ by ~1e-6 relative, the maxima as much)
        torch.testing.assert_close(res.stats.hessians[k] / scale, h / scale, rtol=0, atol=3e-5, msg=k)


def test_gptq_scheme_lowers_layer_output_error_and_needs_hessians():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    wins = _windows(8, 32)
    stats = calibrate(model, wins, batch_size=4, progress=False, hessians=True)
    name = "model.layers.0.mlp.down_proj"
    lin = model.get_submodule(name)
    h = stats.hessians[name]
    out = {}
    for gptq in (False, True):
        m = quantize_(copy.deepcopy(model), W8A8(act="none", gptq=gptq), stats, progress=False)
        d = (m.get_submodule(name).dequantized_weight() - lin.weight).double()
        out[gptq] = torch.einsum("nk,kl,nl->", d, h, d).item()
    assert out[True] < out[False]
    # the same scale as round-to-nearest: only the codes move
    _, s = quantize_weight(lin.weight)
    m = quantize_(copy.deepcopy(model), W8A8(gptq=True), stats, progress=False)
    assert isinstance(m.get_submodule(name), Int8Linear)
    assert torch.equal(m.get_submodule(name).weight_scale, s)
    with pytest.raises(OutlierqError, match="hessians=True"):
        quantize_(copy.deepcopy(model), W8A8(gptq=True), calibrate(model, wins, progress=False), progress=False)
