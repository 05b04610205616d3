"""Perplexity under one fixed protocol (../shared/data/README.md).

Tokenize the whole text once, cut non-overlapping windows of `seqlen` tokens from the start, drop
the remainder, mean token NLL over all windows, ppl = exp(mean). No BOS is inserted per window."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import check_seqlen, eval_windows
from .errors import OutlierqError


@torch.no_grad()
def first_nonfinite(model: nn.Module, wins: torch.Tensor, device) -> str:
    """Where NaN/Inf first appear: the first module (in execution order) whose output is not
    finite, on the first window whose loss is not."""
    for i, w in enumerate(wins):
        seen: list[str] = []

        def hook(name):
            def h(mod, args, out):
                t = out[0] if isinstance(out, tuple) else out
                if not seen and torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                    seen.append(name)
            return h
        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
        try:
            model(input_ids=w[None].to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if seen:
            return (f"non-finite activations first appear in {seen[0]} (window {i}); try "
                    "--dtype float32, or check the checkpoint")
    return "the loss overflowed although every activation is finite"


@dataclass
class PplResult:
    ppl: float
    nll: float
    windows: int
    windows_available: int
    seqlen: int
    tokens: int
    seconds: float
    tokens_per_s: float
    # against a reference model (llama.cpp's convention): mean KL(P_ref || P_model) over the
    # predicted tokens, in nats, and the share of them where both pick the same top-1 token
    kl: float | None = None
    top1: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


# Rows of logits per log-softmax in the KL: a whole window of a 262k-vocabulary model is 2 GB per
# [seqlen, vocab] tensor. The unchunked KL took 13.7 s per window on Gemma-3 here (once, 2 cores)
# and held four such tensors (two log-softmaxes, kl_div's elementwise output): ~8 GB by their sizes.
# 256 rows at a time took 3.2 s.
KL_CHUNK = 256


def log_probs_(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension of [rows, vocab] logits, in place, KL_CHUNK rows at a
    time (no second [rows, vocab] tensor); returns `logits`."""
    for i in range(0, logits.shape[0], KL_CHUNK):
        logits[i:i + KL_CHUNK] = F.log_softmax(logits[i:i + KL_CHUNK], -1)
    return logits


def kl_per_token(logits: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || softmax(logits)) of each row [rows], in nats; `ref_log_probs` from `log_probs_`."""
    return torch.cat([F.kl_div(F.log_softmax(logits[i:i + KL_CHUNK].float(), -1), ref_log_probs[i:i + KL_CHUNK],
                               log_target=True, reduction="none").sum(-1)
                      for i in range(0, logits.shape[0], KL_CHUNK)])


def kl_sum(logits: torch.Tensor, ref_log_probs: torch.Tensor) -> float:
    """sum over rows of `kl_per_token`."""
    return kl_per_token(logits, ref_log_probs).sum().item()


def top_log_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A reference distribution kept small: the ids of each row's k most likely tokens [rows, k],
    their log-probabilities [rows, k], and the log-probability of all the others [rows] (-inf when
    there are none). 3 MB per 512 rows at k=256, where full log-probabilities on a 262k vocabulary
    are 537 MB; for `coarse_kl_sum`."""
    lp = log_probs_(logits.float().clone())
    top, idx = lp.topk(min(k, lp.shape[-1]), -1)
    return idx, top, _rest(lp, idx)


def _rest(lp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability outside `idx` in each row of log-probabilities `lp`, summed from
    the others (1 - the top's sum rounds to 0 or below for confident rows)."""
    return lp.scatter(-1, idx, -torch.inf).logsumexp(-1)


def coarse_kl_sum(logits: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """Sum over rows of KL(P_ref || softmax(logits)) with both distributions coarsened to the
    reference's top-k tokens and one bucket for every other token (`ref` from `top_log_probs`).
    Never more than the full KL (merging outcomes loses information); equal to it when the bucket
    is empty."""
    idx, p_top, p_rest = ref
    total = 0.0
    for i in range(0, logits.shape[0], KL_CHUNK):
        rows = slice(i, i + KL_CHUNK)
        lq = F.log_softmax(logits[rows].float(), -1)
        q_top, q_rest, pt, pr = lq.gather(-1, idx[rows]), _rest(lq, idx[rows]), p_top[rows], p_rest[rows]
        # the bucket's term is 0 where the reference puts nothing in it
        kl = (pt.exp() * (pt - q_top)).sum(-1) + torch.where(pr > -torch.inf, pr.exp() * (pr - q_rest), 0.0)
        total += kl.sum().item()
    return total


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, windows: int | None = None,
               progress: bool = True, reference: nn.Module | None = None) -> PplResult:
    """Perplexity of `model` on the 1-D token tensor `ids` (see the module doc for the protocol).
    With `reference` (e.g. the float model), also the mean KL divergence of `model`'s next-token
    distribution from the reference's and their top-1 agreement, on the same tokens."""
    return perplexities([model], ids, seqlen, windows, progress, reference)[0]


@torch.no_grad()
def perplexities(models: Sequence[nn.Module], ids: torch.Tensor, seqlen: int = 2048,
                 windows: int | None = None, progress: bool = True,
                 reference: nn.Module | None = None) -> list[PplResult]:
    """`perplexity` of several models in one pass over the windows, so that the reference's
    forward pass (as costly as a model's) runs once per window for all of them."""
    for model in models:
        check_seqlen(model, seqlen)
    wins = eval_windows(ids, seqlen, windows)
    device = next(models[0].parameters()).device
    n = len(models)
    total, kl, agree, dt = [0.0] * n, [0.0] * n, [0] * n, [0.0] * n
    for w in tqdm(wins, desc="perplexity", unit="window", disable=not progress):
        x = w[None].to(device)
        # (log-probabilities in place: the top-1 token is the same as the logits')
        ref = None if reference is None else log_probs_(reference(input_ids=x, use_cache=False).logits[0, :-1].float())
        for j, model in enumerate(models):
            t0 = time.perf_counter()
            logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
            dt[j] += time.perf_counter() - t0  # the model's own time (not the reference's)
            total[j] += F.cross_entropy(logits, w[1:].to(device), reduction="sum").item()
            if ref is not None:
                kl[j] += kl_sum(logits, ref)
                agree[j] += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            del logits
    n_pred = wins.shape[0] * (seqlen - 1)
    out = []
    for j, model in enumerate(models):
        if not math.isfinite(total[j]):
            raise OutlierqError(f"perplexity is not finite: {first_nonfinite(model, wins, device)}")
        nll = total[j] / n_pred
        out.append(PplResult(ppl=math.exp(nll), nll=nll, windows=wins.shape[0],
                             windows_available=ids.numel() // seqlen, seqlen=seqlen,
                             tokens=int(wins.numel()), seconds=dt[j], tokens_per_s=wins.numel() / dt[j],
                             kl=kl[j] / n_pred if reference is not None else None,
                             top1=agree[j] / n_pred if reference is not None else None))
    return out
