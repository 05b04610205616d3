"""A few end-to-end checks on the real built-in SmolLM2-135M (about a minute in all)."""
import copy

import pytest

from outlierq import calibrate, load_model, perplexity
from outlierq.data import calib_windows, read_text, tokenize
from outlierq.checkpoint import export
from outlierq.mitigate.recipe import mitigate
from outlierq.mitigate.smoothquant import SmoothQuant
from outlierq.quant import W8A8, quantize_

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_perplexity_reproduces_reference(smollm2):
    model, tok = smollm2
    ids = tokenize(tok, read_text("wikitext2", "eval"))
    assert ids.numel() == 304_986  # data/README.md's count for this tokenizer
    r = perplexity(model, ids, 2048, windows=4, progress=False)
    assert r.windows == 4 and abs(r.ppl - 24.15) <= 0.02  # plain transformers, same protocol


def test_massive_activation_and_export_roundtrip(smollm2, tmp_path):
    model, tok = smollm2
    wins = calib_windows(tokenize(tok, read_text("wikitext2", "calib")), 4, 256, seed=0)
    stats = calibrate(model, wins, batch_size=4, progress=False)
    res = stats.residual["model.layers.20"].absmax
    # SmolLM2 carries one massive residual channel, hundreds of times its layer's median, the
    # same channel in every later layer
    assert res.max() / res.median() > 100
    peaks = {int(stats.residual[f"model.layers.{i}"].absmax.argmax()) for i in range(12, 28)}
    assert peaks == {int(res.argmax())}
    m = copy.deepcopy(model)
    s = mitigate(m, stats, [SmoothQuant(0.5)])
    quantize_(m, W8A8(act="tensor"), s, progress=False)
    out = export(m, tmp_path / "ckpt", tok, stats=s)
    back, _ = load_model(str(out))
    ids = tokenize(tok, read_text("wikitext2", "eval"))[:1024]
    a = perplexity(m, ids, 512, progress=False).ppl
    b = perplexity(back, ids, 512, progress=False).ppl
    assert a == b
