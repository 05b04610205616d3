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
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibrate import ActivationStats
from .detect import detect
from .errors import OutlierqError
from .provenance import atomic_dir, stamp
from .quantize import Int8Linear

FORMATS = ("compressed-tensors", "fp")
MANIFEST = "SHA256SUMS"
DEFAULT_SHARD = 2 * 1024 ** 3


def _quantization_config(model: nn.Module, ignore: list[str]) -> dict[str, Any]:
    """One config group per activation mode. A single mode targets the class "Linear" (the
    common layout); mixed modes target Linears by their name's last component, one regex each."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    by_act: dict[str, set[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            by_act.setdefault(m.act, set()).add(name.rpartition(".")[2])
    if not by_act or "none" in by_act:
        raise OutlierqError("compressed-tensors export needs W8A8 (int8 activations) on every "
                            "quantized Linear; weight-only int8 has no W8A8 layout here")
    groups = {}
    for i, (act, kinds) in enumerate(sorted(by_act.items())):
        w = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel",
                             dynamic=False)
        a = QuantizationArgs(num_bits=8, type="int", symmetric=True,
                             strategy="token" if act == "token" else "tensor",
                             dynamic=act == "token")
        targets = ["Linear"] if len(by_act) == 1 else [f"re:.*\\.{k}$" for k in sorted(kinds)]
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=w, input_activations=a)
    qc = QuantizationConfig(config_groups=groups, format="int-quantized",
                            quantization_status="compressed", ignore=ignore)
    return qc.model_dump()


def _act_for(name: str, qc: dict[str, Any]) -> str | None:
    """The activation mode the checkpoint's config groups give Linear `name` (None: ignored)."""
    import re

    if name in set(qc.get("ignore") or []):
        return None
    for g in qc["config_groups"].values():
        for t in g["targets"]:
            if t == "Linear" or (t.startswith("re:") and re.match(t[3:], name)) or t == name:
                return "token" if g["input_activations"]["strategy"] == "token" else "tensor"
    return None


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        out[name] = t.detach().cpu().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            out[f"{name}.weight_scale"] = m.weight_scale.to(dtype).reshape(-1, 1).contiguous()
            if m.input_scale is not None:
                out[f"{name}.input_scale"] = m.input_scale.to(dtype).reshape(1).contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)  # transformers re-ties it on load
    return out


def _write_shards(tensors: dict[str, torch.Tensor], d: Path, max_shard: int) -> None:
    from safetensors.torch import save_file

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
        save_file(shards[0], str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, sh in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in sh})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export(model: nn.Module, out_dir: str | Path, tokenizer=None, fmt: str = "compressed-tensors",
           recipe: list | None = None, stats: ActivationStats | None = None,
           overwrite: bool = False, max_shard_bytes: int = DEFAULT_SHARD,
           extra: dict | None = None) -> Path:
    """Write `model` (mitigated; quantized for compressed-tensors) to `out_dir`; returns it."""
    from .mitigate.recipe import recipe_to_list

    if fmt not in FORMATS:
        raise OutlierqError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutlierqError(f"{out} exists and is not empty; pass --overwrite to replace it")
    quantized = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if fmt == "fp" and quantized:
        raise OutlierqError("format 'fp' writes the unquantized model; export before quantize_")
    config = copy.deepcopy(model.config)
    if fmt == "compressed-tensors":
        if not quantized:
            raise OutlierqError("compressed-tensors export needs a quantized model (run quantize_)")
        kept_float = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        config.quantization_config = _quantization_config(model, kept_float)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_shards(_state_dict(model), tmp, max_shard_bytes)
        info = {"format": fmt, "recipe": recipe_to_list(recipe or []), **stamp(), **(extra or {})}
        if stats is not None:
            info["calibration"] = {k: v for k, v in stats.meta.items()
                                   if k in ("model", "data", "samples", "seqlen", "seed", "tokens")}
            info["stats_summary"] = summarize(stats)
            # the outlier report's compact part (per-layer flag lists live in `outlierq report`)
            info["outliers"] = {k: v for k, v in detect(stats).as_dict().items() if k != "layers"}
        (tmp / "outlierq.json").write_text(json.dumps(info, indent=2, default=str))
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        (tmp / MANIFEST).write_text("".join(f"{_sha256(p)}  {p.name}\n" for p in files))
    return out


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
    """Check every file against SHA256SUMS; a missing, truncated or altered file is an error."""
    d = Path(path)
    man = d / MANIFEST
    if not man.exists():
        raise OutlierqError(f"{d} has no {MANIFEST}; not an outlierq export (or it was altered)")
    for line in man.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        f = d / name
        if not f.exists():
            raise OutlierqError(f"{f} is listed in {MANIFEST} but missing")
        if _sha256(f) != digest:
            raise OutlierqError(f"{f} fails its checksum (truncated or altered); re-export it")


def load(path: str | Path, device: str = "cpu"):
    """Load an outlierq export; compressed-tensors checkpoints come back with real int8
    Int8Linear modules. Returns (model, tokenizer or None)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = Path(path)
    verify(d)
    cfg = AutoConfig.from_pretrained(d)
    qc = getattr(cfg, "quantization_config", None)
    tok = AutoTokenizer.from_pretrained(d) if (d / "tokenizer_config.json").exists() else None
    if qc is None:
        return AutoModelForCausalLM.from_pretrained(d).eval().requires_grad_(False), tok
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    del cfg.quantization_config
    # Built for real (not on the meta device) so non-persistent buffers such as rotary
    # frequencies are initialised; the weights are then replaced by the checkpoint's.
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(cfg, "dtype", None) or torch.float32)
    for name, m in list(model.named_modules()):
        act = _act_for(name, qc) if isinstance(m, nn.Linear) else None
        if act is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    Int8Linear(m.in_features, m.out_features, m.bias is not None, act))
    files = sorted(d.glob("*.safetensors"))
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    for k in [k for k in sd if k.endswith("weight_scale")]:
        sd[k] = sd[k].float().reshape(-1)
    for k in [k for k in sd if k.endswith("input_scale")]:
        sd[k] = sd[k].float().reshape(1)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise OutlierqError(f"{d}: checkpoint does not match its config (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return model.to(device).eval().requires_grad_(False), tok

