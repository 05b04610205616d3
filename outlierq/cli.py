"""Command line: parses arguments and calls the library; no logic of its own.

Bad input raises OutlierqError, printed as one line; exit code 2, nothing written."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import OutlierqError


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), .gguf file, HF dir or hub id")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _add_calib(p: argparse.ArgumentParser, data_flag: str = "--data") -> None:
    p.add_argument(data_flag, default="wikitext2", dest="calib_data",
                   help="calibration text: wikitext2 (its validation split), tinyshakespeare, or a file")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="outlierq", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("calibrate", help="record per-channel activation statistics")
    _add_model(p)
    _add_calib(p)
    p.add_argument("--thresholds", default="6,20,100", help="comma-separated |x| thresholds to count")
    p.add_argument("--keep-rows", type=int, default=0,
                   help="also keep this many activation rows per Linear (for --alpha search)")
    p.add_argument("--out", default="stats.safetensors")

    p = sub.add_parser("ppl", help="perplexity on WikiText-2 test (standard protocol)")
    _add_model(p)
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--out", default=None, help="JSON record (default results/ppl_cli_<model>.json)")
    return ap


def _cmd_calibrate(a) -> None:
    from . import calibrate, data, load_model

    thresholds = [float(t) for t in a.thresholds.split(",") if t.strip()]
    model, tok = load_model(a.model, a.dtype)
    data.check_seqlen(model, a.seqlen)
    ids = data.tokenize(tok, data.read_text(a.calib_data, "calib"))
    wins = data.calib_windows(ids, a.samples, a.seqlen, a.seed)
    stats = calibrate(model, wins, thresholds, batch_size=a.batch_size, keep_rows=a.keep_rows,
                      seed=a.seed, meta={"data": a.calib_data})
    stats.save(a.out)
    top = max(stats.residual.items(), key=lambda kv: kv[1].absmax.max().item())
    ch = int(top[1].absmax.argmax())
    print(f"wrote {a.out}: {len(stats.inputs)} Linear inputs, {len(stats.residual)} residual "
          f"layers, {wins.numel()} tokens; largest residual value {top[1].absmax[ch].item():.1f} "
          f"at {top[0]} channel {ch}")


def _cmd_ppl(a) -> None:
    from . import data, load_model, perplexity
    from .provenance import stamp, write_json

    model, tok = load_model(a.model, a.dtype)
    data.check_seqlen(model, a.seqlen)
    ids = data.tokenize(tok, data.read_text(a.data, "eval"))
    r = perplexity(model, ids, a.seqlen, a.windows)
    out = a.out or f"results/ppl_cli_{Path(a.model).name}.json"
    write_json(out, {"model": a.model, "dtype": a.dtype, "data": a.data, "protocol":
                     "whole text tokenized once, non-overlapping windows from the start, "
                     "mean token NLL, ppl=exp(mean)", **r.as_dict(), **stamp()})
    print(f"ppl {r.ppl:.4f} on {r.windows}/{r.windows_available} windows of {r.seqlen} tokens "
          f"({r.tokens_per_s:.0f} tokens/s); wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        globals()[f"_cmd_{args.cmd}"](args)
    except OutlierqError as e:
        print(f"outlierq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("outlierq: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0
