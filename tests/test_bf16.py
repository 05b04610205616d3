"""bf16 end to end: a model loaded in bfloat16 calibrates, mitigates (surgery in float64, cast
once), quantizes, exports, reloads and evaluates; layer by layer too."""
import copy

import pytest
import torch
from safetensors.torch import load_file

from outlierq import load_model, perplexity, sequential
from outlierq.checkpoint import export, load
from outlierq.mitigate.recipe import mitigate
from outlierq.pipeline import compress
from outlierq.quant import W8A8
from conftest import token_batch, tiny_model_dir

RECIPE = "split:ratio=4+smoothquant:alpha=search,act={act}"


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
@pytest.mark.parametrize("family", ["LlamaForCausalLM", "Gemma3ForCausalLM", "MixtralForCausalLM", "GPT2LMHeadModel"])
def test_bf16_pipeline_end_to_end(family, tmp_path):
    src = tiny_model_dir(tmp_path / "src", family)
    x = token_batch(2, 24, seed=5)
    windows = token_batch(16, 24, seed=3)
    model, tok = load_model(str(src), "bfloat16")
    assert model.dtype == torch.bfloat16
    twin = copy.deepcopy(model).float()  # the same bf16 weights, held in float32
    before = twin(input_ids=x).logits
    res = compress(model, tok, RECIPE, None, windows, progress=False)
    mitigate(twin, res.stats_before, res.recipe, check_stats=False)
    # a layer is held in float32 while the recipe runs, then cast once: bit-equal to the
    # float32 twin rounded to bf16 (two steps rescaling v_proj do not round twice)
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), n
    after = twin(input_ids=x).logits  # and unrounded, the function is unchanged
    assert ((after - before).norm() / before.norm()).item() < 1e-5
    ref = before.float()
    model, tok = load_model(str(src), "bfloat16")
    res = compress(model, tok, RECIPE, W8A8(act="tensor"), windows, progress=False)
    q = model(input_ids=x).logits.float()
    assert torch.isfinite(q).all() and ((q - ref).norm() / ref.norm()).item() < 0.25
    out = export(model, tmp_path / "ckpt", tok, recipe=res.recipe, stats=res.stats)
    back, _ = load(out)
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back(input_ids=x).logits.float(), q, rtol=0, atol=0)
    assert perplexity(back, x.reshape(-1), 16, progress=False).ppl > 0
    # layer by layer, in bf16: the same export
    seq = sequential.run(src, tmp_path / "seq", tok, RECIPE, W8A8(act="tensor"), windows,
                         torch.bfloat16, progress=False)
    a, b = load_file(str(out / "model.safetensors")), {}
    for f in (tmp_path / "seq").glob("*.safetensors"):
        b.update(load_file(str(f)))
    assert seq["out"] is not None and a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
