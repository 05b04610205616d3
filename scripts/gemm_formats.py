"""The 8-bit GEMMs a CPU offers against its fp32 matmul, on one machine in one run: fp32, int8
(torch._int_mm, what Int8Linear runs where it is faster), FP8 E4M3 (torch._scaled_mm with
row-wise scales) and FP8 codes multiplied as fp32 (the fallback FP8 Linears run where
_scaled_mm is slower). Medians of repeated calls; shapes are SmolLM2's prefill GEMMs (2048 tokens).

    .venv/bin/python scripts/gemm_formats.py      # -> results/gemm_formats_cpu.{json,md}
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from outlierq.ops import gemm
from outlierq.provenance import stamp, write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576)]  # (M, K, N): up/gate, down, q/o


def _median_ms(fn, budget_s: float = 1.5) -> float:
    fn()
    times, t_end = [], time.perf_counter() + budget_s
    while time.perf_counter() < t_end or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        wt = w.t().contiguous()
        xi, wi = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g), torch.randint(
            -127, 128, (k, n), dtype=torch.int8, generator=g)
        x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        sx, sw, w8f = torch.ones(m, 1), torch.ones(1, n), w8.float().t().contiguous()
        t = {"fp32 matmul": _median_ms(lambda: x @ wt),
             "int8 _int_mm": _median_ms(lambda: torch._int_mm(xi, wi)),
             "fp8 _scaled_mm": _median_ms(lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw,
                                                                   out_dtype=torch.float32)),
             "fp8 codes as fp32": _median_ms(lambda: x8.float() @ w8f)}
        rows.append({"M": m, "K": k, "N": n, **{f"{key} ms": v for key, v in t.items()}})
        print(rows[-1], flush=True)
    st = stamp()
    rec = {"what": "8-bit GEMMs vs the fp32 matmul on this CPU (medians)", "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "int8_gemm_path": gemm.cpu_gemm_path(),
           "fp8_gemm_path": gemm.fp8_gemm_path(), "rows": rows, **st}
    out = ROOT / "results" / "gemm_formats_cpu.json"
    write_json(out, rec)
    keys = [k for k in rows[0] if k.endswith("ms")]
    md = ["# 8-bit GEMMs against fp32 on this CPU", "",
          f"{rec['machine']}, capability {rec['cpu_capability']}, {rec['threads']} threads, torch "
          f"{st['versions'].get('torch')}, git {st['git_sha'][:12]}. Medians, ms. outlierq picks: int8 "
          f"{rec['int8_gemm_path']}, FP8 {rec['fp8_gemm_path']} (`outlierq.ops.gemm`).", "",
          "| M x K x N | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    md += [f"| {r['M']}x{r['K']}x{r['N']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in rows]
    write_text(out.with_suffix(".md"), "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
