"""Where static per-tensor W8A8 loses, on one model and recipe: KL against FP32 on the first eval
windows for variants of the static model (which Linears keep per-token activations, position 0
quantized dynamically, down_proj's static range clipped, down_proj's input rotated online), and
with --rotate-down the library's rotate_down with its static range scaled by hand and by
`act_clip`'s search (both objectives). Also a table of down_proj's input range per token on the
calibration windows (float model): which token sets the static range, and how far ordinary tokens
sit below it.

    python scripts/static_diagnosis.py --model smollm2-135m --windows 3
    python scripts/static_diagnosis.py --model gemma3-270m --recipe smoothquant:alpha=0.8 --windows 2 --rotate-down

Writes results/static_diagnosis_<model>.json and .md. A diagnostic, not a study row: the
variants are built here by hand. The dense random rotation below predates the library's
`rotate_down` (mitigate/rotate_down.py, measured in scripts/study.py); it stays so that the
recorded numbers reproduce."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from outlierq import calibrate, compress, load_model
from outlierq.data import calib_windows, read_text, tokenize
from outlierq.models.arch import decoder_layers
from outlierq.provenance import stamp, write_json, write_text
from outlierq.quant import W8A8, Int8Linear, quantize_

RECIPE = "split:ratio=4+smoothquant:alpha=search,act=tensor,objective=token"


class OnlineRotation(torch.nn.Module):
    """x -> lin(x R) with lin's weight replaced by W R (R orthogonal): the same function, but
    the Linear sees rotated inputs. In memory only."""

    def __init__(self, lin: torch.nn.Linear, r: torch.Tensor):
        super().__init__()
        self.lin, self.r = lin, r

    def forward(self, x):
        return self.lin(x @ self.r)


@torch.no_grad()
def token_ranges(model, tok, windows: torch.Tensor) -> list[dict]:
    """Per decoder layer: down_proj's input range per token over `windows` (float model)."""
    seen: dict[int, list] = {}
    hooks = [layer.mlp.down_proj.register_forward_hook(
        lambda _m, x, _o, i=i: seen.setdefault(i, []).append(
            (x[0].abs().amax(-1), x[0].float().pow(2).mean(-1).sqrt())))
        for i, layer in enumerate(decoder_layers(model))]
    for b in range(0, windows.shape[0], 8):
        model(input_ids=windows[b:b + 8])
    for h in hooks:
        h.remove()
    out = []
    for i, parts in sorted(seen.items()):
        amax = torch.cat([p[0] for p in parts])
        rms = torch.cat([p[1] for p in parts]).flatten()
        j = int(amax.flatten().argmax())
        s, p = divmod(j, amax.shape[1])
        out.append({"layer": i, "max": amax.max().item(), "position": p, "token": tok.decode(windows[s, p]),
                    "median_token_max": amax.flatten().median().item(),
                    "rms_max_over_median": (rms.max() / rms.median()).item()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default=RECIPE)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--rotate-down", action="store_true",
                    help="also the library's rotate_down variants (static range scaled, act_clip)")
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model(a.model)
    ids = tokenize(tok, read_text("wikitext2", "eval"))
    wins = [ids[i * 2048:(i + 1) * 2048] for i in range(a.windows)]
    with torch.no_grad():
        ref = [F.log_softmax(model(input_ids=w[None]).logits[0, :-1].float(), -1) for w in wins]
    cw = calib_windows(tokenize(tok, read_text("wikitext2", "calib")), 128, 512, 0)
    ranges = token_ranges(model, tok, cw)
    stats = calibrate(model, cw, keep_rows=256, seed=0, progress=False)
    mf = copy.deepcopy(model)
    mst = compress(mf, tok, a.recipe, None, stats, progress=False).stats  # mitigated, float

    def kl_of(m) -> tuple[float, float]:
        kl = agree = n = 0
        with torch.no_grad():
            for w, r in zip(wins, ref):
                lp = F.log_softmax(m(input_ids=w[None]).logits[0, :-1].float(), -1)
                kl += F.kl_div(lp, r, log_target=True, reduction="sum").item()
                agree += int((lp.argmax(-1) == r.argmax(-1)).sum())
                n += lp.shape[0]
        return kl / n, agree / n

    rows: list[dict] = []

    def row(label: str, m) -> None:
        kl, top1 = kl_of(m)
        rows.append({"variant": label, "kl": kl, "top1": top1})
        print(f"{label:60s} KL {kl:.5f}  top-1 {100 * top1:.2f}%", flush=True)

    def int8s(m):
        return [(n, mod) for n, mod in m.named_modules() if isinstance(mod, Int8Linear)]

    def per_token(m, group: str):
        """A copy of static model m with the Linears of `group` ("a|b") per-token."""
        m = copy.deepcopy(m)
        for n, mod in int8s(m):
            if any(g in n for g in group.split("|")):
                mod.act = "token"
        return m

    static = quantize_(copy.deepcopy(mf), W8A8(act="tensor"), mst, progress=False)
    row("static everywhere", static)
    row("per-token everywhere", quantize_(copy.deepcopy(mf), W8A8(act="token"), mst, progress=False))
    for group in ("q_proj|k_proj|v_proj", "o_proj", "gate_proj|up_proj", "down_proj"):
        row(f"static, {group} per-token", per_token(static, group))

    m = copy.deepcopy(static)  # position 0 quantized per token, the rest with the static scale
    for _, mod in int8s(m):
        def fwd(x, mod=mod, f=Int8Linear.forward):
            y = f(mod, x).clone()
            mod.act = "token"
            y[:, :1] = f(mod, x[:, :1])
            mod.act = "tensor"
            return y
        mod.forward = fwd
    row("static, position 0 per-token", m)
    for r in (0.5, 0.1):
        m = copy.deepcopy(static)
        for n, mod in int8s(m):
            if "down_proj" in n:
                mod.input_scale.mul_(r)
        row(f"static, down_proj range clipped to x{r}", m)

    # online rotation of down_proj's input: a random orthogonal matrix per layer (the split
    # width 1612 has no Hadamard matrix of a known construction), static scales from the rotated
    # inputs' maxima over the same calibration windows
    mr = copy.deepcopy(mf)
    for i, layer in enumerate(decoder_layers(mr)):
        lin = layer.mlp.down_proj
        g = torch.Generator().manual_seed(i)
        r = torch.linalg.qr(torch.randn(lin.in_features, lin.in_features, generator=g, dtype=torch.float64))[0]
        with torch.no_grad():
            lin.weight.copy_((lin.weight.double() @ r).float())
        layer.mlp.down_proj = OnlineRotation(lin, r.float())
    amax: dict[str, float] = {}
    hooks = [mod.register_forward_hook(lambda _m, x, _o, n=n: amax.__setitem__(n, max(amax.get(n, 0.0), x[0].abs().max().item())))
             for n, mod in mr.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n]
    with torch.no_grad():
        for i in range(0, cw.shape[0], 8):
            mr(input_ids=cw[i:i + 8])
    for h in hooks:
        h.remove()
    row("float, down_proj input rotated (must be ~0)", mr)
    for parent_name, parent in list(mr.named_modules()):
        for child, mod in list(parent.named_children()):
            full = f"{parent_name}.{child}"
            if isinstance(mod, torch.nn.Linear) and full in amax:
                setattr(parent, child, Int8Linear.from_linear(mod, "tensor", amax[full] / 127))
    row("static everywhere, down_proj input rotated online", mr)
    for n, mod in int8s(mr):
        if "down_proj" in n:
            mod.act = "token"
    row("static, down_proj input rotated online and per-token", mr)

    if a.rotate_down:  # the library's step: recalibrated static ranges, scaled by hand / searched
        rd = copy.deepcopy(model)
        compress(rd, tok, a.recipe + "+rotate_down:block=none", W8A8(act="tensor"), cw, progress=False)
        downs = [mod for n, mod in int8s(rd) if "down_proj" in n]
        at_max = [d.input_scale.clone() for d in downs]
        for r in (1.0, 0.7, 0.5, 0.35, 0.25):
            for d, s in zip(downs, at_max):
                d.input_scale.copy_(s * r)
            row(f"static, rotate_down, down_proj range x{r}", rd)
        for d, s in zip(downs, at_max):
            d.input_scale.copy_(s)
        row("static, rotate_down, down_proj per-token", per_token(rd, "down_proj"))
        for objective in ("value", "token"):
            rc = copy.deepcopy(model)
            res = compress(rc, tok, a.recipe + "+rotate_down:block=none",
                           W8A8(act="tensor", act_clip=True, act_clip_objective=objective), cw, progress=False)
            clips = list(res.record["act_clip"].values())
            row(f"static, rotate_down + act_clip {objective} (ratios {min(clips):.2f}-{max(clips):.2f})", rc)
        for group in ("q_proj|k_proj|v_proj", "o_proj", "gate_proj|up_proj"):  # where the rest is
            row(f"static, rotate_down + act_clip, {group} per-token", per_token(rc, group))

    rec = {"model": a.model, "recipe": a.recipe, "windows": a.windows, "down_proj_ranges": ranges,
           "protocol": "KL of the variant's next-token distribution from FP32's (nats, mean over "
                       "tokens) and top-1 agreement, first windows of WikiText-2 test (2048 tokens); "
                       "calibration 128 x 512 WikiText-2 valid, seed 0; weights round-to-nearest",
           "rows": rows, **stamp()}
    name = Path(a.model).name
    write_json(Path(a.out) / f"static_diagnosis_{name}.json", rec)
    md = [f"# Static W8A8 diagnosis: {a.model}", "", f"Recipe `{a.recipe}`. {rec['protocol']}; "
          f"{a.windows} windows. git {rec['git_sha']}.", "",
          "| variant | KL vs FP32 (nats) | top-1 agreement |", "|---|---|---|"]
    md += [f"| {r['variant'].replace('|', '/')} | {r['kl']:.5f} | {100 * r['top1']:.2f}% |" for r in rows]
    md += ["", "`down_proj`'s input per token on the calibration windows (float model, before the recipe): the "
           "largest |x| of any token (the static range), where it sits, and the median token's; the "
           "per-token RMS, largest over median (what a rotation within the token leaves).", "",
           "| layer | max \\|x\\| | at position | token | median token's max \\|x\\| | max / median RMS |",
           "|---|---|---|---|---|---|"]
    md += [f"| {r['layer']} | {r['max']:.1f} | {r['position']} | {r['token']!r} | {r['median_token_max']:.2f} | "
           f"{r['rms_max_over_median']:.1f} |" for r in ranges]
    write_text(Path(a.out) / f"static_diagnosis_{name}.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
