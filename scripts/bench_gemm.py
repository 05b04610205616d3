"""int8 GEMM with the W8A8 epilogue: Triton kernel vs torch._int_mm + epilogue vs bf16 matmul.

    python scripts/bench_gemm.py --device cuda --shapes 4096x4096x4096,8192x8192x8192

Median of repeats per (M, N, K); TOPS counts 2*M*N*K operations. Writes <out>/gemm_<device>.csv.
On CPU only the torch paths run (the Triton interpreter is not a speed measurement), plus the
fp32-codes fallback that ops.gemm picks where _int_mm is slow; the CSV names the path it chose."""
from __future__ import annotations

import argparse
import csv
import io
import statistics
from pathlib import Path

import torch

from outlierq import ops
from outlierq.ops import gemm
from outlierq.bench import _time
from outlierq.provenance import atomic_path, stamp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="4096x4096x4096,8192x8192x8192")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--out", default="results/kernels")
    a = ap.parse_args()
    dev, prov, rows = a.device, stamp(), []
    for spec in a.shapes.split(","):
        m, n, k = (int(v) for v in spec.split("x"))
        g = torch.Generator(device=dev).manual_seed(0)
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=dev, generator=g)
        wq = torch.randint(-127, 128, (k, n), dtype=torch.int8, device=dev, generator=g)
        xs, ws = torch.rand(m, device=dev), torch.rand(n, device=dev)
        xb, wb = xq.to(torch.bfloat16), wq.to(torch.bfloat16)
        wf = wq.float()
        paths = {"torch _int_mm + epilogue": lambda: ops.int8_matmul(xq, xs, wq, ws, backend="torch"),
                 "bf16 matmul": lambda: xb @ wb}
        if dev == "cpu":  # the AVX2 fallback of ops.gemm: the same codes multiplied in fp32
            paths["fp32 codes + epilogue"] = lambda: ops.int8_matmul(xq, xs, wf, ws, backend="torch")
        if dev == "cuda":
            paths["triton int8 (fused epilogue)"] = lambda: ops.int8_matmul(xq, xs, wq, ws, backend="triton")
        for name, fn in paths.items():
            p50 = statistics.median(_time(fn, dev, a.budget)[0])
            rows.append({"path": name, "M": m, "N": n, "K": k, "p50_ms": p50 * 1e3,
                         "TOPS": 2 * m * n * k / p50 / 1e12, "device": torch.cuda.get_device_name()
                         if dev == "cuda" else f"cpu {torch.backends.cpu.get_cpu_capability()}",
                         "cpu_gemm_path_chosen": "" if dev == "cuda" else gemm.cpu_gemm_path(),
                         "torch": prov["versions"].get("torch"), "triton": prov["versions"].get("triton", ""),
                         "git_sha": prov["git_sha"], "timestamp": prov["timestamp"]})
            print(f"{name:30s} {m}x{n}x{k}  {p50 * 1e3:9.3f} ms  {rows[-1]['TOPS']:7.1f} TOPS", flush=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    out = Path(a.out) / f"gemm_{dev}.csv"
    with atomic_path(out) as tmp:
        tmp.write_text(buf.getvalue())
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
