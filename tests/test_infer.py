"""Structure inferred from the model and proven by folds (models/infer.py): it equals the
hand-written description of every family that has one, rolls back what it cannot prove, and the
class transformers builds decides."""
import json
import warnings

import pytest
import torch
import transformers as tf

from conftest import FAMILIES, char_tokenizer, tiny_model
from outlierq.errors import OutlierqError, OutlierqNotice
from outlierq.models.arch import NormGroup, LinearPair, get_arch, text_config
from outlierq.models.infer import _prove_group, _prove_pair, _logits, infer_arch, probe_ids


def _kind(spec, g, model):
    """A fold's kind, with LayerNorm without bias and RMSNorm the same fold (w / s)."""
    kind = g.kind or spec.norm_kind
    norm = model.get_submodule(spec.layers)[0].get_submodule(g.norm)
    return "rms" if kind == "layernorm" and getattr(norm, "bias", None) is None else kind


@pytest.mark.parametrize("family", FAMILIES)
def test_inferred_equals_hand_written(family):
    model = tiny_model(family, outliers=True)
    hand, found = get_arch(model), infer_arch(model)
    assert found.layers == hand.layers and found.final_norm == hand.final_norm
    # fused experts stay out of inferred groups (their layout is the hand-written override's)
    assert ({(g.norm, tuple(sorted(g.linears)), g.router, _kind(hand, g, model)) for g in hand.groups if not g.experts}
            == {(g.norm, tuple(sorted(g.linears)), g.router, _kind(found, g, model)) for g in found.groups})
    cfg, layer = text_config(model), model.get_submodule(hand.layers)[0]

    def maps(spec):
        return {(p.producer, p.consumer): (p.rows(cfg) if p.rows else torch.arange(layer.get_submodule(p.consumer).in_features))
                for p in spec.pairs}
    a, b = maps(hand), maps(found)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_proof_rolls_back_an_incomplete_group_and_a_wrong_row_map():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    layers = model.get_submodule("model.layers")
    ids = probe_ids(model)
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    assert _prove_group(model, layers, full, [0, 1], ids, ref) == "rms"
    # v_proj reads the norm too: a fold that leaves it out changes the logits
    part = NormGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj"))
    assert _prove_group(model, layers, part, [0, 1], ids, ref) is None
    pair = LinearPair("self_attn.v_proj", "self_attn.o_proj", "attn_vo")
    good = get_arch(model).pairs[0].rows(text_config(model))
    assert _prove_pair(model, layers, pair, good, [0, 1], ids, ref)
    assert not _prove_pair(model, layers, pair, good.roll(1), [0, 1], ids, ref)
    after = model.state_dict()  # every proof restored the weights exactly
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_inferred_family_smoothquant_keeps_logits_and_w8a8_covers_every_linear():
    import copy
    from outlierq import calibrate, compress
    from outlierq.quant import Int8Linear, W8A8

    torch.manual_seed(0)
    cfg = tf.Olmo3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.Olmo3ForCausalLM(cfg).eval().requires_grad_(False)
    spec = get_arch(model)
    assert spec.inferred and spec.pairs  # post-norm layout: pairs, no norm group feeds Linears
    ids = torch.randint(3, 128, (2, 32))
    stats = calibrate(model, ids, keep_rows=64, progress=False)
    ref = model(input_ids=ids).logits
    m = compress(copy.deepcopy(model), None, "smoothquant:alpha=0.5", None, stats, progress=False).model
    assert ((m(input_ids=ids).logits - ref).abs().max() / ref.abs().max()) < 1e-5
    q = compress(copy.deepcopy(model), None, "smoothquant:alpha=0.5", W8A8(act="token"), stats, progress=False).model
    layers = q.get_submodule(spec.layers)
    assert not [n for n, x in layers.named_modules() if type(x) is torch.nn.Linear]
    assert sum(isinstance(x, Int8Linear) for x in layers.modules()) == 14


def _save(model, path):
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)


def test_the_built_class_decides_over_the_label(tmp_path):
    """A Gemma 3n config labelled Gemma3ForCausalLM: transformers builds Gemma3nForCausalLM, and so
    does outlierq, saying so once (it used to take the hand-written Gemma 3 description)."""
    from zoo import build
    from outlierq.models import load_model

    _save(build("gemma3n_text"), tmp_path / "m")
    p = tmp_path / "m" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["architectures"] = ["Gemma3ForCausalLM"]
    p.write_text(json.dumps(cfg))
    with pytest.warns(OutlierqNotice, match="labels the model Gemma3ForCausalLM but transformers builds Gemma3nForCausalLM"):
        model, _ = load_model(str(tmp_path / "m"))
    assert type(model).__name__ == "Gemma3nForCausalLM" and get_arch(model).inferred


def test_missing_layers_are_refused_not_randomly_initialised(tmp_path, capsys):
    from outlierq.cli import main

    _save(tiny_model("LlamaForCausalLM"), tmp_path / "m")
    p = tmp_path / "m" / "config.json"
    cfg = json.loads(p.read_text())
    cfg["num_hidden_layers"] = 4
    p.write_text(json.dumps(cfg))
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["quantize", "--model", str(tmp_path / "m"), "--samples", "2", "--seqlen", "16",
                     "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [x for x in err.splitlines() if "error" in x]  # (transformers' loading progress bar aside)
    assert len(err) == 1 and "has no tensor 'model.layers.2." in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()
    with pytest.raises(OutlierqError):
        from outlierq.models import load_model
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize("family", ["LlamaForCausalLM", "Phi3ForCausalLM", "GPTNeoXForCausalLM", "OPTForCausalLM"])
def test_block_probe_of_wide_producers_finds_the_same_pairs(family, monkeypatch):
    """Real MLPs are wide: there each probe element scales 8 rows by 2, 4, ..., 256. Forced on
    every producer here, it must find the pairs and row maps that one row per element finds."""
    from outlierq.models import infer

    model = tiny_model(family, outliers=True)
    cfg, layer = text_config(model), model.get_submodule(get_arch(model).layers)[0]

    def maps(spec):
        return {(p.producer, p.consumer): (p.rows(cfg) if p.rows else torch.arange(layer.get_submodule(p.consumer).in_features))
                for p in spec.pairs}
    one = maps(infer_arch(model))
    monkeypatch.setattr(infer, "WIDE", 0)
    blocks = maps(infer_arch(model))
    assert one.keys() == blocks.keys() and all(torch.equal(one[k], blocks[k]) for k in one)
