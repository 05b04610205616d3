"""Export mitigated (and quantized) checkpoints that serving engines and transformers load, and
load them back.

format="compressed-tensors": the W8A8 layout vLLM, SGLang and transformers read: int8 `weight`
[out, in], `weight_scale` [out, 1] in the model dtype, `input_scale` [1] for static activations,
and the `quantization_config` built by the compressed-tensors package's own pydantic models.
Our scales are absmax/127 (codes -127..127); compressed-tensors' own quantizer uses absmax/127.5,
but decoding is always codes * scale, so what we write decodes to exactly the weights outlierq
evaluated. format="fp": the mitigated float model in the standard HF layout.

Beside the weights: tokenizer, generation config, recipe, calibration summary, versions, and
SHA256SUMS over every file, verified by `load`. The directory is built under a temporary name and
renamed into place, so a failure (an interrupt included) leaves no partial directory and an
existing target untouched."""
from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import ActivationStats
from .detection import detect
from .errors import OutlierqError, OutlierqNotice
from .provenance import atomic_dir, check_target, output_files, save_tensors, sha256_file, stamp
from .models.arch import decoder_layers, get_arch, resolve
from .models.prepare import prepare
from .quant import Int8Experts, Int8Linear, expert_names, matches
from .quant.formats import INT8

FORMATS = ("compressed-tensors", "fp")
MANIFEST = "SHA256SUMS"
DEFAULT_SHARD = 2 * 1024 ** 3


def _units(model: nn.Module) -> list[tuple[str, str, bool]]:
    """(checkpoint name, activation mode, is an expert) of every quantized Linear, experts under
    the per-expert names the family's original checkpoints use."""
    spec = get_arch(model)
    out = [(n, m.act, False) for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    for i, layer in enumerate(decoder_layers(model, spec)) if spec.experts else ():
        ex = resolve(layer, spec.experts.path)
        if isinstance(ex, Int8Experts):
            for e in range(ex.num_experts):
                g, u, d = expert_names(spec, f"{spec.layers}.{i}", e)
                out += [(g, ex.act[0], True), (u, ex.act[0], True), (d, ex.act[1], True)]
    return out


def _targets(names: list[str], everyone: dict[str, str]) -> list[str]:
    """compressed-tensors targets for `names`: layer indices collapsed to \\d+ where every
    module of that shape is in this group, exact names otherwise (groups stay disjoint)."""
    pat = lambda n: re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n))  # noqa: E731
    mine = set(names)
    by_pat: dict[str, list[str]] = {}
    for n in everyone:
        by_pat.setdefault(pat(n), []).append(n)
    out = []
    for n in names:
        p = pat(n)
        t = f"re:{p}$" if all(m in mine for m in by_pat[p]) else f"re:{re.escape(n)}$"
        if t not in out:
            out.append(t)
    return out


def _quantization_config(model: nn.Module, ignore: list[str], expert_format: str) -> dict[str, Any]:
    """One config group per (activation mode, experts or not). One mode and no experts: the
    common layout, targets ["Linear"]. Otherwise targets from `_targets` (disjoint), and experts
    in their own group (transformers 5 dequantizes fused experts only from packed formats).

    Built from the quantized modules, not from the scheme (issue 30 asked for the scheme): the
    modules are what the tensors are — a Linear a scheme targets can stay float (a 1-wide gate,
    one the model never calls, fused experts of an inferred architecture), a model reloaded by
    `outlierq.load` has no scheme, and a user may quantize parts by hand; describing the modules
    cannot disagree with the weights."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    units = _units(model)
    if not units or any(a == "none" for _, a, _ in units):
        raise OutlierqError("compressed-tensors export needs W8A8 (int8 activations) on every "
                            "quantized Linear; weight-only int8 has no W8A8 layout here")
    fmts = {m.fmt for m in model.modules() if isinstance(m, Int8Linear)} or {INT8}
    if len(fmts) > 1:
        raise OutlierqError("this model mixes int8 and FP8 Linears; an export holds one number format")
    fmt = fmts.pop()
    strategies = {m.weight_strategy for m in model.modules() if isinstance(m, Int8Linear)} or {"channel"}
    if len(strategies) > 1:
        raise OutlierqError("this model mixes per-channel and per-tensor weight scales; an export holds one")
    strategy = strategies.pop()
    kinds = sorted({(a, x) for _, a, x in units})
    simple = len(kinds) == 1 and not kinds[0][1]
    everyone = {n: a for n, a, _ in units}
    groups = {}
    for i, (act, is_expert) in enumerate(kinds):
        w = QuantizationArgs(num_bits=8, type=fmt.ct_type, symmetric=True, strategy=strategy if not is_expert
                             else "channel", dynamic=False)
        a = QuantizationArgs(num_bits=8, type=fmt.ct_type, symmetric=True,
                             strategy="token" if act == "token" else "tensor", dynamic=act == "token")
        names = [n for n, ac, x in units if ac == act and x == is_expert]
        group_fmt = (expert_format if is_expert else fmt.ct_format) if not simple else None
        groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if simple else _targets(names, everyone), weights=w,
            input_activations=a, format=group_fmt)
    qc = QuantizationConfig(config_groups=groups, format=fmt.ct_format if simple else "mixed-precision",
                            quantization_status="compressed", ignore=ignore)
    return qc.model_dump()


def _act_for(name: str, qc: dict[str, Any]) -> str | None:
    """The activation mode the checkpoint's config groups give Linear `name` (None: ignored),
    with the matcher quantize_ uses."""
    if matches(name, qc.get("ignore") or []):
        return None
    for g in qc["config_groups"].values():
        if matches(name, [t for t in g["targets"] if t != "Linear"]) or "Linear" in g["targets"]:
            return "token" if g["input_activations"]["strategy"] == "token" else "tensor"
    return None


def _format_of(qc: dict[str, Any]) -> str:
    """The number format of the checkpoint's weights (one per export: `_quantization_config`)."""
    types = {g["weights"]["type"] for g in qc["config_groups"].values()}
    return "fp8" if types == {"float"} else "int8"


def _weight_strategy(qc: dict[str, Any]) -> str:
    """channel or tensor: the weight scales of the checkpoint's Linears (one per export)."""
    kinds = {g["weights"].get("strategy", "channel") for g in qc["config_groups"].values()} - {"channel"}
    return "tensor" if kinds == {"tensor"} else "channel"


def _state_dict(model: nn.Module, expert_format: str = "pack-quantized",
                part: int | str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under the family's original names: Conv1D weights transposed back
    (float ones; int8 codes keep the [out, in] layout of compressed-tensors), experts one Linear
    each, the router under its original name. part: None = all, i = decoder layer i only,
    "rest" = everything outside the decoder layers (the layer-by-layer pipeline writes the parts
    one at a time)."""
    spec = get_arch(model)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    in_layers = spec.layers + "."
    mine = (lambda n: True) if part is None else \
        (lambda n: not n.startswith(in_layers)) if part == "rest" else \
        (lambda n: n.startswith(f"{spec.layers}.{part}."))
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith(".input_rotation.matrix") and mine(name):
            # rotate_down's block (one tensor shared in memory) under each Linear, as vLLM reads it
            out[name.replace(".input_rotation.matrix", f".{_scheme(t.shape[0])}_input.weight")] = t.detach().cpu().clone()
        elif mine(name):
            out[name] = t.detach().cpu().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear) and mine(name + "."):
            s = m.weight_scale[:1].reshape(1) if m.weight_strategy == "tensor" else m.weight_scale.reshape(-1, 1)
            out[f"{name}.weight_scale"] = s.to(dtype).contiguous()
            if m.input_scale is not None:
                out[f"{name}.input_scale"] = m.input_scale.to(dtype).reshape(1).contiguous()
    for i, layer in enumerate(decoder_layers(model, spec)):
        pre = f"{spec.layers}.{i}"
        if not mine(pre + "."):
            continue
        for path in spec.conv1d:
            if isinstance(resolve(layer, path), nn.Linear):
                out[f"{pre}.{path}.weight"] = out[f"{pre}.{path}.weight"].t().contiguous()
        if spec.experts is None:
            continue
        ex = resolve(layer, spec.experts.path)
        for k in [k for k in out if k.startswith(f"{pre}.{spec.experts.path}.")]:
            del out[k]
        out[f"{pre}.{spec.experts.router_ckpt}.weight"] = out.pop(f"{pre}.{spec.router}.weight")
        out.update(_expert_tensors(ex, spec, pre, dtype, expert_format))
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # transformers re-ties it on load
    return out


def _expert_tensors(ex: nn.Module, spec, pre: str, dtype: torch.dtype, expert_format: str):
    out = {}
    int8 = isinstance(ex, Int8Experts)
    n = ex.num_experts if int8 else ex.gate_up_proj.shape[0]
    for e in range(n):
        names = expert_names(spec, pre, e)
        if int8:
            codes = (*ex.gate_up[e].chunk(2), ex.down[e])
            scales = (*ex.gate_up_scale[e].chunk(2), ex.down_scale[e])
            ins = [ex.gate_up_input_scale, ex.gate_up_input_scale, ex.down_input_scale]
            for name, c, sc, i in zip(names, codes, scales, ins):
                if expert_format == "pack-quantized":
                    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
                    out[f"{name}.weight_packed"] = pack_to_int32(c, 8).contiguous()
                    out[f"{name}.weight_shape"] = torch.tensor(list(c.shape))
                else:
                    out[f"{name}.weight"] = c.contiguous()
                out[f"{name}.weight_scale"] = sc.to(dtype).reshape(-1, 1).contiguous()
                if i is not None:
                    out[f"{name}.input_scale"] = i[e].to(dtype).reshape(1).clone()
        else:
            g, u = ex.gate_up_proj[e].detach().chunk(2)
            for name, w in zip(names, (g, u, ex.down_proj[e].detach())):
                out[f"{name}.weight"] = w.cpu().contiguous()
    return out


def _write_shards(tensors: dict[str, torch.Tensor], d: Path, max_shard: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    if len(shards) == 1:
        save_tensors(shards[0], d / "model.safetensors", {"format": "pt"})
        return
    weight_map = {}
    for i, sh in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(sh, d / fname, {"format": "pt"})
        weight_map.update({k: fname for k in sh})
    write_index(d, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))


def write_index(d: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    """The sharded checkpoint's index (tensor name -> shard file), as transformers reads it."""
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))


def export(model: nn.Module, out_dir: str | Path, tokenizer=None, fmt: str = "compressed-tensors",
           recipe: list | None = None, stats: ActivationStats | None = None,
           overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD,
           extra: dict | None = None, expert_format: str = "pack-quantized",
           inputs: tuple = ()) -> Path:
    """Write `model` (mitigated; quantized for compressed-tensors) to `out_dir`; returns it.

    expert_format: how int8 MoE experts are stored. "pack-quantized" (codes packed into int32,
    compressed-tensors' packed layout) is the one transformers 5 can load into its fused experts;
    "int-quantized" (plain int8 per expert) is the layout of llm-compressor's W8A8 MoE checkpoints.
    `out_dir` is refused if it is not new/empty, or (with overwrite) an earlier outlierq checkpoint,
    or if it holds one of `inputs` (e.g. the model directory)."""
    check_export_args(fmt, expert_format)
    out = Path(out_dir)
    check_target(out, "checkpoint", overwrite, inputs)
    config = export_config(model, fmt, expert_format)
    with atomic_dir(out, "checkpoint", overwrite=overwrite) as tmp:
        _write_shards(_state_dict(model, expert_format), tmp, max_shard_bytes)
        write_extras(tmp, model, config, tokenizer, fmt, recipe, stats, extra)
    return out


def check_exportable(recipe: list) -> None:
    """Refuse, before any work, a recipe whose result no checkpoint can hold."""
    from .mitigate.rotate_down import RotateDown

    if any(isinstance(c, RotateDown) and c.block is None for c in recipe):
        raise OutlierqError("rotate_down:block=none (the full-width rotation) is in memory only: no "
                            "checkpoint format carries it; export with a block (rotate_down:block=128), "
                            "or evaluate it through the Python API (outlierq.compress)")


def check_export_args(fmt: str, expert_format: str) -> None:
    if expert_format not in ("pack-quantized", "int-quantized"):
        raise OutlierqError(f"unknown expert_format {expert_format!r}: pack-quantized | int-quantized")
    if fmt not in FORMATS:
        raise OutlierqError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def export_config(model: nn.Module, fmt: str, expert_format: str):
    """The checkpoint's config: the model's, with the quantization_config for compressed-tensors
    (only module types and names are read, so a layer-by-layer skeleton works too)."""
    spec = get_arch(model)  # unsupported families fail here, with one line
    from .mitigate.rotate_down import rotated_linears

    keyed = [n for n, m in model.named_modules() if getattr(m, "token_ids", None) is not None]
    if keyed:  # see W8A8.quiet_tokens
        raise OutlierqError(f"{keyed[0]} keys a static range by token id (quiet_tokens), which no checkpoint "
                            "format carries: it is in memory only; export without it")
    kept = rotated_linears(model, servable=False)
    if kept:  # see mitigate/rotate_down.py
        raise OutlierqError(f"{kept[0]} rotates its input by the full-width rotation (rotate_down:block=none), "
                            "which no checkpoint format carries: it is in memory only; export with "
                            "rotate_down:block=128")
    rotated = rotated_linears(model, servable=True)
    if rotated and fmt == "fp":
        raise OutlierqError(f"{rotated[0]} rotates its input online (rotate_down): the fp format has no "
                            "transform; export compressed-tensors")
    quantized = [n for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Experts))]
    if fmt == "fp" and quantized:
        raise OutlierqError("format 'fp' writes the unquantized model; export before quantize_")
    config = copy.deepcopy(model.config)
    if fmt == "compressed-tensors":
        if not quantized:
            raise OutlierqError("compressed-tensors export needs a quantized model (run quantize_)")
        kept_float = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if spec.experts is not None:  # routers stay float (vLLM reads them as Linears)
            kept_float += [f"{spec.layers}.{i}.{spec.experts.router_ckpt}"
                           for i in range(len(decoder_layers(model, spec)))]
        config.quantization_config = _quantization_config(model, kept_float, expert_format)
        if rotated:
            config.quantization_config["transform_config"] = _transform_config(model, rotated)
            warnings.warn("this checkpoint rotates Linear inputs online (rotate_down, a compressed-tensors "
                          "transform_config): vLLM and outlierq.load apply it, transformers 5 does not (it would "
                          "skip the R4_* tensors and compute another function); for transformers, export a "
                          "recipe without rotate_down", OutlierqNotice, stacklevel=3)
    return config


def _scheme(block: int) -> str:
    """The transform scheme of rotate_down's blocks of this order: tensors are stored as
    <linear>.R4_<block>_input.weight (vLLM names a transform's module <scheme>_<location>)."""
    return f"R4_{block}"


def _transform_config(model: nn.Module, rotated: list[str]) -> dict[str, Any]:
    """The compressed-tensors transform_config of rotate_down's block rotations: per block order
    one "random-hadamard" input transform with head_dim = the order, over the Linears that use it.
    vLLM shares one tensor per (scheme, size), so every Linear of one order must hold the same block."""
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    by_order: dict[int, list[str]] = {}
    for n in rotated:
        by_order.setdefault(model.get_submodule(n).input_rotation.matrix.shape[0], []).append(n)
    everyone = {n: "" for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    groups = {}
    for b, names in sorted(by_order.items()):
        blocks = [model.get_submodule(n).input_rotation.matrix for n in names]
        if any(not torch.equal(x, blocks[0]) for x in blocks[1:]):
            raise OutlierqError(f"rotate_down's {b}-block differs between Linears; vLLM applies one block per "
                                "order: rotate with one rotate_down step")
        # targets anchored at the decoder-layer list, not the model's root: vLLM renames the root of
        # some families (Gemma-3's language_model) and maps quantization targets, not transform ones
        targets = [f"re:.*{t[t.index('layers'):]}" if "layers" in t else t for t in _targets(names, everyone)]
        groups[_scheme(b)] = TransformScheme(type="random-hadamard", head_dim=b, apply=[
            TransformArgs(targets=targets, location="input")])
    return TransformConfig(config_groups=groups).model_dump(mode="json")


def write_extras(tmp: Path, model: nn.Module, config, tokenizer, fmt: str, recipe: list | None,
                 stats: ActivationStats | None, extra: dict | None) -> None:
    """Everything beside the weight shards (already in `tmp`): config, generation config,
    tokenizer, outlierq.json, and last the SHA256SUMS manifest over every file."""
    from .mitigate.recipe import CHOSEN, applied, recipe_to_list

    config.save_pretrained(tmp)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    steps, skipped = applied(model, recipe or [])
    info = {"format": fmt, "recipe": recipe_to_list(steps), **stamp(), **(extra or {})}
    if getattr(model, "outlierq_scheme", None) is not None and fmt != "fp":
        info.setdefault("scheme", model.outlierq_scheme)  # (recorded by quantize_)
    if skipped:
        info["skipped"] = skipped
    if stats is not None:
        info["calibration"] = {k: v for k, v in stats.meta.items()
                               if k in ("model", "data", "samples", "seqlen", "seed", "tokens")}
        info["stats_summary"] = summarize(stats)
        # what the recipe resolved to: the alpha chosen per smoothing group, split sizes
        info["chosen"] = {k: stats.meta[k] for k in CHOSEN if k in stats.meta}
        # the outlier report's compact part (per-layer flag lists live in `outlierq report`)
        info["outliers"] = {k: v for k, v in detect(stats).as_dict().items() if k != "layers"}
    info.update(getattr(model, "outlierq_tuning", {}))  # what each tuning step chose (act_clip, range_tune)
    (tmp / "outlierq.json").write_text(json.dumps(info, indent=2, default=str))
    files = output_files(tmp)
    (tmp / MANIFEST).write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))


def state_bytes(model: nn.Module) -> int:
    """Bytes a checkpoint of `model`'s state holds, tied tensors counted once."""
    return sum(t.numel() * t.element_size() for t in
               {t.data_ptr(): t for t in model.state_dict().values()}.values())


def dir_mb(d: str | Path) -> float:
    """Size of the files directly in checkpoint directory `d`, in MB."""
    return sum(f.stat().st_size for f in Path(d).iterdir() if f.is_file()) / 1e6


def summarize(stats: ActivationStats, top: int = 20) -> dict[str, Any]:
    """The largest activation channels (Linear inputs and residual stream), for humans."""
    def rows(table):
        r = [(st.absmax.max().item(), n, int(st.absmax.argmax()), st.absmax.median().item())
             for n, st in table.items()]
        r.sort(reverse=True)
        return [{"layer": n, "channel": c, "absmax": v, "median_channel_absmax": med}
                for v, n, c, med in r[:top]]
    return {"linear_inputs": rows(stats.inputs), "residual": rows(stats.residual)}


def verify(path: str | Path) -> None:
    """An export is exactly the files its SHA256SUMS lists, each with its checksum: a missing,
    extra, renamed, truncated or altered file, or a malformed manifest, is an error naming it."""
    d = Path(path)
    man = d / MANIFEST
    if not man.is_file():
        raise OutlierqError(f"{d} has no {MANIFEST}; not an outlierq export (or it was altered)")
    listed: dict[str, str] = {}
    for i, line in enumerate(man.read_text(errors="replace").splitlines(), 1):
        m = re.fullmatch(r"([0-9a-f]{64})  ([^/\\]+)", line)
        if not m or m.group(2) in (".", "..", MANIFEST) or m.group(2) in listed:
            raise OutlierqError(f"{man} line {i} is malformed ({line[:60]!r}); re-export the checkpoint")
        listed[m.group(2)] = m.group(1)
    present = {p.name for p in d.iterdir() if p.name != MANIFEST}
    extra, missing = sorted(present - listed.keys()), sorted(listed.keys() - present)
    if missing:
        raise OutlierqError(f"{d / missing[0]} is listed in {MANIFEST} but missing")
    if extra:
        raise OutlierqError(f"{d / extra[0]} is not in {MANIFEST}: an export holds exactly its listed "
                            "files; remove it or re-export")
    for name, digest in listed.items():
        f = d / name
        if not f.is_file() or sha256_file(f) != digest:
            raise OutlierqError(f"{f} fails its checksum (truncated or altered); re-export it")


def load(path: str | Path, device: str = "cpu"):
    """Load an outlierq export; compressed-tensors checkpoints come back with real int8
    Int8Linear modules. Returns (model, tokenizer or None)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .models.files import check_config, tensor_index

    d = Path(path)
    verify(d)
    cfg = AutoConfig.from_pretrained(d, trust_remote_code=False)
    check_config(cfg, tensor_index(d), d)  # (before anything is built from it)
    qc = getattr(cfg, "quantization_config", None)
    tok = None
    if (d / "tokenizer_config.json").exists():
        try:
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        except ValueError as e:  # (transformers' refusal of auto_map code, among others)
            raise OutlierqError(f"the tokenizer of {d} does not load without running its own code "
                                f"({str(e).splitlines()[0][:120]}); outlierq never runs checkpoint code") from None
    if qc is None:
        model = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False, use_safetensors=True)
        prepare(model)  # unsupported families fail here too
        return model.eval().requires_grad_(False), tok
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    _check_quantization_config(d, qc)
    del cfg.quantization_config
    # Built for real (not on the meta device) so non-persistent buffers such as rotary
    # frequencies are initialised; the weights are then replaced by the checkpoint's.
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(cfg, "dtype", None) or torch.float32,
                                             trust_remote_code=False)
    prepare(model)  # Conv1D -> Linear as everywhere else; unsupported families fail here
    spec = get_arch(model)
    fmt = _format_of(qc)
    for name, m in list(model.named_modules()):
        act = _act_for(name, qc) if isinstance(m, nn.Linear) else None
        if act is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Int8Linear(m.in_features, m.out_features, m.bias is not None, act, fmt=fmt))
    files = sorted(d.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    filled: set[str] = set()
    for i, layer in enumerate(decoder_layers(model, spec)):
        pre = f"{spec.layers}.{i}"
        for path in spec.conv1d:  # float Conv1D weights are stored [in, out]
            if type(resolve(layer, path)) is nn.Linear:
                sd[f"{pre}.{path}.weight"] = sd[f"{pre}.{path}.weight"].t()
        if spec.experts is not None:
            _load_experts(layer, spec, pre, qc, sd, filled)
    _load_rotations(model, qc, sd)
    for k in [k for k in sd if k.endswith("weight_scale")]:
        sd[k] = sd[k].float().reshape(-1)
        m = model.get_submodule(k.rpartition(".")[0])
        if isinstance(m, Int8Linear) and sd[k].numel() == 1 and _weight_strategy(qc) == "tensor":
            sd[k], m.weight_strategy = sd[k].expand(m.out_features).clone(), "tensor"
    for k in [k for k in sd if k.endswith("input_scale")]:
        sd[k] = sd[k].float().reshape(1)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if "rotary_emb" not in k and k.rpartition(".")[0] not in filled]
    if missing or unexpected:
        raise OutlierqError(f"{d}: checkpoint does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return model.to(device).eval().requires_grad_(False), tok


def _check_quantization_config(d: Path, qc: dict) -> None:
    """One line for a quantization_config that is not W8A8 as outlierq writes it (a hand-edited or
    foreign export), before anything reads it."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise OutlierqError(f"{d}/config.json: quantization_config has no config_groups; not an outlierq W8A8 export")
    for name, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        a = g.get("input_activations") if isinstance(g, dict) else None
        if not isinstance(g.get("targets") if isinstance(g, dict) else None, list) or not isinstance(w, dict) \
                or w.get("num_bits") != 8 or w.get("type") not in ("int", "float") or not isinstance(a, dict) \
                or a.get("strategy") not in ("token", "tensor") or a.get("num_bits") != 8 \
                or a.get("type", w.get("type")) != w.get("type"):
            raise OutlierqError(f"{d}/config.json: config group {name!r} is not W8A8 as outlierq reads it "
                                "(8-bit int or float weights with targets, per-token or per-tensor input "
                                "activations of the same type)")
    if any(g["weights"].get("strategy", "channel") not in ("channel", "tensor") for g in groups.values()):
        raise OutlierqError(f"{d}/config.json: weight scales per channel or per tensor only (outlierq reads no "
                            "group or block strategy)")
    if len({g["weights"]["type"] for g in groups.values()}) > 1:
        raise OutlierqError(f"{d}/config.json: its config groups mix int and float weights; outlierq reads one format")
    if not isinstance(qc.get("ignore", []), list):
        raise OutlierqError(f"{d}/config.json: quantization_config ignore must be a list")


def _load_rotations(model: nn.Module, qc: dict, sd: dict) -> None:
    """rotate_down's block rotation from the checkpoint's transform_config (see `_transform_config`),
    attached to the Linears it targets; refuses transforms outlierq does not write."""
    from .mitigate.rotate_down import BlockRotation

    for name, scheme in ((qc.get("transform_config") or {}).get("config_groups") or {}).items():
        args = scheme.get("apply") or []
        if scheme.get("type") not in ("random-hadamard", "hadamard") or not scheme.get("head_dim") or \
                any(a.get("location") != "input" or a.get("inverse") or a.get("ignore") for a in args):
            raise OutlierqError(f"transform {name!r} of this checkpoint is not one outlierq applies (it reads "
                                "block-diagonal Hadamard input transforms, as rotate_down writes them)")
        for mod_name, m in list(model.named_modules()):
            if isinstance(m, Int8Linear) and any(matches(mod_name, a["targets"]) for a in args):
                key = f"{mod_name}.{name}_input.weight"
                b = scheme["head_dim"]
                if key not in sd or tuple(sd[key].shape) != (b, b) or m.in_features % b:
                    raise OutlierqError(f"checkpoint has no {b} x {b} {key} for its {m.in_features}-wide input, "
                                        f"which its transform {name!r} needs")
                sd[f"{mod_name}.input_rotation.matrix"] = sd.pop(key)  # (loaded with the rest)
                m.input_rotation = BlockRotation(torch.empty_like(sd[f"{mod_name}.input_rotation.matrix"]))


def fused_experts(spec, pre: str, n: int, get) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers-5 fused (gate_up_proj [E, 2I, H], down_proj [E, H, I]) from the per-expert
    float Linears of an original checkpoint; `get(name)` returns one checkpoint tensor."""
    names = [expert_names(spec, pre, e) for e in range(n)]
    return (torch.stack([torch.cat([get(f"{g}.weight"), get(f"{u}.weight")]) for g, u, _ in names]),
            torch.stack([get(f"{d}.weight") for _, _, d in names]))


def _load_experts(layer: nn.Module, spec, pre: str, qc: dict, sd: dict, filled: set) -> None:
    """Per-expert checkpoint Linears (plain or packed int8) -> one Int8Experts module."""
    from .mitigate.surgery import set_module

    ex = resolve(layer, spec.experts.path)
    n, two_i, h = ex.gate_up_proj.shape
    gate0, _, down0 = expert_names(spec, pre, 0)
    acts = (_act_for(gate0, qc), _act_for(down0, qc))
    sd[f"{pre}.{spec.router}.weight"] = sd.pop(f"{pre}.{spec.experts.router_ckpt}.weight")
    if acts[0] is None or acts[1] is None:  # float experts: stack them back into the fused layout
        gate_up, down = fused_experts(spec, pre, n, lambda k: sd.pop(k))
        ex.gate_up_proj.data = gate_up.to(ex.gate_up_proj.dtype)
        ex.down_proj.data = down.to(ex.down_proj.dtype)
        return
    q = Int8Experts(n, h, two_i // 2, ex.act_fn, acts)

    def codes(name: str, shape) -> torch.Tensor:
        if f"{name}.weight_packed" in sd:
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
            sd.pop(f"{name}.weight_shape", None)
            return unpack_from_int32(sd.pop(f"{name}.weight_packed"), 8, torch.Size(shape)).to(torch.int8)
        return sd.pop(f"{name}.weight")

    for e in range(n):
        g, u, dn = expert_names(spec, pre, e)
        q.gate_up[e] = torch.cat([codes(g, (two_i // 2, h)), codes(u, (two_i // 2, h))])
        q.down[e] = codes(dn, (h, two_i // 2))
        q.gate_up_scale[e] = torch.cat([sd.pop(f"{g}.weight_scale"), sd.pop(f"{u}.weight_scale")]).float().reshape(-1)
        q.down_scale[e] = sd.pop(f"{dn}.weight_scale").float().reshape(-1)
        for buf, k in ((q.gate_up_input_scale, g), (q.down_input_scale, dn)):
            if buf is not None:
                buf[e] = sd.pop(f"{k}.input_scale").float().reshape(())
            sd.pop(f"{u}.input_scale", None)
    set_module(layer, spec.experts.path, q)
    filled.add(f"{pre}.{spec.experts.path}")
