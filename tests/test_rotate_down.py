"""Online rotation of down_proj's input (rotate_down): an orthogonal map, the function unchanged on
every family, static scales taken from the rotated inputs by a second calibration, refused where it
cannot be honoured (statistics passed in, layer by layer, export, LLM.int8, not last)."""
import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

from outlierq import calibrate
from outlierq.checkpoint import export
from outlierq.errors import OutlierqError, OutlierqNotice
from outlierq.mitigate.recipe import mitigate
from outlierq.mitigate.rotate import _paley_order, hadamard
from outlierq.mitigate.rotate_down import RotateDown, _orders, kron_rotation, plan
from outlierq.models.arch import decoder_layers, get_arch
from outlierq.pipeline import compress
from outlierq.quant import W8A8, Int8Linear, LLMInt8, quantize_
from conftest import FAMILIES, char_tokenizer, tiny_model, token_batch


@pytest.mark.parametrize("n", [128, 1612, 2048, 97, 5])
def test_kron_rotation_is_the_dense_orthogonal_matrix(n):
    rot, what = kron_rotation(n, seed=3, out_features=64)
    m, a, b = plan(n, 64)
    assert a * b == m >= n and (a, b) == (rot.a.shape[0], rot.b.shape[0])
    dense = torch.diag(rot.signs) @ torch.kron(rot.a, rot.b)  # independent of the factored forward
    torch.testing.assert_close(dense @ dense.t(), torch.eye(m, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(rot(x), F.pad(x, (0, m - n)) @ dense, rtol=0, atol=1e-12)
    assert ("random orthogonal" in what) == (n == 5) and ("padded" in what) == (m > n)
    if n != 5:  # every entry of a randomized Hadamard rotation is +-1/sqrt(m)
        torch.testing.assert_close(dense.abs(), torch.full_like(dense, m ** -0.5), rtol=0, atol=1e-12)


def test_plan_pads_to_hadamard_factors_at_the_least_cost():
    # the sieve's orders are exactly those hadamard() builds (its own order test, and a few built)
    assert _orders(3000) == {k for k in range(1, 3001) if _paley_order(k)}
    assert all(hadamard(k) is not None for k in (24, 68, 104, 120)) and hadamard(52) is None
    assert plan(2048, 640) == (2048, 32, 64)          # Gemma-3: Sylvester x Sylvester, no padding
    assert plan(1612, 576) == (1632, 24, 68)          # SmolLM2 split: 20 zero channels, Paley factors
    assert plan(5, 4) == (5, 1, 5)                    # nothing within n/8: random orthogonal
    rot, what = kron_rotation(1612, 0, 576, kind="random")  # the width as it is, Gaussian factors
    assert (rot.a.shape[0], rot.b.shape[0]) == (31, 52) and "padded" not in what
    assert what == "random orthogonal (31) x random orthogonal (52)"


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("inputs", ["down", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_down_preserves_the_function(family, inputs):
    model = tiny_model(family, outliers=True)
    x = token_batch(2, 24)
    ref = model(input_ids=x).logits
    m = copy.deepcopy(model)
    stats = calibrate(m, token_batch(4, 16, seed=3), progress=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = mitigate(m, stats, [RotateDown(inputs=inputs)])
    spec = get_arch(model)
    if inputs == "down" and not [p for p in spec.pairs if p.kind == "mlp"]:
        assert any("skipped" in str(w.message) for w in seen if w.category is OutlierqNotice)
        assert "rotate_down" in m.outlierq_skipped
        return
    err = _rel(m(input_ids=x).logits, ref)
    if err >= 1e-5 and spec.experts is not None:  # fused experts have no float64 kernel: the
        assert err < 1e-4, err                        # fp32 bound the twin check below also holds
    elif err >= 1e-5:  # fp32 rounding of the rotations through every Linear: the float64 twin must do better
        m64, model64 = copy.deepcopy(model).double(), copy.deepcopy(model).double()
        mitigate(m64, calibrate(m64, token_batch(4, 16, seed=3), progress=False), [RotateDown(inputs=inputs)])
        m64.double()  # (the online rotations' factors too)
        assert err < 1e-4 and _rel(m64(input_ids=x).logits, model64(input_ids=x).logits) < 1e-6
    assert out.meta["recalibrate"] and all(n.startswith(spec.layers + ".") for n in out.meta["recalibrate"])
    if inputs == "all":  # every Linear a norm group or a pair feeds, in every layer
        wanted = {n for g in spec.groups for n in g.linears} | {p.consumer for p in spec.pairs}
        assert len(out.meta["recalibrate"]) == len(wanted) * len(decoder_layers(m, spec))


def test_static_scales_come_from_the_rotated_inputs():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows = token_batch(8, 24, seed=3)
    m = copy.deepcopy(model)
    # (deal=false: the brute force below hooks the undealt channel order)
    res = compress(m, None, "split:ratio=4,multiple=32+smoothquant:alpha=0.5+rotate_down:deal=false",
                   W8A8(act="tensor", gptq=True, act_clip=False), windows, progress=False)
    name = "model.layers.1.mlp.down_proj"
    lin = dict(m.named_modules())[name]
    assert isinstance(lin, Int8Linear) and lin.input_rotation is not None
    # brute force: the maximum of the rotated input of the same model mitigated without the
    # rotation, hooked (not the recorder)
    f = copy.deepcopy(model)
    compress(f, None, "split:ratio=4,multiple=32+smoothquant:alpha=0.5", None, windows, progress=False)
    rotated, plain, hess = [], [], []

    def hook(mod, args, out):
        r = lin.input_rotation(args[0]).reshape(-1, lin.in_features).double()
        rotated.append(r.abs().max().float())
        plain.append(args[0].abs().max())
        hess.append(r.t() @ r)

    h = decoder_layers(f)[1].mlp.down_proj.register_forward_hook(hook)
    with torch.no_grad():
        f(input_ids=windows)
    h.remove()
    torch.testing.assert_close(lin.input_scale * 127, max(rotated).reshape(1), rtol=1e-6, atol=0)
    assert max(rotated) < 0.8 * max(plain)  # the rotation spreads what split + smoothing left
    assert _rel(res.stats.hessians[name], sum(hess)) < 1e-6  # GPTQ's (summed in float32 per batch)
    assert "recalibrate" not in res.stats.meta and res.record["down_rotation"]


def test_rotate_down_lowers_the_static_error():
    model = tiny_model("LlamaForCausalLM")  # (no residual outliers: down_proj's input decides)
    with torch.no_grad():  # a massive intermediate channel (same function): up row x50, down column /50
        for layer in decoder_layers(model):
            layer.mlp.up_proj.weight[5] *= 50
            layer.mlp.down_proj.weight[:, 5] /= 50
    windows, x = token_batch(16, 24, seed=3), token_batch(2, 24)
    ref = model(input_ids=x).logits

    def err(recipe):
        m = copy.deepcopy(model)
        compress(m, None, recipe, W8A8(act="tensor", fake=True), windows, progress=False)
        return _rel(m(input_ids=x).logits, ref)

    assert err("rotate_down") < 0.5 * err("none")  # measured 0.16 vs 0.67


def test_rotate_down_refusals(tmp_path):
    from outlierq import sequential
    from conftest import tiny_model_dir

    model = tiny_model("LlamaForCausalLM")
    windows = token_batch(4, 16)
    with pytest.raises(OutlierqError, match="must be the last step"):
        compress(copy.deepcopy(model), None, "rotate_down+smoothquant", None, windows, progress=False)
    stats = calibrate(model, windows, progress=False)
    with pytest.raises(OutlierqError, match="not statistics"):
        compress(copy.deepcopy(model), None, "rotate_down", W8A8(), stats, progress=False)
    m = copy.deepcopy(model)
    stale = mitigate(m, calibrate(m, windows, progress=False), [RotateDown()])
    with pytest.raises(OutlierqError, match="stale after rotate_down"):
        quantize_(m, W8A8(act="tensor"), stale, progress=False)
    with pytest.raises(OutlierqError, match="LLM.int8"):
        quantize_(m, LLMInt8(), None, progress=False)
    q = copy.deepcopy(model)
    compress(q, None, "rotate_down:block=none", W8A8(), windows, progress=False)
    with pytest.raises(OutlierqError, match="in memory only"):
        export(q, tmp_path / "ckpt", char_tokenizer())
    assert not (tmp_path / "ckpt").exists()
    src = tiny_model_dir(tmp_path / "src", "LlamaForCausalLM")
    with pytest.raises(OutlierqError, match="drop --sequential"):
        sequential.run(src, tmp_path / "out", None, "rotate_down", W8A8(), windows)


def test_rotate_down_on_a_bf16_model_and_the_cli_refusal(tmp_path):
    from outlierq.cli import main
    from conftest import tiny_model_dir

    model = tiny_model("LlamaForCausalLM").to(torch.bfloat16)
    x, windows = token_batch(2, 24), token_batch(8, 24, seed=3)
    ref = model(input_ids=x).logits.float()

    def err(recipe):
        m = copy.deepcopy(model)
        res = compress(m, None, recipe, None, windows, progress=False)
        return _rel(m(input_ids=x).logits.float(), ref), m, res

    e_rot, m, res = err("rotate_down:block=none")
    down = decoder_layers(m)[0].mlp.down_proj
    assert down.weight.dtype == torch.bfloat16 and down.input_rotation.a.dtype == torch.float32
    e_block, m, _ = err("rotate_down")  # the servable block: its +-1 matrix held exactly in bf16
    rot = decoder_layers(m)[0].mlp.down_proj.input_rotation
    assert rot.matrix.dtype == torch.bfloat16 and set(rot.matrix.float().unique().tolist()) == {-1.0, 1.0}
    assert e_block < 0.015
    assert e_rot < 0.015  # bf16 rounding of the rotated weights (measured 0.009)
    e_sq, e_both = err("smoothquant:alpha=0.5")[0], err("smoothquant:alpha=0.5+rotate_down")[0]
    assert e_both < e_sq + 0.005  # (smoothing alone costs 0.022 in bf16; the rotation ~0)
    assert "recalibrate" not in res.stats.meta
    src = tiny_model_dir(tmp_path / "src", "LlamaForCausalLM")
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q"), "--recipe",
                 "smoothquant+rotate_down:block=none"]) == 2
    assert not (tmp_path / "q").exists()


def test_statistics_passed_in_recalibrate_on_their_windows():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows, x = token_batch(8, 24, seed=3), token_batch(2, 24)
    recipe, scheme = "smoothquant:alpha=0.5+rotate_down", W8A8(act="tensor")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    compress(a, None, recipe, scheme, windows, progress=False)
    compress(b, None, recipe, scheme, calibrate(b, windows, progress=False), progress=False, recalibrate_on=windows)
    torch.testing.assert_close(a(input_ids=x).logits, b(input_ids=x).logits, rtol=0, atol=0)


def test_a_padded_rotation_keeps_the_function_and_quantizes():
    model = tiny_model("LlamaForCausalLM", outliers=True, intermediate_size=100)
    m_, _, _ = plan(100, 64)
    assert m_ > 100
    x, windows = token_batch(2, 24), token_batch(8, 24, seed=3)
    ref = model(input_ids=x).logits
    m = copy.deepcopy(model)
    compress(m, None, "rotate_down:block=none", None, windows, progress=False)
    assert decoder_layers(m)[0].mlp.down_proj.weight.shape == (64, m_)
    assert _rel(m(input_ids=x).logits, ref) < 1e-5
    q = copy.deepcopy(model)
    res = compress(q, None, "rotate_down:block=none", W8A8(act="tensor"), windows, progress=False)
    assert res.stats.inputs["model.layers.0.mlp.down_proj"].absmax.shape == (m_,)
    plain = copy.deepcopy(model)
    compress(plain, None, "none", W8A8(act="tensor"), windows, progress=False)
    # (the planted residual outliers dominate both errors; the padded rotation must not add to them)
    assert _rel(q(input_ids=x).logits, ref) < 1.2 * _rel(plain(input_ids=x).logits, ref)


def test_value_histogram_and_act_clip_search_against_brute_force():
    from outlierq.calibration import VALUE_BINS_PER_OCTAVE, value_bin_centres, value_histogram
    from outlierq.quant import ACT_CLIP_GRID, act_clip_search

    g = torch.Generator().manual_seed(0)
    # rotated-like values: Gaussian tokens with log-normal norms, a few of them far larger
    x = torch.randn(4000, 64, generator=g) * torch.exp(1.5 * torch.randn(4000, 1, generator=g))
    hist = value_histogram(x)
    assert hist.shape == (2, value_bin_centres().numel()) and int(hist[0].sum()) == x.numel()
    centres = value_bin_centres()
    k = torch.bucketize(x.abs().flatten().double(), centres * 2 ** (-0.5 / VALUE_BINS_PER_OCTAVE), right=True) - 1
    # the bins' lower edges, in float64: float32's log2 puts a few values in 1e5 across an edge
    assert (torch.bincount(k, minlength=hist.shape[1]) - hist[0]).abs().sum() <= 1e-4 * x.numel()
    # row 1: each value weighted by 1 / its token's mean square, so every token weighs 1 in all
    ms = x.double().pow(2).mean(1, keepdim=True)
    weighted = torch.bincount(k, weights=(1 / ms).expand_as(x).flatten(), minlength=hist.shape[1])
    # (every token's weighted squares sum to its width: 64 x 4000 tokens, up to the bins' widths)
    assert abs((centres ** 2 * hist[1]).sum().item() / (64 * 4000) - 1) < 0.01
    assert (weighted - hist[1]).abs().sum() <= 1e-3 * hist[1].sum()

    amax = x.abs().max().item()

    def err(r, per_token):  # brute force: quantize every value on the step and measure
        s = r * amax / 127
        e = ((x / s).round().clamp(-127, 127) * s - x).double().pow(2)
        return (e / ms if per_token else e).mean().item()

    for row, per_token in ((0, False), (1, True)):
        chosen, best = act_clip_search(hist[row], amax), min(ACT_CLIP_GRID, key=lambda r: err(r, per_token))
        assert chosen < 0.8  # the max is a rare token here: clipping pays
        assert err(chosen, per_token) < 1.03 * err(best, per_token) < 0.8 * err(1.0, per_token)
    # weighing every token alike clips harder: the large-norm tokens that set the max count less
    assert act_clip_search(hist[1], amax) < act_clip_search(hist[0], amax)
    # a flat distribution up to its max: nothing to gain from clipping
    assert act_clip_search(value_histogram(torch.rand(10000, 1, generator=g) * 5)[0], 5.0) >= 0.97


def test_act_clip_sets_the_rotated_static_ranges_only():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows = token_batch(8, 24, seed=3)
    recipe = "smoothquant:alpha=0.5+rotate_down"
    with pytest.raises(OutlierqError, match="act='tensor'"):
        W8A8(act="token", act_clip=True)
    with pytest.raises(OutlierqError, match="auto, token or value"):
        W8A8(act="tensor", act_clip=True, act_clip_objective="mse")
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    plain = compress(a, None, recipe, W8A8(act="tensor", act_clip=False), windows, progress=False)
    clipped = compress(b, None, recipe, W8A8(act="tensor"), windows, progress=False)  # (on by default)
    from outlierq.calibration import value_histogram
    from outlierq.quant import act_clip_search

    assert clipped.record["act_clip_objective"] == "value"  # "auto" on Llama: no output norms
    # the histogram is of every rotated value the down_proj saw (hooked on the float model)
    f = copy.deepcopy(model)
    compress(f, None, recipe, None, windows, progress=False)
    seen = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(
        lambda mod, args, out, i=i: seen.__setitem__(i, seen.get(i, 0) + value_histogram(mod.input_rotation(args[0]))))
        for i, layer in enumerate(decoder_layers(f))]
    with torch.no_grad():
        f(input_ids=windows)  # (one batch of 8, as compress calibrates)
    for h in hooks:
        h.remove()
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    for i in seen:
        name = f"model.layers.{i}.mlp.down_proj"
        assert torch.equal(clipped.stats.value_hists[name], seen[i])
        ratio = act_clip_search(seen[i][0], (ma[name].input_scale * 127).item())
        assert clipped.record["act_clip"][name] == ratio
        torch.testing.assert_close(mb[name].input_scale, ma[name].input_scale * ratio, rtol=1e-6, atol=0)
    assert set(clipped.record["act_clip"]) == {f"model.layers.{i}.mlp.down_proj" for i in seen}
    for n, mod in ma.items():  # every unrotated static range stays at the max
        if isinstance(mod, Int8Linear) and "down_proj" not in n:
            assert torch.equal(mod.input_scale, mb[n].input_scale)
    assert "act_clip" not in plain.record
    f2 = copy.deepcopy(model)
    compress(f2, None, recipe, None, windows, progress=False)
    old = copy.deepcopy(clipped.stats)  # statistics from before the weighted row was kept
    old.value_hists = {k: v[0].long() for k, v in old.value_hists.items()}
    for stale in (old, dataclasses.replace(clipped.stats, value_hists={})):  # or any histogram
        with pytest.raises(OutlierqError, match="no value histograms"):
            quantize_(f2, W8A8(act="tensor", act_clip=True), stale, progress=False)
    assert not any(isinstance(m, Int8Linear) for m in f2.modules())  # refused before any change


@pytest.mark.parametrize("arch,objective,auto", [("LlamaForCausalLM", "token", "value"),
                                                  ("Gemma3ForCausalLM", "value", "token")])
def test_act_clip_objective_picks_the_histogram_row(arch, objective, auto):
    """"auto" weighs every token alike where the family normalises sublayer outputs per token
    (Gemma), every value alike elsewhere; an explicit objective overrides it."""
    from outlierq.quant import act_clip_search

    model = tiny_model(arch, outliers=True)
    windows = token_batch(8, 24, seed=3)
    for chosen, expected in (("auto", auto), (objective, objective)):
        m = copy.deepcopy(model)
        res = compress(m, None, "rotate_down", W8A8(act="tensor", act_clip=True, act_clip_objective=chosen),
                       windows, progress=False)
        assert res.record["act_clip_objective"] == expected
        amax = {n: res.stats.input_absmax(n).max().item() for n in res.record["act_clip"]}
        row = 1 if expected == "token" else 0
        assert res.record["act_clip"] == {n: act_clip_search(res.stats.value_hists[n][row], a)
                                          for n, a in amax.items()}


def test_value_histograms_persist_and_merge(tmp_path):
    from outlierq.calibration import ActivationStats

    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows = token_batch(8, 24, seed=3)
    compress(model, None, "rotate_down", None, windows, progress=False)
    st = calibrate(model, windows, progress=False)
    assert len(st.value_hists) == len(decoder_layers(model))
    st.save(tmp_path / "s.safetensors")
    back = ActivationStats.load(tmp_path / "s.safetensors")
    assert back.value_hists.keys() == st.value_hists.keys()
    assert all(torch.equal(back.value_hists[k], v) for k, v in st.value_hists.items())
    halves = [calibrate(model, w, progress=False) for w in (windows[:4], windows[4:])]
    merged = halves[0].merge(halves[1])
    for k, v in st.value_hists.items():  # (the weighted row sums in another order)
        torch.testing.assert_close(merged.value_hists[k], v, rtol=1e-12, atol=0)


def test_act_clip_without_a_rotated_input_says_so():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    windows = token_batch(8, 24, seed=3)
    with pytest.warns(OutlierqNotice, match="no static Linear reads a rotated input"):
        res = compress(model, None, "smoothquant:alpha=0.5", W8A8(act="tensor", act_clip=True), windows,
                       progress=False)
    assert "act_clip" not in res.record


def test_rotate_down_all_inputs_lets_act_clip_reach_every_linear():
    model = tiny_model("Gemma3ForCausalLM", outliers=True)
    windows = token_batch(8, 24, seed=3)
    x = token_batch(2, 24)
    m = copy.deepcopy(model)
    res = compress(m, None, "smoothquant:alpha=0.5+rotate_down:inputs=all", W8A8(act="tensor", act_clip=True),
                   windows, progress=False)
    layers = len(decoder_layers(m))
    assert len(res.record["act_clip"]) == 7 * layers  # q, k, v, o, gate, up, down
    assert res.record["act_clip_objective"] == "token"
    f = copy.deepcopy(model)
    compress(f, None, "smoothquant:alpha=0.5", W8A8(act="tensor"), windows, progress=False)
    # (the planted outliers dominate the plain static error; every clipped rotated range must beat it)
    assert _rel(m(input_ids=x).logits, model(input_ids=x).logits) < _rel(f(input_ids=x).logits, model(input_ids=x).logits)


def test_block_rotation_is_the_block_diagonal_hadamard_vllm_applies():
    from outlierq.mitigate.rotate_down import _dividing_order, block_rotation

    rot = block_rotation(12, seed=5, dtype=torch.float32)  # a Paley order: +-1 entries, M M^T = 12 I
    m = rot.matrix.double()
    assert set(m.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(m @ m.t(), 12 * torch.eye(12, dtype=torch.float64), rtol=0, atol=0)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    dense = torch.block_diag(*[m / 12 ** 0.5] * 4)  # vLLM: x.unflatten(-1, (-1, 12)) @ (M / sqrt(12))
    torch.testing.assert_close(rot(x), x @ dense, rtol=0, atol=1e-12)
    w = torch.randn(7, 48, dtype=torch.float64)
    torch.testing.assert_close(rot.fold(w), w @ dense, rtol=0, atol=1e-12)
    assert (_dividing_order(1536, 128), _dividing_order(2048, 128), _dividing_order(576, 128)) == (128, 128, 96)
    assert _dividing_order(1612, 128) == 4 and _dividing_order(40, 128) == 40
    with pytest.raises(OutlierqError, match="Hadamard order"):
        RotateDown(block=100)
    with pytest.raises(OutlierqError, match="block=none"):
        RotateDown(kind="random")


def test_block_rotation_shares_one_block_and_says_when_the_width_is_awkward():
    model = tiny_model("LlamaForCausalLM", outliers=True, intermediate_size=100)  # 100 = 20 x 5
    x = token_batch(2, 24)
    ref = model(input_ids=x).logits
    m = copy.deepcopy(model)
    with pytest.warns(OutlierqNotice, match="Hadamard 20 .100 wide.*split:multiple=64"):
        mitigate(m, calibrate(m, token_batch(4, 16, seed=3), progress=False), [RotateDown(block=64)])
    rots = [layer.mlp.down_proj.input_rotation for layer in decoder_layers(m)]
    assert all(r is rots[0] for r in rots) and rots[0].matrix.shape == (20, 20)
    assert _rel(m(input_ids=x).logits, ref) < 1e-5
    # split pads its new size to a multiple the block divides
    s = copy.deepcopy(model)
    compress(s, None, "split:ratio=2,multiple=32+rotate_down:block=32", None, token_batch(8, 16, seed=3),
             progress=False)
    down = decoder_layers(s)[0].mlp.down_proj
    assert down.in_features % 32 == 0 and down.in_features > 100 and down.input_rotation.matrix.shape == (32, 32)
    assert _rel(s(input_ids=x).logits, ref) < 1e-5


def test_deal_order_puts_the_largest_channels_and_split_parts_in_different_blocks():
    from outlierq.mitigate.rotate_down import deal_order

    g = torch.Generator().manual_seed(0)
    absmax = torch.rand(96, generator=g)
    absmax[[3, 50, 94, 95]] = torch.tensor([40.0, 30.0, 20.0, 20.0])  # 94 and 95: parts of one split channel
    order = deal_order(absmax, 16)  # 6 blocks
    assert sorted(order.tolist()) == list(range(96))  # a permutation
    block_of = {int(c): p // 16 for p, c in enumerate(order)}
    # brute force: the k-th largest channel sits in block k mod 6, and every block's channels
    # are in descending order
    ranked = sorted(range(96), key=lambda c: (-absmax[c].item(), c))
    assert all(block_of[c] == k % 6 for k, c in enumerate(ranked))
    assert len({block_of[c] for c in (3, 50, 94, 95)}) == 4
    for b in range(6):
        vals = absmax[order[16 * b:16 * (b + 1)]]
        assert torch.equal(vals, vals.sort(descending=True).values)
    with pytest.raises(OutlierqError, match="needs block=B"):
        RotateDown(block=None, deal=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_deal_keeps_the_function(family):
    model = tiny_model(family, outliers=True)
    spec = get_arch(model)
    if spec.mlp is None:  # no MLP layout to permute: refused (or rotate_down skipped, MoE)
        refused = [p for p in spec.pairs if p.kind == "mlp"]
        with pytest.raises(OutlierqError, match="deal=true needs") if refused else \
                pytest.warns(OutlierqNotice, match="no dense MLP"):
            compress(copy.deepcopy(model), None, "rotate_down:block=16,deal=true", None,
                     token_batch(8, 16, seed=3), progress=False)
        return
    x = token_batch(2, 24)
    ref = model(input_ids=x).logits
    d = copy.deepcopy(model)
    compress(d, None, "split:ratio=1.5,multiple=16+rotate_down:block=16,deal=true", None,
             token_batch(8, 16, seed=3), progress=False)
    assert _rel(d(input_ids=x).logits, ref) < 1e-5


def test_deal_spreads_a_split_channel_over_blocks_and_lowers_the_static_range():
    model = tiny_model("LlamaForCausalLM")
    with torch.no_grad():  # a massive intermediate channel (same function): up row x50, down column /50
        for layer in decoder_layers(model):
            layer.mlp.up_proj.weight[5] *= 50
            layer.mlp.down_proj.weight[:, 5] /= 50
    windows = token_batch(16, 24, seed=3)

    def down_range(deal: bool) -> float:
        m = copy.deepcopy(model)
        compress(m, None, f"split:ratio=8,multiple=32+rotate_down:block=32,deal={str(deal).lower()}",
                 W8A8(act="tensor", fake=True, act_clip=False), windows, progress=False)
        return max(layer.mlp.down_proj.input_scale.item() for layer in decoder_layers(m))

    # undealt, split appends channel 5's parts side by side in the last block, where the Hadamard
    # block adds them back up; dealt, each part has a block of its own
    assert down_range(True) < 0.6 * down_range(False)


@pytest.mark.parametrize("act,inputs", [("token", "down"), ("tensor", "all")])
def test_block_rotation_exports_as_a_transform_and_reloads_bit_identically(tmp_path, act, inputs):
    import json

    from outlierq.checkpoint import load

    model = tiny_model("LlamaForCausalLM", outliers=True, intermediate_size=128)
    windows, x = token_batch(8, 24, seed=3), token_batch(2, 24)
    q = copy.deepcopy(model)
    compress(q, None, f"smoothquant:alpha=0.5+rotate_down:block=32,inputs={inputs}", W8A8(act=act), windows,
             progress=False)
    export(q, tmp_path / "ckpt", char_tokenizer())
    tc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]["transform_config"]
    (name, scheme), = tc["config_groups"].items()
    assert (name, scheme["type"], scheme["head_dim"]) == ("R4_32", "random-hadamard", 32)
    (args,), = [scheme["apply"]]
    assert args["location"] == "input" and not args["inverse"]
    from outlierq.quant import matches  # (compressed-tensors' rule: re.match on the full name)
    for root in ("model.", "language_model.model."):  # (vLLM renames some families' root)
        assert matches(f"{root}layers.1.mlp.down_proj", args["targets"])
        assert not matches(f"{root}layers.1.mlp.up_proj", args["targets"]) or inputs == "all"
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    stored = sorted(k for k in sd if k.endswith(".R4_32_input.weight"))
    want = 2 * (1 if inputs == "down" else 7)  # every rotated Linear of both layers holds the block
    assert len(stored) == want and all(torch.equal(sd[k], sd[stored[0]]) for k in stored)
    r, _ = load(tmp_path / "ckpt")
    assert torch.equal(r(input_ids=x).logits, q(input_ids=x).logits)
    assert isinstance(decoder_layers(r)[1].mlp.down_proj, Int8Linear)
    with pytest.raises(OutlierqError, match="fp format has no transform"):
        f = copy.deepcopy(model)
        compress(f, None, "rotate_down:block=32", None, windows, progress=False)
        export(f, tmp_path / "fp", fmt="fp")


def test_a_transform_outlierq_does_not_apply_is_refused():
    from outlierq.checkpoint import _load_rotations

    model = tiny_model("LlamaForCausalLM")
    for bad in ({"type": "random-matrix", "head_dim": 32}, {"type": "hadamard", "head_dim": None},
                {"type": "hadamard", "head_dim": 32, "location": "output"}):
        args = {"targets": ["re:.*down_proj$"], "location": bad.pop("location", "input")}
        qc = {"transform_config": {"config_groups": {"R": {**bad, "apply": [args]}}}}
        with pytest.raises(OutlierqError, match="not one outlierq applies"):
            _load_rotations(model, qc, {})


def test_cli_with_saved_statistics_recalibrates_on_the_flags_windows(tmp_path):
    import json

    from outlierq.cli import main
    from conftest import tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", "LlamaForCausalLM")
    quick = ["--samples", "4", "--seqlen", "16", "--batch-size", "2"]
    assert main(["calibrate", "--model", str(src), "--out", str(tmp_path / "s.safetensors")] + quick) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["quantize", "--model", str(src), "--stats", str(tmp_path / "s.safetensors"), "--recipe",
                     "smoothquant:alpha=0.5+rotate_down:block=32", "--out", str(tmp_path / "q")] + quick) == 0
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert list(qc["transform_config"]["config_groups"]) == ["R4_32"]
