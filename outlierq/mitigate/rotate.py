"""Rotation of the residual stream (QuaRot / SpinQuant "R1", Ashkboos et al. 2024), folded into
the weights: a data-free mitigation.

Every norm's weight is folded into the Linears that read it (the norm weight becomes 1), then the
residual stream x is replaced by x Q for an orthogonal Q: embeddings E -> E Q, every Linear that
reads a norm W -> W Q (an RMSNorm commutes with Q once its weight is 1: ||x Q|| = ||x||), every
Linear that writes the residual W -> Q^T W, and the head W -> W Q. The function is unchanged in
exact arithmetic; the massive activations that live in a few residual channels are spread over
all of them, so the inputs of q/k/v and gate/up quantize per token or per tensor with a much
smaller range. The result is a standard checkpoint (norm weights 1; a tied head is untied, which
adds a vocab x hidden float tensor to the export).

Q is a randomized Hadamard matrix H diag(+-1) / sqrt(n): H = Sylvester(2^k) (x) Paley(m) with m - 1
a prime = 3 mod 4 (576 = 8 x 72, 640 = 32 x 20, 3200 = 16 x 200, 896 = 4 x 224), else (no such
factorisation) a random orthogonal matrix (QR of a Gaussian), named in a notice.

Only families whose residual stream is read by RMSNorms alone and written by plain Linears:
Llama-like and Phi-3. Gemma's post-sublayer norms sit between o_proj/down_proj and the residual
(rotating would need an online rotation after them), LayerNorm subtracts the mean (needs a
centering fold), post-norm layouts and MoE are not rotated: those get a notice and are left as
they are. The online rotation before down_proj (R4) is `rotate_down`, in memory only.

`rotate_heads` is SpinQuant's "R2": the value rows of every attention head rotated by one
orthogonal head_dim x head_dim Q and the output projection's columns by the same Q. Attention mixes
the values of different positions, never their dimensions, so each head's output comes out
multiplied by Q and o_proj's columns undo it. Weights only, on every layout with a v -> o pair
(Gemma's post norms do not matter here): a standard checkpoint, and o_proj's input (the
attention output) is spread over each head's dimensions, but not across heads: act_clip leaves
its static range at the max (see `calibration.rotated_input`)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..errors import OutlierqError, OutlierqNotice
from ..models.arch import _heads, decoder_layers, get_arch, resolve, text_config
from .registry import Skipped, register
from .surgery import _f64, _set  # (computed in float64, cast to the weight's dtype once)


@dataclass(frozen=True)
class Rotate:
    seed: int = 0
    kind: Literal["hadamard", "random"] = "hadamard"

    def __post_init__(self):
        check_options("rotate", self.seed, self.kind)


def check_options(name: str, seed, kind: str) -> None:
    """The options every rotation step shares (rotate, rotate_down)."""
    if kind not in ("hadamard", "random"):
        raise OutlierqError(f"{name} kind must be hadamard or random, got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or seed != int(seed):
        raise OutlierqError(f"{name} seed must be an integer, got {seed!r}")


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def _paley(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 (Paley construction I, q prime, q = 3 mod 4)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in squares else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]             # Jacobsthal matrix, antisymmetric
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def _paley_order(n: int) -> int | None:
    """1 if n is a power of two, else the m with n = 2^k m and a Paley construction of order m
    (m - 1 a prime = 3 mod 4), else None: the orders `hadamard` can build."""
    if n & (n - 1) == 0:
        return 1
    for m in range(4, n + 1, 4):
        if n % m == 0 and (n // m) & (n // m - 1) == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3:
            return m
    return None


def has_hadamard(n: int) -> bool:
    """Whether `hadamard` can build order n."""
    return n >= 1 and _paley_order(n) is not None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I), or None if outlierq has no
    construction for n."""
    m = _paley_order(n)
    if m is None:
        return None
    return _sylvester(n) if m == 1 else torch.kron(_sylvester(n // m), _paley(m - 1))


def rotation(n: int, cfg: Rotate) -> tuple[torch.Tensor, str]:
    """An orthogonal n x n matrix (float64) and what it is. Hadamard: H diag(s) / sqrt(n), the
    seed's signs after the mixing, where they only flip channels that quantizers see by magnitude:
    `rotate`, `rotate_heads` and rotate_down's blocks round as a plain Hadamard would, whatever
    the seed (their measured results are those of the plain one; see `block_rotation` for what
    the signs first measured)."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    h = hadamard(n) if cfg.kind == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return h * signs[None, :] / math.sqrt(n), f"randomized Hadamard ({n})"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], f"random orthogonal ({n})"


@torch.no_grad()
def apply_rotate(model: nn.Module, stats, cfg: Rotate, only: list[int] | None = None):
    """Fold the norms and rotate the residual stream of `model` in place. Data-free: applied
    before calibration (statistics taken earlier would describe another basis)."""
    spec = get_arch(model)
    if only is not None:
        raise OutlierqError("rotate changes the embeddings and every layer at once: it runs in memory "
                            "(not layer by layer)")
    why = _not_rotatable(model, spec)
    if why:
        raise Skipped(why)
    n = text_config(model).hidden_size
    q, what = rotation(n, cfg)
    if what.startswith("random orthogonal") and cfg.kind == "hadamard":
        warnings.warn(f"rotate: no Hadamard construction for width {n}; using a {what}", OutlierqNotice,
                      stacklevel=3)
    embed = resolve(model, spec.embed)
    head = model.get_output_embeddings()
    final = resolve(model, spec.final_norm)
    head_w = head.weight.detach().double() * final.weight.double()[None, :]
    if head.weight is embed.weight:  # tied: the head becomes its own tensor
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for c in (model.config, text_config(model)):
            c.tie_word_embeddings = False
    _set(head.weight, head_w @ q)
    _set(final.weight, torch.ones_like(final.weight, dtype=torch.float64))
    _set(embed.weight, embed.weight.double() @ q)
    for layer in decoder_layers(model, spec):
        for g in spec.groups:
            norm = resolve(layer, g.norm)
            w = norm.weight.double()
            for name in g.linears:
                lin = resolve(layer, name)
                _set(lin.weight, (lin.weight.double() * w[None, :]) @ q)
            _set(norm.weight, torch.ones_like(w))
        for name in spec.writers:
            lin = resolve(layer, name)
            _set(lin.weight, q.t() @ lin.weight.double())
            if lin.bias is not None:
                _set(lin.bias, lin.bias.double() @ q)
    if stats is not None:
        stats.meta = dict(stats.meta, rotation=what)
    model.outlierq_rotation = what
    return stats


def _not_rotatable(model: nn.Module, spec) -> str | None:
    if not spec.rotatable:
        return (f"the {spec.family} layout is not rotatable offline (needs every residual reader to be "
                "an RMSNorm and every writer a plain Linear)")
    if getattr(resolve(model, spec.embed), "weight", None) is None:
        return "no embedding weight"
    return None


register("rotate", Rotate, apply_rotate, data_free=True)


@dataclass(frozen=True)
class RotateHeads:
    seed: int = 0
    kind: Literal["hadamard", "random"] = "hadamard"

    def __post_init__(self):
        check_options("rotate_heads", self.seed, self.kind)


@torch.no_grad()
def apply_rotate_heads(model: nn.Module, stats, cfg: RotateHeads, only: list[int] | None = None):
    """Rotate every v -> o pair of `model` per head, in place (data-free, before calibration).

    With v_h the values of head h (a row of head_dim): v_h -> v_h Q, i.e. producer rows
    W_v[h] -> Q^T W_v[h] (and the bias b_h -> b_h Q); the attention output of each query head is
    then o_h Q, and o_proj's columns W_o[:, h] -> W_o[:, h] Q. Grouped KV heads: a KV head's rows
    rotate once, and every query head reading it carries the same Q."""
    spec = get_arch(model)
    pairs = [p for p in spec.pairs if p.kind == "attn_vo"]
    if spec.inferred:  # the per-head layout below is read from the config, not proven
        pairs = []
    if not pairs:
        raise Skipped(f"the {spec.family} layout has no v -> o pair")
    config = text_config(model)
    heads, _, hd = _heads(config)
    q, what = rotation(hd, Rotate(seed=cfg.seed, kind=cfg.kind))
    for i, layer in enumerate(decoder_layers(model, spec)):
        if only is not None and i not in only:
            continue
        for p in pairs:
            prod, cons = resolve(layer, p.producer), resolve(layer, p.consumer)
            rows = p.rows(config) if p.rows is not None else torch.arange(cons.in_features)
            blocks = rows.reshape(heads, hd)
            if rows.numel() != heads * hd or not torch.equal(blocks - blocks[:, :1], torch.arange(hd).expand_as(blocks)):
                raise OutlierqError(f"rotate_heads: {p.consumer}'s input is not {heads} heads of "
                                    f"{hd} contiguous value rows in the {spec.family} layout")
            w, b = _f64(prod.weight), None if prod.bias is None else _f64(prod.bias)
            for r in {int(r0) for r0 in blocks[:, 0]}:  # each KV head once
                w[r:r + hd] = q.t() @ w[r:r + hd]
                if b is not None:
                    b[r:r + hd] = b[r:r + hd] @ q
            _set(prod.weight, w)
            if b is not None:
                _set(prod.bias, b)
            wc = cons.weight.double()
            _set(cons.weight, (wc.reshape(-1, heads, hd) @ q).reshape(wc.shape))
    model.outlierq_head_rotation = what
    if stats is not None:
        stats.meta = dict(stats.meta, head_rotation=what)
    return stats


register("rotate_heads", RotateHeads, apply_rotate_heads, data_free=True)
