"""Every causal-LM class transformers ships, on a tiny random model (tests/zoo.py: the family's
default config shrunk to hidden 64 and 2 layers): what outlierq proved about its structure, what
stays float, whether SmoothQuant on the proven groups keeps the logits, and whether the per-token
W8A8 export reloads in outlierq (bit-identical) and in transformers.

    python scripts/families.py            # writes results/families_tiny.json and .md
    python scripts/families.py --part 0/2 & python scripts/families.py --part 1/2; python scripts/families.py --merge 2
    python scripts/families.py llama olmoe   # only these model types (printed, not written)

Tiny random models: these rows check the machinery (exactness, reload), not model quality."""
from __future__ import annotations

import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from zoo import Unbuildable, contract, decoder_only, model_types  # noqa: E402

from outlierq.provenance import stamp, write_json, write_text  # noqa: E402


LIMIT_S = 120  # per class: a tiny model that takes longer is recorded as too slow, not waited for
MEMORY_GB = 8  # per process (address space): one part per core must fit the machine's 24 GB


class _TooSlow(Exception):
    pass


def _alarm(signum, frame):
    raise _TooSlow


def run(model_type: str) -> dict:
    why = decoder_only(model_type)
    if why:
        return {"model_type": model_type, "skipped": why}
    t = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(LIMIT_S)
    try:
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row = contract(model_type, d)
    except _TooSlow:
        return {"model_type": model_type, "error": f"too slow: over {LIMIT_S} s on its tiny model", "where": "",
                "heavy": True}
    except MemoryError:
        return {"model_type": model_type, "error": f"needs over {MEMORY_GB} GB on its tiny model", "where": "",
                "heavy": True}
    except Unbuildable as e:
        return {"model_type": model_type, "skipped": f"tests/zoo.py cannot make a tiny model of it yet ({e})"}
    except Exception as e:  # noqa: BLE001  (recorded in the table, never hidden)
        if "can't allocate memory" in str(e):  # torch's allocator under the limit below
            return {"model_type": model_type, "error": f"needs over {MEMORY_GB} GB on its tiny model", "where": "",
                    "heavy": True}
        where = traceback.extract_tb(e.__traceback__)[-1]
        return {"model_type": model_type, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                "where": f"{Path(where.filename).name}:{where.lineno}"}
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - t, 1)
    return row


def ok(r: dict) -> bool:
    return ("error" not in r and r["smoothquant_rel"] <= 1e-5 and not r["float_linears_left"]
            and r["reload_bit_identical"] and not isinstance(r["transformers_rel"], str))


def markdown(rec: dict) -> str:
    rows = rec["rows"]
    tested = [r for r in rows if "skipped" not in r]
    md = ["# What outlierq proved, per causal-LM class", "",
          f"{rec['what']} git {rec['git_sha']}, torch {rec['versions'].get('torch')}, transformers "
          f"{rec['versions'].get('transformers')}.", "",
          f"**{sum(ok(r) for r in tested)} of {len(tested)}** decoder-only classes meet the whole contract; "
          f"{len(rows) - len(tested)} entries of the mapping are skipped (reasons at the end)"
          f"{'' if rec.get('complete') else '; the run stopped before the end of the mapping (later classes missing)'}. "
          "Groups: a norm and the Linears one SmoothQuant scale serves; pairs: producer -> consumer with a "
          "proven row map. SQ keeps logits: max |change| / max |logit| after SmoothQuant alpha=0.5 on the "
          "proven groups and pairs. Hand: the family's hand-written description, which inference reproduces "
          "(tests/test_infer.py).", "",
          "| model type | class | groups proven | pairs proven | SQ keeps logits | int8 Linears | reload outlierq | "
          "transformers vs outlierq | not smoothed / stays float |", "|---|---|---|---|---|---|---|---|---|"]
    for r in tested:
        if "error" in r:
            md.append(f"| {r['model_type']} | | | | | | | | **fails**: {r['error']} ({r['where']}) |")
            continue
        tr = r["transformers_rel"]
        tr = f"{tr:.1e}" if isinstance(tr, float) else tr
        notes = [n for n in r["notes"] if n.startswith(("not smoothed", "stay float", "MoE", "post-norm"))]
        left = f" (float left: {', '.join(r['float_linears_left'][:3])})" if r["float_linears_left"] else ""
        md.append(f"| {r['model_type']} | {r['class']}{' (hand)' if not r['inferred'] else ''} | "
                  f"{'<br>'.join(r['groups']) or '-'} | {'<br>'.join(r['pairs']) or '-'} | {r['smoothquant_rel']:.1e} | "
                  f"{r['int8_linears']}{left} | "
                  f"{'bit-identical' if r['reload_bit_identical'] else 'DIFFERS'} | {tr} | {'<br>'.join(notes) or '-'} |")
    md += ["", "## Skipped", ""]
    md += [f"- {r['model_type']}: {r['skipped']}" for r in rows if "skipped" in r]
    return "\n".join(md) + "\n"


# The 2025-26 architectures users brought (issue 28) -> their model types here
TARGETS = {"SmolLM3": "smollm3", "Llama 4 (text)": "llama4_text", "DeepSeek-V3": "deepseek_v3", "gpt-oss": "gpt_oss",
           "Qwen3-Next": "qwen3_next", "Qwen3.5": "qwen3_5_text", "GLM-4": "glm4", "GLM-4.5-MoE": "glm4_moe",
           "Olmo 3": "olmo3", "OLMoE": "olmoe", "EXAONE 4": "exaone4", "ERNIE 4.5": "ernie4_5",
           "ERNIE 4.5 MoE": "ernie4_5_moe", "Hunyuan": "hunyuan_v1_dense", "Seed-OSS": "seed_oss",
           "Apertus": "apertus", "Ministral 3": "ministral3", "Cohere 2": "cohere2", "Gemma 1": "gemma",
           "Gemma 3n": "gemma3n_text", "Gemma 4": "gemma4_text", "StarCoder2": "starcoder2", "BLOOM": "bloom",
           "Granite MoE": "granitemoe", "Granite 4 hybrid": "granitemoehybrid", "Phi-3.5-MoE": "phimoe",
           "MiniMax-M2": "minimax_m2", "LFM2": "lfm2", "Hunyuan MoE": "hunyuan_v1_moe"}


def readme_block(rec: dict) -> str:
    rows = {r["model_type"]: r for r in rec["rows"]}
    tested = [r for r in rec["rows"] if "skipped" not in r]
    good = [r["model_type"] for r in tested if ok(r)]
    bad = [r for r in tested if not ok(r)]
    proven = [r["model_type"] for r in tested if "error" not in r and (r["groups"] or r["pairs"])]
    t_ok = [name for name, mt in TARGETS.items() if mt in rows and ok(rows[mt])]
    t_sq = [name for name, mt in TARGETS.items() if mt in rows and "error" not in rows[mt] and rows[mt]["groups"]]
    out = [f"- **{len(good)} of {len(tested)}** decoder-only classes meet the whole contract (every decoder "
           "Linear int8, SmoothQuant on the proven groups keeps the logits within 1e-5, the export reloads "
           "bit-identically in outlierq and loads in transformers); "
           f"{len(proven)} have at least one proven group or pair (git {rec['git_sha'][:12]}).",
           f"- The 2025-26 architectures users brought: {len(t_ok)} of {len(TARGETS)} meet the contract, "
           f"{len(t_sq)} with at least one proven SmoothQuant norm group: {', '.join(t_ok)}.",
           f"- Meet the contract: {', '.join(good)}."]
    if bad:
        out.append("- Do not yet: " + "; ".join(
            f"{r['model_type']} ({r['error'] if 'error' in r else 'contract: ' + _why(r)})" for r in bad) + ".")
    out.append(f"- Skipped ({len(rec['rows']) - len(tested)}): encoders and encoder-decoder decoders, multimodal "
               "wrappers whose text model is its own entry, and configs too big for a test machine (reasons in the table).")
    return "\n".join(out)


def _why(r: dict) -> str:
    if r["smoothquant_rel"] > 1e-5:
        return f"SmoothQuant moved the logits {r['smoothquant_rel']:.1e}"
    if r["float_linears_left"]:
        return "float Linears left"
    if not r["reload_bit_identical"]:
        return "reload differs"
    return str(r["transformers_rel"])[:100]


def fill_readme(block: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = "<!-- families:start -->\n", "<!-- families:end -->"
    start, end = text.index(a) + len(a), text.index(b)
    write_text(readme, text[:start] + block + "\n" + text[end:])


def main(argv: list[str]) -> None:
    """No arguments: every class. `--part K/N`: every N-th class from the K-th (run N parts side by
    side, one per core), then `--merge N` writes the record of all parts. Model types: just those."""
    import json

    if argv[:1] == ["--merge"]:
        parts = [json.loads((ROOT / "results" / f"families_tiny.part{k}.json").read_text())
                 for k in range(int(argv[1]))]
        if len({p["git_sha"] for p in parts}) != 1:
            raise SystemExit("the parts come from different commits: run them again")
        order = {mt: i for i, mt in enumerate(model_types())}
        rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: order[r["model_type"]])
        st = {k: v for k, v in parts[0].items() if k not in ("rows", "complete", "what")}
        write(rows, all(p["complete"] for p in parts), st)
        for k in range(int(argv[1])):
            (ROOT / "results" / f"families_tiny.part{k}.json").unlink()
        return
    part = None
    if argv[:1] == ["--part"]:
        k, n = map(int, argv[1].split("/"))
        part, types, argv = k, model_types()[k::n], []
    else:
        types = argv or model_types()
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_GB << 30, resource.RLIM_INFINITY))
    st = stamp()  # before the first write: the README block this run fills is not a code change
    rows = []
    for mt in types:
        rows.append(run(mt))
        r = rows[-1]
        print(mt, "skipped" if "skipped" in r else r.get("error") or ("ok" if ok(r) else "FAILS CONTRACT"), flush=True)
        if part is not None:
            write_json(ROOT / "results" / f"families_tiny.part{part}.json",
                       {"rows": rows, "complete": len(rows) == len(types), **st})
        elif not argv:
            write(rows, len(rows) == len(types), st)


def write(rows: list[dict], done: bool, st: dict) -> None:
    """The record so far (rewritten after every class, so a long run leaves what it measured)."""
    rec = {"what": "Every causal-LM class in transformers' MODEL_FOR_CAUSAL_LM mapping on a tiny random model "
                   "(tests/zoo.py: hidden 64, 2 layers, seed 0); calibration 4 x 32 random ids, test 2 x 32 "
                   "(seed 1); per-token W8A8 after SmoothQuant alpha=0.5.", "complete": done, "rows": rows, **st}
    write_json(ROOT / "results" / "families_tiny.json", rec)
    write_text(ROOT / "results" / "families_tiny.md", markdown(rec))
    fill_readme(readme_block(rec))


if __name__ == "__main__":
    main(sys.argv[1:])
