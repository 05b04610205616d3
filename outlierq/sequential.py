"""Models bigger than memory: the pipeline one decoder layer at a time.

The model is never materialized whole. Its skeleton is built on the meta device (accelerate's
`init_empty_weights`), the tensors outside the decoder layers (embeddings, final norm, head) are
loaded, and each decoder layer is loaded from the checkpoint's safetensors (memory-mapped,
tensor by tensor) when its turn comes and sent back to the meta device after it:

1. Calibrate. The model's own forward runs once with every decoder layer replaced by a
   pass-through that records its call (masks, rotary embeddings, per-layer-type masks as Gemma
   passes them), so nothing about a family's forward is re-implemented. Then layer by layer:
   load it, run every batch's hidden states through it under the calibration hooks, keep its
   outputs (float) as the next layer's inputs, free it. The final norm's output feeds the head's
   hook last.
2. Mitigate, quantize, write. Layer by layer again (loaded a second time: memory-mapped reads
   are cheap next to the forward): apply the recipe to that layer, quantize it, write its tensors
   as one shard of the export, free it. Then the tensors outside the layers, the config, and the
   manifest, inside the same atomic directory as `export`.

Two passes instead of one because channel splitting pads every layer to the largest split, which
needs every layer's statistics first. The contract, tested on every family: the statistics and
the export are bit-identical to the in-memory pipeline's (same recipe, windows and seed).
Supported: mitigations whose only cross-layer input is the calibrated statistics (`split` first in
the recipe, `smoothquant`); `rotate`, which changes the embeddings and every layer at once, runs
in memory only (refused here with one line; `auto` leaves it out layer by layer)."""
from __future__ import annotations

import json
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import allocator
from .calibration import ActivationStats, batches, finish, head_skipped, recorder
from .errors import OutlierqError
from .mitigate.recipe import check_layer_major, layer_result, mitigate_layer, recipe_to_list
from .models.arch import decoder_layers, get_arch, resolve
from .models.prepare import fingerprint_layer, fingerprint_start, prepare
from .provenance import atomic_dir, check_target, save_tensors
from .quant import LLMInt8, W8A8, quantize_, quantizes_head
from .quant.tuning import check_layer_by_layer

# checkpoint prefixes older transformers wrote for multimodal models, as (model, checkpoint)
_LEGACY = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head."),
           ("lm_head.", "embed_out."))  # (GPT-NeoX)


class Checkpoint:
    """A Hugging Face safetensors checkpoint read one tensor at a time (memory-mapped)."""

    def __init__(self, path: str | Path):
        from .models.files import tensor_index

        self.path = Path(path)
        self.tensors = tensor_index(self.path)  # (checked: files inside the directory, sound headers)
        self._where = {k: t.file for k, t in self.tensors.items()}
        if not self.tensors:
            raise OutlierqError(f"{self.path} has no safetensors checkpoint (model.safetensors or "
                                "model.safetensors.index.json); the layer-by-layer pipeline reads only those")

    def key(self, name: str) -> str | None:
        """The checkpoint's name for model tensor `name` (None if it has none)."""
        if name in self._where:
            return name
        for new, old in _LEGACY:
            if name.startswith(new) and old + name[len(new):] in self._where:
                return old + name[len(new):]
        return None

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        if key is None:
            raise OutlierqError(f"{self.path}: no tensor {name!r} in the checkpoint; the layer-by-layer "
                                "pipeline cannot map this checkpoint's layout (drop --sequential)")
        # Opened per tensor and closed again: a file stays memory-mapped only while open, and
        # the pages read from a mapping count in the process's RSS for as long as it lives.
        from safetensors import safe_open

        with safe_open(str(self.path / self._where[key]), "pt") as f:
            return f.get_tensor(key)


def skeleton(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of checkpoint `path` with every parameter on the meta device (buffers such as
    rotary frequencies are real), in outlierq's one shape (Conv1D -> Linear)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models.files import check_config, tensor_index

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    check_config(cfg, tensor_index(path), path)  # (before building: sizes the weights cannot back)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    if get_arch(model).inferred:  # its structure is proven on a probe forward of the whole model
        raise OutlierqError(f"{type(model).__name__}: layer by layer (--sequential) needs one of the "
                            "hand-written families for now; run it in memory (without --sequential)")
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    prepare(model)
    return model.eval().requires_grad_(False)


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    want = (mod._parameters.get(attr) if attr in mod._parameters else mod._buffers.get(attr))
    if want is not None and tuple(want.shape) != tuple(value.shape):  # (copying would broadcast)
        raise OutlierqError(f"the checkpoint's {name} has shape {list(value.shape)}, but its config "
                            f"asks for {list(want.shape)}; re-download or fix config.json")
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value.to(mod._parameters[attr].dtype), requires_grad=False)
    else:
        mod._buffers[attr] = value.to(mod._buffers[attr].dtype)


def load_rest(model: nn.Module, ckpt: Checkpoint) -> None:
    """Load every tensor outside the decoder layers (embeddings, final norm, head, vision tower)."""
    spec = get_arch(model)
    for name in model.state_dict():
        if name.startswith(spec.layers + "."):
            continue
        if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
            continue
        _assign(model, name, ckpt.get(name))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def load_layer(model: nn.Module, ckpt: Checkpoint, i: int) -> nn.Module:
    """Materialize decoder layer i from the checkpoint (the conversions `checkpoint.load` makes for
    float checkpoints: Conv1D transposed, per-expert Linears stacked into fused experts)."""
    from .checkpoint import fused_experts

    spec = get_arch(model)
    layer = decoder_layers(model, spec)[i]
    pre = f"{spec.layers}.{i}"
    experts = f"{spec.experts.path}." if spec.experts else None
    for name in layer.state_dict():
        if experts and name.startswith(experts):
            continue
        full = f"{pre}.{name}"
        if spec.experts and name == f"{spec.router}.weight":
            full = f"{pre}.{spec.experts.router_ckpt}.weight"
        t = ckpt.get(full)
        if name.endswith(".weight") and name[:-len(".weight")] in spec.conv1d:
            t = t.t()  # Conv1D stores [in, out]
        _assign(layer, name, t.contiguous())
    if spec.experts:
        ex = resolve(layer, spec.experts.path)
        gate_up, down = fused_experts(spec, pre, ex.gate_up_proj.shape[0], ckpt.get)
        _assign(ex, "gate_up_proj", gate_up)
        _assign(ex, "down_proj", down)
    return layer


def drop_embeddings(model: nn.Module) -> None:
    """Send the token embedding and the output head (the largest tensors outside the layers) to
    the meta device; `load_rest` brings them back for writing."""
    for m in (model.get_input_embeddings(), model.get_output_embeddings()):
        if m is not None:
            m.to("meta")
    allocator.trim()


def free_layer(model: nn.Module, i: int) -> None:
    """Send layer i back to the meta device and hand the freed memory back to the system: without
    malloc_trim, glibc keeps the freed heap of every layer and the RSS grows by ~80 MB per 3B
    layer (measured)."""
    decoder_layers(model)[i].to("meta")
    allocator.trim()


def _return_freed_memory() -> None:
    """Tensors of 1 MB and more get their own mapping, returned to the system when freed. glibc's
    default threshold rises to 32 MB after the first large free, so a 3B layer's activations
    (26 MB each) fragment the heap: peak RSS 2.3 GB instead of 1.5 GB (measured, random 3B)."""
    allocator.mmap_threshold(1 << 20)


class _Stop(Exception):
    pass


class _Call(nn.Module):
    """Stands in for decoder layer i during the capture pass: records how the model calls it.
    Only layer 0's hidden-state input is used later, so what it returns to the loop does not
    matter (Falcon indexes a tuple); the last one stops the forward."""

    def __init__(self, calls: list, last: bool):
        super().__init__()
        self.calls, self.last = calls, last

    def forward(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.last:
            raise _Stop
        return args[0] if args else kwargs["hidden_states"]


def _capture(model: nn.Module, windows: torch.Tensor, batch_size: int, mine: list[int]) -> list[list]:
    """For every decoder layer, the (args, kwargs) of its call on each batch of `mine`."""
    layers = decoder_layers(model)
    real = list(layers)
    calls: list[list] = [[] for _ in real]
    for i in range(len(real)):
        layers[i] = _Call(calls[i], last=i == len(real) - 1)
    try:
        for b in mine:
            try:
                model(input_ids=windows[b * batch_size: (b + 1) * batch_size], use_cache=False)
            except _Stop:
                pass
    finally:
        for i, m in enumerate(real):
            layers[i] = m
    return calls


def _with_hidden(call: tuple, hidden: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, dict(kwargs, hidden_states=hidden)


class _Spill:
    """Hidden states in memory-mapped files, two generations (layer i reads i-1's, writes i's)."""

    def __init__(self):
        from .provenance import scratch_dir

        self.dir = scratch_dir("hidden")
        self.bufs: dict[tuple[int, int], torch.Tensor] = {}

    def put(self, i: int, j: int, t: torch.Tensor) -> torch.Tensor:
        key = (i % 2, j)
        if key not in self.bufs:
            f = self.dir / f"{key[0]}-{j}.bin"
            with f.open("wb") as fh:
                fh.truncate(t.numel() * t.element_size())
            self.bufs[key] = torch.from_file(str(f), shared=True, size=t.numel(), dtype=t.dtype).view(t.shape)
        buf = self.bufs[key]
        buf.copy_(t)
        return buf

    def close(self) -> None:
        import shutil

        self.bufs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


@torch.no_grad()
def calibrate_sequential(model: nn.Module, ckpt: Checkpoint, windows: torch.Tensor, thresholds=None,
                         batch_size: int = 8, keep_rows: int = 0, seed: int = 0, backend: str = "auto",
                         progress: bool = True, meta: dict | None = None,
                         spill_bytes: int | None = None) -> ActivationStats:
    """`calibration.calibrate`, one decoder layer in memory at a time: bit-identical statistics.
    `model`: a `skeleton` with `load_rest` done (embeddings and head are dropped again after the
    first pass). Under torch.distributed each rank runs its share of the batches through each
    layer; the statistics are reduced once at the end (they are per-layer reductions, so reducing
    per layer or at the end gives the same numbers).

    The hidden states of every window (a layer's inputs and outputs) stay in memory up to
    `spill_bytes` (default: a quarter of the memory available), else in memory-mapped files."""
    from . import distributed
    from .calibration import DEFAULT_THRESHOLDS

    spec = get_arch(model)
    rank, world = distributed.rank_world()
    mine = batches(windows.shape[0], batch_size, rank, world)
    calls = _capture(model, windows, batch_size, mine)
    drop_embeddings(model)  # only the capture pass embeds tokens; the head's hook needs no weight
    rec = recorder(model, windows, thresholds or DEFAULT_THRESHOLDS, batch_size, keep_rows, seed, backend)
    hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in calls[0]]
    need = 2 * sum(h.numel() * h.element_size() for h in hidden)
    spill = _Spill() if need > (available_bytes() // 4 if spill_bytes is None else spill_bytes) else None
    # A layer's output is the next layer's input: the hooks reduce that tensor once (see
    # _Recorder._stats) in memory, so carry each batch's last reduction across layers here too.
    lasts: list = [None] * len(mine)
    seconds: list[float] = []
    fp = fingerprint_start(spec.family)
    n = len(calls)
    try:
        bar = tqdm(range(n), desc="calibrate (layer by layer)", unit="layer", disable=not progress or rank != 0)
        for i in bar:
            t0 = time.perf_counter()
            layer = load_layer(model, ckpt, i)
            fingerprint_layer(fp, layer, i)
            for j, b in enumerate(mine):
                rec.at_batch(b, batch_size, windows.shape[1])
                args, kwargs = _with_hidden(calls[i][j], hidden[j])
                rec._last = lasts[j]
                out = layer(*args, **kwargs)
                hidden[j] = out[0] if isinstance(out, tuple) else out
                lasts[j], rec._last = rec._last, None
                if spill is not None:  # (the reduction is carried to the copy: same values)
                    hidden[j] = spill.put(i, j, hidden[j])
                    if lasts[j] is not None:
                        lasts[j] = (weakref.ref(hidden[j]), *lasts[j][1:])
            free_layer(model, i)
            seconds.append(time.perf_counter() - t0)
            bar.set_postfix(s_per_layer=f"{seconds[-1]:.1f}")
        norm = resolve(model, spec.final_norm)
        project = getattr(resolve(model, spec.final_norm.rpartition(".")[0]), "project_out", None)
        head = model.get_output_embeddings()
        with head_skipped(model):
            for j, b in enumerate(mine):  # the head's input, as the model's forward computes it
                rec.at_batch(b, batch_size, windows.shape[1])
                rec._last = lasts[j]
                h = norm(hidden[j])
                head(project(h) if project is not None else h)
                rec._last = lasts[j] = None
    finally:
        rec.close()
        if spill is not None:
            spill.close()
    if world > 1:
        distributed.reduce_recorder(rec, mine)
    stats = finish(model, rec, windows, keep_rows, seed, meta, fp.hexdigest()[:16])
    stats.meta["layer_seconds"] = seconds
    return stats


@torch.no_grad()
def compress_to(model: nn.Module, ckpt: Checkpoint, out_dir: str | Path, stats: ActivationStats,
                configs: list, scheme: W8A8 | LLMInt8 | None, tokenizer=None, fmt: str = "compressed-tensors",
                overwrite: bool = False, expert_format: str = "pack-quantized", progress: bool = True,
                extra: dict | None = None, inputs: tuple = ()) -> tuple[Path, ActivationStats]:
    """Mitigate with `configs`, quantize with `scheme` and export to `out_dir`, one decoder layer
    at a time. `model`: a `skeleton` (what lies outside the layers is loaded at the end); `stats`:
    its calibration statistics
    (checked against the weights layer by layer). Returns (out_dir, statistics of the result)."""
    from .checkpoint import _state_dict, check_export_args, export_config, write_extras, write_index

    if isinstance(scheme, LLMInt8):
        raise OutlierqError("the layer-by-layer pipeline exports W8A8 (compressed-tensors); LLM.int8 "
                            "is a load-time quantizer, use it in memory")
    check_export_args(fmt, expert_format)
    check_layer_major(configs)
    if (scheme is None) != (fmt == "fp"):
        raise OutlierqError("format 'fp' writes the mitigated float model (no scheme); "
                            "compressed-tensors needs a W8A8 scheme")
    spec = get_arch(model)
    out = Path(out_dir)
    check_target(out, "checkpoint", overwrite, inputs)
    n = len(decoder_layers(model, spec))
    final = layer_result(stats)
    fp = fingerprint_start(spec.family)
    weight_map: dict[str, str] = {}
    total = 0
    seconds: list[float] = []
    with atomic_dir(out, "checkpoint", overwrite=overwrite) as tmp:
        bar = tqdm(range(n), desc="mitigate+quantize+write (layer by layer)", unit="layer",
                   disable=not progress)
        for i in bar:
            t0 = time.perf_counter()
            layer = load_layer(model, ckpt, i)
            fingerprint_layer(fp, layer, i)
            s = mitigate_layer(model, stats, configs, i, final)
            if scheme is not None:
                quantize_(model, scheme, s, progress=False, only=[i])
            total += _write_part(_state_dict(model, expert_format, i), tmp, f"layer-{i:05d}", weight_map)
            free_layer(model, i)
            seconds.append(time.perf_counter() - t0)
            bar.set_postfix(s_per_layer=f"{seconds[-1]:.1f}")
        final.meta["layer_seconds_write"] = seconds
        if stats.meta.get("fingerprint") not in (None, fp.hexdigest()[:16]):
            raise OutlierqError("statistics are stale: they describe different weights than this "
                                "checkpoint has; recalibrate (nothing was written)")
        load_rest(model, ckpt)  # (embeddings and head were not needed until now)
        total += _write_part(_state_dict(model, expert_format, "rest"), tmp, "rest", weight_map)
        write_index(tmp, weight_map, total)
        final.meta["fingerprint"] = None  # (of the mitigated weights: not computed layer by layer)
        info = dict(extra or {}, pipeline="sequential")
        write_extras(tmp, model, export_config(model, fmt, expert_format), tokenizer, fmt, configs, final, info)
    return out, final


def _write_part(tensors: dict[str, torch.Tensor], d: Path, tag: str, weight_map: dict) -> int:
    fname = f"model-{tag}.safetensors"
    save_tensors(tensors, d / fname, {"format": "pt"})
    weight_map.update({k: fname for k in tensors})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def too_big(path: str | Path, dtype: torch.dtype = torch.float32, fraction: float = 0.5) -> bool:
    """Would the float model at checkpoint directory `path`, in `dtype`, take more than `fraction`
    of the memory available now? (The in-memory pipeline needs about twice the model: weight
    surgery in float64 one tensor at a time, int8 codes beside the float weights.)"""
    p = Path(path)
    files = list(p.glob("*.safetensors")) if p.is_dir() else []
    if not files:
        return False
    stored = 4
    try:
        cfg = json.loads((p / "config.json").read_text())
        stored = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.get("dtype") or cfg.get("torch_dtype"), 4)
    except (OSError, ValueError):
        pass
    need = sum(f.stat().st_size for f in files) * torch.tensor([], dtype=dtype).element_size() / stored
    return need > fraction * available_bytes()


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux); a large number where that is unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def run(model_path: str | Path, out_dir: str | Path | None, tokenizer, recipe: Any, scheme, calibration,
        dtype: torch.dtype = torch.float32, progress: bool = True, thresholds=None,
        spill_bytes: int | None = None, **export_kw) -> dict[str, Any]:
    """The whole layer-by-layer chain from a checkpoint directory: calibrate (or use statistics),
    then, with `out_dir`, mitigate + quantize + export. Returns {"stats", "final", "out"}."""
    from . import distributed
    from .pipeline import calibration_plan, resolve_recipe

    act = scheme.act if isinstance(scheme, W8A8) else "token"
    if quantizes_head(scheme):
        raise OutlierqError("the layer-by-layer pipeline keeps the output head float; for an int8 head "
                            "(--int8-head) quantize in memory (without --sequential)")
    check_layer_by_layer(scheme)
    ckpt = Checkpoint(model_path)
    model = skeleton(model_path, dtype)
    configs = resolve_recipe(recipe, act, model, layer_by_layer=True, fmt=getattr(scheme, "format", "int8"))
    check_layer_major(configs)
    _return_freed_memory()
    model.outlierq_source = str(model_path)
    if isinstance(calibration, ActivationStats):
        stats = calibration
        stats.check_matches(model, exact=False)  # shapes now; the weights as the layers load
    else:
        cal, windows, keep, meta = calibration_plan(model, tokenizer, calibration, configs, scheme)
        load_rest(model, ckpt)
        stats = calibrate_sequential(model, ckpt, windows, thresholds, batch_size=cal.batch_size, keep_rows=keep,
                                     seed=cal.seed, progress=progress, meta=meta, spill_bytes=spill_bytes)
    result: dict[str, Any] = {"stats": stats, "final": None, "out": None, "recipe": recipe_to_list(configs)}
    if out_dir is not None and distributed.is_writer():
        result["out"], result["final"] = compress_to(model, ckpt, out_dir, stats, configs, scheme, tokenizer,
                                                     progress=progress, **export_kw)
    return result
