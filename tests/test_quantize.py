import copy
import json

import pytest
import torch
from torch import nn

from outlierq import calibrate
from outlierq.errors import OutlierqError
from outlierq.quant import Int8Linear, W8A8, quantize_
from conftest import tiny_model, token_batch


def _sqnr_db(ref, out):
    return 10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum()).item()


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_int8_linear_matches_fake_quant_oracle(act):
    torch.manual_seed(0)
    lin = nn.Linear(123, 77)
    x = torch.randn(5, 31, 123)
    scale = x.abs().max().item() / 127
    real = Int8Linear.from_linear(lin, act, scale)
    fake = Int8Linear.from_linear(lin, act, scale, fake=True)
    y, yf = real(x), fake(x)
    torch.testing.assert_close(y, yf, rtol=1e-4, atol=1e-4)
    assert _sqnr_db(lin(x), y) > 30  # int8 both sides on Gaussian data: ~35-40 dB


def test_weight_codes_and_scales():
    lin = nn.Linear(16, 4, bias=False)
    m = Int8Linear.from_linear(lin)
    w = lin.weight.detach()
    assert m.weight.dtype == torch.int8 and m.weight.abs().max() == 127
    torch.testing.assert_close(m.weight_scale, w.abs().amax(1) / 127)
    assert (m.dequantized_weight() - w).abs().max() <= m.weight_scale.max() / 2 + 1e-7


def test_quantize_model_keeps_lm_head_and_needs_stats_for_static():
    model = tiny_model("LlamaForCausalLM")
    q = quantize_(copy.deepcopy(model), W8A8(), progress=False)
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if n.endswith(("proj", "lm_head"))}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.mlp.down_proj"] == "Int8Linear"
    with pytest.raises(OutlierqError, match="statistics"):
        quantize_(copy.deepcopy(model), W8A8(act="tensor"), progress=False)
    x = token_batch(2, 16)
    ref = model(input_ids=x).logits
    out = q(input_ids=x).logits
    assert _sqnr_db(ref, out) > 20
    q2 = q.to(torch.float32)  # moving never re-quantizes
    assert q2.model.layers[0].mlp.down_proj.weight.dtype == torch.int8


def test_static_model_runs_with_calibrated_scales():
    model = tiny_model("MistralForCausalLM")
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    q = quantize_(copy.deepcopy(model), W8A8(act="tensor"), stats, progress=False)
    m = q.model.layers[0].self_attn.q_proj
    want = stats.inputs["model.layers.0.self_attn.q_proj"].absmax.max() / 127
    torch.testing.assert_close(m.input_scale, want.reshape(1))
    assert _sqnr_db(model(input_ids=x).logits, q(input_ids=x).logits) > 15


def test_stale_or_foreign_statistics_are_refused():
    """Statistics taken before a mitigation changed the weights (same shapes or not), or on
    another model of the same shapes, give wrong static scales: quantize_ refuses them."""
    from outlierq.mitigate.recipe import mitigate
    from outlierq.mitigate.smoothquant import SmoothQuant
    from outlierq.mitigate.split import ChannelSplit

    model = tiny_model("LlamaForCausalLM", outliers=True)
    x = token_batch(2, 16)
    stats = calibrate(model, x, progress=False)
    for recipe, msg in (([SmoothQuant(0.5)], "stale"), ([ChannelSplit(0.1, 2.0)], "input channels")):
        m = copy.deepcopy(model)
        fresh = mitigate(m, stats, recipe)
        with pytest.raises(OutlierqError, match=msg):
            quantize_(copy.deepcopy(m), W8A8(act="tensor"), stats, progress=False)
        quantize_(m, W8A8(act="tensor"), fresh, progress=False)  # the returned stats are fine
    other = tiny_model("LlamaForCausalLM", seed=1)
    with pytest.raises(OutlierqError, match="stale"):
        quantize_(other, W8A8(act="tensor"), stats, progress=False)
    quantize_(other, W8A8(act="tensor"), stats, progress=False, check_stats=False)  # explicit override


def test_token_for_typo_is_an_error():
    model = tiny_model("LlamaForCausalLM")
    stats = calibrate(model, token_batch(2, 16), progress=False)
    with pytest.raises(OutlierqError, match="matches no quantizable Linear"):
        quantize_(model, W8A8(act="tensor", token_for=("*dwn_proj",)), stats, progress=False)


@pytest.mark.parametrize("path", ["int_mm", "fp32"])
@pytest.mark.parametrize("act", ["token", "tensor"])
def test_both_cpu_gemm_paths_match_the_oracle(path, act, monkeypatch):
    """AVX2-only CPUs run the int8 codes through an fp32 matmul (their int8 GEMM is 30x slower):
    either path stays within the fake-quant oracle's tolerance, and on small codes both are exact."""
    from outlierq.ops import gemm

    monkeypatch.setenv("OUTLIERQ_INT8_GEMM", path)
    gemm.cpu_gemm_path.cache_clear()
    try:
        torch.manual_seed(0)
        lin = nn.Linear(200, 72)
        x = torch.randn(3, 17, 200)
        scale = x.abs().max().item() / 127
        real = Int8Linear.from_linear(lin, act, scale)
        torch.testing.assert_close(real(x), Int8Linear.from_linear(lin, act, scale, fake=True)(x),
                                   rtol=1e-4, atol=1e-4)
        assert real._wt.dtype == (torch.int8 if path == "int_mm" else torch.float32)
        xq = torch.randint(-127, 128, (9, 64), dtype=torch.int8)
        wq = torch.randint(-127, 128, (64, 16), dtype=torch.int8)
        ones = torch.ones(9), torch.ones(16)
        from outlierq import ops
        assert torch.equal(ops.int8_matmul(xq, ones[0], ops.gemm_operand(wq), ones[1]),
                           torch._int_mm(xq, wq).float())
    finally:
        gemm.cpu_gemm_path.cache_clear()


@pytest.mark.parametrize("int8_vs_fp32,path", [(0.4, "int_mm"), (1.5, "int_mm"), (2.5, "fp32"), (30.0, "fp32")])
def test_cpu_gemm_probe_falls_back_only_where_int8_is_clearly_slower(int8_vs_fp32, path, monkeypatch):
    """The probe keeps the int8 GEMM (a quarter of the weight memory) unless it measured more than
    2x slower than fp32: a probe disturbed by another process must not flip a VNNI CPU to fp32."""
    from outlierq.ops import gemm

    monkeypatch.delenv("OUTLIERQ_INT8_GEMM", raising=False)
    times = iter([int8_vs_fp32, 1.0])  # (the probe times the int8 GEMM first)
    monkeypatch.setattr(gemm, "_best_of", lambda fn: next(times))
    gemm.cpu_gemm_path.cache_clear()
    try:
        assert gemm.cpu_gemm_path() == path
    finally:
        gemm.cpu_gemm_path.cache_clear()


def test_weight_clip_search_picks_the_least_output_error():
    """Brute force per channel over the grid; and clipping never loses to plain rounding on the
    rows it was chosen on (1.0 is in the grid)."""
    from outlierq.quant import CLIP_GRID, clip_search, quantize_weight

    torch.manual_seed(0)
    w = torch.randn(12, 40)
    w[:, 3] *= 8  # one large weight per row, on an input channel that is nearly silent:
    x = torch.randn(64, 40)  # clipping it costs little and refines every other weight
    x[:, 3] *= 0.01
    ratios = clip_search(w, x)
    for n in range(12):
        errs = []
        for r in CLIP_GRID:
            q, s = quantize_weight(w[n:n + 1], clip=torch.tensor([r]))
            errs.append(((x @ (w[n] - q[0].float() * s[0])) ** 2).sum().item())
        assert ratios[n].item() == pytest.approx(CLIP_GRID[min(range(len(errs)), key=errs.__getitem__)])
    q1, s1 = quantize_weight(w)
    qc, sc = quantize_weight(w, clip=ratios)
    e1 = (x @ (w - q1.float() * s1[:, None]).t()).pow(2).sum()
    ec = (x @ (w - qc.float() * sc[:, None]).t()).pow(2).sum()
    assert ec <= e1 and (ratios < 1).any()
    q_same, s_same = quantize_weight(w, clip=torch.ones(12))  # ratio 1 = plain absmax/127
    torch.testing.assert_close(s_same, s1)
    assert (q_same.int() - q1.int()).abs().max() <= 1


def test_weight_clip_searches_in_the_schemes_format():
    """FP8's clip ratios are FP8's brute-force best (its error is relative, so the ratios differ
    from int8's): quantize_ applies the ratios searched for the format it stores."""
    from outlierq.quant import CLIP_GRID, clip_search, quantize_weight
    from outlierq.quant.formats import FP8

    torch.manual_seed(1)
    w, x = torch.randn(16, 48), torch.randn(64, 48)
    w[:, 5] *= 6
    x[:, 5] *= 0.01
    ratios = clip_search(w, x, fmt=FP8)
    for n in range(16):
        errs = []
        for r in CLIP_GRID:
            q, s = quantize_weight(w[n:n + 1], clip=torch.tensor([r]), fmt=FP8)
            errs.append(((x @ (w[n] - q[0].float() * s[0])) ** 2).sum().item())
        assert ratios[n].item() == pytest.approx(CLIP_GRID[min(range(len(errs)), key=errs.__getitem__)])
    assert not torch.equal(ratios, clip_search(w, x))
    model = tiny_model("LlamaForCausalLM", outliers=True)
    stats = calibrate(model, token_batch(8, 32, seed=1), keep_rows=128, progress=False)
    q = quantize_(copy.deepcopy(model), W8A8(act="none", format="fp8", weight_clip=True), stats, progress=False)
    name = "model.layers.0.mlp.down_proj"
    lin = dict(model.named_modules())[name]
    want, _ = quantize_weight(lin.weight, clip=clip_search(lin.weight, stats.samples[name], fmt=FP8), fmt=FP8)
    assert torch.equal(dict(q.named_modules())[name].weight.float(), want.float())


def test_weight_clip_in_quantize_needs_rows_and_reduces_error():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    calib, test = token_batch(8, 32, seed=1), token_batch(4, 32, seed=2)
    with pytest.raises(OutlierqError, match="kept calibration rows"):
        quantize_(copy.deepcopy(model), W8A8(weight_clip=True), calibrate(model, calib, progress=False))
    stats = calibrate(model, calib, keep_rows=128, progress=False)
    ref = model(input_ids=test).logits
    err = {}
    for clip in (False, True):
        q = quantize_(copy.deepcopy(model), W8A8(act="none", weight_clip=clip), stats, progress=False)
        err[clip] = (q(input_ids=test).logits - ref).pow(2).mean().item()
    assert err[True] < err[False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_weight_leaves_its_input_alone(dtype):
    from outlierq.quant import quantize_weight

    w = torch.randn(8, 16).to(dtype)
    before = w.clone()
    quantize_weight(w)
    quantize_weight(w, clip=torch.full((8,), 0.9))
    assert torch.equal(w, before)


def _static_inputs(model) -> dict[str, torch.Tensor]:
    return {n: m.input_scale.clone() for n, m in model.named_modules()
            if isinstance(m, Int8Linear) and m.act == "tensor"}


def _kl_brute(model, ref, windows) -> float:
    """sum over every position of KL(ref || model), float64, no chunks."""
    total = 0.0
    with torch.no_grad():
        for w, r in zip(windows, ref):
            lq = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1)
            total += (r.exp() * (r - lq)).sum().item()
    return total


def test_range_tune_picks_the_factor_of_least_kl_against_brute_force(tmp_path):
    """With down_proj the only static kind, the descent is one exhaustive search over the grid:
    it must pick what a float64 brute force over the same windows picks, and export as is."""
    import dataclasses

    from outlierq import compress
    from outlierq.checkpoint import export, load
    from outlierq.quant import RANGE_TUNE_GRID

    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows = token_batch(6, 24, seed=3)
    scheme = W8A8(act="tensor", token_for=("*_attn.*", "*gate_proj", "*up_proj"), range_tune=3)
    tuned = compress(copy.deepcopy(model), None, "none", scheme, windows, progress=False)
    plain = compress(copy.deepcopy(model), None, "none", dataclasses.replace(scheme, range_tune=0),
                     windows, progress=False).model
    assert set(tuned.record["range_tune"]) == {"down_proj"}
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1) for w in windows[:3]]
    base = _static_inputs(plain)

    def kl_at(f: float) -> float:
        for n, m in plain.named_modules():
            if n in base:
                m.input_scale.copy_(base[n] * f)
        return _kl_brute(plain, ref, windows[:3])

    kls = {f: kl_at(f) for f in RANGE_TUNE_GRID}
    best = min(kls, key=kls.get)
    assert tuned.record["range_tune"]["down_proj"] == best
    for n, s in _static_inputs(tuned.model).items():  # the chosen factor is left in place
        torch.testing.assert_close(s, base[n] * best, rtol=1e-6, atol=0)
    out = export(tuned.model, tmp_path / "ckpt", recipe=[], stats=tuned.stats)
    assert json.loads((out / "outlierq.json").read_text())["range_tune"] == {"down_proj": best}
    back, _ = load(out)
    assert all(torch.equal(s, _static_inputs(back)[n]) for n, s in _static_inputs(tuned.model).items())
    x = windows[3:]
    assert torch.equal(back(input_ids=x).logits, tuned.model(input_ids=x).logits)


def test_range_tune_each_descends_linear_by_linear_like_a_brute_force():
    """range_tune_each=("down_proj",): after the kind's factor, each down_proj in module order gets
    the grid factor of least KL on top of it, the ones before at their choice: a float64 replay
    of that descent picks the same factors, and the result is never worse than the kind alone."""
    import dataclasses

    from outlierq import compress
    from outlierq.quant import RANGE_TUNE_GRID

    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows = token_batch(6, 24, seed=5)
    scheme = W8A8(act="tensor", token_for=("*_attn.*", "*gate_proj", "*up_proj"), range_tune=3,
                  range_tune_each=("down_proj",))
    tuned = compress(copy.deepcopy(model), None, "none", scheme, windows, progress=False)
    kind_only = compress(copy.deepcopy(model), None, "none", dataclasses.replace(scheme, range_tune_each=()),
                         windows, progress=False)
    plain = compress(copy.deepcopy(model), None, "none", dataclasses.replace(scheme, range_tune=0,
                     range_tune_each=()), windows, progress=False).model
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1) for w in windows[:3]]
    base = _static_inputs(plain)
    names = list(base)  # module order; every static Linear is a down_proj here
    assert len(names) >= 2 and all(n.endswith("down_proj") for n in names)
    kind = kind_only.record["range_tune"]["down_proj"]
    assert tuned.record["range_tune"]["down_proj"] == kind

    def kl_at(own: dict[str, float]) -> float:
        for n, m in plain.named_modules():
            if n in base:
                m.input_scale.copy_(base[n] * kind * own[n])
        return _kl_brute(plain, ref, windows[:3])

    own = dict.fromkeys(names, 1.0)
    best = kl_at(own)
    for n in names:
        for f in RANGE_TUNE_GRID:
            kl = kl_at(dict(own, **{n: f}))
            if kl < best:
                best, own[n] = kl, f
    assert {n: tuned.record["range_tune"][n] for n in names} == own
    for n, s in _static_inputs(tuned.model).items():
        torch.testing.assert_close(s, base[n] * kind * own[n], rtol=1e-6, atol=0)
    assert _kl_brute(tuned.model, ref, windows[:3]) <= _kl_brute(kind_only.model, ref, windows[:3]) * (1 + 1e-6)

    with pytest.raises(OutlierqError, match="set range_tune=N too"):
        W8A8(act="tensor", range_tune_each=("down_proj",))
    with pytest.raises(OutlierqError, match="'o_proj' is not the kind of any static Linear"):
        compress(copy.deepcopy(model), None, "none", dataclasses.replace(scheme, range_tune_each=("o_proj",)),
                 windows, progress=False)


def test_range_tune_every_kind_never_worse_and_refusals():
    from outlierq import compress
    from outlierq.quant import RANGE_TUNE_GRID

    model = tiny_model("Gemma3ForCausalLM", outliers=True)
    windows = token_batch(6, 24, seed=4)
    plain = compress(copy.deepcopy(model), None, "rotate_down:inputs=all,block=none",
                     W8A8(act="tensor", act_clip=True), windows, progress=False)
    tuned = compress(copy.deepcopy(model), None, "rotate_down:inputs=all,block=none",
                     W8A8(act="tensor", act_clip=True, range_tune=2), windows, progress=False)
    kinds = tuned.record["range_tune"]
    assert list(kinds) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert set(kinds.values()) <= set(RANGE_TUNE_GRID)
    assert tuned.record["act_clip"] == plain.record["act_clip"]  # tuned on top of act_clip's ranges
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1) for w in windows[:2]]
    assert _kl_brute(tuned.model, ref, windows[:2]) <= _kl_brute(plain.model, ref, windows[:2]) * (1 + 1e-6)
    for n, s in _static_inputs(tuned.model).items():
        torch.testing.assert_close(s, _static_inputs(plain.model)[n] * kinds[n.rsplit(".", 1)[-1]],
                                   rtol=1e-6, atol=0)

    with pytest.raises(OutlierqError, match="use act='tensor'"):
        W8A8(act="token", range_tune=2)
    with pytest.raises(OutlierqError, match=">= 0"):
        W8A8(act="tensor", range_tune=-1)
    m = copy.deepcopy(model)
    stats = calibrate(m, windows, progress=False)
    with pytest.raises(OutlierqError, match="needs calibration token windows"):
        quantize_(m, W8A8(act="tensor", range_tune=2), stats, progress=False)
    with pytest.raises(OutlierqError, match="layer by layer"):
        quantize_(m, W8A8(act="tensor", range_tune=2), stats, progress=False, only=[0], tune_windows=windows)
    assert not any(isinstance(x, Int8Linear) for x in m.modules())  # refused before any change


def test_quiet_token_rows_take_their_own_static_range_like_a_brute_force():
    """Int8Linear with token_ids: rows of those ids quantize at token_scale, the rest at
    input_scale, each a constant; without ids (inputs_embeds) every row takes input_scale."""
    from outlierq.quant import TokenKeys

    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 8, bias=True)
    x = torch.randn(2, 5, 24) * torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0])[None, :, None]
    ids = torch.tensor([[4, 9, 4, 9, 1], [9, 4, 2, 3, 9]])
    for fake in (False, True):
        m = Int8Linear.from_linear(lin, "tensor", input_scale=x.abs().max().item() / 127, fake=fake)
        plain = m(x)
        m.token_ids, m.token_scale, m.token_keys = torch.tensor([9]), m.input_scale * 0.05, TokenKeys()
        assert torch.equal(m(x), plain)  # no ids known: the plain static range
        m.token_keys.ids = ids.reshape(-1)
        s = torch.where(ids.reshape(-1) == 9, m.token_scale, m.input_scale)[:, None]
        q = (x.reshape(-1, 24) / s).round().clamp(-127, 127)
        want = (q * s) @ m.dequantized_weight().t() + lin.bias.detach()
        torch.testing.assert_close(m(x).reshape(-1, 8), want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(m(x), plain)


# seed 4: the quiet range's best factor is 1.0 (no keys left), seed 5: 0.5; seed 6, quiet_tune=4: 0.5,
# tuned on 4 windows against the float model's top 4 tokens
@pytest.mark.parametrize("seed,quiet_tune", [(4, 0), (5, 0), (6, 4)])
def test_quiet_tokens_keyed_and_tuned_like_a_brute_force(tmp_path, monkeypatch, seed, quiet_tune):
    """Token 3, the only id frequent enough, is found quiet in exactly the down_projs where a brute
    force finds >= QUIET_SHARE of its rows below QUIET_LEVEL of the range (QUIET_LEVEL raised to
    1/2: a tiny random model has no silent tokens; QUIET_SHARE to 0.4: only layer 0 passes), and is
    keyed in every down_proj; the quiet range's factor is the grid's least KL on the tuning windows
    (float64 replay; with quiet_tune, of the distributions with all but the reference's top tokens
    merged), never worse than without keys; the keyed model refuses to export."""
    import dataclasses

    from outlierq import compress
    from outlierq.quant import tuning as quantize
    from outlierq.checkpoint import export
    from outlierq.quant import QUIET_GRID

    monkeypatch.setattr(quantize, "QUIET_LEVEL", 0.5)
    monkeypatch.setattr(quantize, "QUIET_SHARE", 0.4)  # token 3 passes it in layer 0's down_proj only
    monkeypatch.setattr(quantize, "QUIET_TOPK", 4)
    model = tiny_model("Gemma3ForCausalLM", outliers=True)
    windows = token_batch(6, 24, seed=seed)
    windows[:, ::3] = 3
    scheme = W8A8(act="tensor", act_clip=True, range_tune=2, quiet_tokens=("down_proj",), quiet_tune=quiet_tune)
    tuned = compress(copy.deepcopy(model), None, "rotate_down:inputs=all,block=none", scheme, windows, progress=False)
    plain = compress(copy.deepcopy(model), None, "rotate_down:inputs=all,block=none",
                     dataclasses.replace(scheme, quiet_tokens=(), quiet_tune=0), windows, progress=False)
    rec = tuned.record["quiet_tokens"]
    assert list(rec["factors"]) == ["down_proj"] and rec["factors"]["down_proj"] in QUIET_GRID
    scored = windows[:quiet_tune or 2]
    with torch.no_grad():
        ref = [torch.log_softmax(model(input_ids=w[None]).logits[0].double(), -1) for w in scored]

    def kl(m) -> float:
        if not quiet_tune:
            return _kl_brute(m, ref, scored)
        total = 0.0  # the top 4 of each row kept, the rest merged into one outcome
        with torch.no_grad():
            for w, r in zip(scored, ref):
                lq = torch.log_softmax(m(input_ids=w[None]).logits[0].double(), -1)
                top = r.topk(4, -1).indices
                rest = torch.ones_like(r, dtype=torch.bool).scatter_(-1, top, False)
                p = torch.cat([r.gather(-1, top).exp(), (r.exp() * rest).sum(-1, keepdim=True)], -1)
                q = torch.cat([lq.gather(-1, top).exp(), (lq.exp() * rest).sum(-1, keepdim=True)], -1)
                total += (p * (p.log() - q.log())).sum().item()
        return total

    keyed = {n: m for n, m in tuned.model.named_modules() if getattr(m, "token_ids", None) is not None}
    downs = [n for n, _ in tuned.model.named_modules() if n.endswith("down_proj")]
    quiet = {}  # brute force on the unkeyed model (same ranges): token 3's rows below half the range
    for n, m in plain.model.named_modules():
        if n.endswith("down_proj"):
            m.register_forward_pre_hook(lambda m, a, n=n: quiet.setdefault(n, []).append(
                m.input_rotation(a[0])[0].abs().amax(-1) < 0.5 * 127 * m.input_scale))
    with torch.no_grad():
        for w in windows:
            plain.model(input_ids=w[None])
    share = {n: torch.stack(v)[windows == 3].float().mean().item() for n, v in quiet.items()}
    detected = {n for n, v in share.items() if v >= quantize.QUIET_SHARE}
    assert detected == {"model.layers.0.mlp.down_proj"} and rec["quiet_in"] == {"down_proj": [n for n in downs if n in detected]}
    if rec["factors"]["down_proj"] != 1.0:
        assert rec["ids"] == {"down_proj": [3]} and sorted(keyed) == sorted(downs)
        assert all(m.token_ids.tolist() == [3] for m in keyed.values())
    else:
        assert rec["ids"] == {} and not keyed
    assert kl(tuned.model) <= kl(plain.model) * (1 + 1e-6)
    if not keyed:  # the best factor was 1.0: the model is the range-tuned one, untouched
        assert rec["factors"]["down_proj"] == 1.0
        assert torch.equal(tuned.model(input_ids=windows).logits, plain.model(input_ids=windows).logits)
        return
    kls = {}
    for f in QUIET_GRID:
        for m in keyed.values():
            m.token_scale.copy_(m.input_scale * f)
        kls[f] = kl(tuned.model)
    assert rec["factors"]["down_proj"] == min(kls, key=kls.get), kls
    n = scored.numel()  # the recorded scores are those KLs per token
    assert rec["kl"]["down_proj"] == pytest.approx({f: v / n for f, v in kls.items()}, rel=1e-4)
    with pytest.raises(OutlierqError, match="keys a static range by token id"):
        export(tuned.model, tmp_path / "ckpt", recipe=[], stats=tuned.stats)


def test_quiet_tokens_refusals():
    from outlierq import compress

    with pytest.raises(OutlierqError, match="set range_tune=N too"):
        W8A8(act="tensor", quiet_tokens=("down_proj",))
    with pytest.raises(OutlierqError, match="quiet_tokens: 'o_proj' is not the kind of any static Linear"):
        compress(tiny_model("LlamaForCausalLM"), None, "none",
                 W8A8(act="tensor", token_for=("*_attn.*",), range_tune=1, quiet_tokens=("o_proj",)),
                 token_batch(2, 16), progress=False)
    with pytest.raises(OutlierqError, match="set quiet_tokens=\\(kinds\\) too"):
        W8A8(act="tensor", range_tune=1, quiet_tune=4)
    with pytest.raises(OutlierqError, match="tunes on 3 calibration windows, but 2 were given"):
        compress(tiny_model("LlamaForCausalLM"), None, "none",
                 W8A8(act="tensor", range_tune=1, quiet_tokens=("down_proj",), quiet_tune=3),
                 token_batch(2, 16), progress=False)
