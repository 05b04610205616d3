"""Perplexity under one fixed protocol (../shared/data/README.md).

Tokenize the whole text once, cut non-overlapping windows of `seqlen` tokens from the start, drop
the remainder, mean token NLL over all windows, ppl = exp(mean). No BOS is inserted per window."""
from __future__ import annotations

import math
import time
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


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int = 2048, windows: int | None = None,
               progress: bool = True, reference: nn.Module | None = None) -> PplResult:
    """Perplexity of `model` on the 1-D token tensor `ids` (see the module doc for the protocol).
    With `reference` (e.g. the float model), also the mean KL divergence of `model`'s next-token
    distribution from the reference's and their top-1 agreement, on the same tokens."""
    check_seqlen(model, seqlen)
    wins = eval_windows(ids, seqlen, windows)
    device = next(model.parameters()).device
    total = kl = 0.0
    agree = 0
    dt = 0.0
    for w in tqdm(wins, desc="perplexity", unit="window", disable=not progress):
        t0 = time.perf_counter()
        logits = model(input_ids=w[None].to(device), use_cache=False).logits[0, :-1].float()
        dt += time.perf_counter() - t0  # the model's own time (not the reference's)
        total += F.cross_entropy(logits, w[1:].to(device), reduction="sum").item()
        if reference is not None:
            ref = reference(input_ids=w[None].to(device), use_cache=False).logits[0, :-1].float()
            lp, lr = F.log_softmax(logits, -1), F.log_softmax(ref, -1)
            kl += F.kl_div(lp, lr, log_target=True, reduction="sum").item()
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
    if not math.isfinite(total):
        raise OutlierqError(f"perplexity is not finite: {first_nonfinite(model, wins, device)}")
    n_pred = wins.shape[0] * (seqlen - 1)
    nll = total / n_pred
    return PplResult(ppl=math.exp(nll), nll=nll, windows=wins.shape[0],
                     windows_available=ids.numel() // seqlen, seqlen=seqlen,
                     tokens=int(wins.numel()), seconds=dt, tokens_per_s=wins.numel() / dt,
                     kl=kl / n_pred if reference is not None else None,
                     top1=agree / n_pred if reference is not None else None)
