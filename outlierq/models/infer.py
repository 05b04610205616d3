"""Structure inferred from the model itself, then proven: an ArchSpec for any causal LM.

W8A8 needs no structure (every Linear inside the decoder layers is quantized). Mitigations do, and
instead of a description written per family, this module finds it on a short probe forward:

* Norm groups: hooks record each norm's output and each Linear's (router's, fused experts') input;
  a reader belongs to the norm whose output it reads (the same tensor, or equal values).
* Pairs (v->o, up->down, fused and grouped row maps): each producer row is scaled by 2 in its own
  batch element of one forward that stops after the layer; a consumer input channel that doubles
  exactly, with nothing else in that consumer changed, is fed by that row.
* Every group and pair is then *proven*: random power-of-two factors are folded in every layer
  that has it (x / 2^k and w * 2^k are exact in floating point, so a correct fold leaves the
  logits unchanged to the last bit) and the probe's logits compared; whatever changes them is
  rolled back and named in `notes`. The norm's kind (x * w, Gemma's x * (1 + w), LayerNorm with
  bias) is whichever fold the proof accepts.

Nothing here reads a family's name: the class transformers built decides, through its modules."""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch import nn

from .arch import ArchSpec, LinearPair, NormGroup

KINDS = ("rms", "rms_offset", "layernorm")
PROBE_TOKENS = 32
TOL = 1e-5          # relative change of the logits a proof allows (Gemma's (1 + w) fold rounds)
ROW_CHUNK = 256     # batch elements per perturbation forward
WIDE, BLOCK = 1024, 8  # producers wider than WIDE rows perturb BLOCK rows per batch element
PAIR_TOKENS = 16    # tokens of the pair probe (it runs one layer per batch element)
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class _Stop(Exception):
    """Raised by a hook to end a probe forward after the layer it needs."""


def is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def _is_norm(m: nn.Module) -> bool:
    if isinstance(m, (nn.Linear, nn.Embedding)) or is_conv1d(m):
        return False
    if any(True for c in m.children() for _ in c.parameters()):
        return False
    return "norm" in type(m).__name__.lower()


def _is_experts(m: nn.Module) -> bool:
    p = dict(m.named_parameters(recurse=False))
    return p.get("gate_up_proj") is not None and p["gate_up_proj"].ndim == 3 and p.get("down_proj") is not None


def _is_router(m: nn.Module) -> bool:
    """A non-Linear module holding a 2-D weight [E, H] that it applies as a Linear (MoE routers)."""
    w = getattr(m, "weight", None)
    return (not isinstance(m, (nn.Linear, nn.Embedding)) and not _is_norm(m) and isinstance(w, torch.Tensor)
            and w.ndim == 2 and not any(True for _ in m.children()))


def find_layers(model: nn.Module) -> str:
    """The decoder layers: the ModuleList (of modules holding Linears) with the most parameters."""
    best, size = None, -1
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or not len(m):
            continue
        if not all(any(isinstance(x, nn.Linear) or is_conv1d(x) for x in layer.modules()) for layer in m):
            continue
        n = sum(p.numel() for p in m.parameters())
        if n > size:
            best, size = name, n
    if best is None:
        from ..errors import OutlierqError
        raise OutlierqError(f"{type(model).__name__}: found no list of decoder layers holding Linear modules")
    return best


def _name_of(model: nn.Module, mod: nn.Module | None) -> str:
    return next((n for n, m in model.named_modules() if m is mod), "") if mod is not None else ""


def expert_count(config) -> int | None:
    for f in EXPERT_COUNT_FIELDS:
        v = getattr(config, f, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def probe_ids(model: nn.Module, batch: int = 1, tokens: int = PROBE_TOKENS) -> torch.Tensor:
    vocab = getattr(_text_config(model), "vocab_size", None) or model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, max(4, min(vocab, 32000)), (1, tokens), generator=g)
    return ids.expand(batch, -1).to(next(p.device for p in model.parameters() if not p.is_meta))


def _first(x):
    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    return x if isinstance(x, torch.Tensor) else None


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.double()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape[-1] == b.shape[-1] and a.numel() == b.numel() and a.dtype == b.dtype
                      and torch.equal(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])))


@contextmanager
def _saved(tensors: list[nn.Parameter]):
    """Restore these parameters' data exactly after the block."""
    keep = [(p, p.data) for p in tensors]
    try:
        yield
    finally:
        for p, d in keep:
            p.data = d


def _pow2(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.pow(2.0, torch.randint(-3, 4, (n,), generator=g).double())


# ---- norm groups --------------------------------------------------------------------------------
@torch.no_grad()
def _readers(model: nn.Module, layers: nn.ModuleList) -> tuple[list[dict[str, tuple]], set[str]]:
    """Per layer: norm path -> (Linears, routers, experts) that read its output, by one probe forward;
    and the Linears that were never called (their weight is read directly, e.g. Mamba's dt_proj)."""
    outs: dict[tuple[int, str], tuple[int, torch.Tensor]] = {}
    ins: dict[tuple[int, str], tuple[int, torch.Tensor, str]] = {}
    clock = [0]
    handles = []

    def norm_hook(key):
        def h(m, args, out):
            t = _first(out)
            if t is not None:
                clock[0] += 1
                outs.setdefault(key, (clock[0], t))
        return h

    def reader_hook(key, role):
        def h(m, args, kwargs):
            t = _first(args) if args else _first(kwargs.get("hidden_states"))
            if t is not None:
                clock[0] += 1
                ins.setdefault(key, (clock[0], t, role))
        return h

    try:
        for i, layer in enumerate(layers):
            for path, m in layer.named_modules():
                if not path:
                    continue
                if _is_norm(m):
                    handles.append(m.register_forward_hook(norm_hook((i, path))))
                role = ("linear" if isinstance(m, nn.Linear) else "experts" if _is_experts(m)
                        else "router" if _is_router(m) else None)
                if role:
                    handles.append(m.register_forward_pre_hook(reader_hook((i, path), role), with_kwargs=True))
        _logits(model, probe_ids(model))
    finally:
        for h in handles:
            h.remove()
    called = {(i, path) for (i, path), (_, _, role) in ins.items() if role == "linear"}
    idle = {path for i, layer in enumerate(layers) for path, m in layer.named_modules()
            if isinstance(m, nn.Linear) and (i, path) not in called}
    per_layer: list[dict[str, tuple]] = [dict() for _ in layers]
    found: list[dict[str, dict[str, list[str]]]] = [defaultdict(lambda: defaultdict(list)) for _ in layers]
    for (i, path), (t_in, x, role) in ins.items():
        cands = [(t, norm) for (j, norm), (t, y) in outs.items() if j == i and t < t_in and _same(y, x)]
        if cands:
            found[i][max(cands)[1]][role].append(path)
    for i, groups in enumerate(found):
        for norm, roles in groups.items():
            per_layer[i][norm] = (tuple(sorted(roles["linear"])), tuple(roles["router"]), tuple(roles["experts"]))
    return per_layer, idle


def _fold_norm_group(layer: nn.Module, g: NormGroup, kind: str, s: torch.Tensor) -> None:
    from ..mitigate import surgery

    surgery.scale_norm_output(layer.get_submodule(g.norm), kind, s)
    for n in g.linears + ((g.router,) if g.router else ()):
        surgery.scale_linear_input(layer.get_submodule(n), s)
    if g.experts:
        surgery.scale_experts_input(layer.get_submodule(g.experts), s)


def _params(layer: nn.Module, paths) -> list[nn.Parameter]:
    return [p for path in paths if path for p in layer.get_submodule(path).parameters(recurse=False)]


def _changed(model, ids, ref) -> float:
    out = _logits(model, ids)
    return ((out - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


@torch.no_grad()
def _prove_group(model, layers, g: NormGroup, where: list[int], ids, ref) -> str | None:
    """The norm kind whose fold leaves the logits unchanged in every layer of `where`, or None."""
    norm = layers[where[0]].get_submodule(g.norm)
    if getattr(norm, "weight", None) is None:
        return None
    gen = torch.Generator().manual_seed(1)
    s = _pow2(norm.weight.shape[-1], gen)
    # a zero bias cannot tell LayerNorm's fold from RMSNorm's: a norm with a bias is tried as LayerNorm first
    kinds = ("layernorm",) + KINDS if getattr(norm, "bias", None) is not None else KINDS
    for kind in kinds:
        touched = [p for i in where for p in _params(layers[i], (g.norm, g.router, g.experts) + g.linears)]
        with _saved(touched):
            try:
                for i in where:
                    _fold_norm_group(layers[i], g, kind, s)
                ok = _changed(model, ids, ref) <= TOL
            except (RuntimeError, AttributeError):  # a reader whose weight does not take [*, H] factors
                ok = False
        if ok:
            return kind
    return None


# ---- pairs ------------------------------------------------------------------------------------
@torch.no_grad()
def _pair_maps(model, layers, i: int, producer: str) -> dict[str, torch.Tensor]:
    """Consumers in layer i whose input channels are each fed by exactly one row of `producer`
    (scaled by the same factor, nothing else in the consumer changed) -> channel -> row."""
    layer = layers[i]
    prod = layer.get_submodule(producer)
    rows = prod.out_features
    consumers = {p: m for p, m in layer.named_modules() if isinstance(m, nn.Linear) and p != producer}
    clean: dict[str, torch.Tensor] = {c: torch.full((m.in_features,), -1, dtype=torch.long)
                                      for c, m in consumers.items()}
    bad = set()
    # Wide producers (MLPs of real models): each batch element scales a block of k adjacent rows,
    # row j of the block by 2^(j+1); a channel's exact ratio then names its row. A block that mixes
    # kinds of rows (a q row beside a v row) is lost, so small producers keep one row per element.
    k = 1 if rows <= WIDE else BLOCK
    factors = torch.pow(2.0, torch.arange(1, k + 1, dtype=torch.float32))
    blocks = torch.arange(rows).split(k)
    for start in range(0, len(blocks), ROW_CHUNK):
        mine = blocks[start:start + ROW_CHUNK]
        n = len(mine)
        seen: dict[str, torch.Tensor] = {}

        def perturb(m, args, out):
            if not isinstance(out, torch.Tensor) or out.shape[0] % (n + 1) or out.shape[-1] != rows:
                raise _Stop
            out = out.clone(memory_format=torch.contiguous_format)  # [n + 1, T, R] or [(n + 1) T, R] (MoE)
            view = out.view(n + 1, -1, out.shape[-1])
            for b, rs in enumerate(mine):
                view[b, :, rs] *= factors[: rs.numel()]
            return out

        def grab(path):
            def h(m, args):
                seen.setdefault(path, args[0].detach())
            return h

        def stop(m, args, out):
            raise _Stop

        hs = [prod.register_forward_hook(perturb), layer.register_forward_hook(stop)]
        hs += [m.register_forward_pre_hook(grab(p)) for p, m in consumers.items()]
        try:
            model(input_ids=probe_ids(model, n + 1, PAIR_TOKENS), use_cache=False)
        except _Stop:
            pass
        finally:
            for h in hs:
                h.remove()
        for c, x in seen.items():
            if c in bad or x.shape[0] % (n + 1):
                bad.add(c)
                continue
            x = x.float().reshape(n + 1, -1, x.shape[-1])
            base = x[-1]
            scale = base.abs().amax().clamp(min=1e-30)
            first = torch.tensor([int(rs[0]) for rs in mine])               # each element's first row
            size = torch.tensor([rs.numel() for rs in mine])
            d = x[:-1] - base                                                # [n, T, C]
            moved = (d.abs() > TOL * scale).any(1)                           # [n, C]
            hit = torch.full(moved.shape, -1, dtype=torch.long)              # which factor explains it
            for j in range(k):  # (k is 1 or 8: a few passes over [n, T, C])
                exact = ((x[:-1] - factors[j] * base).abs() <= TOL * scale).all(1) & moved & (j < size)[:, None]
                hit[exact & (hit < 0)] = j
            clean_el = ~(moved & (hit < 0)).any(1)  # a q/k or gate row moves channels no factor explains
            use = moved & clean_el[:, None]
            if bool((use.sum(0) > 1).any()) or bool((clean[c][use.any(0)] >= 0).any()):
                bad.add(c)  # two rows feed one channel
                continue
            rows_of = (first[:, None] + hit).masked_fill(~use, -1).amax(0)  # [C]
            clean[c][use.any(0)] = rows_of[use.any(0)]
    out = {}
    for c, m in clean.items():
        if c in bad:
            continue
        if (m < 0).all():
            continue
        if (m < 0).any():
            # channels no probe token reached (a ReLU's dead units): identity if the rest is
            ident = torch.arange(m.numel())
            known = m >= 0
            if m.numel() == rows and torch.equal(m[known], ident[known]):
                m = ident
            else:
                continue
        out[c] = m
    return out


@torch.no_grad()
def _prove_pair(model, layers, p: LinearPair, cmap: torch.Tensor, where: list[int], ids, ref) -> bool:
    from ..mitigate import surgery

    gen = torch.Generator().manual_seed(2)
    prod = layers[where[0]].get_submodule(p.producer)
    s_rows = torch.ones(prod.out_features, dtype=torch.float64)
    used = torch.unique(cmap)
    s_rows[used] = _pow2(used.numel(), gen)
    touched = [q for i in where for q in _params(layers[i], (p.producer, p.consumer))]
    with _saved(touched):
        for i in where:
            surgery.scale_linear_output(layers[i].get_submodule(p.producer), s_rows)
            surgery.scale_linear_input(layers[i].get_submodule(p.consumer), s_rows[cmap])
        return _changed(model, ids, ref) <= TOL


def _signature(layer: nn.Module) -> tuple:
    return tuple((p, tuple(m.weight.shape)) for p, m in layer.named_modules() if isinstance(m, nn.Linear))


def _fixed(rows: torch.Tensor):
    return lambda cfg: rows


# ---- the spec ---------------------------------------------------------------------------------
def skeleton(model: nn.Module) -> dict:
    """What needs no forward: the layers, embedding, head-side norm, Conv1D modules, float keeps."""
    layers_path = find_layers(model)
    layers = model.get_submodule(layers_path)
    embed = _name_of(model, model.get_input_embeddings())
    conv1d = tuple(sorted({p for layer in layers for p, m in layer.named_modules() if is_conv1d(m)}))
    n_exp = expert_count(_text_config(model))
    keep, notes = set(), []
    for layer in layers:
        for p, m in layer.named_modules():
            out = getattr(m, "out_features", None) or (getattr(m, "nf", None) if is_conv1d(m) else None)
            if out == 1 or (n_exp and out == n_exp and any(_is_experts(x) or isinstance(x, nn.ModuleList)
                                                            for x in layer.modules())):
                keep.add(p)
    if keep:
        notes.append(f"stay float: {', '.join(sorted(keep))} (routers and 1-wide gates: too narrow for "
                     "an int8 GEMM, and routing must not change)")
    floats = sorted({type(m).__name__ for layer in layers for m in layer.modules()
                     if _is_experts(m) or isinstance(m, nn.Conv1d)})
    if floats:
        notes.append(f"stay float: {', '.join(floats)} (fused experts and convolutions: only nn.Linear "
                     "modules are int8 in an inferred architecture)")
    return dict(layers=layers_path, embed=embed, conv1d=conv1d, keep_float=tuple(sorted(keep)), notes=notes)


@torch.no_grad()
def _final_norm(model: nn.Module, layers_path: str) -> str:
    """The norm outside the decoder layers that reads the last layer's output (by a probe forward;
    by module order when the weights are not in memory)."""
    layers = model.get_submodule(layers_path)
    outside = [(n, m) for n, m in model.named_modules()
               if _is_norm(m) and not n.startswith(layers_path + ".")]
    if any(p.is_meta for p in model.parameters()):
        hidden = getattr(_text_config(model), "hidden_size", None)
        return next((n for n, m in outside if getattr(getattr(m, "weight", None), "shape", (None,))[-1] == hidden), "")
    last: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}
    hs = [layers[-1].register_forward_hook(lambda m, a, out: last.append(_first(out)))]
    hs += [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, _first(a))) for n, m in outside]
    try:
        _logits(model, probe_ids(model))
    finally:
        for h in hs:
            h.remove()
    return next((n for n, x in seen.items() if x is not None and last and last[-1] is not None
                 and _same(x, last[-1])), "")


def _family(model: nn.Module) -> str:
    return getattr(_text_config(model), "model_type", None) or re.sub(r"For\w+$", "", type(model).__name__).lower()


@torch.no_grad()
def infer_arch(model: nn.Module) -> ArchSpec:
    """An ArchSpec found from the model: skeleton always; groups and pairs only where proven on a
    probe forward (the model's float weights must be in memory; otherwise none, said in notes)."""
    sk = skeleton(model)
    cfg = _text_config(model)
    act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", None) or "?"
    base = dict(family=_family(model), layers=sk["layers"], embed=sk["embed"],
                final_norm=_final_norm(model, sk["layers"]), act=str(act), conv1d=sk["conv1d"],
                keep_float=sk["keep_float"], writers=(), pairs=(), groups=(), norm_kind="rms")
    notes = list(sk["notes"])
    layers = model.get_submodule(sk["layers"])
    probeable = (not any(p.is_meta or not p.is_floating_point() for p in model.parameters())
                 and not any(b.dtype == torch.int8 for b in model.buffers())  # an int8 model: nothing to fold
                 and not any(is_conv1d(m) for m in layers.modules()))
    if not probeable:
        notes.append("structure not probed (weights not in memory, not float, or Conv1D not yet "
                     "converted): no mitigation group is applied")
        return ArchSpec(**base, notes=tuple(notes), inferred=True)
    was_training = model.training
    model.eval()
    ids = probe_ids(model)
    ref = _logits(model, ids)
    # norm groups: (norm, readers) -> the layers that have it
    where: dict[tuple, list[int]] = defaultdict(list)
    per_layer, idle = _readers(model, layers)
    if idle:  # a module swap cannot quantize what the model never calls: it stays float
        notes.append(f"stay float: {', '.join(sorted(idle))} (never called as a module: the model reads its "
                     "weight directly)")
        base["keep_float"] = tuple(sorted(set(base["keep_float"]) | idle))
        base["uncalled"] = tuple(sorted(idle))
    for i, groups in enumerate(per_layer):
        for norm, (lins, routers, experts) in groups.items():
            where[(norm, lins, routers, experts)].append(i)
    groups, kinds = [], []
    for (norm, lins, routers, experts), idx in where.items():
        label = f"{norm} -> {', '.join(lins + routers + experts) or 'nothing'}"
        if len(routers) > 1 or len(experts) > 1:
            notes.append(f"not smoothed: {label} (more than one router or experts module)")
            continue
        if experts:
            notes.append(f"not smoothed: {label} (fused experts stay float in an inferred architecture)")
            continue
        if not lins:
            continue
        g = NormGroup(norm, lins, routers[0] if routers else None, None,
                      layers=None if len(idx) == len(layers) else tuple(idx))
        kind = _prove_group(model, layers, g, idx, ids, ref)
        if kind is None:
            notes.append(f"not smoothed: {label} (rolled back: a fold into this norm changed the logits, "
                         "so its output also feeds something that is not one of these Linears)")
            continue
        groups.append(g)
        kinds.append(kind)
    norm_kind = max(set(kinds), key=kinds.count) if kinds else "rms"
    groups = [g if k == norm_kind else NormGroup(g.norm, g.linears, g.router, g.experts, g.layers, k)
              for g, k in zip(groups, kinds)]
    # pairs: found on the first layer of each distinct layout, proven on every layer that has them
    firsts: dict[tuple, int] = {}
    for i, layer in enumerate(layers):
        firsts.setdefault(_signature(layer), i)
    grouped = {n for g in groups for n in g.linears}
    pairs: list[LinearPair] = []
    maps: list[torch.Tensor] = []
    for sig, i in firsts.items():
        same = [j for j, layer in enumerate(layers) if _signature(layer) == sig]
        for prod, _ in sig:
            try:
                found = _pair_maps(model, layers, i, prod)
            except (RuntimeError, IndexError, ValueError, AttributeError, TypeError) as e:  # a layout the probe cannot batch
                notes.append(f"no pair probed from {prod}: {type(e).__name__}")
                found = {}
            for cons, cmap in found.items():
                if cons in grouped:
                    continue
                kind = "attn_vo" if re.search(r"attn|attention", cons) else "mlp"
                ident = cmap.numel() == layers[i].get_submodule(prod).out_features and \
                    torch.equal(cmap, torch.arange(cmap.numel()))
                p = LinearPair(prod, cons, kind, None if ident else _fixed(cmap),
                               layers=None if len(same) == len(layers) else tuple(same))
                if any(q.consumer == cons and q.layers == p.layers for q in pairs):
                    continue
                if _prove_pair(model, layers, p, cmap, same, ids, ref):
                    twin = next((k for k, (q, m) in enumerate(zip(pairs, maps)) if q.layers is not None
                                 and (q.producer, q.consumer) == (prod, cons) and torch.equal(m, cmap)), None)
                    if twin is not None:  # the same pair in another layout: one entry for both
                        merged = tuple(sorted(set(pairs[twin].layers) | set(same)))
                        pairs[twin] = dataclasses.replace(
                            pairs[twin], layers=None if len(merged) == len(layers) else merged)
                        continue
                    pairs.append(p)
                    maps.append(cmap)
                else:
                    notes.append(f"not smoothed: {prod} -> {cons} (rolled back: the fold changed the logits)")
    consumers = {p.consumer for p in pairs}
    writers = tuple(sorted({p for layer in layers for p, m in layer.named_modules() if isinstance(m, nn.Linear)}
                           - grouped - consumers - set(sk["keep_float"])))
    model.train(was_training)
    notes.append(f"structure inferred and proven on a {PROBE_TOKENS}-token probe: {len(groups)} norm group(s), "
                 f"{len(pairs)} pair(s); no channel split or rotation (not proven for inferred architectures)")
    return ArchSpec(**dict(base, groups=tuple(groups), pairs=tuple(pairs), writers=writers, norm_kind=norm_kind),
                    notes=tuple(notes), inferred=True)
