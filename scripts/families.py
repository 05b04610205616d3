"""Every supported family on its tiny test model (tests/conftest.py: hidden 64, 2 layers, planted
outliers): what the ArchSpec applies, whether each mitigation preserves the logits, W8A8 error
with and without mitigation, and whether the export reloads (outlierq.load, transformers).

    python scripts/families.py            # writes results/families_tiny.json and .md

Tiny random models: these numbers check the machinery (exactness, reload), not model quality."""
from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAMILIES, tiny_model, token_batch  # noqa: E402

from outlierq import calibrate, compress, export, load  # noqa: E402
from outlierq.models.arch import get_arch  # noqa: E402
from outlierq.provenance import stamp, write_json, write_text  # noqa: E402
from outlierq.quantize import W8A8  # noqa: E402

RECIPES = {"sq0.5": "smoothquant:alpha=0.5", "sq-search": "smoothquant:alpha=search,act={act}",
           "split": "split:expand=0.1,ratio=2"}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def row(family: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = tiny_model(family, outliers=True)
    spec = get_arch(model)
    calib, test = token_batch(8, 32, seed=1), token_batch(4, 32, seed=2)
    stats = calibrate(model, calib, keep_rows=128, progress=False)
    ref = model(input_ids=test).logits
    out = {"family": family, "notes": list(spec.notes), "split": spec.mlp is not None,
           "preserve": {}, "w8a8_mse": {}}
    for name, recipe in RECIPES.items():  # mitigation alone: logits unchanged
        m = compress(copy.deepcopy(model), None, recipe, None, stats, progress=False).model
        out["preserve"][name] = _rel(m(input_ids=test).logits, ref)
    for act in ("token", "tensor"):
        for name in ("none", "sq0.5", "sq-search"):
            m = compress(copy.deepcopy(model), None, RECIPES.get(name, "none"), W8A8(act=act), stats,
                         progress=False).model
            out["w8a8_mse"][f"{act} {name}"] = (m(input_ids=test).logits - ref).pow(2).mean().item()
    q = compress(copy.deepcopy(model), None, RECIPES["sq0.5"], W8A8(act="token"), stats, progress=False)
    qref = q.model(input_ids=test).logits
    with tempfile.TemporaryDirectory() as d:
        ckpt = export(q.model, Path(d) / "ckpt", recipe=q.recipe, stats=q.stats)
        out["reload_bit_identical"] = torch.equal(load(ckpt)[0](input_ids=test).logits, qref)
        try:
            hf = AutoModelForCausalLM.from_pretrained(ckpt)(input_ids=test).logits
            out["transformers_rel_diff"] = _rel(hf, qref)
        except Exception as e:  # noqa: BLE001  (recorded, not hidden)
            out["transformers_rel_diff"] = f"does not load: {type(e).__name__}"
    out["int8_vs_fp32_rel"] = _rel(qref, ref)
    return out


def main() -> None:
    warnings.simplefilter("ignore")
    rows = []
    for f in FAMILIES:
        rows.append(row(f))
        print(f, rows[-1]["reload_bit_identical"], rows[-1]["transformers_rel_diff"], flush=True)
    rec = {"what": "Every supported family on its tiny test model (tests/conftest.py: hidden 64, 2 layers, "
                   "planted outliers)", "test_tokens": "4 x 32 random ids (seed 2)",
           "calibration": "8 x 32 random ids (seed 1), 128 kept rows", "rows": rows, **stamp()}
    write_json("results/families_tiny.json", rec)
    fmt = lambda v: f"{v:.1e}" if isinstance(v, float) else str(v)  # noqa: E731
    md = ["# Every family on its tiny test model", "",
          f"{rec['what']}. Test input {rec['test_tokens']}; calibration {rec['calibration']}. "
          f"git {rec['git_sha']}, torch {rec['versions'].get('torch')}, transformers "
          f"{rec['versions'].get('transformers')}. Logit MSE vs FP32; relative L2 otherwise.", "",
          "| family | mitigation keeps logits (rel. L2: SQ 0.5 / SQ search / split) "
          "| static W8A8 MSE: plain / SQ 0.5 / SQ search | per-token W8A8 MSE: plain / SQ 0.5 / SQ search "
          "| reload in outlierq bit-identical | transformers vs outlierq int8 (rel. L2) "
          "| outlierq int8 vs FP32 (rel. L2) |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        p, w = r["preserve"], r["w8a8_mse"]
        md.append(f"| {r['family']} | {' / '.join(fmt(p[k]) for k in RECIPES)} | "
                  f"{' / '.join(fmt(w['tensor ' + k]) for k in ('none', 'sq0.5', 'sq-search'))} | "
                  f"{' / '.join(fmt(w['token ' + k]) for k in ('none', 'sq0.5', 'sq-search'))} | "
                  f"{r['reload_bit_identical']} | {fmt(r['transformers_rel_diff'])} | {fmt(r['int8_vs_fp32_rel'])} |")
    write_text("results/families_tiny.md", "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
