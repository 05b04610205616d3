"""Evaluation throughput of each quantized form, measured back to back in one process.

    python scripts/throughput.py --model smollm2-135m --windows 2

The study's tokens/s column is measured while other rows' work may share the CPU; this script is
the controlled comparison: same windows, same process, rows interleaved over --repeats rounds,
median tokens/s kept. Writes results/throughput_<model>.json and .md."""
from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

from outlierq import calibrate, compress, load_model, perplexity
from outlierq.data import calib_windows, read_text, tokenize
from outlierq.ops import gemm
from outlierq.provenance import stamp, write_json, write_text
from outlierq.quantize import LLMInt8, W8A8


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    ids = tokenize(tok, read_text("wikitext2", "eval"))
    stats = calibrate(model, calib_windows(tokenize(tok, read_text("wikitext2", "calib")), 16, 512),
                      progress=False)  # once, shared by every form
    forms = {"FP32": model}
    for label, cfg in (("W8A8 token (int8 GEMM)", W8A8(act="token")),
                       ("W8A8 tensor (int8 GEMM)", W8A8(act="tensor")),
                       ("W8A8 token fake-quant (dequantize + fp32 matmul)", W8A8(act="token", fake=True)),
                       ("LLM.int8 (bitsandbytes)", LLMInt8())):
        forms[label] = compress(copy.deepcopy(model), tok, "smoothquant:alpha=0.5", cfg, stats,
                                progress=False).model
    tps: dict[str, list[float]] = {k: [] for k in forms}
    for _ in range(a.repeats):
        for k, m in forms.items():
            tps[k].append(perplexity(m, ids, 2048, a.windows, progress=False).tokens_per_s)
    fp = statistics.median(tps["FP32"])
    rows = [{"form": k, "tokens_per_s": statistics.median(v), "all": v,
             "vs_fp32": statistics.median(v) / fp} for k, v in tps.items()]
    write_json(Path(a.out) / f"throughput_{Path(a.model).name}.json",
               {"model": a.model, "windows": a.windows, "seqlen": 2048, "repeats": a.repeats,
                "int8_gemm": gemm.describe(), "rows": rows, **stamp()})
    md = [f"# Evaluation throughput: {a.model}", "",
          f"Median tokens/s over {a.repeats} interleaved rounds of the first {a.windows} WikiText-2 "
          f"test windows of 2048 tokens (forward + loss), one process. SmoothQuant a=0.5 applied "
          f"to the quantized forms. CPU: {gemm.describe()}.", "", "| form | tokens/s | vs FP32 |",
          "|---|---|---|"]
    md += [f"| {r['form']} | {r['tokens_per_s']:.0f} | {r['vs_fp32']:.2f}x |" for r in rows]
    write_text(Path(a.out) / f"throughput_{Path(a.model).name}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
