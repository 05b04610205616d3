"""Calibration overhead: time plain forward passes and `calibrate` over the same token windows.
(It times the calibration step itself, so it calls `calibrate`, not the whole `compress`.)

    python scripts/calib_overhead.py --model smollm2-135m --samples 128 --seqlen 512

Writes results/calibration_overhead_<model>.json. Apples to apples: both sides run the same
forward with the output head's matmul skipped (calibrate never reads logits; see
calibration.head_skipped). Each timing is repeated (--repeats) and the median kept; the two are
interleaved so machine noise hits both alike. One more calibrate run under cProfile says where
the hooks' time goes (cumulative seconds per function)."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import torch

from outlierq import calibrate, load_model, ops
from outlierq.calibration import head_skipped
from outlierq.data import calib_windows, read_text, tokenize
from outlierq.provenance import stamp, write_json

# where the hooks spend their time: (label, file suffix, function name) in cProfile's table
_PARTS = [("hooks, total", "calibration.py", "_record"),
          ("channel_stats", "ops/__init__.py", "channel_stats"),
          ("TensorStats.update (histogram, top-k, merges)", "calibration.py", "update"),
          ("calibrate, total", "calibration.py", "calibrate")]


@torch.no_grad()
def _forward_only(model, wins, batch_size):
    with head_skipped(model):
        for b in range(0, wins.shape[0], batch_size):
            model(input_ids=wins[b: b + batch_size], use_cache=False)


def _profile(model, wins, batch_size) -> dict:
    prof = cProfile.Profile()
    prof.enable()
    calibrate(model, wins, batch_size=batch_size, progress=False)
    prof.disable()
    st = pstats.Stats(prof).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
    out = {}
    for label, file, fn in _PARTS:
        hits = [v for (f, _, name), v in st.items() if f.endswith(file) and name == fn]
        out[label] = {"calls": sum(v[1] for v in hits), "cumulative_s": sum(v[3] for v in hits)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    model, tok = load_model(a.model)
    wins = calib_windows(tokenize(tok, read_text("wikitext2", "calib")), a.samples, a.seqlen, 0)
    plain, calib = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        _forward_only(model, wins, a.batch_size)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = calibrate(model, wins, batch_size=a.batch_size, progress=False)
        calib.append(time.perf_counter() - t0)
    p, c = statistics.median(plain), statistics.median(calib)
    prof = _profile(model, wins, a.batch_size)
    res = {"model": a.model, "samples": a.samples, "seqlen": a.seqlen, "batch_size": a.batch_size,
           "tokens": int(wins.numel()), "repeats": a.repeats, "plain_forward_s": plain,
           "calibrate_s": calib, "median_plain_s": p, "median_calibrate_s": c,
           "overhead_ratio": c / p, "hooked_linears": len(stats.inputs),
           "hooked_layers": len(stats.residual),
           "backend": "auto: " + ("native C kernels" if ops.native.available() else "torch twins"),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
           "profile_one_calibrate_run": prof,
           "note": "both sides skip the output head's matmul (calibrate only records its input)",
           **stamp()}
    write_json(Path(a.out) / f"calibration_overhead_{Path(a.model).name}.json", res)
    print(f"plain {p:.1f} s, calibrate {c:.1f} s, overhead ratio {c / p:.3f} "
          f"({wins.numel()} tokens, median of {a.repeats}); profile: {prof}")


if __name__ == "__main__":
    main()
