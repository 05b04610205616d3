"""The serving check (issue 29): serve the float model and each export in vLLM, and compare with
outlierq's own evaluation of the same checkpoint on the same windows of the study protocol.

    bash scripts/vllm_setup.sh      # once: vLLM in its own environment (.venv-vllm)
    .venv/bin/python scripts/serve_check.py --model smollm2-135m --windows 148 \\
        --export ckpt/:default-token:token --export static/:default-static:tensor

Writes (merging by model, label and windows) results/served.json and results/served.md."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from outlierq.data import eval_windows, read_text, tokenize
from outlierq.errors import OutlierqError
from outlierq.models.load import resolve_model_path
from outlierq.provenance import stamp, write_json, write_text
from outlierq.serving import as_dict, check

ROOT = Path(__file__).resolve().parents[1]


def table(rows: list[dict]) -> str:
    md = ["# Served in vLLM: each checkpoint scored by vLLM and by outlierq on the same windows", "",
          "Perplexity from vLLM's prompt log-probabilities vs `outlierq ppl` of the same checkpoint (the study "
          "protocol: WikiText-2 test, non-overlapping windows from the start). top-1: share of positions where "
          "vLLM's most likely token equals the float model's in vLLM. greedy: share of a 16-token greedy "
          "continuation equal to outlierq's. spread: outlierq's int8 evaluation against its fake-quant oracle of the "
          "same checkpoint (two equally valid int8 evaluations: the rounding-realization spread every W8A8 delta "
          "carries). Tokens/s from the same vLLM run (prefill: all windows in one call).", "",
          "| model | label | act | windows | vLLM ppl | outlierq ppl | diff | spread | top-1 vs float | greedy | "
          "prefill tok/s | decode tok/s | engine, dtype | CPU | git |", "|" + "---|" * 15]
    for r in rows:
        top1 = "-" if r["top1_vs_float"] is None else f"{100 * r['top1_vs_float']:.2f}%"
        spread = "-" if r.get("spread") is None else f"{100 * r['spread']:+.3f}%"
        md.append(f"| {r['model']} | {r['label']} | {r['act']} | {r['windows']} | {r['vllm_ppl']:.4f} | "
                  f"{r['outlierq_ppl']:.4f} | {100 * r['rel_diff']:+.3f}% | {spread} | {top1} | "
                  f"{100 * r['greedy_match_outlierq']:.0f}% | "
                  f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['engine']}, {r['dtype']} | {r['cpu']} | "
                  f"{r['git_sha'][:12]} |")
    return "\n".join(md) + "\n"


def fill_readme(rows: list[dict]) -> None:
    """The README's served table: the float model and today's defaults (labels fp32, auto-*) of
    results/served.json, as served.md shows them (served.md keeps every row). A row of an older
    default ("auto-token (undealt)") shows only while today's ("auto-token") has none for its model."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = "<!-- served:start -->\n", "<!-- served:end -->"
    today = {(r["model"], r["label"]) for r in rows}
    rows = [r for r in rows if r["label"] == "fp32" or r["label"].startswith("auto-")
            and (r["model"], r["label"].split(" (")[0]) not in today - {(r["model"], r["label"])}]
    body = "\n".join(table(rows).splitlines()[4:])  # (the header and its explanation are above it)
    start, end = text.index(a) + len(a), text.index(b)
    write_text(readme, text[:start] + body + "\n" + text[end:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--model", required=True, help="the float model (built-in name or HF directory)")
    ap.add_argument("--export", action="append", default=[], metavar="DIR:LABEL:ACT",
                    help="an outlierq export, a label for the table, and its activations (token|tensor)")
    ap.add_argument("--data", default="wikitext2")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--windows", type=int, default=None, help="default: all")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "results" / "served.json"))
    ap.add_argument("--no-float", action="store_true",
                    help="skip serving the float model (no top-1 column; the float perplexity is the study's)")
    ap.add_argument("--no-oracle", action="store_true",
                    help="skip outlierq's fake-quant evaluation (no spread column): a third of the time")
    ap.add_argument("--render", action="store_true",
                    help="only re-render --out's table (served.md) and the README's served block from its JSON")
    a = ap.parse_args(argv)
    if a.render:
        import json
        rows = json.loads(Path(a.out).read_text())["rows"]
        write_text(Path(a.out).with_suffix(".md"), table(rows))
        fill_readme(rows)
        return 0
    try:
        exports = [e.rsplit(":", 2) for e in a.export]
        if any(len(e) != 3 or e[2] not in ("token", "tensor") for e in exports):
            raise OutlierqError("--export takes DIR:LABEL:ACT with ACT token or tensor")
        float_dir = resolve_model_path(a.model)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(float_dir, trust_remote_code=False)
        wins = eval_windows(tokenize(tok, read_text(a.data)), a.seqlen, a.windows)
        name = Path(a.model).name if Path(a.model).exists() else a.model
        rows, float_argmax = [], None
        if not a.no_float:
            row, served = check(float_dir, "fp32", "none", wins, name, None, a.dtype)
            float_argmax = served["argmax"]
            rows.append(row)
        for d, label, act in exports:
            rows.append(check(d, label, act, wins, name, float_argmax, a.dtype, oracle=not a.no_oracle)[0])
            print(f"{label}: vLLM {rows[-1].vllm_ppl:.4f} outlierq {rows[-1].outlierq_ppl:.4f}", flush=True)
    except OutlierqError as e:
        print(f"serve_check: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    old = []
    if out.exists():
        import json
        old = json.loads(out.read_text()).get("rows", [])
    st = stamp()
    new = [dict(as_dict(r), git_sha=st["git_sha"], timestamp=st["timestamp"]) for r in rows]
    keys = {(r["model"], r["label"], r["windows"], r["dtype"]) for r in new}
    merged = [r for r in old if (r["model"], r["label"], r["windows"], r["dtype"]) not in keys] + new
    write_json(out, {"what": "checkpoints served in vLLM vs outlierq's evaluation of the same checkpoint",
                     "data": a.data, "seqlen": a.seqlen, "rows": merged, **st})
    write_text(out.with_suffix(".md"), table(merged))
    print(table(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
