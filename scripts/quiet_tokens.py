"""Why Gemma-3's static W8A8 loses on the lone space token ' ', and what a second static range
keyed by token id (W8A8.quiet_tokens) buys: KL against FP32 on the first eval windows with the
down_proj rows of ' ' treated in turn per-token (all of them, the quiet ones, the loud ones: a
diagnostic) and at a static range of f x the Linear's (the product's keyed path); and, per
down_proj, where the rows of ' ' sit against the static range.

    python scripts/quiet_tokens.py --model gemma3-270m --windows 2

Writes results/quiet_tokens_<model>.json and .md. Weights round to nearest (no GPTQ), no range
tune: the numbers compare with each other and with results/static_losses_<model>.md."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from outlierq import calibrate, compress, load_model
from outlierq.data import calib_windows, eval_windows, read_text, tokenize
from outlierq.evaluate import kl_per_token, log_probs_
from outlierq.provenance import stamp, write_json, write_text
from outlierq.quant import QUIET_GRID, QUIET_LEVEL, W8A8, Int8Linear, TokenKeys, quantize_

RECIPE = "smoothquant:alpha=0.8+rotate_down:inputs=all,block=none"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--windows", type=int, default=2)  # each window's FP32 log-probs: 2 GB on Gemma-3
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    space = tok(" ", add_special_tokens=False).input_ids[-1]
    cw = calib_windows(tokenize(tok, read_text("wikitext2", "calib")), 128, a.calib_seqlen, 0)
    stats = calibrate(model, cw, keep_rows=256, seed=0, progress=False)
    mf = copy.deepcopy(model)
    mst = compress(mf, tok, a.recipe, None, stats, progress=False, recalibrate_on=cw).stats
    ev = eval_windows(tokenize(tok, read_text("wikitext2", "eval")), a.seqlen, a.windows)
    with torch.no_grad():
        ref = [log_probs_(model(input_ids=w[None]).logits[0].float()) for w in ev]
    del model, stats
    q = quantize_(mf, W8A8(act="tensor", act_clip=True), mst, progress=False)
    downs = [(n, m) for n, m in q.named_modules() if isinstance(m, Int8Linear) and n.endswith("down_proj")]
    is_space = ev == space

    # per down_proj: where the rows of ' ' sit against the static range (absmax / range)
    where: dict[str, list[torch.Tensor]] = {n: [] for n, _ in downs}
    hooks = [m.register_forward_pre_hook(lambda m, args, n=n: where[n].append(
        m.input_rotation(args[0]).reshape(-1, m.in_features).abs().amax(-1) / (127 * m.input_scale)))
        for n, m in downs]
    with torch.no_grad():
        for w in ev:
            q(input_ids=w[None])
    for h in hooks:
        h.remove()
    layers = []
    for n, _ in downs:
        r = torch.cat(where[n])[is_space.reshape(-1)]
        layers.append({"linear": n, "space_rows": int(r.numel()), "quiet_share": (r < QUIET_LEVEL).float().mean().item(),
                       "median": r.median().item(), "max": r.max().item(), "min": r.min().item()})

    rows: list[dict] = []

    def row(label: str) -> None:
        with torch.no_grad():
            k = torch.stack([kl_per_token(q(input_ids=w[None]).logits[0], r) for w, r in zip(ev, ref)])
        rows.append({"variant": label, "kl": k.mean().item(), "kl_space": k[is_space].mean().item(),
                     "kl_other": k[~is_space].mean().item()})
        print(f"{label:60s} KL {rows[-1]['kl']:.5f}", flush=True)

    row("static (act_clip)")
    # diagnostic: chosen rows of ' ' quantized per token (at run time), the rest static
    ids = {"ids": None}
    pick = {"rows": None}

    def per_token_rows(m, args, out):
        if ids["ids"] is None or getattr(m, "_inside", False):
            return out
        x = args[0]
        amax = m.input_rotation(x).reshape(-1, m.in_features).abs().amax(-1)
        sel = (ids["ids"] == space) & pick["rows"](amax / (127 * m.input_scale))
        m._inside, m.act = True, "token"
        try:
            yt = m(x)
        finally:
            m._inside, m.act = False, "tensor"
        return torch.where(sel.reshape(*out.shape[:-1], 1), yt, out)

    hooks = [m.register_forward_hook(per_token_rows) for _, m in downs]
    keys = TokenKeys()
    enter = q.register_forward_pre_hook(keys.enter, with_kwargs=True)
    leave = q.register_forward_hook(keys.leave, with_kwargs=True)
    spy = q.register_forward_pre_hook(lambda mod, args, kwargs: ids.update(ids=kwargs["input_ids"].reshape(-1)),
                                      with_kwargs=True)
    for label, rule in (("' ' rows per-token", lambda r: torch.ones_like(r, dtype=torch.bool)),
                        (f"quiet ' ' rows (below {QUIET_LEVEL:.3g} of the range) per-token", lambda r: r < QUIET_LEVEL),
                        ("loud ' ' rows per-token", lambda r: r >= QUIET_LEVEL)):
        pick["rows"] = rule
        row(label)
    spy.remove()
    ids["ids"] = None
    for h in hooks:
        h.remove()
    # the product's path: ' ' rows at a second static range, f x the Linear's
    for _, m in downs:
        m.token_ids, m.token_scale, m.token_keys = torch.tensor([space]), m.input_scale.clone(), keys
    for f in QUIET_GRID[1:]:
        for _, m in downs:
            m.token_scale.copy_(m.input_scale * f)
        row(f"' ' rows at a static range x{f}")
    enter.remove()
    leave.remove()

    rec = {"model": a.model, "recipe": a.recipe, "windows": a.windows, "space_token_id": space,
           "space_share": is_space.float().mean().item(), "rows": rows, "down_proj": layers,
           "protocol": f"KL of the variant's next-token distribution from FP32's (nats, mean over tokens; "
                       f"and over the ' ' positions / the others), first windows of WikiText-2 test ({a.seqlen} "
                       f"tokens); calibration 128 x {a.calib_seqlen} WikiText-2 valid, seed 0; static ranges at "
                       "act_clip's ratios; weights round-to-nearest; int8 kernels", **stamp()}
    name = Path(a.model).name
    write_json(Path(a.out) / f"quiet_tokens_{name}.json", rec)
    md = [f"# Quiet tokens in static W8A8: {a.model}", "",
          f"Recipe `{a.recipe}`. {rec['protocol']}; {a.windows} windows; ' ' is "
          f"{100 * rec['space_share']:.1f}% of the tokens. git {rec['git_sha']}.", "",
          "| variant (down_proj only) | KL vs FP32 | KL at ' ' | KL elsewhere |", "|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['kl']:.5f} | {r['kl_space']:.4f} | {r['kl_other']:.5f} |" for r in rows]
    md += ["", "Rows of ' ' into each down_proj, as a fraction of its static range (largest |value| of "
           f"the rotated row / the range); quiet: below {QUIET_LEVEL:.3g}.", "",
           "| Linear | rows | quiet share | min | median | max |", "|---|---|---|---|---|---|"]
    md += [f"| {r['linear']} | {r['space_rows']} | {r['quiet_share']:.2f} | {r['min']:.4f} | {r['median']:.3f} | "
           f"{r['max']:.2f} |" for r in layers]
    write_text(Path(a.out) / f"quiet_tokens_{name}.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
