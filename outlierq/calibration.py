"""Calibration: stream token windows through the model and keep running activation statistics.

Forward hooks on every nn.Linear input and on every decoder layer's output (the residual stream,
where massive activations live). Only reductions are kept (max, sum, count, histogram, top-k), so
two runs over different text merge exactly (`ActivationStats.merge`) — the basis for data-parallel
calibration with an all_reduce. Activations themselves are never stored, except an optional small
row sample per Linear input (`keep_rows`) that the per-layer alpha search scores candidates on."""
from __future__ import annotations

import json
import math
import weakref
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .errors import OutlierqError
from .models.arch import ArchSpec, decoder_layers, get_arch, resolve, text_config
from .models.prepare import fingerprint, input_device, prepare
from .provenance import atomic_path, stamp

DEFAULT_THRESHOLDS = (6.0, 20.0, 100.0)  # 6.0 is LLM.int8's outlier threshold
TOP_K = 16
# per-token absmax histogram: bins on a log2 scale from 2^-10 to 2^16, half an octave wide
HIST_EDGES = torch.tensor([2.0 ** (e / 2) for e in range(-20, 33)])
# histograms of every |x| of an online-rotated Linear input (`rotated_input`), for the static-range
# search (`quantize.act_clip_search`): bins a sixteenth of an octave wide from 2^-24 to 2^24;
# bin 0 also holds smaller values (and zeros), the last bin larger ones
VALUE_BINS_PER_OCTAVE, VALUE_LOG2_MIN, VALUE_LOG2_MAX = 16, -24, 24
VALUE_BINS = (VALUE_LOG2_MAX - VALUE_LOG2_MIN) * VALUE_BINS_PER_OCTAVE


def value_histogram(x: torch.Tensor) -> torch.Tensor:
    """f64 [2, VALUE_BINS] over the rows (tokens) of x: row 0 counts |x| per log2 bin (see
    VALUE_BINS_PER_OCTAVE); row 1 weighs each value by 1 / (its token's mean square), so that
    every token carries the same total weight whatever its norm (act_clip's "token" objective)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    idx = (x.abs().clamp(min=2.0 ** VALUE_LOG2_MIN).log2_() - VALUE_LOG2_MIN)
    idx = idx.mul_(VALUE_BINS_PER_OCTAVE).floor_().clamp_(0, VALUE_BINS - 1).long().reshape(-1)
    w = x.pow(2).mean(-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny).reciprocal_()
    return torch.stack([torch.bincount(idx, minlength=VALUE_BINS).double(),
                        torch.bincount(idx, weights=w.expand_as(x).reshape(-1).double(),
                                       minlength=VALUE_BINS)]).cpu()


def rotated_input(mod: nn.Module) -> bool:
    """Whether a Linear rotates its whole input online (rotate_down): no single channel carries
    its range, so calibration keeps the histograms of its values and act_clip may clip it.
    rotate_heads' per-head rotation does not count: a head whose output is massive for a few
    tokens stays massive across that head's width, and a clip cuts it (measured on SmolLM2:
    layer 0's o_proj clipped to 0.14x, perplexity +35%)."""
    return getattr(mod, "input_rotation", None) is not None


def value_bin_centres() -> torch.Tensor:
    """The geometric centre of each VALUE_BINS bin, float64."""
    k = torch.arange(VALUE_BINS, dtype=torch.float64) + 0.5
    return torch.pow(2.0, k / VALUE_BINS_PER_OCTAVE + VALUE_LOG2_MIN)


@dataclass
class TensorStats:
    """Running statistics of one activation tensor with N channels."""
    absmax: torch.Tensor        # f32 [N]  per-channel max |x|
    abssum: torch.Tensor        # f64 [N]  per-channel sum |x| (mean = abssum / tokens)
    counts: torch.Tensor        # i64 [T, N] per-channel count of |x| > thresholds[t]
    token_hist: torch.Tensor    # i64 [len(HIST_EDGES)+1] histogram of per-token max |x|
    top_values: torch.Tensor    # f32 [<=K] the largest |x| seen, one per token
    top_where: torch.Tensor     # i64 [<=K, 3] (sample, position, channel) of each
    tokens: int = 0

    @classmethod
    def empty(cls, n: int, n_thr: int) -> "TensorStats":
        return cls(torch.zeros(n), torch.zeros(n, dtype=torch.float64),
                   torch.zeros(n_thr, n, dtype=torch.int64),
                   torch.zeros(len(HIST_EDGES) + 1, dtype=torch.int64),
                   torch.zeros(0), torch.zeros(0, 3, dtype=torch.int64))

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).float()

    def update(self, x2: torch.Tensor, cs: ops.ChannelStats, sample0: int, seqlen: int) -> None:
        torch.maximum(self.absmax, cs.col_absmax.cpu(), out=self.absmax)
        self.abssum += cs.col_abssum.cpu().double()
        self.counts += cs.col_count.cpu().long()
        self.tokens += x2.shape[0]
        rows = cs.row_absmax
        self.token_hist += torch.bincount(torch.bucketize(rows.cpu(), HIST_EDGES),
                                          minlength=len(HIST_EDGES) + 1)
        k = min(TOP_K, rows.numel())
        vals, idx = rows.topk(k)
        chan = x2[idx].abs().argmax(1)
        where = torch.stack([sample0 + idx // seqlen, idx % seqlen, chan], 1).cpu()
        self._merge_top(vals.cpu().float(), where)

    def _merge_top(self, vals: torch.Tensor, where: torch.Tensor) -> None:
        v = torch.cat([self.top_values, vals])
        w = torch.cat([self.top_where, where])
        keep = v.topk(min(TOP_K, v.numel())).indices
        self.top_values, self.top_where = v[keep], w[keep]

    def merge(self, other: "TensorStats") -> "TensorStats":
        """Exact merge of statistics gathered over different text (sample ids are kept as-is)."""
        out = TensorStats(torch.maximum(self.absmax, other.absmax), self.abssum + other.abssum,
                          self.counts + other.counts, self.token_hist + other.token_hist,
                          self.top_values.clone(), self.top_where.clone(), self.tokens + other.tokens)
        out._merge_top(other.top_values, other.top_where)
        return out

    _FIELDS = ("absmax", "abssum", "counts", "token_hist", "top_values", "top_where")


def _shared_sum(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """a + b per name; names that share one tensor in `a` share the sum."""
    done: dict[int, torch.Tensor] = {}
    return {k: done.setdefault(id(v), v + b[k]) for k, v in a.items()}


@dataclass
class ActivationStats:
    thresholds: tuple[float, ...]
    inputs: dict[str, TensorStats] = field(default_factory=dict)    # Linear name -> its input
    residual: dict[str, TensorStats] = field(default_factory=dict)  # decoder layer -> its output
    meta: dict[str, Any] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] = field(default_factory=dict)  # Linear name -> rows [R, N]
    # Linear name -> sum of x x^T over every calibration row [N, N], float64 (for GPTQ); Linears
    # that read one tensor (q/k/v) share one matrix
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    # Linear name -> `value_histogram` of its input, for inputs rotated online (rotate_down)
    value_hists: dict[str, torch.Tensor] = field(default_factory=dict)

    def merge(self, other: "ActivationStats") -> "ActivationStats":
        if self.thresholds != other.thresholds or self.inputs.keys() != other.inputs.keys():
            raise OutlierqError("cannot merge statistics with different thresholds or layers")
        return ActivationStats(
            self.thresholds,
            {k: v.merge(other.inputs[k]) for k, v in self.inputs.items()},
            {k: v.merge(other.residual[k]) for k, v in self.residual.items()},
            dict(self.meta, tokens=self.meta.get("tokens", 0) + other.meta.get("tokens", 0)),
            hessians=_shared_sum(self.hessians, other.hessians) if self.hessians and other.hessians else {},
            value_hists={k: v + other.value_hists[k] for k, v in self.value_hists.items()
                         if k in other.value_hists},
        )

    def input_absmax(self, name: str) -> torch.Tensor:
        if name not in self.inputs:
            raise OutlierqError(f"statistics have no entry for Linear {name!r}; "
                                "were they calibrated on this model?")
        return self.inputs[name].absmax

    # ---- persistence: safetensors + JSON metadata -------------------------------------------
    def save(self, path: str | Path) -> None:
        from .provenance import save_tensors

        tensors: dict[str, torch.Tensor] = {}
        for kind, table in (("in", self.inputs), ("res", self.residual)):
            for name, st in table.items():
                for f in TensorStats._FIELDS:
                    tensors[f"{kind}/{name}/{f}"] = getattr(st, f).contiguous()
        for name, h in self.value_hists.items():
            tensors[f"vhist/{name}"] = h.contiguous()
        # Linears that read the same tensor (q/k/v) share one sample and one Hessian: store once.
        aliases = {}
        for kind, table in (("sample", self.samples), ("hessian", self.hessians)):
            seen: dict[int, str] = {}
            for name, t in table.items():
                if id(t) in seen:
                    aliases[f"{kind}/{name}"] = f"{kind}/{seen[id(t)]}"
                else:
                    seen[id(t)] = name
                    tensors[f"{kind}/{name}"] = t.contiguous()
        meta = dict(self.meta, thresholds=list(self.thresholds), aliases=aliases,
                    tokens_in={k: v.tokens for k, v in self.inputs.items()},
                    tokens_res={k: v.tokens for k, v in self.residual.items()})
        with atomic_path(path) as tmp:
            save_tensors(tensors, tmp, {"outlierq": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> "ActivationStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise OutlierqError(f"statistics file not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["outlierq"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # header errors come as several exception types
            raise OutlierqError(f"{path} is not an outlierq statistics file ({e})") from None
        out = cls(tuple(meta.pop("thresholds")))
        aliases = meta.pop("aliases", None)
        if aliases is None:  # files written before Hessians were kept
            aliases = {f"sample/{k}": f"sample/{v}" for k, v in meta.pop("sample_aliases", {}).items()}
        tok_in, tok_res = meta.pop("tokens_in"), meta.pop("tokens_res")
        for kind, table, toks in (("in", out.inputs, tok_in), ("res", out.residual, tok_res)):
            for name, n in toks.items():
                table[name] = TensorStats(*(tensors[f"{kind}/{name}/{f}"] for f in TensorStats._FIELDS),
                                          tokens=n)
        tables = {"sample": out.samples, "hessian": out.hessians, "vhist": out.value_hists}
        for k, v in list(tensors.items()) + [(a, tensors[src]) for a, src in aliases.items()]:
            kind, _, name = k.partition("/")
            if kind in tables:
                tables[kind][name] = v
        out.meta = meta
        return out

    def check_matches(self, model: nn.Module, exact: bool = True) -> None:
        """Refuse statistics gathered on another model, or on this model before a mitigation
        changed it (`exact`: the weight fingerprint must match too; shapes are always checked)."""
        expected = expected_inputs(model)
        for name, n in expected.items():
            st = self.inputs.get(name)
            if st is None:
                raise OutlierqError(f"statistics do not match this model: no stats for {name!r}; "
                                    f"recalibrate (stats came from {self.meta.get('model')!r})")
            if st.absmax.numel() != n:
                raise OutlierqError(f"statistics do not match this model: {name!r} has "
                                    f"{st.absmax.numel()} input channels in the stats, {n} in the "
                                    f"model; recalibrate (stats came from {self.meta.get('model')!r})")
        want = self.meta.get("fingerprint")
        if exact and want is not None and want != fingerprint(model):
            raise OutlierqError("statistics are stale: they describe different weights than this "
                                "model has (another model, or taken before a mitigation changed it); "
                                "use the statistics mitigate() returned, or recalibrate")


def is_stats_file(path: str | Path) -> bool:
    """A statistics file outlierq wrote (safetensors with outlierq metadata)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return "outlierq" in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (any unreadable file is simply not ours)
        return False


def expected_inputs(model: nn.Module, spec: ArchSpec | None = None) -> dict[str, int]:
    """Every input calibration records -> its channel count: the decoder layers' Linears, the
    output head, and for MoE layers the experts' shared input and each expert's down input."""
    spec = spec or get_arch(model)
    uncalled = tuple("." + u for u in spec.uncalled)
    out = {n: m.in_features for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and n.startswith(spec.layers + ".") and not n.endswith(uncalled)}
    head = output_head(model)
    if head is not None:
        out[module_name(model, head)] = head.in_features
    if spec.experts is not None:
        for i, layer in enumerate(decoder_layers(model, spec)):
            ex = resolve(layer, spec.experts.path)
            pre = f"{spec.layers}.{i}.{spec.experts.path}"
            out[f"{pre}.gate_up"] = ex.gate_up_proj.shape[2]
            for e in range(ex.gate_up_proj.shape[0]):
                out[f"{pre}.{e}.down"] = ex.down_proj.shape[2]
    return out


def module_name(model: nn.Module, mod: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is mod)


def output_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when it is an nn.Linear (what calibration records and W8A8 can
    quantize), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


class _Recorder:
    """Holds the hooks; removed in `close()` even when the forward pass fails."""

    def __init__(self, model: nn.Module, thresholds, keep_rows: int, rows_per_batch: int,
                 backend: str, seed: int, hessians: bool = False, names=None):
        self.thr = thresholds
        self.hessian = hessians
        self.hessians: dict[str, torch.Tensor] = {}  # owner Linear -> sum x x^T (float64)
        self.hessian_owner: dict[str, str] = {}      # Linear -> the Linear whose matrix it shares
        self.backend = backend
        self.keep = keep_rows
        self.rows_per_batch = rows_per_batch
        self.seed = seed
        self.batch = 0  # index of the batch in the whole run (kept-row draws are seeded by it)
        self.inputs: dict[str, TensorStats] = {}
        self.residual: dict[str, TensorStats] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.fired: dict[str, int] = {}
        self.sample0 = 0
        self.seqlen = 1
        self._last: tuple[weakref.ref, ops.ChannelStats, list, str] | None = None
        self.handles = []
        self.expert_tokens: dict[str, torch.Tensor] = {}
        self.value_hists: dict[str, torch.Tensor] = {}
        spec = get_arch(model)
        mods = dict(model.named_modules())
        for name, n in expected_inputs(model, spec).items():
            if names is not None and name not in names:
                continue
            self.inputs[name] = TensorStats.empty(n, len(thresholds))
            if name in mods:
                self.handles.append(mods[name].register_forward_hook(self._linear_hook(name)))
                if rotated_input(mods[name]):
                    self.value_hists[name] = torch.zeros(2, VALUE_BINS, dtype=torch.float64)
        for i, layer in enumerate(decoder_layers(model, spec)):
            name = f"{spec.layers}.{i}"
            self.residual[name] = TensorStats.empty(text_config(model).hidden_size, len(thresholds))
            self.handles.append(layer.register_forward_hook(self._residual_hook(name)))
            if spec.experts is not None:
                ex = resolve(layer, spec.experts.path)
                self.handles.append(ex.register_forward_hook(
                    self._experts_hook(f"{name}.{spec.experts.path}", ex)))

    def at_batch(self, b: int, batch_size: int, seqlen: int) -> None:
        """The hooks that fire next see batch b of the run (sample ids, kept-row seeds)."""
        self.sample0, self.seqlen, self.batch = b * batch_size, seqlen, b

    def _stats(self, x: torch.Tensor, name: str):
        # q/k/v (and gate/up) read the very same tensor: reduce it once, record it thrice.
        if self._last is not None and self._last[0]() is x:
            return self._last[1], self._last[2], self._last[3]
        x2 = x.detach().reshape(-1, x.shape[-1])
        cs = ops.channel_stats(x2, self.thr, backend=self.backend)
        kept = []
        if self.keep:
            # One generator per (seed, batch, tensor), not one for the run: the same rows are
            # kept whatever order the batches run in (layer by layer, or split across ranks).
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{self.batch}:{name}".encode()))
            idx = torch.randperm(x2.shape[0], generator=gen)[: self.rows_per_batch]
            kept = [x2[idx.to(x2.device)].float().cpu()]
        # A weak reference: holding the activation past its last use in the model made every
        # one a fresh allocation whose release cost ~1 ms (measured: a third of the hooks' time).
        self._last = (weakref.ref(x), cs, kept, name)
        return cs, kept, name

    def _record(self, table, name, x) -> str:
        """Record x for `name`; returns the first name that recorded this very tensor."""
        cs, kept, first = self._stats(x, name)
        table[name].update(x.detach().reshape(-1, x.shape[-1]), cs, self.sample0, self.seqlen)
        self.fired[name] = self.fired.get(name, 0) + 1
        if kept and table is self.inputs:  # rows are kept for Linear inputs (the alpha search)
            self.samples.setdefault(name, []).extend(kept)
        return first

    def _add_hessian(self, name: str, first: str, x: torch.Tensor) -> None:
        owner = self.hessian_owner.setdefault(name, first)
        if owner == name:  # the first Linear to read this tensor accumulates for all
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            # float64 sums on the CPU: a big model's Hessians would crowd the accelerator
            h = (x2.t() @ x2).double().cpu()
            self.hessians[name] = self.hessians[name].add_(h) if name in self.hessians else h

    def _linear_hook(self, name):
        def hook(mod, args, out):
            x = args[0]
            if getattr(mod, "input_rotation", None) is not None:  # rotate_down: what gets quantized
                x = mod.input_rotation(x)
            if name in self.value_hists:
                self.value_hists[name] += value_histogram(x)
            first = self._record(self.inputs, name, x)
            if self.hessian:  # Linears only: MoE experts stay round-to-nearest
                self._add_hessian(name, first, x)
        return hook

    def _experts_hook(self, name: str, ex: nn.Module):
        """Every token through every expert, for statistics only: the model's output is the
        routed one the experts module already computed. Records the experts' shared input, each
        expert's down_proj input, and how many tokens the router actually sent to each expert."""
        def hook(mod, args, out):
            x, top_k_index = args[0], args[1]
            self.expert_tokens[name] = self.expert_tokens.get(name, 0) + torch.bincount(
                top_k_index.reshape(-1).cpu(), minlength=ex.gate_up_proj.shape[0])
            self._record(self.inputs, f"{name}.gate_up", x)
            for e in range(ex.gate_up_proj.shape[0]):
                gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
                self._record(self.inputs, f"{name}.{e}.down", ex.act_fn(gate) * up)
        return hook

    def _residual_hook(self, name):
        def hook(mod, args, out):
            self._record(self.residual, name, out[0] if isinstance(out, tuple) else out)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self._last = None


@contextmanager
def head_skipped(model: nn.Module):
    """Calibration never reads the logits, and with a large vocabulary the output head is most of
    the forward (Gemma-3: 262k x 640). Inside this block the head's hooks still fire (its input is
    recorded) but its matmul is replaced by a zero view (no memory)."""
    head = output_head(model)
    if head is None:
        yield
        return
    own_forward = vars(head).get("forward")  # e.g. accelerate's wrapper
    head.forward = lambda x: x.new_zeros(()).expand(*x.shape[:-1], head.out_features)
    try:
        yield
    finally:
        if own_forward is not None:
            head.forward = own_forward
        else:
            del head.forward


def batches(n_windows: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """The batch indices this rank runs: every world-th batch, so ranks share the work evenly and
    each batch keeps the windows (and the kept-row seeds) it has in a one-process run."""
    return list(range(rank, math.ceil(n_windows / batch_size), world))


def recorder(model: nn.Module, windows: torch.Tensor, thresholds=DEFAULT_THRESHOLDS, batch_size: int = 8,
             keep_rows: int = 0, seed: int = 0, backend: str = "auto", hessians: bool = False,
             names=None) -> "_Recorder":
    """The hooks `calibrate` uses, for runners that drive the forward themselves (layer by
    layer, or one slice of the windows per rank)."""
    n_batches = math.ceil(windows.shape[0] / batch_size)
    return _Recorder(model, tuple(float(t) for t in thresholds), keep_rows,
                     math.ceil(keep_rows / n_batches) if keep_rows else 0, backend, seed, hessians, names)


@torch.no_grad()
def calibrate(model: nn.Module, windows: torch.Tensor, thresholds=DEFAULT_THRESHOLDS,
              batch_size: int = 8, keep_rows: int = 0, seed: int = 0, backend: str = "auto",
              progress: bool = True, meta: dict | None = None, hessians: bool = False,
              names: Collection[str] | None = None) -> ActivationStats:
    """Run `windows` [S, L] through `model` and return its ActivationStats.

    keep_rows > 0 also keeps about that many random rows of every Linear input (for the
    per-layer alpha search); hessians=True also sums x x^T of every Linear input (for GPTQ:
    width^2 float64 numbers per distinct input); names: record only these Linears' inputs (a
    recalibration of some of them; the residual stream is always recorded). Under torch.distributed each rank runs its
    share of the batches and the statistics are reduced exactly (see `outlierq.distributed`); every rank gets them."""
    from . import distributed

    prepare(model)
    rec = recorder(model, windows, thresholds, batch_size, keep_rows, seed, backend, hessians, names)
    device = input_device(model)
    rank, world = distributed.rank_world()
    mine = batches(windows.shape[0], batch_size, rank, world)
    try:
        with head_skipped(model):
            for b in tqdm(mine, desc="calibrate", unit="batch", disable=not progress or rank != 0):
                batch = windows[b * batch_size: (b + 1) * batch_size].to(device)
                rec.at_batch(b, batch_size, batch.shape[1])
                model(input_ids=batch, use_cache=False)
                rec._last = None
    finally:
        rec.close()
    if world > 1:
        distributed.reduce_recorder(rec, mine)
    return finish(model, rec, windows, keep_rows, seed, meta, fingerprint(model))


def finish(model: nn.Module, rec: "_Recorder", windows: torch.Tensor, keep_rows: int, seed: int,
           meta: dict | None, fp: str) -> ActivationStats:
    """Check what the hooks saw and assemble the ActivationStats (`fp`: the weight fingerprint)."""
    silent = [n for n in list(rec.inputs) + list(rec.residual) if not rec.fired.get(n)]
    if silent:
        raise OutlierqError(f"{len(silent)} calibration hooks never fired (e.g. {silent[0]!r}); "
                            "the model's forward skips these modules")
    bad = [n for t in (rec.inputs, rec.residual) for n, s in t.items()
           if not torch.isfinite(s.absmax).all()]
    if bad:
        raise OutlierqError(f"NaN/Inf activations in {len(bad)} layers, first {bad[0]!r}; "
                            "try --dtype float32")
    samples = {}
    by_src: dict[int, torch.Tensor] = {}
    for name, parts in rec.samples.items():
        key = id(parts[0])  # Linears that read one tensor share one sample tensor
        if key not in by_src:
            by_src[key] = torch.cat(parts)[:keep_rows]
        samples[name] = by_src[key]
    hessians = {n: rec.hessians[o] for n, o in rec.hessian_owner.items()}  # shared, not copied
    info = dict(meta or {})
    info.update(model=getattr(model, "outlierq_source", getattr(model, "name_or_path", "?")),
                architecture=get_arch(model).family, samples=int(windows.shape[0]),
                seqlen=int(windows.shape[1]), seed=seed, tokens=int(windows.numel()),
                fingerprint=fp, **stamp())
    if rec.expert_tokens:  # tokens the router sent to each expert (statistics cover all tokens)
        info["expert_tokens"] = {k: v.tolist() for k, v in rec.expert_tokens.items()}
    return ActivationStats(rec.thr, rec.inputs, rec.residual, info, samples, hessians, rec.value_hists)
