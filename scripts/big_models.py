"""Peak memory of the in-memory vs the layer-by-layer (sequential) pipeline, a random-weight
Llama bigger than this machine's comfort, and data-parallel calibration.

    python scripts/big_models.py memory --models smollm2-135m,gemma3-270m --samples 32
    python scripts/big_models.py random --size 3b --samples 16
    python scripts/big_models.py dp --model smollm2-135m --samples 128

Every measurement runs in its own child process, so its peak RSS (getrusage ru_maxrss) is its
own. Writes results/big_models.json and .md (rows are merged by key, so the three parts can run
separately). The random model is written to --scratch with a fixed seed and never committed."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_RANDOM = "smoothquant:alpha=0.5"

RANDOM = {  # OpenLLaMA-3B's shape (3.43B parameters)
    "3b": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


def one(a) -> dict:
    """One measurement, in this (child) process."""
    import torch

    from transformers import AutoTokenizer

    from outlierq import compress, load_model, sequential
    from outlierq.checkpoint import export
    from outlierq.models.load import DTYPES, resolve_model_path
    from outlierq.pipeline import Calibration
    from outlierq.quant import W8A8

    torch.manual_seed(0)
    path = Path(resolve_model_path(a.model))
    dtype = DTYPES[a.dtype]
    base_mb = _peak_mb()
    t0 = time.perf_counter()
    out = Path(tempfile.mkdtemp(dir=a.scratch)) / "ckpt"
    recipe = a.recipe
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    # the same windows for both pipelines: wikitext2's calibration split (seed 0), or random ids
    calib = (torch.randint(0, cfg["vocab_size"], (a.samples, a.seqlen), generator=torch.Generator().manual_seed(0))
             if a.random_tokens else Calibration(samples=a.samples, seqlen=a.seqlen))
    tok = None if a.random_tokens else AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    rec: dict = {}
    if a.pipeline == "memory":
        model, _ = load_model(str(path), dtype)
        res = compress(model, tok, recipe, W8A8(), calib, progress=False)
        export(model, out, tok, recipe=res.recipe, stats=res.stats)
    else:
        r = sequential.run(path, out, tok, recipe, W8A8(), calib, dtype, progress=False)
        cal_s, write_s = r["stats"].meta["layer_seconds"], r["final"].meta["layer_seconds_write"]
        rec["seconds_per_layer_calibrate_median"] = sorted(cal_s)[len(cal_s) // 2]
        rec["seconds_per_layer_write_median"] = sorted(write_s)[len(write_s) // 2]
    item = torch.tensor([], dtype=dtype).element_size()
    rec.update(
        model=a.model, pipeline=a.pipeline, dtype=a.dtype, recipe=recipe, samples=a.samples, seqlen=a.seqlen,
        layers=layers, wall_s=time.perf_counter() - t0, peak_rss_mb=_peak_mb(),
        rss_after_imports_mb=base_mb, float_checkpoint_mb=_dir_bytes(path) / 1e6,
        float_in_dtype_mb=_dir_bytes(path) / 1e6 * item / (4 if _stored_fp32(path) else 2),
        export_mb=_dir_bytes(out) / 1e6,
        # the layer-by-layer pipeline keeps every calibration window's hidden states (its input
        # and its output for the current layer)
        kept_activations_mb=2 * a.samples * a.seqlen * hidden * item / 1e6 if a.pipeline == "sequential" else 0.0,
        cpu=_cpu(), threads=torch.get_num_threads())
    rec["peak_over_float_checkpoint"] = rec["peak_rss_mb"] / rec["float_in_dtype_mb"]
    return rec


def _stored_fp32(path: Path) -> bool:
    cfg = json.loads((path / "config.json").read_text())
    return (cfg.get("dtype") or cfg.get("torch_dtype") or "float32") == "float32"


def _cpu() -> str:
    import torch
    return torch.backends.cpu.get_cpu_capability()


def _env(**extra: str) -> dict:
    """Children import this checkout's outlierq (a clean worktree's, not an editable install)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra)


def _child(args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "_one", *args, "--result", f.name]
        subprocess.run(cmd, check=True, env=_env())
        return json.loads(Path(f.name).read_text())


def make_random_llama(d: Path, size: str, seed: int = 0) -> Path:
    """A random-weight Llama in bf16, one safetensors shard per layer, written layer by layer
    (never whole in memory). Kept if it exists."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (d / "config.json").exists():
        return d
    d.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**RANDOM[size], max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.dtype = "bfloat16"
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size

    def w(*shape, std=0.02):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    weight_map = {}

    def shard(name: str, tensors: dict) -> None:
        save_file(tensors, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    shard("model-embed.safetensors", {"model.embed_tokens.weight": w(v, h, std=1.0)})
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        t = {p + f"self_attn.{n}_proj.weight": w(h, h) for n in "qkvo"}
        t.update({p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                  p + "mlp.down_proj.weight": w(h, i)})
        ln = torch.ones(h)
        ln[[7, 1000]] = 30.0  # two massive channels in the norms, as real LLMs have
        t.update({p + "input_layernorm.weight": ln.to(torch.bfloat16),
                  p + "post_attention_layernorm.weight": ln.to(torch.bfloat16)})
        shard(f"model-layer{L:03d}.safetensors", t)
    shard("model-head.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                     "lm_head.weight": w(v, h)})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(d)
    return d


def _merge(out: Path, rows: list[dict]) -> None:
    from outlierq.provenance import stamp, write_json, write_text

    path = out / "big_models.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    key = lambda r: (r.get("part"), r["model"], r.get("pipeline"), r.get("dtype"), r.get("mode"))  # noqa: E731
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    rows = list(merged.values())
    write_json(path, {"rows": rows, "protocol": __doc__, **stamp()})
    lines = ["# Big models: peak memory, layer by layer, data-parallel calibration", "",
             "Each row ran in its own process (peak RSS = getrusage ru_maxrss). Reproduce with "
             "`python scripts/big_models.py memory|random|dp` (see the script's doc).", "",
             "| model | pipeline | dtype | calib windows x len | peak RSS MB | float model MB (in dtype) | peak / float | "
             "kept activations MB | s/layer (calibrate, write) | wall s | export MB | CPU | git |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("part") == "dp":
            continue
        per = (f"{r['seconds_per_layer_calibrate_median']:.2f}, {r['seconds_per_layer_write_median']:.2f}"
               if "seconds_per_layer_calibrate_median" in r else "")
        lines.append(f"| {r['model']} | {r['pipeline']} | {r['dtype']} | {r['samples']}x{r['seqlen']} | "
                     f"{r['peak_rss_mb']:.0f} | {r['float_in_dtype_mb']:.0f} | {r['peak_over_float_checkpoint']:.2f} | "
                     f"{r['kept_activations_mb']:.0f} | {per} | {r['wall_s']:.0f} | {r['export_mb']:.0f} | "
                     f"{r['cpu']} | {r.get('git_sha', '')[:12]} |")
    dp = [r for r in rows if r.get("part") == "dp"]
    if dp:
        lines += ["", "## Data-parallel calibration (same windows; wall time of the calibrate command)", "",
                  "| model | mode | windows x len | wall s | vs 1 process x 2 threads | statistics equal | CPU | git |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in dp:
            lines.append(f"| {r['model']} | {r['mode']} | {r['samples']}x{r['seqlen']} | {r['wall_s']:.1f} | "
                         f"{r['ratio']:.2f}x | {r['equal']} | {r['cpu']} | {r.get('git_sha', '')[:12]} |")
    write_text(out / "big_models.md", "\n".join(lines) + "\n")


def dp(a) -> list[dict]:
    """2 processes x 1 thread vs 1 process x 2 threads: wall time of `outlierq calibrate`, and
    whether the statistics are equal (maxima/counts/kept rows exactly, sums to 1e-12)."""
    import torch

    from outlierq.calibration import ActivationStats
    from outlierq.provenance import stamp

    rows, files = [], {}
    base = [sys.executable, "-m", "outlierq", "calibrate", "--model", a.model, "--samples", str(a.samples),
            "--seqlen", str(a.seqlen), "--keep-rows", "256"]
    for mode, extra, threads in (("1 process x 2 threads", [], "2"), ("2 processes x 1 thread", ["--nproc", "2"], "1")):
        f = Path(a.scratch) / f"dp-{len(files)}.safetensors"
        f.unlink(missing_ok=True)
        t0 = time.perf_counter()
        subprocess.run(base + ["--out", str(f)] + extra, check=True, env=_env(OMP_NUM_THREADS=threads))
        rows.append({"part": "dp", "model": a.model, "mode": mode, "samples": a.samples, "seqlen": a.seqlen,
                     "wall_s": time.perf_counter() - t0, "cpu": _cpu(), **stamp()})
        files[mode] = ActivationStats.load(f)
    one_, two = files.values()
    equal = all(torch.equal(one_.inputs[k].absmax, two.inputs[k].absmax)
                and torch.equal(one_.inputs[k].counts, two.inputs[k].counts)
                and torch.allclose(one_.inputs[k].abssum, two.inputs[k].abssum, rtol=1e-12, atol=0)
                for k in one_.inputs) and all(torch.equal(one_.samples[k], two.samples[k]) for k in one_.samples)
    for r in rows:
        r["ratio"] = r["wall_s"] / rows[0]["wall_s"]
        r["equal"] = equal
    return rows


def main() -> None:
    from outlierq.provenance import stamp

    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["memory", "random", "dp", "_one"])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pipeline", default="memory")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--recipe", default="split:ratio=4+smoothquant:alpha=search,act=token")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--size", default="3b", choices=list(RANDOM))
    ap.add_argument("--random-tokens", action="store_true")
    ap.add_argument("--scratch", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--result", default=None)
    ap.add_argument("--out", default=str(ROOT / "results"))
    a = ap.parse_args()
    common = ["--samples", str(a.samples), "--seqlen", str(a.seqlen), "--scratch", a.scratch]
    if a.part == "_one":
        Path(a.result).write_text(json.dumps({**one(a), "part": "memory", **stamp()}))
        return
    if a.part == "memory":
        rows = [_child(["--model", m, "--pipeline", p, "--recipe", a.recipe, "--dtype", a.dtype] + common)
                for m in a.models.split(",") for p in ("memory", "sequential")]
    elif a.part == "random":
        d = make_random_llama(Path(a.scratch) / f"random-llama-{a.size}", a.size)
        rows = [_child(["--model", str(d), "--pipeline", "sequential", "--recipe", RECIPE_RANDOM,
                        "--dtype", "bfloat16", "--random-tokens"] + common)]
        rows[0]["model"] = f"random Llama {a.size} ({RANDOM[a.size]['num_hidden_layers']} layers, bf16)"
    else:
        rows = dp(a)
    _merge(Path(a.out), rows)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
