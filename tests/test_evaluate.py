import math

import pytest
import torch

from outlierq import evaluate, perplexity
from outlierq.data import calib_windows, eval_windows
from outlierq.errors import OutlierqError
from conftest import tiny_model


def test_ppl_equals_reference_loop():
    model = tiny_model("LlamaForCausalLM")
    ids = torch.randint(0, 128, (32 * 5 + 7,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seqlen=32, progress=False)
    losses = []  # transformers' own shifted loss, window by window
    with torch.no_grad():
        for i in range(5):
            w = ids[i * 32:(i + 1) * 32][None]
            losses.append(model(input_ids=w, labels=w).loss.item())
    assert r.windows == 5 and r.tokens == 160
    assert r.ppl == pytest.approx(math.exp(sum(losses) / 5), rel=1e-6)
    assert perplexity(model, ids, 32, windows=2, progress=False).windows == 2


def test_windows_and_errors():
    ids = torch.arange(100)
    assert eval_windows(ids, 30).shape == (3, 30)
    with pytest.raises(OutlierqError, match="fewer than one window"):
        eval_windows(ids, 200)
    w = calib_windows(ids, 3, 20, seed=0)
    assert torch.equal(w, calib_windows(ids, 3, 20, seed=0))
    with pytest.raises(OutlierqError, match="fewer than"):
        calib_windows(ids, 10, 20)
    with pytest.raises(OutlierqError, match="exceeds the model's context"):
        perplexity(tiny_model("LlamaForCausalLM"), torch.arange(1000) % 128, seqlen=512)


def test_kl_and_top1_against_a_brute_force_loop(monkeypatch):
    monkeypatch.setattr(evaluate, "KL_CHUNK", 8)  # 31 rows per window: chunks of 8, 8, 8 and 7
    model, other = tiny_model("LlamaForCausalLM", seed=0), tiny_model("LlamaForCausalLM", seed=3)
    ids = torch.randint(0, 128, (32 * 3,), generator=torch.Generator().manual_seed(1))
    r = perplexity(other, ids, seqlen=32, progress=False, reference=model)
    kl = agree = 0.0
    with torch.no_grad():
        for i in range(3):
            w = ids[i * 32:(i + 1) * 32][None]
            p = torch.softmax(model(input_ids=w).logits[0, :-1].double(), -1)
            q = torch.softmax(other(input_ids=w).logits[0, :-1].double(), -1)
            kl += (p * (p.log() - q.log())).sum().item()
            agree += (p.argmax(-1) == q.argmax(-1)).sum().item()
    assert r.kl == pytest.approx(kl / 93, rel=1e-4) and r.top1 == pytest.approx(agree / 93)
    same = perplexity(model, ids, seqlen=32, progress=False, reference=model)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.top1 == 1.0


def test_kl_per_token_against_each_row(monkeypatch):
    monkeypatch.setattr(evaluate, "KL_CHUNK", 4)  # 10 rows: chunks of 4, 4 and 2
    g = torch.Generator().manual_seed(4)
    logits, ref = torch.randn(10, 50, generator=g), torch.randn(10, 50, generator=g)
    got = evaluate.kl_per_token(logits, evaluate.log_probs_(ref.clone()))
    p, q = torch.softmax(ref.double(), -1), torch.softmax(logits.double(), -1)
    want = torch.stack([(p[i] * (p[i].log() - q[i].log())).sum() for i in range(10)])
    assert got.shape == (10,) and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-7)
    assert evaluate.kl_sum(logits, evaluate.log_probs_(ref.clone())) == pytest.approx(want.sum().item(), rel=1e-5)


def test_coarse_kl_against_merged_distributions(monkeypatch):
    """coarse_kl_sum = the KL of the two distributions with every token outside the reference's
    top k merged into one outcome (float64, row by row); <= the full KL; = it when k is the
    vocabulary. One row is confident enough that 1 - its top's sum rounds to 0 in float32."""
    monkeypatch.setattr(evaluate, "KL_CHUNK", 4)
    g = torch.Generator().manual_seed(6)
    logits, ref = torch.randn(10, 50, generator=g) * 3, torch.randn(10, 50, generator=g) * 3
    ref[7, 0] = 40.0
    p, q = torch.softmax(ref.double(), -1), torch.softmax(logits.double(), -1)
    for k in (1, 5, 50):
        got = evaluate.coarse_kl_sum(logits, evaluate.top_log_probs(ref.clone(), k))
        want = 0.0
        for i in range(10):
            top = p[i].argsort(descending=True)[:k]
            rest = torch.ones(50, dtype=torch.bool)
            rest[top] = False
            pm = torch.cat([p[i][top], p[i][rest].sum()[None]])
            qm = torch.cat([q[i][top], q[i][rest].sum()[None]])
            want += torch.where(pm > 0, pm * (pm.log() - qm.log()), 0.0).sum().item()
        assert got == pytest.approx(want, rel=1e-4), k
        full = evaluate.kl_sum(logits, evaluate.log_probs_(ref.clone()))
        assert got <= full * (1 + 1e-5) and (k < 50 or got == pytest.approx(full, rel=1e-5))


def test_perplexities_share_the_reference_and_match_one_by_one():
    ref, a, b = (tiny_model("LlamaForCausalLM", seed=s) for s in (0, 3, 5))
    ids = torch.randint(0, 128, (32 * 3,), generator=torch.Generator().manual_seed(2))
    calls = []
    ref.register_forward_hook(lambda *_: calls.append(1))
    both = evaluate.perplexities([a, b], ids, seqlen=32, progress=False, reference=ref)
    assert len(calls) == 3  # one reference pass per window, for both models
    for model, r in zip((a, b), both):
        one = perplexity(model, ids, seqlen=32, progress=False, reference=ref)
        assert (r.ppl, r.kl, r.top1) == (one.ppl, one.kl, one.top1)
    assert both[0].ppl != both[1].ppl
