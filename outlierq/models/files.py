"""What a local model directory's safetensors files hold, read from their headers and checked
before anything is allocated: the one validator of the in-memory loaders (float models and
outlierq exports) and the layer-by-layer reader.

A directory is trusted for nothing: the index may name files outside it, a header may lie about
sizes, and config.json may ask for sizes (a vocabulary of 2e9, 1e5 layers) that no weights back,
which building the model would try to allocate first. Each of these is one line naming the file."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutlierqError

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # safetensors' own limit
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]


def _bad(path: Path, why: str) -> OutlierqError:
    return OutlierqError(f"{path} is not a valid safetensors file ({why}); re-download or re-export it")


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header, each checked against the file's size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, "shorter than its header")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise _bad(path, f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise OutlierqError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError):
        raise _bad(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a mapping")
    data = size - 8 - n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = t["dtype"], t["shape"], t["data_offsets"]
            ok = (dtype in _ITEMSIZE and isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)
                  and type(a) is int and type(b) is int and 0 <= a <= b <= data
                  and b - a == math.prod(shape) * _ITEMSIZE[dtype])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise _bad(path, f"tensor {name!r} has an invalid entry")
        out[name] = TensorInfo(path.name, dtype, tuple(shape))
    return out


def _plain_name(d: Path, f: object, index: Path) -> str:
    """A file the index names must be a file name inside `d`: no directories, no '..', no absolute path."""
    if (not isinstance(f, str) or not f or f in (".", "..") or "/" in f or "\\" in f or "\0" in f
            or os.path.isabs(f)):
        raise OutlierqError(f"{index} names {f!r}: a checkpoint's files must lie in its own directory")
    if not (d / f).is_file():
        raise OutlierqError(f"{index} names {f}, which is not in {d}")
    return f


def tensor_index(d: str | Path) -> dict[str, TensorInfo]:
    """{tensor name: where, dtype, shape} of the checkpoint in directory `d` (its index and shards,
    or model.safetensors), as transformers would read it."""
    d = Path(d)
    index = d / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise OutlierqError(f"{index} is not a safetensors index (it needs a weight_map of tensor -> "
                                "file); re-download or re-export the checkpoint") from None
        if not isinstance(wm, dict) or not all(isinstance(k, str) for k in wm):
            raise OutlierqError(f"{index}: its weight_map must map tensor names to file names")
        files = sorted({_plain_name(d, f, index) for f in wm.values()})
    elif (d / "model.safetensors").is_file():
        wm, files = None, ["model.safetensors"]
    else:
        return {}
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(d / f).items():
            if wm is None or wm.get(name) == f:
                out[name] = info
    if wm is not None:
        missing = sorted(k for k in wm if k not in out)
        if missing:
            raise OutlierqError(f"{index} places {missing[0]!r} in {wm[missing[0]]}, which does not hold it")
    return out


def _layers_held(names) -> int:
    """The most numbered children any one module holds (the decoder layers, in a language model)."""
    seen: dict[str, set[str]] = {}
    for n in names:
        parts = n.split(".")
        for i, p in enumerate(parts):
            if p.isdigit():
                seen.setdefault(".".join(parts[:i]), set()).add(p)
    return max((len(v) for v in seen.values()), default=0)


def _config_params(config) -> int | None:
    """Parameters the model `config` describes (tied tensors once), built on the meta device: no
    memory. None where transformers cannot build it from the config alone."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception:  # noqa: BLE001  (the real load reports what is wrong with such a config)
        return None
    return sum(t.numel() for t in {id(t): t for t in model.parameters()}.values())


def _held_params(tensors: dict[str, TensorInfo]) -> int:
    """Parameters the weights hold: 8-bit codes packed four to an int32 (pack-quantized) count as four."""
    return sum(math.prod(t.shape) * (4 if n.endswith("weight_packed") else 1) for n, t in tensors.items())


def check_config(config, tensors: dict[str, TensorInfo], where: str | Path) -> None:
    """Refuse a config whose sizes the weights in `tensors` cannot back, before any model is built
    for real: a vocabulary or hidden width larger than every dimension of every tensor, far more
    decoder layers than the checkpoint numbers, or a model (built on the meta device, which costs
    no memory) with more than twice the parameters the weights hold. Layer counts alone do not
    decide: some configs count layers another way (HRM's num_hidden_layers is not its stack)."""
    if not tensors:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    # (the embedding is [vocab, hidden] in every causal LM; intermediate_size is not checked: an
    # all-MoE config may carry an unused one larger than any tensor, as Qwen3-MoE's does)
    for field in ("vocab_size", "hidden_size"):
        v = getattr(text, field, None)
        if isinstance(v, int) and v > largest:
            raise OutlierqError(f"{where}: config.json sets {field}={v}, larger than any dimension of any "
                                f"tensor in the weights (at most {largest}); refusing to build it")
    layers, held = getattr(text, "num_hidden_layers", None), _layers_held(tensors)
    if isinstance(layers, int) and layers > 4 * max(held, 1) + 64:  # (before building even on meta)
        raise OutlierqError(f"{where}: config.json asks for {layers} decoder layers but the weights hold "
                            f"{held}; the missing layers would be random")
    want, have = _config_params(config), _held_params(tensors)
    if want is not None and want > 2 * have + 4096:
        raise OutlierqError(f"{where}: config.json describes {want:,} parameters but the weights hold {have:,}; "
                            "the missing ones would be random")
