"""The perplexity study: every mitigation x quantizer on one model, one protocol.

    python scripts/study.py --model smollm2-135m --windows 16 [--full-best]

Writes results/ppl_<model>.json and .md after every row (a partial run still leaves a table).
Drives the library only: load_model -> calibrate (once per text, cached) -> compress -> perplexity."""
from __future__ import annotations

import argparse
import copy
import itertools
import time
from pathlib import Path

import torch

from outlierq import calibrate, compress, load_model, perplexity
from outlierq.evaluate import perplexities
from outlierq.data import calib_windows, read_text, tokenize
from outlierq.mitigate.recipe import mitigate, parse_recipe, recipe_to_list
from outlierq.mitigate.registry import lookup
from outlierq.provenance import git_sha, stamp, write_json, write_text
from outlierq.quant import LLMInt8, W8A8

# (label, recipe, quantizer). The recipe's alpha search scores for the same activation mode.
ROWS = [
    ("FP32", "", None),
    ("int8 weights only", "", W8A8(act="none")),
    ("W8A8 naive", "", "both"),
    ("SmoothQuant a=0.5", "smoothquant:alpha=0.5", "both"),
    ("SmoothQuant a=0.8", "smoothquant:alpha=0.8", "both"),
    ("SmoothQuant searched", "smoothquant:alpha=search,act={act}", "both"),
    ("OCS split", "split:ratio=4", "both"),
    ("OCS split + SmoothQuant searched", "split:ratio=4+smoothquant:alpha=search,act={act}", "both"),
    ("OCS split + SmoothQuant a=0.5", "split:ratio=4+smoothquant:alpha=0.5", "both"),
    ("OCS split + SmoothQuant a=0.8", "split:ratio=4+smoothquant:alpha=0.8", "both"),
    ("LLM.int8 (bitsandbytes, t=6.0)", "", LLMInt8()),
    ("SmoothQuant searched, down_proj per-token", "smoothquant:alpha=search,act=tensor",
     W8A8(act="tensor", token_for=("*down_proj",))),
    ("SmoothQuant a=0.8, down_proj per-token", "smoothquant:alpha=0.8",
     W8A8(act="tensor", token_for=("*down_proj",))),
    ("OCS split + SmoothQuant searched + weight clip", "split:ratio=4+smoothquant:alpha=search,act={act}",
     "both+clip"),
    ("SmoothQuant a=0.8 + weight clip", "smoothquant:alpha=0.8", "both+clip"),
    ("int8 weights only + weight clip", "", W8A8(act="none", weight_clip=True)),
    ("SmoothQuant searched, per-token objective", "smoothquant:alpha=search,act={act},objective=token", "both"),
    ("OCS split + SmoothQuant searched, per-token objective",
     "split:ratio=4+smoothquant:alpha=search,act={act},objective=token", "both"),
    ("OCS split + SmoothQuant searched, per-token objective + weight clip",
     "split:ratio=4+smoothquant:alpha=search,act={act},objective=token", "both+clip"),
    ("Rotate (randomized Hadamard)", "rotate", "both"),
    ("Rotate + SmoothQuant searched", "rotate+smoothquant:alpha=search,act={act}", "both"),
    ("Rotate + OCS split + SmoothQuant searched", "rotate+split:ratio=4+smoothquant:alpha=search,act={act}",
     "both"),
    ("Rotate + OCS split + SmoothQuant searched + int8 head",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}", W8A8(act="token", skip=())),
    ("int8 weights only + GPTQ", "", W8A8(act="none", gptq=True)),
    ("Rotate + OCS split + SmoothQuant searched + GPTQ",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}", "both+gptq"),
    ("OCS split + SmoothQuant searched, per-token objective + GPTQ",
     "split:ratio=4+smoothquant:alpha=search,act={act},objective=token", "both+gptq"),
    ("OCS split + SmoothQuant searched, per-token objective, down_proj per-token",
     "split:ratio=4+smoothquant:alpha=search,act=tensor,objective=token",
     W8A8(act="tensor", token_for=("*down_proj",))),
    ("OCS split + SmoothQuant searched, per-token objective, down_proj per-token + GPTQ",
     "split:ratio=4+smoothquant:alpha=search,act=tensor,objective=token",
     W8A8(act="tensor", token_for=("*down_proj",), gptq=True)),
    ("SmoothQuant a=0.8 + GPTQ", "smoothquant:alpha=0.8", "both+gptq"),
    # online rotation of down_proj's input (R4), after the best recipes of each model
    ("OCS split + SmoothQuant searched, per-token objective + rotate_down + GPTQ",
     "split:ratio=4+smoothquant:alpha=search,act={act},objective=token+rotate_down:block=none", "both+gptq"),
    ("OCS split + SmoothQuant searched, per-token objective + rotate_down kind=random + GPTQ",
     "split:ratio=4+smoothquant:alpha=search,act={act},objective=token+rotate_down:kind=random,block=none", "both+gptq"),
    ("Rotate + OCS split + SmoothQuant searched + rotate_down + GPTQ",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:block=none", "both+gptq"),
    ("Rotate + OCS split + SmoothQuant searched + rotate_down kind=random + GPTQ",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:kind=random,block=none", "both+gptq"),
    ("SmoothQuant a=0.8 + rotate_down + GPTQ", "smoothquant:alpha=0.8+rotate_down:block=none", "both+gptq"),
    ("OCS split + SmoothQuant searched + rotate_down + GPTQ",
     "split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:block=none", "both+gptq"),
    ("SmoothQuant a=0.8, down_proj per-token + GPTQ", "smoothquant:alpha=0.8",
     W8A8(act="tensor", token_for=("*down_proj",), gptq=True)),
    # static only: down_proj's rotated range set by act_clip's search, over every calibration
    # value alike ("value", labels "+ act clip") or every token alike ("token", "+ act clip per token")
    *[(f"{label} + act clip{suffix}", recipe, W8A8(act="tensor", gptq=True, act_clip=True,
                                                   act_clip_objective=objective))
      for objective, suffix in (("value", ""), ("token", " per token"))
      for label, recipe in (
          ("SmoothQuant a=0.8 + rotate_down + GPTQ", "smoothquant:alpha=0.8+rotate_down:block=none"),
          ("OCS split + SmoothQuant searched + rotate_down + GPTQ",
           "split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:block=none"),
          ("Rotate + OCS split + SmoothQuant searched + rotate_down + GPTQ",
           "rotate+split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:block=none"))],
    # R2 (rotate_heads, exportable): o_proj's input rotated per head through the weights, so
    # act_clip ("auto" objective: per token on Gemma, per value elsewhere) reaches it too
    ("Rotate heads + SmoothQuant a=0.8 + rotate_down + GPTQ + act clip auto",
     "rotate_heads+smoothquant:alpha=0.8+rotate_down:block=none", W8A8(act="tensor", gptq=True, act_clip=True)),
    ("Rotate heads + SmoothQuant a=0.8, down_proj per-token + GPTQ + act clip auto", "rotate_heads+smoothquant:alpha=0.8",
     W8A8(act="tensor", token_for=("*down_proj",), gptq=True, act_clip=True)),
    ("Rotate + rotate heads + OCS split + SmoothQuant searched + rotate_down + GPTQ + act clip auto",
     "rotate+rotate_heads+split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:block=none",
     W8A8(act="tensor", gptq=True, act_clip=True)),
    # every norm-group and pair input rotated online (in memory), so act_clip sets every static range
    ("SmoothQuant a=0.8 + rotate_down all inputs + GPTQ + act clip auto",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none", W8A8(act="tensor", gptq=True, act_clip=True)),
    ("OCS split + SmoothQuant searched + rotate_down all inputs + GPTQ + act clip auto",
     "split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:inputs=all,block=none",
     W8A8(act="tensor", gptq=True, act_clip=True)),
    # static ranges tuned end to end by kind on 4 calibration windows (W8A8.range_tune), on the
    # best static recipes in memory and on the exportable ones
    ("SmoothQuant a=0.8 + rotate_down all inputs + GPTQ + act clip auto + range tune",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none", W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4)),
    # and then each down_proj on its own (W8A8.range_tune_each): what is left of Gemma-3's static loss
    ("SmoothQuant a=0.8 + rotate_down all inputs + GPTQ + act clip auto + range tune, each down_proj",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none",
     W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4, range_tune_each=("down_proj",))),
    # and a second static range for quiet tokens in down_proj (W8A8.quiet_tokens)
    ("SmoothQuant a=0.8 + rotate_down all inputs + GPTQ + act clip auto + range tune + quiet tokens",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none",
     W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4, quiet_tokens=("down_proj",))),
    # and that range's factor tuned on 32 calibration windows in place of range_tune's 4 (W8A8.quiet_tune)
    ("SmoothQuant a=0.8 + rotate_down all inputs + GPTQ + act clip auto + range tune + quiet tokens tuned on 32 windows",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none",
     W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4, quiet_tokens=("down_proj",), quiet_tune=32)),
    # both: each down_proj's own range factor, then the quiet range
    ("SmoothQuant a=0.8 + rotate_down all inputs + GPTQ + act clip auto + range tune, each down_proj + quiet tokens",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none",
     W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4, range_tune_each=("down_proj",),
          quiet_tokens=("down_proj",))),
    ("Rotate + OCS split + SmoothQuant searched + rotate_down + GPTQ + act clip + range tune",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}+rotate_down:block=none",
     W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4)),
    # servable R4: rotate_down's block-diagonal Hadamard (block 128), which the export carries as a
    # compressed-tensors transform_config and vLLM applies (split pads its size for the block)
    ("Rotate + OCS split + SmoothQuant searched + rotate_down block 128 + GPTQ",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=false", "both+gptq"),
    ("SmoothQuant a=0.8 + rotate_down block 128 + GPTQ", "smoothquant:alpha=0.8+rotate_down:deal=false", "both+gptq"),
    # the same, one dense block over the whole width (block=4096: the largest Hadamard order up to
    # 4096 that divides it; SmolLM2's split width 1664 = 16 x 104, Gemma-3's 2048)
    ("Rotate + OCS split + SmoothQuant searched + rotate_down dense + GPTQ",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:block=4096,deal=false", "both+gptq"),
    ("Rotate + OCS split + SmoothQuant searched + rotate_down dense + GPTQ + act clip auto",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:block=4096,deal=false",
     W8A8(act="tensor", gptq=True, act_clip=True)),
    # the 128 block after dealing the intermediate channels to the blocks (rotate_down:deal=true:
    # split's parts of a channel, appended side by side, no longer share a block)
    ("Rotate + OCS split + SmoothQuant searched + rotate_down block 128 dealt + GPTQ",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=true", "both+gptq"),
    ("Rotate + OCS split + SmoothQuant searched + rotate_down block 128 dealt + GPTQ + act clip auto",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=true",
     W8A8(act="tensor", gptq=True, act_clip=True)),
    ("SmoothQuant a=0.8 + rotate_down block 128 dealt + GPTQ", "smoothquant:alpha=0.8+rotate_down:deal=true",
     "both+gptq"),
    # Gemma-3's per-token loss by the servable block's width (its intermediate 2048: dense = block 2048)
    ("SmoothQuant a=0.8 + rotate_down block 512 + GPTQ", "smoothquant:alpha=0.8+rotate_down:block=512,deal=false",
     "both+gptq"),
    ("SmoothQuant a=0.8 + rotate_down dense + GPTQ", "smoothquant:alpha=0.8+rotate_down:block=4096,deal=false",
     "both+gptq"),
    ("SmoothQuant a=0.8 + rotate_down all inputs block 128 dealt + GPTQ + act clip auto",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=true", W8A8(act="tensor", gptq=True, act_clip=True)),
    ("SmoothQuant a=0.8 + rotate_down all inputs dense + GPTQ + act clip auto + range tune",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,block=4096,deal=false",
     W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4)),
    ("Rotate + OCS split + SmoothQuant searched + rotate_down block 128 + GPTQ + act clip auto",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=false",
     W8A8(act="tensor", gptq=True, act_clip=True)),
    ("OCS split + SmoothQuant searched + rotate_down block 128 + GPTQ + act clip auto",
     "split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=false",
     W8A8(act="tensor", gptq=True, act_clip=True)),
    ("SmoothQuant a=0.8 + rotate_down all inputs block 128 + GPTQ + act clip auto",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=false", W8A8(act="tensor", gptq=True, act_clip=True)),
    ("SmoothQuant a=0.8 + rotate_down all inputs block 128 + GPTQ + act clip auto + range tune",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=false", W8A8(act="tensor", gptq=True, act_clip=True, range_tune=4)),
    ("OCS split + SmoothQuant searched + GPTQ + range tune", "split:ratio=4+smoothquant:alpha=search,act={act}",
     W8A8(act="tensor", gptq=True, range_tune=4)),
    ("Rotate + OCS split + SmoothQuant searched + GPTQ + range tune",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}", W8A8(act="tensor", gptq=True, range_tune=4)),
    # the servable per-token and static defaults with the N Linears whose int8 error costs most
    # left float (W8A8.keep_float; the checkpoint lists them in ignore)
    *[(f"SmoothQuant a=0.8 + rotate_down block 128 + GPTQ + keep float {n}",
       "smoothquant:alpha=0.8+rotate_down:deal=false", W8A8(act="token", gptq=True, keep_float=n)) for n in (2, 4)],
    ("Rotate + OCS split + SmoothQuant searched + rotate_down block 128 + GPTQ + keep float 2",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=false",
     W8A8(act="token", gptq=True, keep_float=2)),
    *[(f"SmoothQuant a=0.8 + rotate_down all inputs block 128 + GPTQ + act clip auto + keep float {n}",
       "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=false",
       W8A8(act="tensor", gptq=True, act_clip=True, keep_float=n)) for n in (2, 4)],
    # Gemma-3 per-token, servable levers not yet tried with rotate_down: the block rotation on every
    # Linear input (the static default's), the offline head rotation (R2) first; and the floor,
    # the default mitigation with float activations (what GPTQ's int8 weights alone cost)
    ("SmoothQuant a=0.8 + rotate_down all inputs block 128 + GPTQ",
     "smoothquant:alpha=0.8+rotate_down:inputs=all,deal=false", W8A8(act="token", gptq=True)),
    ("rotate_down all inputs block 128 + GPTQ", "rotate_down:inputs=all,deal=false", W8A8(act="token", gptq=True)),
    ("Rotate heads + SmoothQuant a=0.8 + rotate_down block 128 + GPTQ",
     "rotate_heads+smoothquant:alpha=0.8+rotate_down:deal=false", W8A8(act="token", gptq=True)),
    ("SmoothQuant a=0.8 + rotate_down block 128 + GPTQ, weights only",
     "smoothquant:alpha=0.8+rotate_down:deal=false", W8A8(act="none", gptq=True)),
    # FP8 (E4M3) weights and activations: what each mitigation buys there (issue 30); the
    # SmoothQuant search scores for FP8 (the scheme's format)
    ("FP8 naive", "", "fp8"),
    # FP8 weights with float activations (int8's twin is "int8 weights only + GPTQ" above): how much
    # of FP8's loss the weights carry
    ("FP8 weights only", "", W8A8(act="none", format="fp8")),
    ("FP8 weights only + GPTQ", "", W8A8(act="none", format="fp8", gptq=True)),
    ("FP8 + GPTQ", "", "fp8+gptq"),
    # compressed-tensors' FP8 preset (--scheme FP8): per-tensor weight scales, static activations
    ("FP8 preset (per-tensor weights)", "", W8A8(act="tensor", format="fp8", weight_strategy="tensor")),
    ("FP8 preset (per-tensor weights) + SmoothQuant searched + GPTQ", "smoothquant:alpha=search,act={act}",
     W8A8(act="tensor", format="fp8", weight_strategy="tensor", gptq=True)),
    ("FP8 SmoothQuant searched", "smoothquant:alpha=search,act={act}", "fp8"),
    ("FP8 Rotate + OCS split + SmoothQuant searched", "rotate+split:ratio=4+smoothquant:alpha=search,act={act}", "fp8"),
    ("FP8 Rotate + OCS split + SmoothQuant searched + GPTQ",
     "rotate+split:ratio=4+smoothquant:alpha=search,act={act}", "fp8+gptq"),
    ("FP8 Rotate + OCS split + SmoothQuant searched + rotate_down block 128 + GPTQ",
     "rotate+split:ratio=4,multiple=128+smoothquant:alpha=search,act={act}+rotate_down:deal=false", "fp8+gptq"),
    ("FP8 SmoothQuant a=0.8 + GPTQ", "smoothquant:alpha=0.8", "fp8+gptq"),
    ("FP8 SmoothQuant a=0.8 + rotate_down block 128 + GPTQ", "smoothquant:alpha=0.8+rotate_down:deal=false", "fp8+gptq"),
]


UNQUANTIZED = ("FP32", "BF16 (unquantized; vs-FP32 column: vs this row)")


def _quantizers(q):
    if q in ("both", "both+clip", "both+gptq"):
        kw = {"weight_clip": q == "both+clip", "gptq": q == "both+gptq", "act_clip": False}
        return [("token", W8A8(act="token", **kw)), ("tensor", W8A8(act="tensor", **kw))]
    if q in ("fp8", "fp8+gptq"):
        kw = {"format": "fp8", "gptq": q == "fp8+gptq"}
        return [("token", W8A8(act="token", **kw)), ("tensor", W8A8(act="tensor", **kw))]
    if isinstance(q, W8A8) and q.token_for:
        return [("tensor+token", q)]
    return [("token" if isinstance(q, W8A8) and q.act == "token" else
             ("-" if q is None else getattr(q, "act", "llm.int8")), q)]


def _table(rows: list[dict], fp: dict[int, float]) -> str:
    """Markdown table; each row compared with the FP32 row over the same number of windows."""
    out = ["| configuration | activations | calibrated on | ppl | vs FP32 | KL vs FP32 (nats) | top-1 agreement "
           "| windows | calib s | eval tokens/s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = fp.get(r["windows"])
        d = "—" if ref is None or r["label"] in UNQUANTIZED else f"{100 * (r['ppl'] / ref - 1):+.2f}%"
        kl = f"{r['kl']:.5f}" if r.get("kl") is not None else ""
        top1 = f"{100 * r['top1']:.2f}%" if r.get("top1") is not None else ""
        out.append(f"| {r['label']} | {r['act']} | {r['calib_data'] or '-'} | {r['ppl']:.3f} | {d} | {kl} | "
                   f"{top1} | {r['windows']} | {r['calib_seconds']:.0f} | {r['tokens_per_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="bfloat16: the model is loaded, mitigated, quantized and evaluated in bf16 "
                         "(results/ppl_<model>_bf16.*); KL and top-1 stay against the FP32 model")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--keep-rows", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="semicolon-separated row labels to run")
    ap.add_argument("--acts", default=None, help="comma-separated activation modes to run (e.g. token)")
    ap.add_argument("--full", default=None,
                    help="'label|act' rows to evaluate on all windows (and on --windows, from the same "
                         "build), ';'-separated")
    ap.add_argument("--robust", default=None, help="'label|act' row recalibrated on tinyshakespeare")
    ap.add_argument("--out", default="results")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in the results file (same protocol) and add these")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    a = ap.parse_args()
    a.append = a.append or a.render

    name = Path(a.model).name + ("" if a.dtype == "float32" else "_bf16")
    stats_cache: dict[tuple, tuple] = {}
    bases: dict[str, torch.nn.Module] = {}

    def base_for(first: list):
        """The model with the recipe's leading data-free steps (rotation) applied, once per spec:
        rows that share them share the (rotated) model and its statistics."""
        key = repr(first)
        if key not in bases:
            bases[key] = copy.deepcopy(model)
            mitigate(bases[key], None, first)
        return key, bases[key]

    def windows_for(data: str) -> torch.Tensor:
        return calib_windows(tokenize(tok, read_text(data, "calib")), a.samples, a.seqlen, a.seed)

    def stats_for(data: str, key: str = "[]", base=None, hessians: bool = False):
        # statistics with Hessians (GPTQ rows) serve the other rows too
        if (data, key, True) in stats_cache:
            return stats_cache[data, key, True]
        if (data, key, hessians) not in stats_cache:
            w = windows_for(data)
            t0 = time.perf_counter()
            s = calibrate(base if base is not None else model, w, keep_rows=a.keep_rows, seed=a.seed,
                          meta={"data": data}, hessians=hessians)
            stats_cache[data, key, hessians] = (s, time.perf_counter() - t0)
        return stats_cache[data, key, hessians]

    rows: list[dict] = []
    old = Path(a.out) / f"ppl_{name}.json"
    if a.append and old.exists():
        import json
        rows = json.loads(old.read_text())["rows"]
    record = {"model": a.model, "protocol": {
        "eval": "WikiText-2 raw test, whole text tokenized once, non-overlapping windows of "
                "2048 tokens from the start, remainder dropped, ppl = exp(mean token NLL)",
        "seqlen": 2048, "dtype": a.dtype,
        "calibration": f"{a.samples} random windows x {a.seqlen} tokens (seed {a.seed}) of the "
                       f"named text's calibration split; {a.keep_rows} rows kept per Linear input "
                       "for the alpha search"}, **stamp()}

    def build(label, rec_spec, act, q, data="wikitext2"):
        """The row's mitigated and quantized model, and the row without its perplexity."""
        calib_s = 0.0
        stats = None
        recipe = parse_recipe(rec_spec.format(act=act)) if rec_spec else []
        first = list(itertools.takewhile(lambda c: lookup(c).data_free, recipe))
        key, base = base_for(first) if first else ("[]", model)
        m = copy.deepcopy(base)
        rest = recipe[len(first):]
        if recipe or (isinstance(q, W8A8) and (q.act == "tensor" or q.weight_clip or q.gptq)):
            stats, calib_s = stats_for(data, key, base, isinstance(q, W8A8) and q.gptq)
        t0 = time.perf_counter()
        # (rotate_down records down_proj's rotated input on the same windows, after mitigating)
        # (and range_tune and keep_float score the quantized model on the first of them)
        again = (windows_for(data) if any(lookup(c).recalibrates for c in rest)
                 or getattr(q, "range_tune", 0) or getattr(q, "keep_float", 0) else None)
        res = compress(m, tok, rest, q, stats, progress=False, recalibrate_on=again)
        stats = res.stats
        prep_s = time.perf_counter() - t0
        if label == "FP32" and a.dtype != "float32":
            label = UNQUANTIZED[1]
        return m, {"label": label, "act": act, "recipe": recipe_to_list(recipe), "calib_data": data
                   if stats is not None else None, "calib_seconds": calib_s,
                   "mitigate_quantize_seconds": prep_s, "git_sha": git_sha(),
                   "alphas": stats.meta.get("smoothquant_alpha") if stats is not None else None,
                   "split_intermediate_size": stats.meta.get("split_intermediate_size")
                   if stats is not None else None,
                   "rotation": getattr(base, "outlierq_rotation", None),
                   "down_rotation": stats.meta.get("down_rotation") if stats is not None else None,
                   "act_clip": res.record.get("act_clip"), "range_tune": res.record.get("range_tune"),
                   "quiet_tokens": res.record.get("quiet_tokens"), "keep_float": res.record.get("keep_float")}

    def finish(row, r):
        row.update(ppl=r.ppl, windows=r.windows, tokens_per_s=r.tokens_per_s, kl=r.kl, top1=r.top1)
        print(f"{row['label']:40s} {row['act']:7s} ppl {r.ppl:.3f} ({r.windows} windows, "
              f"{r.tokens_per_s:.0f} tok/s)", flush=True)
        return row

    def evaluate(built: list, windows) -> list[dict]:
        """The rows of `built` ((model, row) pairs from `build`) with their perplexities, in one
        pass over the windows: the FP32 reference's forward pass runs once per window for all."""
        out = {}
        for i, (m, row) in enumerate(built):
            if row["label"] == "FP32" and a.dtype == "float32":  # the reference itself: no KL
                out[i] = finish(row, perplexity(m, ids, 2048, windows))
        rest = [i for i in range(len(built)) if i not in out]
        if rest:
            for i, r in zip(rest, perplexities([built[i][0] for i in rest], ids, 2048, windows, reference=fp32)):
                out[i] = finish(built[i][1], r)
        return [out[i] for i in range(len(built))]

    def run(label, rec_spec, act, q, windows, data="wikitext2"):
        return evaluate([build(label, rec_spec, act, q, data)], windows)[0]

    def save():
        write_json(Path(a.out) / f"ppl_{name}.json", dict(record, rows=rows))
        quick = [r for r in rows if r["windows"] == a.windows and r["calib_data"] in (None, "wikitext2")]
        other = [r for r in rows if r not in quick]
        fps = {r["windows"]: r["ppl"] for r in rows if r["label"] in UNQUANTIZED}
        md = [f"# Perplexity study: {a.model}", "",
              f"{record['protocol']['eval']}. Quick table: first {a.windows} windows. "
              f"Calibration: {record['protocol']['calibration']}. git {record['git_sha']}, "
              f"torch {record['versions'].get('torch')}, transformers "
              f"{record['versions'].get('transformers')}, {record['machine']}. Eval tokens/s were "
              "measured while other jobs shared the machine at times; scripts/throughput.py is the "
              "controlled speed comparison. KL (mean KL divergence of the row's next-token distribution "
              "from FP32's, nats) and top-1 agreement are measured against the FP32 model on the "
              "same tokens (rows without them predate the columns).", "", _table(quick, fps)]
        if other:
            md += ["", "## All windows, and robustness (calibrated on tinyshakespeare, evaluated on "
                   "WikiText-2 test)", "", _table(other, fps)]
        write_text(Path(a.out) / f"ppl_{name}.md", "\n".join(md) + "\n")

    if a.render:  # keep the stamp of the run that wrote the rows
        import json
        record.update({k: v for k, v in json.loads(old.read_text()).items() if k != "rows"})
        save()
        return
    model, tok = load_model(a.model, a.dtype)
    fp32 = model if a.dtype == "float32" else load_model(a.model)[0]  # the KL / top-1 reference
    ids = tokenize(tok, read_text("wikitext2", "eval"))
    only = set(a.only.split(";")) if a.only else None

    def drop_quick(label: str, act: str) -> None:
        """Forget the quick-table row of `label` and `act`, which a new one replaces."""
        rows[:] = [r for r in rows if not (r["label"] == label and r["act"] == act and r["windows"] == a.windows
                                           and r["calib_data"] in (None, "wikitext2"))]

    for label, rec_spec, q in ROWS:
        if only and label not in only:
            continue
        for act, qq in _quantizers(q):
            if a.acts and act not in a.acts.split(","):
                continue
            shown = UNQUANTIZED[1] if label == "FP32" and a.dtype != "float32" else label  # as run() names it
            drop_quick(shown, act)
            rows.append(run(label, rec_spec, act, qq, a.windows))
            save()
    by_label = {(lbl, ): (spec, q) for lbl, spec, q in ROWS}
    for item in filter(None, (a.robust or "").split(";")):
        label, act = item.split("|")
        spec, q = by_label[(label,)]
        qq = dict(_quantizers(q))[act]
        rows.append(run(label, spec, act, qq, a.windows, data="tinyshakespeare"))
        save()
    # all-window rows are built first and evaluated in one pass; each also gives its quick-table
    # row (first --windows windows) from the same build, which costs a tenth of building it again
    built = []
    for item in filter(None, (a.full or "").split(";")):
        label, act = item.split("|")
        spec, q = by_label[(label,)]
        built.append(build(label, spec, act, dict(_quantizers(q)).get(act)))
    if built:
        quick = evaluate([(m, dict(row)) for m, row in built], a.windows)
        for r in quick:
            drop_quick(r["label"], r["act"])
        rows.extend(quick)
        save()
        rows.extend(evaluate(built, None))
        save()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
