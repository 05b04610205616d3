"""Rotation of the residual stream: the Hadamard constructions are Hadamard, the function is
unchanged on every family (rotated where the layout allows, left alone with a notice elsewhere),
outliers are spread, and a rotated W8A8 export reloads in transformers."""
import copy
import warnings

import pytest
import torch

from outlierq import calibrate
from outlierq.checkpoint import export, load
from outlierq.errors import OutlierqError, OutlierqNotice
from outlierq.mitigate.recipe import mitigate
from outlierq.mitigate.rotate import Rotate, hadamard, rotation
from outlierq.models.arch import decoder_layers, get_arch, resolve
from outlierq.pipeline import compress
from outlierq.quant import W8A8
from conftest import FAMILIES, char_tokenizer, tiny_model, token_batch


@pytest.mark.parametrize("n", [1, 12, 20, 64, 576, 640, 896, 960, 3200])
def test_hadamard_constructions(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_no_construction_falls_back_to_a_random_orthogonal():
    assert hadamard(56) is None  # 56 = 8 x 7: no Paley order 7, 14, 28 or 56 here
    q, what = rotation(56, Rotate())
    assert what.startswith("random orthogonal")
    torch.testing.assert_close(q @ q.t(), torch.eye(56, dtype=torch.float64), rtol=0, atol=1e-12)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _mitigated_copy(model, cfg):
    """(a copy of model with the data-free step cfg applied, the notices it gave)."""
    m = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        mitigate(m, None, [cfg])
    return m, [str(w.message) for w in seen if w.category is OutlierqNotice]


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_preserves_the_function(family):
    model = tiny_model(family, outliers=True)
    spec = get_arch(model)
    x = token_batch(2, 24)
    ref = model(input_ids=x).logits
    m, notes = _mitigated_copy(model, Rotate())
    if not spec.rotatable:
        assert notes and "not rotatable" in notes[0]
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m.state_dict().values()))
        return
    assert not notes
    err = _rel(m(input_ids=x).logits, ref)
    if err >= 1e-5:  # fp32 noise of the planted 40x outliers: the float64 twin must do better
        m64, model64 = copy.deepcopy(model).double(), copy.deepcopy(model).double()
        mitigate(m64, None, [Rotate()])
        # (transformers' RMSNorms compute in float32 even in a float64 model: 1e-6, not 1e-12)
        assert err < 1e-4 and _rel(m64(input_ids=x).logits, model64(input_ids=x).logits) < 1e-6
    for layer in decoder_layers(m, spec):  # folded norms, rotated weights
        for g in spec.groups:
            assert torch.equal(resolve(layer, g.norm).weight, torch.ones_like(resolve(layer, g.norm).weight))
    assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight


def test_rotation_spreads_the_planted_outliers():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    x = token_batch(4, 32)

    def ratio(m):
        a = calibrate(m, x, progress=False).inputs["model.layers.1.self_attn.q_proj"].absmax
        return (a.max() / a.median()).item()

    m = copy.deepcopy(model)
    mitigate(m, None, [Rotate()])
    assert ratio(m) < ratio(model) / 3


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_rotate_composes_and_the_export_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("LlamaForCausalLM", outliers=True, tie_word_embeddings=True)
    x = token_batch(2, 24)
    windows = token_batch(16, 24, seed=3)
    ref = model(input_ids=x).logits
    m = copy.deepcopy(model)
    res = compress(m, None, "rotate+split:ratio=4+smoothquant:alpha=search", None, windows, progress=False)
    assert _rel(m(input_ids=x).logits, ref) < 1e-4
    assert res.record["rotation"].startswith("randomized Hadamard")
    q = copy.deepcopy(model)
    res = compress(q, None, "rotate+smoothquant:alpha=0.5", W8A8(act="tensor"), windows, progress=False)
    out = export(q, tmp_path / "ckpt", char_tokenizer(), recipe=res.recipe, stats=res.stats)
    ours = load(out)[0](input_ids=x).logits
    torch.testing.assert_close(ours, q(input_ids=x).logits, rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits
    assert _rel(hf, ours) < 0.05
    assert not AutoModelForCausalLM.from_pretrained(out).config.tie_word_embeddings


def test_rotate_must_come_first_and_runs_in_memory(tmp_path):
    from outlierq import sequential
    from conftest import tiny_model_dir

    model = tiny_model("LlamaForCausalLM")
    windows = token_batch(4, 16)
    with pytest.raises(OutlierqError, match="must come first"):
        compress(model, None, "smoothquant+rotate", None, windows, progress=False)
    with pytest.raises(OutlierqError, match="alone before calibrating"):
        mitigate(model, calibrate(model, windows, progress=False), [Rotate()])
    src = tiny_model_dir(tmp_path / "src", "LlamaForCausalLM")
    with pytest.raises(OutlierqError, match="not layer by layer"):
        sequential.run(src, tmp_path / "out", None, "rotate+smoothquant", W8A8(), windows)


@pytest.mark.parametrize("family", FAMILIES)
def test_rotate_heads_preserves_the_function(family):
    from outlierq.mitigate.rotate import RotateHeads

    model = tiny_model(family, outliers=True)
    spec = get_arch(model)
    x = token_batch(2, 24)
    ref = model(input_ids=x).logits
    m, notes = _mitigated_copy(model, RotateHeads())
    if not any(p.kind == "attn_vo" for p in spec.pairs):
        assert notes and "no v -> o pair" in notes[0]
        return
    assert not notes and m.outlierq_head_rotation.startswith("randomized Hadamard")
    assert _rel(m(input_ids=x).logits, ref) < 1e-5
    # o_proj's input is each head's output times Q (hooked on both models)
    pair = next(p for p in spec.pairs if p.kind == "attn_vo")
    seen_in = {}
    for name, mod in (("ref", model), ("rot", m)):
        cons = resolve(decoder_layers(mod, spec)[0], pair.consumer)
        h = cons.register_forward_hook(lambda _m, a, _o, name=name: seen_in.__setitem__(name, a[0]))
        mod(input_ids=x)
        h.remove()
    from outlierq.models.arch import _heads, text_config
    heads, _, hd = _heads(text_config(model))
    q = rotation(hd, Rotate())[0].float()
    a, b = seen_in["ref"], seen_in["rot"]
    torch.testing.assert_close(b, (a.reshape(*a.shape[:-1], heads, hd) @ q).reshape(a.shape), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, b, atol=1e-3)


def test_rotate_heads_composes_with_rotate():
    from outlierq.mitigate.rotate import RotateHeads

    model = tiny_model("LlamaForCausalLM", outliers=True)
    x = token_batch(2, 24)
    m = copy.deepcopy(model)
    mitigate(m, None, [Rotate(), RotateHeads()])
    assert m.outlierq_rotation and m.outlierq_head_rotation
    assert _rel(m(input_ids=x).logits, model(input_ids=x).logits) < 1e-4  # (rotate's fp32 bound above)


def test_rotate_heads_exports_and_act_clip_leaves_o_proj_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("Gemma3ForCausalLM", outliers=True)
    x = token_batch(2, 24)
    windows = token_batch(16, 24, seed=3)
    q = copy.deepcopy(model)
    # a per-head rotation leaves a massive head massive: act_clip must not clip o_proj's range
    with pytest.warns(OutlierqNotice, match="no static Linear reads a rotated input"):
        res = compress(q, None, "rotate_heads+smoothquant:alpha=0.5", W8A8(act="tensor", act_clip=True), windows,
                       progress=False)
    assert res.record["head_rotation"].startswith("randomized Hadamard") and "act_clip" not in res.record
    out = export(q, tmp_path / "ckpt", char_tokenizer(), recipe=res.recipe, stats=res.stats)
    ours = load(out)[0](input_ids=x).logits
    torch.testing.assert_close(ours, q(input_ids=x).logits, rtol=0, atol=0)
    hf = AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits
    assert _rel(hf, ours) < 0.05
