"""Online rotation of the MLP output projection's input (QuaRot / SpinQuant "R4").

down_proj's input (act(gate) * up) carries the largest activations of a layer, and split +
SmoothQuant cannot shrink them enough for one static per-tensor scale: measured on SmolLM2
(results/static_diagnosis_smollm2-135m.md), static W8A8 loses almost all of its KL there, and
an orthogonal rotation of that input takes fully static activations to per-token quality.

down_proj's weight W becomes W R and the Linear computes (x R)(W R)^T = x W^T: the same function,
but what gets quantized is x R, whose outliers are spread over every channel. R is applied at run
time (nothing upstream can absorb it: the SiLU/GELU product is not linear in the rotated basis).

R = diag(s) (A (x) B) with random signs s and A, B randomized Hadamard matrices of orders a, b that
rotate.py can build, m = a b >= n: x is zero-padded to m where n has no such factors (`plan`
picks the cheapest m within n/8). Applied as A^T X B on the [a, b] view of x: m (a + b)
multiply-adds per token instead of m^2 for a dense R (SmolLM2 split to 1612, padded to
1632 = 24 x 68: ~17% of down_proj's own 1612 x 576; Gemma-3 2048 = 32 x 64: ~15%). Hadamard
factors put every entry of R at +-1/sqrt(m), so a massive channel is spread evenly; kind=random
uses random orthogonal factors of n as it is (31 x 52 for 1612), whose products are heavy-tailed.

Statistics of down_proj's input do not carry over (a per-tensor maximum of x R is not a function
of x's per-channel maxima), so this step marks them stale and `outlierq.compress` recalibrates
the mitigated model once (it has the windows). It must be the last step: smoothing or splitting
down_proj's input channels after the rotation would act on the rotated basis.

Two shapes of R. block=B (the default, servable): R = I (x) R_B, one randomized Hadamard block of
order B on every B consecutive channels, the same block in every rotated Linear. That is what a
compressed-tensors `transform_config` describes (a "random-hadamard" scheme with head_dim=B) and
what vLLM applies when it loads the checkpoint: `outlierq.export` writes it, `outlierq.load` reads
it back. vLLM keys the transform tensor by (scheme, size), so every rotated Linear must share the
block (one seed, not one per layer). B = the width gives a dense rotation. block=None: the
full-width Kronecker rotation above (padded where needed); no format carries the padding or the
two factors, so it is in memory only and `outlierq.export` refuses it with one line. transformers
5 does not apply a transform_config: a rotated export is served by vLLM or loaded by
`outlierq.load`, not by `AutoModelForCausalLM` (which would compute another function)."""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OutlierqError, OutlierqNotice
from ..models.arch import decoder_layers, get_arch, resolve
from .registry import Skipped, is_number, register
from .rotate import Rotate, check_options, has_hadamard, rotation


@dataclass(frozen=True)
class RotateDown:
    seed: int = 0
    # hadamard: randomized Hadamard factors, the input zero-padded to a width that has them
    # (`plan`); random: random orthogonal factors of the width as it is (measured against it)
    kind: Literal["hadamard", "random"] = "hadamard"
    # down: the MLP output projection's input (R4); all: every Linear a norm group or a pair
    # feeds (q/k/v, o_proj, gate/up, down_proj), each with its own online rotation. "all" serves
    # families that `rotate` cannot rotate offline (Gemma's post norms): static ranges of the
    # attention and MLP inputs are then clipped by act_clip too (measured in the study).
    inputs: Literal["down", "all"] = "down"
    # B: block-diagonal, randomized Hadamard blocks of the largest order <= B that divides each
    # input (servable: exported as a compressed-tensors transform_config); None: the full-width
    # Kronecker rotation (in memory only)
    block: int | None = 128
    # block only: first permute the MLP's intermediate channels (gate/up rows, down_proj columns:
    # offline, free at serving) so that, largest max|x| first, they are dealt to the blocks in turn.
    # A block spreads a massive channel over its own B channels only, and OCS split appends a
    # channel's parts side by side, where a Hadamard block adds them back up; dealt, the largest
    # channels and every part of a split one sit in different blocks. None: wherever the layout
    # allows (gated or ReLU MLPs: the layout `split` uses); true: required
    deal: bool | None = None

    def __post_init__(self):
        check_options("rotate_down", self.seed, self.kind)
        if self.inputs not in ("down", "all"):
            raise OutlierqError(f"rotate_down inputs must be down or all, got {self.inputs!r}")
        if self.block is not None:
            if not is_number(self.block) or self.block != int(self.block) or not has_hadamard(int(self.block)):
                raise OutlierqError(f"rotate_down block must be a Hadamard order (64, 128, 96, ...) or none, "
                                    f"got {self.block!r}")
            if self.kind != "hadamard":
                raise OutlierqError("rotate_down block=B uses Hadamard blocks (what vLLM applies); "
                                    "kind=random needs block=none (in memory only)")
            object.__setattr__(self, "block", int(self.block))
        elif self.deal:
            raise OutlierqError("rotate_down deal=true deals channels to blocks: it needs block=B")
        if self.deal not in (None, True, False):
            raise OutlierqError(f"rotate_down deal must be true or false, got {self.deal!r}")


class InputRotation(nn.Module):
    """x -> x diag(s) (A (x) B), an orthogonal map of the last dimension, a * b wide."""

    def __init__(self, signs: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.register_buffer("signs", signs)
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, m = self.a.dtype, self.signs.shape[0]
        if x.shape[-1] < m:  # zero channels up to a width with Hadamard factors
            x = F.pad(x, (0, m - x.shape[-1]))
        xs = (x.to(dt) * self.signs).reshape(*x.shape[:-1], self.a.shape[0], self.b.shape[0])
        y = (xs @ self.b).transpose(-1, -2) @ self.a  # (X B)^T A: two plain GEMMs, no batched ones
        return y.transpose(-1, -2).reshape(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.a.shape[0]} x {self.b.shape[0]}"


class BlockRotation(nn.Module):
    """x -> x (I (x) M / sqrt(B)): the B x B matrix M (+-1 entries for a Hadamard block, held in
    the model's dtype) applied to every B consecutive channels, exactly as vLLM applies a
    compressed-tensors input transform with head_dim=B (it divides the loaded M by sqrt(B) in
    place). M is the tensor the checkpoint stores, so a reload computes the same function."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dt = self.matrix.shape[0], torch.promote_types(x.dtype, torch.float32)
        r = self.matrix.to(dt).div(math.sqrt(b))
        return (x.to(dt).unflatten(-1, (-1, b)) @ r).flatten(-2).to(x.dtype)

    def fold(self, w: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """W -> W R (or W R^T, which undoes a fold) for a weight [out, in] (float64, block by
        block: R itself is never built)."""
        b = self.matrix.shape[0]
        m = self.matrix.double() / math.sqrt(b)
        return (w.double().unflatten(-1, (-1, b)) @ (m.T if transpose else m)).flatten(-2)

    def extra_repr(self) -> str:
        return f"block {self.matrix.shape[0]}"


def block_rotation(b: int, seed: int, dtype: torch.dtype) -> BlockRotation:
    """The randomized Hadamard block of order b (its +-1 matrix, in `dtype`: exact), H diag(s).
    The seed's signs come after the mixing, where they flip output channels only, which a
    symmetric quantizer sees by magnitude: every seed rounds as the plain Hadamard does. Kept so,
    as measured: the signs first (diag(s) H^T, a real draw; git 9b9c874) rounded Gemma-3's
    per-token default no better, KL 0.00671 vs 0.00551, and one draw per layer 0.00680
    (results/ppl_gemma3-270m.md, 16 windows)."""
    r, _ = rotation(b, Rotate(seed=seed, kind="hadamard"))
    return BlockRotation(torch.sign(r).to(dtype))


class RotatedLinear(nn.Linear):
    """An nn.Linear whose input is rotated first (its weight is already W R). Calibration records
    the rotated input (what the int8 twin quantizes); `Int8Linear.from_linear` keeps the rotation."""

    input_rotation: InputRotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_rotation(x), self.weight, self.bias)


def _factors(n: int) -> tuple[int, int]:
    """n = a * b with a <= b and a + b smallest (a = 1 for a prime n: a dense rotation)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


@functools.lru_cache(maxsize=8)
def _orders(limit: int) -> frozenset[int]:
    """Every order <= limit that `hadamard` can build: 2^k, and 2^k (q + 1) for primes q = 3 mod 4."""
    sieve = bytearray([1]) * (limit + 1)
    sieve[:2] = b"\x00\x00"
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(range(i * i, limit + 1, i)))
    bases = [1] + [q + 1 for q in range(3, limit, 4) if sieve[q]]
    out = set()
    for b in bases:
        while b <= limit:
            out.add(b)
            b *= 2
    return frozenset(out)


@functools.lru_cache(maxsize=64)
def plan(n: int, out_features: int) -> tuple[int, int, int]:
    """(m, a, b): the input is zero-padded to m = a * b >= n, with a and b orders `hadamard` can
    build, at the least cost in multiply-adds per token (the rotation's m (a + b) plus the padded
    columns' (m - n) * out_features), if any such m lies within n + n/8; else (n, *_factors(n)),
    random orthogonal factors where no construction exists. Randomized Hadamard factors keep every
    entry of R at 1/sqrt(m): a massive channel is spread evenly, which Gaussian factors do not do
    (their products are heavy-tailed)."""
    best, orders = None, _orders(n + n // 8)
    for m in range(n, n + n // 8 + 1):
        for a in range(1, math.isqrt(m) + 1):
            if m % a == 0 and a in orders and m // a in orders:
                cost = m * (a + m // a) + (m - n) * out_features
                if best is None or cost < best[0]:
                    best = (cost, m, a, m // a)
    return best[1:] if best else (n, *_factors(n))


def kron_rotation(n: int, seed: int, out_features: int = 0,
                  kind: str = "hadamard") -> tuple[InputRotation, str]:
    """The rotation of an n-wide input (float64; padded as `plan` says) and what it is made of."""
    m, a, b = plan(n, out_features) if kind == "hadamard" else (n, *_factors(n))
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (m,), generator=g).double() * 2 - 1
    ra, what_a = rotation(a, Rotate(seed=seed * 2 + 1, kind=kind))
    rb, what_b = rotation(b, Rotate(seed=seed * 2 + 2, kind=kind))
    what = what_b if a == 1 else f"{what_a} x {what_b}"
    return InputRotation(signs, ra, rb), what + (f", input zero-padded {n} -> {m}" if m > n else "")


@torch.no_grad()
def apply_rotate_down(model: nn.Module, stats, cfg: RotateDown, only: list[int] | None = None):
    spec = get_arch(model)
    def consumers_of(i: int) -> list[str]:  # (an inferred layout may differ from layer to layer)
        if cfg.inputs != "all":
            return [p.consumer for p in spec.pairs if p.kind == "mlp" and p.applies(i)]
        return list(dict.fromkeys([n for g in spec.groups if g.applies(i) for n in g.linears] +
                                  [p.consumer for p in spec.pairs if p.applies(i)]))

    if not any(consumers_of(i) for i in range(len(decoder_layers(model, spec)))):
        raise Skipped(f"the {spec.family} layout has no dense MLP output projection")
    stale, what = [], set()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    blocks: dict[int, BlockRotation] = {}  # one block per order, shared by every Linear (vLLM's rule)
    small: list[str] = []  # widths no Hadamard order up to the block divides
    for i, layer in enumerate(decoder_layers(model, spec)):
        if only is not None and i not in only:
            continue
        if cfg.block is not None and cfg.deal is not False:
            _deal(layer, spec.mlp, stats, f"{spec.layers}.{i}", cfg.block, required=bool(cfg.deal))
        for name in consumers_of(i):
            lin = resolve(layer, name)
            if isinstance(lin, RotatedLinear):
                raise OutlierqError(f"rotate_down: {spec.layers}.{i}.{name} is rotated already")
            if cfg.block is None:
                rot, desc = kron_rotation(lin.in_features, int(cfg.seed) * 100003 + i, lin.out_features, cfg.kind)
                width, dense = rot.signs.shape[0], rot
                # float32 factors: at run time the rotation costs as much as a float32 matmul, and
                # its rounding (~1e-7 relative) is far below int8's
                rot = InputRotation(*(t.float() for t in (rot.signs, rot.a, rot.b)))
            else:
                b = _dividing_order(lin.in_features, cfg.block)
                if b not in blocks:
                    blocks[b] = block_rotation(b, int(cfg.seed), dtype)
                rot, width, dense = blocks[b], lin.in_features, blocks[b].fold
                desc = f"block-diagonal randomized Hadamard {b} ({width} wide)"
                if b < min(width, cfg.block):
                    small.append(desc)
            what.add(desc)
            new = RotatedLinear(width, lin.out_features, lin.bias is not None, device="meta")
            new.weight = nn.Parameter(dense(lin.weight.detach().double()).to(lin.weight.dtype),
                                      requires_grad=lin.weight.requires_grad)
            new.bias = lin.bias
            new.input_rotation = rot.to(lin.weight.device)
            parent, _, child = name.rpartition(".")
            setattr(resolve(layer, parent) if parent else layer, child, new)
            stale.append(f"{spec.layers}.{i}.{name}")
    if small:
        warnings.warn(f"rotate_down: {small[0]} is the largest Hadamard block up to {cfg.block} that divides "
                      f"the width, so outliers spread over fewer channels; pad the width (split:multiple="
                      f"{cfg.block} before it)", OutlierqNotice, stacklevel=3)
    if stats is not None:
        stats.meta = dict(stats.meta, recalibrate=sorted(set(stats.meta.get("recalibrate", [])) | set(stale)),
                          down_rotation=" / ".join(sorted(what)))
    return stats


def deal_order(absmax: torch.Tensor, block: int) -> torch.Tensor:
    """The permutation (new channel p holds old channel order[p]) that deals channels, largest
    first, to the n / block blocks in turn: the k-th largest lands in block k mod (n / block)."""
    n = absmax.numel()
    blocks = n // block
    ranked = torch.sort(absmax, descending=True, stable=True).indices
    k = torch.arange(n)
    order = torch.empty(n, dtype=torch.long)
    order[(k % blocks) * block + k // blocks] = ranked
    return order


@torch.no_grad()
def _deal(layer: nn.Module, mlp, stats, prefix: str, block: int, required: bool) -> None:
    """Permute one layer's MLP intermediate channels by `deal_order` of down_proj's input maxima
    (where the layout and statistics allow it; `required`: else refuse)."""
    if mlp is None or stats is None or f"{prefix}.{mlp.down}" not in stats.inputs:
        if not required:
            return
        raise OutlierqError("rotate_down deal=true needs the family's MLP layout (gate/up -> down) and "
                            "calibrated statistics of down_proj's input")
    absmax = stats.input_absmax(f"{prefix}.{mlp.down}")
    b = _dividing_order(absmax.numel(), block)
    if absmax.numel() // b < 2:
        return
    order = deal_order(absmax.float().cpu(), b)
    down, up = resolve(layer, mlp.down), resolve(layer, mlp.up)
    down.weight.data = down.weight.data[:, order.to(down.weight.device)]
    rows = order if not mlp.fused else torch.cat([order, order + order.numel()])  # [gate | up]
    for lin in [up] + ([resolve(layer, mlp.gate)] if mlp.gate else []):
        lin.weight.data = lin.weight.data[rows.to(lin.weight.device)]
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[rows.to(lin.bias.device)]


def _dividing_order(n: int, limit: int) -> int:
    """The largest Hadamard order <= limit that divides n."""
    return max(b for b in range(1, min(n, limit) + 1) if n % b == 0 and has_hadamard(b))


def rotated_linears(model: nn.Module, servable: bool | None = None) -> list[str]:
    """Names of the modules that rotate their input online; servable=True / False: only those
    whose rotation a checkpoint carries (block) / does not (full-width Kronecker)."""
    return [n for n, m in model.named_modules() if getattr(m, "input_rotation", None) is not None
            and (servable is None or isinstance(m.input_rotation, BlockRotation) == servable)]


register("rotate_down", RotateDown, apply_rotate_down, recalibrates=True)
