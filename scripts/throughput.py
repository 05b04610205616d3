"""Evaluation throughput of each quantized form, measured back to back in one process, and where
the time goes (torch.profiler over one window of the FP32 and W8A8 forms).

    python scripts/throughput.py --model smollm2-135m --windows 2

The study's tokens/s column is measured while other rows' work may share the CPU; this script is
the controlled comparison: same windows, same process, rows interleaved over --repeats rounds,
median tokens/s kept. Writes results/throughput_<model>.json and .md."""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from outlierq import calibrate, compress, load_model, ops, perplexity
from outlierq.data import calib_windows, read_text, tokenize
from outlierq.ops import gemm
from outlierq.provenance import stamp, write_json, write_text
from outlierq.quant import Int8Linear, LLMInt8, W8A8

FP32_CODES = "W8A8 token, fp32-codes GEMM (the AVX2 fallback, forced)"
PROFILED = ("FP32", "W8A8 token (int8 GEMM)", "W8A8 token + int8 head")


def _force_fp32_codes(model: torch.nn.Module) -> torch.nn.Module:
    """Every Int8Linear multiplies its codes as fp32 (what ops.gemm picks where _int_mm is slow)."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            m._wt = m.weight.t().float().contiguous()
    return model


def _profile(model, ids: torch.Tensor, top: int = 8) -> list[dict]:
    """Self CPU time per op over one forward of `ids` (the native kernels appear under their
    record_function names), the largest `top`, the rest, and what no op accounts for (Python)."""
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        wall = (time.perf_counter() - t0) * 1e6
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    rows = [{"op": e.key, "calls": e.count, "self_ms": e.self_cpu_time_total / 1e3,
             "share": e.self_cpu_time_total / wall} for e in ev[:top]]
    rest = total - sum(e.self_cpu_time_total for e in ev[:top])
    return rows + [{"op": "(other ops)", "calls": None, "self_ms": rest / 1e3, "share": rest / wall},
                   {"op": "(no op: Python, hooks)", "calls": None, "self_ms": (wall - total) / 1e3,
                    "share": (wall - total) / wall}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    ids = tokenize(tok, read_text("wikitext2", "eval"))
    windows = calib_windows(tokenize(tok, read_text("wikitext2", "calib")), 16, 512)
    stats = calibrate(model, windows, progress=False)  # once, shared by every form
    forms = {"FP32": model}
    sq = "smoothquant:alpha=0.5"
    for label, cfg, recipe in (("W8A8 token (int8 GEMM)", W8A8(act="token"), sq),
                               ("W8A8 token + int8 head", W8A8(act="token", skip=()), sq),
                               ("W8A8 tensor (int8 GEMM)", W8A8(act="tensor"), sq),
                               ("W8A8 tensor + rotate_down (online rotation of down_proj's input)",
                                W8A8(act="tensor"), sq + "+rotate_down:block=none"),
                               (FP32_CODES, W8A8(act="token"), sq),
                               ("W8A8 token fake-quant (dequantize + fp32 matmul)", W8A8(act="token", fake=True), sq),
                               ("LLM.int8 (bitsandbytes)", LLMInt8(), sq)):
        forms[label] = compress(copy.deepcopy(model), tok, recipe, cfg, stats, progress=False,
                                recalibrate_on=windows).model
    _force_fp32_codes(forms[FP32_CODES])
    tps: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(a.repeats):
        for k, m in forms.items():
            tps[k].append(perplexity(m, ids, 2048, a.windows, progress=False).tokens_per_s)
    fp = statistics.median(tps["FP32"])
    rows = [{"form": k, "tokens_per_s": statistics.median(v), "all": v,
             "vs_fp32": statistics.median(v) / fp} for k, v in tps.items()]
    prof = {k: _profile(forms[k], ids[:2048][None]) for k in PROFILED}
    cpu = (f"{gemm.describe()}; activation quantization: "
           f"{'native C kernels' if ops.native.available() else 'torch twins'}; "
           f"{torch.get_num_threads()} torch threads")
    write_json(Path(a.out) / f"throughput_{Path(a.model).name}.json",
               {"model": a.model, "windows": a.windows, "seqlen": 2048, "repeats": a.repeats,
                "int8_gemm": gemm.describe(), "cpu": cpu, "rows": rows,
                "profile_one_window": prof, **stamp()})
    md = [f"# Evaluation throughput: {a.model}", "",
          f"Median tokens/s over {a.repeats} interleaved rounds of the first {a.windows} WikiText-2 "
          f"test windows of 2048 tokens (forward + loss), one process. SmoothQuant a=0.5 applied "
          f"to the quantized forms. CPU: {cpu}.", "", "| form | tokens/s | vs FP32 |", "|---|---|---|"]
    md += [f"| {r['form']} | {r['tokens_per_s']:.0f} | {r['vs_fp32']:.2f}x |" for r in rows]
    for k, ops_ in prof.items():
        md += ["", f"## Where one window's forward goes: {k} (torch.profiler, self CPU time; share of "
               "the profiled forward's wall time)", "",
               "| op | calls | ms | share |", "|---|---|---|---|"]
        md += [f"| {r['op']} | {r['calls'] if r['calls'] is not None else ''} | {r['self_ms']:.0f} | "
               f"{100 * r['share']:.1f}% |" for r in ops_]
    write_text(Path(a.out) / f"throughput_{Path(a.model).name}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
