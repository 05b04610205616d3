"""Where a static W8A8 recipe still loses, against FP32 on the first eval windows: KL with one
kind of Linear (every layer's q_proj, ...) per-token at a time, with one layer's down_proj
per-token at a time, KL by position in the window, and the tokens with the largest KL.

    python scripts/static_losses.py --model gemma3-270m --windows 2

Writes results/static_losses_<model>.json and .md. A diagnostic, not a study row: weights are
rounded to nearest (no GPTQ) and the variants switch Linears to per-token by hand, so the
numbers compare with each other, not with results/ppl_*.md."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from outlierq import calibrate, compress, load_model
from outlierq.data import calib_windows, eval_windows, read_text, tokenize
from outlierq.evaluate import kl_per_token, log_probs_
from outlierq.provenance import stamp, write_json, write_text
from outlierq.quant import W8A8, Int8Linear, quantize_

RECIPE = "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none"
BUCKETS = (0, 1, 4, 16, 64, 256, 2048)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--recipe", default=RECIPE)
    # each window's FP32 log-probabilities are kept: 2 GB a window on Gemma-3
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    cw = calib_windows(tokenize(tok, read_text("wikitext2", "calib")), 128, 512, 0)
    stats = calibrate(model, cw, keep_rows=256, seed=0, progress=False)
    mf = copy.deepcopy(model)
    mst = compress(mf, tok, a.recipe, None, stats, progress=False, recalibrate_on=cw).stats
    ev = eval_windows(tokenize(tok, read_text("wikitext2", "eval")), 2048, a.windows)
    with torch.no_grad():
        ref = [log_probs_(model(input_ids=w[None]).logits[0].float()) for w in ev]

    def kl_by_token(m) -> torch.Tensor:  # [windows, 2048]: KL(FP32 || m) at each position
        with torch.no_grad():
            return torch.stack([kl_per_token(m(input_ids=w[None]).logits[0], r) for w, r in zip(ev, ref)])

    static = quantize_(copy.deepcopy(mf), W8A8(act="tensor", act_clip=True), mst, progress=False)
    rows: list[dict] = []

    def row(label: str, m) -> torch.Tensor:
        k = kl_by_token(m)
        rows.append({"variant": label, "kl": k.mean().item(),
                     "by_position": {f"{lo}-{hi}": k[:, lo:hi].mean().item() for lo, hi in zip(BUCKETS, BUCKETS[1:])}})
        print(f"{label:50s} KL {rows[-1]['kl']:.5f}", flush=True)
        return k

    def per_token(names) -> torch.nn.Module:
        m = copy.deepcopy(static)
        for n, mod in m.named_modules():
            if isinstance(mod, Int8Linear) and n in names:
                mod.act = "token"
        return m

    k = row("static (act_clip)", static)
    flat = k.flatten()
    top = flat.topk(20)
    worst = [{"window": i // 2048, "position": i % 2048, "token": tok.decode(ev[i // 2048, i % 2048]),
              "next": tok.decode(ev[i // 2048, i % 2048 + 1]) if i % 2048 < 2047 else "", "kl": v}
             for v, i in zip(top.values.tolist(), top.indices.tolist())]
    share = (top.values.sum() / flat.sum()).item()
    int8 = [n for n, mod in static.named_modules() if isinstance(mod, Int8Linear) and mod.act == "tensor"]
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in int8))
    for kind in kinds:
        row(f"{kind} per-token", per_token({n for n in int8 if n.endswith(kind)}))
    downs = [n for n in int8 if n.endswith("down_proj")]
    for n in downs:
        row(f"{n} per-token", per_token({n}))
    row("per-token everywhere", per_token(set(int8)))

    rec = {"model": a.model, "recipe": a.recipe, "windows": a.windows, "rows": rows, "worst_tokens": worst,
           "worst_share": share,
           "protocol": "KL of the variant's next-token distribution from FP32's (nats, mean over tokens), "
                       "first windows of WikiText-2 test (2048 tokens); calibration 128 x 512 WikiText-2 "
                       "valid, seed 0; static ranges at act_clip's ratios; weights round-to-nearest",
           **stamp()}
    name = Path(a.model).name
    write_json(Path(a.out) / f"static_losses_{name}.json", rec)
    head = " | ".join(f"pos {lo}-{hi - 1}" for lo, hi in zip(BUCKETS, BUCKETS[1:]))
    md = [f"# Where static W8A8 still loses: {a.model}", "", f"Recipe `{a.recipe}`. {rec['protocol']}; "
          f"{a.windows} windows. git {rec['git_sha']}.", "",
          f"| variant | KL vs FP32 (nats) | {head} |", "|---|---|" + "---|" * (len(BUCKETS) - 1)]
    md += [f"| {r['variant']} | {r['kl']:.5f} | " + " | ".join(f"{v:.4f}" for v in r["by_position"].values()) + " |"
           for r in rows]
    md += ["", f"The 20 tokens with the largest KL in the static model carry {100 * share:.1f}% of its KL "
           f"(of {flat.numel()} tokens):", "", "| window | position | token | next token | KL |", "|---|---|---|---|---|"]
    md += [f"| {w['window']} | {w['position']} | {w['token']!r} | {w['next']!r} | {w['kl']:.3f} |" for w in worst]
    write_text(Path(a.out) / f"static_losses_{name}.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
