import json

import pytest
import torch

from outlierq import calibrate
from outlierq.detection import Criteria, detect, flags
from outlierq.mitigate.smoothquant import SmoothQuant
from outlierq.report import build_report
from conftest import FAMILIES, tiny_model, token_batch


def test_criteria_on_hand_computed_cases():
    clean = torch.linspace(1.0, 2.0, 100)  # no outliers at all
    for name, mask in flags(clean).items():
        assert not mask.any(), name
    planted = clean.clone()
    planted[[7, 42]] = torch.tensor([80.0, 300.0])
    f = flags(planted, Criteria(absolute=6.0, zscore=4.0, iqr_k=3.0, ratio=20.0))
    for name in ("absolute", "iqr", "ratio"):
        assert torch.nonzero(f[name]).flatten().tolist() == [7, 42], name
    # z-score: std is inflated by the outliers themselves; only the largest stands 4 sigma out
    assert torch.nonzero(f["zscore"]).flatten().tolist() == [42]
    # hand computation of the IQR fence: Q1, Q3 of the 100 values, k = 3
    q1, q3 = torch.quantile(planted.double(), torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert (planted.double() > q3 + 3 * (q3 - q1)).sum() == 2
    assert flags(planted, Criteria(absolute=100.0))["absolute"].sum() == 1


def test_detect_finds_planted_channels_recurring():
    model = tiny_model("LlamaForCausalLM", outliers=True)
    stats = calibrate(model, token_batch(4, 32), progress=False)
    rep = detect(stats, Criteria(ratio=8.0))
    q0 = rep.layers["model.layers.0.self_attn.q_proj"]
    assert {3, 17} <= set(q0["flagged_ratio"])
    rec = {d["channel"] for d in rep.recurring["q_proj"]}
    assert {3, 17} <= rec  # planted in both layers
    assert rep.top_tokens["residual"][0]["value"] == max(s.absmax.max().item()
                                                          for s in stats.residual.values())


def test_report_builds_from_tiny_model(tmp_path):
    model = tiny_model("Qwen2ForCausalLM", outliers=True)
    out = build_report(model, token_batch(4, 32), tmp_path / "rep", [SmoothQuant(0.5)],
                       keep_rows=64, progress=False)
    for f in ("index.html", "report.json", "heatmap.png", "boxplots.png", "histograms.png",
              "pca.png", "sqnr.png"):
        assert (out / f).stat().st_size > 0, f
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "report.json").read_text())
    assert set(data["detection"]) == {"before", "after smoothquant"}
    before, after = data["sqnr_db"]["before"], data["sqnr_db"]["after smoothquant"]
    q = "model.layers.0.self_attn.q_proj"
    assert after[q] > before[q]  # smoothing the planted channels helps this layer


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
@pytest.mark.parametrize("family", FAMILIES)
def test_report_builds_for_every_family(family, tmp_path):
    """Linear kinds come from the family's ArchSpec (OPT crashed on Llama names before)."""
    model = tiny_model(family, outliers=True)
    out = build_report(model, token_batch(2, 16), tmp_path / "rep", [SmoothQuant(0.5)],
                       keep_rows=16, progress=False)
    kinds = json.loads((out / "report.json").read_text())["heatmaps"]["before"]
    assert "residual stream" in kinds and len(kinds) >= 3
