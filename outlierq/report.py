"""Outlier analysis report: an HTML page with PNG figures, and a JSON file with every number.

Figures: layer x channel heatmaps of max|x| (log colour) for the residual stream and the Linear
inputs; per-layer boxplots of channel max|x|; histograms (log counts) of activations at chosen
layers; a 2-D PCA of token activations with outlier tokens highlighted; per-layer int8 SQNR. With a
recipe, figures are drawn before and after the mitigation on the same scales."""
from __future__ import annotations

import copy
import html
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import ActivationStats, calibrate
from .detection import CRITERIA, Criteria, OutlierReport, detect
from .models.arch import ArchSpec, decoder_layers, get_arch
from .provenance import atomic_dir, stamp

MAX_COLS = 768      # heatmaps wider than this are max-pooled: figures stay readable
DPI = 90


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _pool(mat: torch.Tensor, cols: int = MAX_COLS) -> tuple[torch.Tensor, int]:
    """Max-pool columns so at most `cols` remain; returns (matrix, channels per column)."""
    n = mat.shape[1]
    k = max(1, math.ceil(n / cols))
    if k == 1:
        return mat, 1
    pad = k * math.ceil(n / k) - n
    m = torch.cat([mat, mat.new_zeros(mat.shape[0], pad)], 1)
    return m.view(mat.shape[0], -1, k).amax(2), k


def _by_kind(stats: ActivationStats, spec: ArchSpec) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Residual stream, then one entry per distinct Linear input of a layer (from the family's
    ArchSpec: Linears fed by one norm read one tensor and are drawn once)."""
    out: dict[str, list] = {"residual stream": list((n, s.absmax) for n, s in stats.residual.items())}
    n_layers = len(stats.residual)
    for path, label in spec.input_kinds().items():
        names = [f"{spec.layers}.{i}.{path}" for i in range(n_layers)]
        if all(n in stats.inputs for n in names):
            out[label] = [(n, stats.inputs[n].absmax) for n in names]
    return out


def _heatmaps(sets: dict[str, ActivationStats], spec: ArchSpec, path: Path) -> None:
    plt = _plt()
    kinds = list(_by_kind(next(iter(sets.values())), spec))
    mats = {lbl: {k: torch.stack([a for _, a in v]) for k, v in _by_kind(s, spec).items()}
            for lbl, s in sets.items()}
    fig, axes = plt.subplots(len(kinds), len(sets), figsize=(6.5 * len(sets), 2.6 * len(kinds)),
                             squeeze=False)
    from matplotlib.colors import LogNorm
    for r, kind in enumerate(kinds):
        vals = [mats[lbl][kind] for lbl in sets if kind in mats[lbl]]
        vmax = max(v.max().item() for v in vals)
        vmin = max(min(v[v > 0].min().item() for v in vals), vmax * 1e-4)
        for c, lbl in enumerate(sets):
            ax = axes[r][c]
            m, k = _pool(mats[lbl][kind].clamp(min=vmin))
            im = ax.imshow(m.numpy(), aspect="auto", interpolation="nearest", cmap="magma",
                           norm=LogNorm(vmin=vmin, vmax=vmax))
            ax.set_title(f"{kind}, {lbl}" + (f" (max over {k} channels/px)" if k > 1 else ""),
                         fontsize=9)
            ax.set_ylabel("layer")
            ax.set_xlabel("channel")
            fig.colorbar(im, ax=ax, label="max |x|")
    fig.suptitle("Per-channel max |activation| by layer (log colour scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _boxplots(sets: dict[str, ActivationStats], spec: ArchSpec, path: Path) -> None:
    plt = _plt()
    kinds = list(_by_kind(next(iter(sets.values())), spec))[:3]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(12, 3.0 * len(kinds)), squeeze=False)
    colors = ["tab:blue", "tab:orange"]
    for r, kind in enumerate(kinds):
        ax = axes[r][0]
        for c, (lbl, s) in enumerate(sets.items()):
            data = _by_kind(s, spec).get(kind)
            if not data:
                continue
            pos = [i + (c - (len(sets) - 1) / 2) * 0.35 for i in range(len(data))]
            bp = ax.boxplot([a.numpy() for _, a in data], positions=pos, widths=0.3,
                            flierprops={"markersize": 2}, patch_artist=True)
            for b in bp["boxes"]:
                b.set_facecolor(colors[c])
                b.set_alpha(0.6)
            ax.plot([], [], color=colors[c], lw=6, alpha=0.6, label=lbl)
        ax.set_yscale("log")
        ax.set_xticks(range(len(data)))
        ax.set_xticklabels(range(len(data)), fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("channel max |x| (log)")
        ax.set_title(f"{kind}: distribution of per-channel max |x| per layer")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _histograms(samples: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    plt = _plt()
    names = list(next(iter(samples.values())))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for i, n in enumerate(names):
        ax = axes[0][i]
        lim = max(s[n].abs().max().item() for s in samples.values())
        bins = torch.linspace(-lim, lim, 121).numpy()
        for lbl, s in samples.items():
            ax.hist(s[n].flatten().numpy(), bins=bins, log=True, histtype="step", lw=1.4, label=lbl)
        ax.set_title(n.replace("layers.", "layer ").replace(".", " "), fontsize=9)
        ax.set_xlabel("activation value")
        ax.set_ylabel("count (log)")
        ax.legend(fontsize=7)
    fig.suptitle("Histogram of Linear input activations (kept calibration rows)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


@torch.no_grad()
def _pca(model: nn.Module, batch: torch.Tensor, layer_idx: int, path: Path,
         ratio: float) -> dict[str, Any]:
    plt = _plt()
    spec = get_arch(model)
    captured = []
    layer = decoder_layers(model, spec)[layer_idx]
    h = layer.register_forward_hook(lambda m, a, o: captured.append(
        (o[0] if isinstance(o, tuple) else o).detach().float()))
    try:
        model(input_ids=batch, use_cache=False)
    finally:
        h.remove()
    x = captured[0].reshape(-1, captured[0].shape[-1])
    tok_max = x.abs().amax(1)
    outl = tok_max > ratio * tok_max.median()
    pos = torch.arange(batch.shape[1]).repeat(batch.shape[0])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    ev = []
    for ax, keep, title in ((axes[0], torch.ones_like(outl), "all tokens"),
                            (axes[1], ~outl, "outlier tokens removed")):
        xs = x[keep]
        xc = xs - xs.mean(0)
        _, s, v = torch.linalg.svd(xc, full_matrices=False)
        p = xc @ v[:2].t()
        o = outl[keep]
        ax.scatter(p[~o, 0], p[~o, 1], s=4, alpha=0.4, label="tokens")
        if o.any():
            ax.scatter(p[o, 0], p[o, 1], s=30, c="red", marker="x",
                       label=f"outlier tokens (max|x| > {ratio:g}x median), n={int(o.sum())}")
        e = (s[:2] ** 2 / (s ** 2).sum()).tolist()
        ev.append(e)
        ax.set_xlabel(f"PC1 ({100 * e[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * e[1]:.1f}% of variance)")
        ax.set_title(f"{title}, {int(keep.sum())} tokens")
        ax.legend(fontsize=8)
    fig.suptitle(f"PCA of residual-stream token activations after layer {layer_idx}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {"layer": layer_idx, "tokens": int(x.shape[0]), "outlier_tokens": int(outl.sum()),
            "outlier_positions": sorted(set(pos[outl].tolist()))[:50],
            "explained_variance": ev}


def sqnr_per_layer(model: nn.Module, stats: ActivationStats, act: str = "token") -> dict[str, float]:
    """SQNR (dB) of each Linear's W8A8 output vs float, on the kept calibration rows."""
    from .mitigate.smoothquant import _group_error

    mods = dict(model.named_modules())
    out = {}
    for n, rows in stats.samples.items():
        if n == "lm_head" or n not in mods:
            continue
        err = _group_error(rows, [mods[n].weight.detach()], torch.ones(rows.shape[1]), act,
                           stats.inputs[n].absmax)
        out[n] = -10 * math.log10(max(err, 1e-30))
    return out


def _sqnr_plot(sq: dict[str, dict[str, float]], path: Path) -> None:
    plt = _plt()
    kinds = sorted({n.rpartition(".")[2] for d in sq.values() for n in d})
    ncol = min(4, len(kinds))
    nrow = math.ceil(len(kinds) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol, 2.9 * nrow), sharey=True,
                             squeeze=False)
    for ax in axes.flat[len(kinds):]:
        ax.axis("off")
    for i, k in enumerate(kinds):
        ax = axes.flat[i]
        for lbl, d in sq.items():
            ys = [v for n, v in d.items() if n.rpartition(".")[2] == k]
            ax.plot(range(len(ys)), ys, marker=".", label=lbl)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylabel("SQNR (dB)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Per-layer quantization quality (per-token int8 activations, higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _round(o: Any) -> Any:
    if isinstance(o, float):
        return float(f"{o:.4g}")
    if isinstance(o, dict):
        return {k: _round(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_round(v) for v in o]
    return o


def build_report(model: nn.Module, windows: torch.Tensor, out_dir: str | Path,
                 recipe: list | None = None, criteria: Criteria = Criteria(),
                 stats: ActivationStats | None = None, keep_rows: int = 256,
                 overwrite: bool = True, progress: bool = True) -> Path:
    """Calibrate (unless `stats` with kept rows is given), detect, draw, and write the report."""
    from .mitigate.recipe import mitigate, recipe_to_list

    if stats is None or not stats.samples:
        stats = calibrate(model, windows, keep_rows=keep_rows, progress=progress)
    sets = {"before": stats}
    models = {"before": model}
    if recipe:
        after_model = copy.deepcopy(model)
        mitigate(after_model, stats, recipe)
        sets["after " + "+".join(next(iter(d)) for d in recipe_to_list(recipe))] = calibrate(
            after_model, windows, keep_rows=keep_rows, progress=progress)
        models[list(sets)[1]] = after_model
    reports: dict[str, OutlierReport] = {k: detect(s, criteria) for k, s in sets.items()}
    res_peak = max(range(len(stats.residual)),
                   key=lambda i: list(stats.residual.values())[i].absmax.max().item())
    with atomic_dir(out_dir, "report", overwrite=overwrite) as d:
        spec = get_arch(model)
        _heatmaps(sets, spec, d / "heatmap.png")
        _boxplots(sets, spec, d / "boxplots.png")
        inputs = [n for n in stats.inputs if n in stats.samples and n.startswith(spec.layers + ".")]
        worst = max(inputs, key=lambda n: stats.inputs[n].absmax.max())
        chosen = list(dict.fromkeys([inputs[0], worst, inputs[-1]]))
        _histograms({k: {n: s.samples[n] for n in chosen} for k, s in sets.items()},
                    d / "histograms.png")
        pca = _pca(model, windows[:4], res_peak, d / "pca.png", criteria.ratio)
        sq = {k: sqnr_per_layer(models[k], s) for k, s in sets.items()}
        _sqnr_plot(sq, d / "sqnr.png")
        data = {"meta": {k: v for k, v in stats.meta.items()}, "report": stamp(),
                "recipe": recipe_to_list(recipe or []),
                "detection": {k: r.as_dict() for k, r in reports.items()},
                "pca": pca, "sqnr_db": sq,
                # what the heatmaps draw (max-pooled like the figure), layer by layer
                "heatmaps": {lbl: {k: _pool(torch.stack([a for _, a in v]))[0].tolist()
                                   for k, v in _by_kind(s, spec).items()} for lbl, s in sets.items()}}
        (d / "report.json").write_text(json.dumps(_round(data)))
        shown = {n for v in _by_kind(stats, spec).values() for n, _ in v}
        (d / "index.html").write_text(_html(stats, reports, sq, pca, shown))
    return Path(out_dir)


def _html(stats: ActivationStats, reports: dict[str, OutlierReport], sq, pca, shown: set[str]) -> str:
    e = html.escape
    rows = []
    for lbl, r in reports.items():
        for kind, rec in r.recurring.items():
            chans = ", ".join(f"{d['channel']} ({d['layers']} layers)" for d in rec[:6]) or "none"
            rows.append(f"<tr><td>{e(lbl)}</td><td>{e(kind)}</td><td>{e(chans)}</td></tr>")
    first = next(iter(reports.values()))
    crit_rows = []
    for name, L in list(first.layers.items()):
        if name not in shown:
            continue
        crit_rows.append("<tr><td>{}</td><td>{:.1f}</td><td>{:.2f}</td>{}</tr>".format(
            e(name), L["absmax"], L["median"],
            "".join(f"<td>{len(L['flagged_' + c])}</td>" for c in CRITERIA)))
    tops = "".join(f"<tr><td>{e(t['layer'])}</td><td>{t['value']:.1f}</td><td>{t['sample']}</td>"
                   f"<td>{t['position']}</td><td>{t['channel']}</td></tr>"
                   for t in first.top_tokens.get("residual", [])[:10])
    sq_rows = "".join(f"<tr><td>{e(k)}</td><td>{sum(v.values()) / max(len(v), 1):.1f}</td>"
                      f"<td>{min(v.values()):.1f} ({e(min(v, key=v.get))})</td></tr>"
                      for k, v in sq.items())
    c = first.criteria
    m = stats.meta
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>outlierq report</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>Activation outliers: {e(str(m.get('model')))}</h1>
<p>Calibration: {m.get('samples')} windows x {m.get('seqlen')} tokens of {e(str(m.get('data')))}, seed
{m.get('seed')}; git {e(str(m.get('git_sha')))}. Criteria: absolute &gt; {c.absolute}, z-score &gt; {c.zscore},
IQR fence Q3 + {c.iqr_k}&middot;IQR, ratio to median &gt; {c.ratio}. All numbers: <a href="report.json">report.json</a>.</p>
<h2>Where the outliers are</h2><img src="heatmap.png"><img src="boxplots.png">
<h2>Channels that recur across layers (ratio criterion)</h2>
<table><tr><th>model</th><th>tensor</th><th>channels (layers flagged)</th></tr>{''.join(rows)}</table>
<h2>Tokens carrying the largest residual values</h2>
<table><tr><th>layer</th><th>max |x|</th><th>sample</th><th>position</th><th>channel</th></tr>{tops}</table>
<p>PCA at layer {pca['layer']}: {pca['outlier_tokens']} of {pca['tokens']} tokens are outliers; positions
{e(str(pca['outlier_positions'][:20]))}.</p><img src="pca.png"><img src="histograms.png">
<h2>Flagged channels per criterion (each distinct Linear input, residual stream)</h2>
<table><tr><th>tensor</th><th>max</th><th>median</th>{''.join(f'<th>{k}</th>' for k in CRITERIA)}</tr>{''.join(crit_rows)}</table>
<h2>Quantization quality per layer</h2>
<table><tr><th>model</th><th>mean SQNR (dB)</th><th>worst layer (dB)</th></tr>{sq_rows}</table>
<img src="sqnr.png"></body></html>
"""
