"""Command line: parses arguments and calls the library; no logic of its own.

Bad input raises OutlierqError, printed as one line; exit code 2, nothing written."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .errors import OutlierqError
from .pipeline import DEFAULT_RECIPE
from .quant.scheme import PRESETS
from .quant.tuning import TUNING


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (and exit code 2), like every other error, and no flag
    is taken by an abbreviation (`--npro 2` was read as --nproc, then crashed the launcher)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _count(minimum: int, maximum: int | None = None):
    """An int flag that must be >= minimum (and <= maximum), checked before any work."""
    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{v!r} is not an integer") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        if maximum is not None and n > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum} (this machine's CPU count), got {n}")
        return n
    return parse


def _thresholds(v: str) -> list[float]:
    try:
        out = [float(t) for t in v.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{v!r}: write comma-separated numbers, e.g. 6,20,100") from None
    if not out or any(not t > 0 or t != t or t == float("inf") for t in out):
        raise argparse.ArgumentTypeError(f"{v!r}: thresholds must be finite numbers > 0")
    return out


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, gemma3-270m), .gguf file, HF dir or hub id")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")


def _add_calib(p: argparse.ArgumentParser, data_flag: str = "--data") -> None:
    p.add_argument(data_flag, default="wikitext2", dest="calib_data",
                   help="calibration text: wikitext2 (its validation split), tinyshakespeare, or a file")
    p.add_argument("--samples", type=_count(1), default=128)
    p.add_argument("--seqlen", type=_count(2), default=512)
    p.add_argument("--seed", type=_count(0), default=0)
    p.add_argument("--batch-size", type=_count(1), default=8)


def _add_scheme(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheme", default="W8A8", metavar="NAME[:OPTIONS]",
                   help="a preset by its compressed-tensors name: W8A8 (int8 weights per channel, activations "
                        "per token; the default), W8A8_STATIC (activations per tensor, static), FP8_DYNAMIC, "
                        "FP8 (E4M3, static); 'float' writes the mitigated float model. Options: "
                        "token_for=down_proj|... (kept per-token in a static scheme), head=true (quantize "
                        "the output head too: faster prefill with a large vocabulary, at a perplexity cost)")
    p.add_argument("--tune", default="auto", metavar="STEPS",
                   help="tuning steps on top of rounding, joined by '+', e.g. "
                        "'gptq+range_tune:windows=4,each=down_proj': " + "; ".join(
                            f"{s.name}: {s.help}" for s in TUNING.values()) +
                        ". 'auto' (default): gptq (in memory, with Hessians) + act_clip; 'none': plain rounding")


def _add_scale(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequential", action="store_true",
                   help="one decoder layer in memory at a time (models bigger than memory; chosen "
                        "automatically, with a notice, when the float model would not fit)")
    p.add_argument("--nproc", type=_count(1, os.cpu_count() or 1), default=1,
                   help="data-parallel calibration over N processes on torch.distributed (starts the N "
                        "ranks itself; or run under torchrun yourself)")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="outlierq", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    p = sub.add_parser("calibrate", help="record per-channel activation statistics")
    _add_model(p)
    _add_calib(p)
    p.add_argument("--thresholds", type=_thresholds, default=[6.0, 20.0, 100.0],
                   help="comma-separated |x| thresholds to count")
    p.add_argument("--keep-rows", type=_count(0), default=0,
                   help="also keep this many activation rows per Linear (for --alpha search)")
    p.add_argument("--hessians", action="store_true",
                   help="also sum x x^T of every Linear input (for quantize --gptq --stats)")
    p.add_argument("--out", default="stats.safetensors",
                   help="statistics file (replaces only an earlier outlierq statistics file)")
    _add_scale(p)

    p = sub.add_parser("ppl", help="perplexity on WikiText-2 test (standard protocol)")
    _add_model(p)
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--seqlen", type=_count(2), default=2048)
    p.add_argument("--windows", type=_count(1), default=None, help="first N windows (default: all)")
    p.add_argument("--out", default=None, help="JSON record (default results/ppl_cli_<model>.json; "
                                               "replaces only an earlier outlierq record)")

    p = sub.add_parser("quantize", help="mitigate + quantize (W8A8, FP8) + export a checkpoint")
    _add_model(p)
    _add_calib(p, "--calib-data")
    p.add_argument("--recipe", default=DEFAULT_RECIPE,
                   help="mitigations: 'auto' (the best measured for the model's family and scheme), "
                        ".json/.yaml file or inline, e.g. 'smoothquant:alpha=0.5+split' ('none' for "
                        "no mitigation)")
    _add_scheme(p)
    p.add_argument("--stats", default=None, help="use a saved stats file instead of calibrating")
    p.add_argument("--force-stats", action="store_true",
                   help="use --stats even if they were taken on other weights (risk: static "
                        "scales and smoothing factors that do not fit this model)")
    p.add_argument("--expert-format", default="pack-quantized", choices=["pack-quantized", "int-quantized"],
                   help="MoE experts: packed int8 (loads in transformers 5) or plain int8 "
                        "(llm-compressor's W8A8 MoE layout)")
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--overwrite", action="store_true")
    _add_scale(p)

    p = sub.add_parser("run", help="the whole pipeline on one model: calibrate, detect, mitigate, "
                                   "quantize, export, and FP32 vs exported perplexity")
    _add_model(p)
    _add_calib(p, "--calib-data")
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    _add_scheme(p)
    p.add_argument("--windows", type=_count(1), default=8, help="perplexity windows of 2048 tokens")
    p.add_argument("--out", default=None, help="default outlierq-out/<model>-<scheme>")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("report", help="outlier analysis: HTML page, PNG figures, JSON numbers")
    _add_model(p)
    _add_calib(p)
    p.set_defaults(samples=64)
    p.add_argument("--recipe", default=None, help="also show the model after this mitigation")
    p.add_argument("--stats", default=None, help="stats file with kept rows (--keep-rows)")
    p.add_argument("--out", default="outlierq-out/report")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("kernels", help="op backends vs naive torch eager: time, GB/s, %% of peak")
    b.add_argument("--ops", default="channel_stats,quant_token,quant_tensor,quant_fp8")
    b.add_argument("--shapes", default="2048x576,8192x4096,16384x8192")
    b.add_argument("--dtypes", default="fp32,bf16")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    b.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    b.add_argument("--compiled", action="store_true",
                   help="also time torch.compile of the eager code (first_call_ms = compile time)")
    b.add_argument("--out", default="results/kernels")
    return ap


def _cmd_report(a) -> None:
    from . import data, load_model
    from .calibration import ActivationStats
    from .mitigate.recipe import parse_recipe
    from .report import build_report

    _check_out(a, "report")
    recipe = parse_recipe(a.recipe) if a.recipe else None
    stats = ActivationStats.load(a.stats) if a.stats else None
    model, tok = load_model(a.model, a.dtype)
    if stats is not None:
        stats.check_matches(model)
    data.check_seqlen(model, a.seqlen)
    wins = data.calib_windows(data.tokenize(tok, data.read_text(a.calib_data, "calib")),
                              a.samples, a.seqlen, a.seed)
    out = build_report(model, wins, a.out, recipe, stats=stats, overwrite=True)
    print(f"wrote {out}/index.html")


def _cmd_bench(a) -> None:
    from .bench import bench_kernels, is_bench_table
    from .provenance import check_file_target

    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in a.shapes.split(",")]
        assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    except (ValueError, AssertionError):
        raise OutlierqError(f"--shapes {a.shapes!r}: write MxN pairs, e.g. 2048x576,8192x4096") from None
    for d in a.dtypes.split(","):
        if d not in ("fp32", "bf16", "fp16"):
            raise OutlierqError(f"unknown dtype {d!r} in --dtypes; use fp32, bf16, fp16")
    out = Path(a.out).expanduser().resolve()
    if out in (Path.home().resolve(), Path(out.anchor)):
        raise OutlierqError(f"refusing to write the benchmark table into {out}: give --out a folder of its own")
    check_file_target(out / f"kernels_{a.device}.csv", "benchmark table", is_bench_table)
    bench_kernels(a.ops.split(","), shapes, a.dtypes.split(","), a.device, a.out, a.budget, a.compiled)


def _scheme(a, layer_by_layer: bool = False):
    """The scheme --scheme and --tune name (None for 'float'), checked before any work."""
    from .quant import parse_tune, steps_of
    from .quant.scheme import preset
    from .quant.tuning import check_exported, check_layer_by_layer

    if a.scheme_name == "float":
        if a.tune not in ("auto", "none"):
            raise OutlierqError(f"--scheme float writes the float model: --tune {a.tune} has nothing to tune")
        return None
    scheme = preset(a.scheme_name, **a.scheme_over, **parse_tune(a.tune, layer_by_layer, bool(getattr(a, "stats", None))))
    if layer_by_layer:
        check_layer_by_layer(scheme)
    if getattr(a, "stats", None) and any("windows" in s.needs for s in steps_of(scheme)):
        stray = next(s.name for s in steps_of(scheme) if "windows" in s.needs)
        raise OutlierqError(f"--tune {stray} runs the model on calibration windows: drop --stats")
    check_exported(scheme)
    return scheme


def _scheme_args(a) -> None:
    """--scheme into a.scheme_name, a.scheme_over (field overrides), a.act, a.fmt and a.format."""
    from .quant.scheme import parse_scheme

    if not hasattr(a, "scheme"):
        return
    a.scheme_name, a.scheme_over = parse_scheme(a.scheme)
    if a.scheme_name == "float" and a.cmd == "run":
        raise OutlierqError("run measures a quantized export: choose a quantization --scheme (float: use quantize)")
    want = PRESETS.get(a.scheme_name, {"act": "token"})
    if want["act"] == "none":
        raise OutlierqError(f"--scheme {a.scheme_name} (weight-only int8) has no compressed-tensors export here; "
                            "use it in memory: outlierq.compress(model, tok, scheme='W8A16')")
    a.act, a.fmt = want["act"], want.get("format", "int8")
    a.format = "fp" if a.scheme_name == "float" else "compressed-tensors"


def _calibration(a):
    from .calibration import ActivationStats
    from .pipeline import Calibration

    keep = getattr(a, "keep_rows", None)
    stats = ActivationStats.load(a.stats) if getattr(a, "stats", None) else None
    return stats or Calibration(a.calib_data, a.samples, a.seqlen, a.seed, a.batch_size,
                                keep_rows=keep or None)


def _prepare(a):
    """Load, then outlierq.compress: calibrate (or read stats), mitigate, quantize."""
    from . import load_model
    from .mitigate.registry import lookup
    from .pipeline import Calibration, calibration_windows, compress, resolve_recipe

    from .checkpoint import check_exportable

    # bad recipes, schemes and stats files fail before the model load
    check_exportable(resolve_recipe(a.recipe, a.act, fmt=a.fmt))
    scheme, calib = _scheme(a), _calibration(a)
    model, tok = load_model(a.model, a.dtype)
    again = None
    if not isinstance(calib, Calibration) and any(lookup(c).recalibrates
                                                  for c in resolve_recipe(a.recipe, a.act, model, fmt=a.fmt)):
        # saved statistics: a step that recalibrates the mitigated model (rotate_down) records it
        # on the windows the calibration flags name
        again = calibration_windows(model, tok, Calibration(a.calib_data, a.samples, a.seqlen, a.seed))
    result = compress(model, tok, a.recipe, scheme, calib, check_stats=not getattr(a, "force_stats", False),
                      recalibrate_on=again)
    return model, tok, result.recipe, result.stats


def _sequential_path(a) -> str | None:
    """The checkpoint directory to stream layer by layer, if --sequential or if the float model
    would not fit in memory (then with a notice); None for the in-memory pipeline."""
    from . import sequential
    from .models.load import DTYPES, resolve_model_path

    if getattr(a, "stats", None) and getattr(a, "force_stats", False) and a.sequential:
        raise OutlierqError("--force-stats is not available layer by layer (weights are checked as they load)")
    path = resolve_model_path(a.model)
    if not a.sequential and not sequential.too_big(path, DTYPES.get(a.dtype, a.dtype)):
        return None
    if not Path(path).is_dir():
        raise OutlierqError(f"--sequential reads a local checkpoint directory; download {a.model!r} first "
                            "(huggingface-cli download) and pass its path")
    if not a.sequential:
        import warnings

        from .errors import OutlierqNotice
        warnings.warn("the float model would not fit in the memory available: running layer by layer "
                      "(--sequential)", OutlierqNotice, stacklevel=2)
    return path


def _run_sequential(a, path: str, out: str | None = None, recipe="none", scheme=None, thresholds=None):
    from transformers import AutoTokenizer

    from . import sequential
    from .models.load import DTYPES

    if a.dtype not in DTYPES:
        raise OutlierqError(f"unknown dtype {a.dtype!r}; choose one of {', '.join(DTYPES)}")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    kw = dict(overwrite=a.overwrite, expert_format=a.expert_format, fmt=a.format, inputs=_inputs(a)) if out else {}
    return sequential.run(path, out, tok, recipe, scheme, _calibration(a), DTYPES[a.dtype],
                          thresholds=thresholds, **kw)


def _cmd_quantize(a) -> None:
    from .checkpoint import dir_mb, export
    from .distributed import is_writer

    _check_out(a, "checkpoint")
    path = _sequential_path(a)
    if path is not None:
        res = _run_sequential(a, path, a.out, a.recipe, _scheme(a, True))
        if res["out"] is not None:
            print(f"wrote {res['out']} ({a.format}, {dir_mb(res['out']):.1f} MB; layer by layer)")
        return
    model, tok, recipe, stats = _prepare(a)
    if is_writer():
        out = export(model, a.out, tok, a.format, recipe, stats, overwrite=a.overwrite, inputs=_inputs(a),
                     expert_format=a.expert_format)
        print(f"wrote {out} ({a.format}, {dir_mb(out):.1f} MB)")


def _cmd_run(a) -> None:
    from . import data, load_model, perplexity
    from .checkpoint import dir_mb, export, state_bytes, summarize
    from .mitigate.recipe import applied, recipe_to_list
    from .provenance import check_file_target, is_record, stamp, write_json

    a.out = a.out or f"outlierq-out/{Path(a.model).name}-{a.scheme_name.lower()}"
    _check_out(a, "checkpoint")
    check_file_target(f"{a.out}.json", "record", is_record)
    a.stats = None
    fp_model, tok = load_model(a.model, a.dtype)
    ids = data.tokenize(tok, data.read_text("wikitext2", "eval"))
    fp = perplexity(fp_model, ids, 2048, a.windows)
    fp_bytes = state_bytes(fp_model)  # the float checkpoint's size, for the ratio
    fp_dtype = str(fp_model.dtype).removeprefix("torch.")
    del fp_model
    model, tok, recipe, stats = _prepare(a)
    top = summarize(stats, top=3)
    for kind, rows in top.items():
        for r in rows:
            print(f"outlier  {kind:13s} {r['layer']:32s} channel {r['channel']:5d}  "
                  f"max|x| {r['absmax']:9.1f}  ({r['absmax'] / max(r['median_channel_absmax'], 1e-9):.0f}x median)")
    out = export(model, a.out, tok, "compressed-tensors", recipe, stats, overwrite=a.overwrite,
                 inputs=_inputs(a))
    steps, skipped = applied(model, recipe)
    scheme = getattr(model, "outlierq_scheme", None)
    del model
    qmodel, _ = load_model(str(out))
    q = perplexity(qmodel, ids, 2048, a.windows)
    size = dir_mb(out)
    rec = {"model": a.model, "recipe": a.recipe, "recipe_resolved": recipe_to_list(steps),
           **({"skipped": skipped} if skipped else {}), "act": a.act,
           "scheme": scheme, "export": str(out),
           "export_mb": size, "float_checkpoint_mb": fp_bytes / 1e6,
           "fp32": fp.as_dict(), "exported": q.as_dict(), **stamp()}
    write_json(f"{a.out}.json", rec)
    print(f"FP32 ppl {fp.ppl:.3f} | exported {a.scheme_name} ({a.act}) ppl {q.ppl:.3f} "
          f"({100 * (q.ppl / fp.ppl - 1):+.2f}%) on the first {fp.windows} WikiText-2 test "
          f"windows of 2048 tokens; checkpoint {out} ({size:.0f} MB vs {fp_bytes / 1e6:.0f} MB "
          f"in {fp_dtype})")


def _inputs(a) -> tuple[str, ...]:
    """Local paths this command reads: outputs may never replace or hold them."""
    return tuple(p for p in (a.model, getattr(a, "stats", None), getattr(a, "calib_data", None))
                 if p and Path(p).expanduser().exists())


def _check_out(a, kind: str) -> None:
    from .provenance import check_target

    check_target(a.out, kind, a.overwrite, _inputs(a))


def _cmd_calibrate(a) -> None:
    from . import calibrate, data, load_model
    from .calibration import is_stats_file
    from .distributed import is_writer
    from .provenance import check_file_target

    check_file_target(a.out, "statistics file", is_stats_file)
    path = _sequential_path(a)
    if path is not None and a.hessians:
        raise OutlierqError("--hessians is for in-memory calibration (GPTQ runs in memory): drop --sequential")
    if path is not None:
        stats = _run_sequential(a, path, thresholds=a.thresholds)["stats"]
        tokens = int(stats.meta["tokens"])
    else:
        model, tok = load_model(a.model, a.dtype)
        data.check_seqlen(model, a.seqlen)
        ids = data.tokenize(tok, data.read_text(a.calib_data, "calib"))
        wins = data.calib_windows(ids, a.samples, a.seqlen, a.seed)
        stats = calibrate(model, wins, a.thresholds, batch_size=a.batch_size, keep_rows=a.keep_rows,
                          seed=a.seed, meta={"data": a.calib_data}, hessians=a.hessians)
        tokens = wins.numel()
    if not is_writer():
        return
    stats.save(a.out)
    top = max(stats.residual.items(), key=lambda kv: kv[1].absmax.max().item())
    ch = int(top[1].absmax.argmax())
    print(f"wrote {a.out}: {len(stats.inputs)} Linear inputs, {len(stats.residual)} residual "
          f"layers, {tokens} tokens; largest residual value {top[1].absmax[ch].item():.1f} "
          f"at {top[0]} channel {ch}")


def _cmd_ppl(a) -> None:
    from . import data, load_model, perplexity
    from .provenance import check_file_target, is_record, stamp, write_json

    out = a.out or f"results/ppl_cli_{Path(a.model).name}.json"
    check_file_target(out, "record", is_record)
    model, tok = load_model(a.model, a.dtype)
    data.check_seqlen(model, a.seqlen)
    ids = data.tokenize(tok, data.read_text(a.data, "eval"))
    r = perplexity(model, ids, a.seqlen, a.windows)
    write_json(out, {"model": a.model, "dtype": a.dtype, "data": a.data, "protocol":
                     "whole text tokenized once, non-overlapping windows from the start, "
                     "mean token NLL, ppl=exp(mean)", **r.as_dict(), **stamp()})
    print(f"ppl {r.ppl:.4f} on {r.windows}/{r.windows_available} windows of {r.seqlen} tokens "
          f"({r.tokens_per_s:.0f} tokens/s); wrote {out}")


class _Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised like Ctrl-C so every atomic write cleans up on the way out."""


def _on_signal(signum, frame):
    raise _Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    import os

    from . import distributed

    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        _scheme_args(args)
    except OutlierqError as e:
        print(f"outlierq: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "nproc", 1) > 1 and "WORLD_SIZE" not in os.environ:
        i = next(i for i, v in enumerate(argv) if v == "--nproc" or v.startswith("--nproc="))
        rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]
        return distributed.launch(args.nproc, rest)
    distributed.init_from_env()
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        globals()[f"_cmd_{args.cmd}"](args)
    except OutlierqError as e:
        if os.environ.get("RANK", "0") == "0":  # (every rank meets a bad input: rank 0 says it)
            print(f"outlierq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.args[0] if isinstance(e, _Terminated) else signal.SIGINT
        if "OUTLIERQ_LAUNCHED" not in os.environ:  # (a rank of `--nproc`: the launcher says it once)
            print(f"outlierq: interrupted ({signal.Signals(signum).name}); nothing was written", file=sys.stderr)
        return 128 + int(signum)
    except OSError as e:  # a full disk, a permission problem: name the path, leave nothing partial
        print(f"outlierq: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return 0
