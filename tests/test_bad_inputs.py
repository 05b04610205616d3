"""The catalog of bad inputs and faults, tried as a careless or hostile user would: every case
exits with code 2 (or the signal's code), says what is wrong in one line, and leaves every
pre-existing file as it was."""
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from outlierq.cli import main
from outlierq.cache import seal_dir
from conftest import abandoned_dir, tiny_model_dir

QUICK = ["--samples", "2", "--seqlen", "16", "--batch-size", "2"]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", "LlamaForCausalLM")


@pytest.fixture
def ws(tmp_path, model_dir, monkeypatch):
    """A scratch workspace (as cwd and HOME) holding a user's files that must survive."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "id_rsa").write_text("secret")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / ".ckpt.old").mkdir()
    (tmp_path / ".ckpt.old" / "mine.txt").write_text("a user's own .old folder")
    return tmp_path


def _fails(capsys, argv, msg, root):
    capsys.readouterr()  # forget what earlier commands of the test printed
    before = _snapshot(root)
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    lines = [x for x in err.splitlines() if x.startswith("outlierq")]  # (progress bars aside)
    assert rc == 2, err
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err
    assert _snapshot(root) == before
    return lines[0]


@pytest.mark.parametrize("out, msg", [
    ("~", "home directory"), (".", "current directory"), ("notes", "not an outlierq output"),
])
def test_overwrite_never_replaces_what_outlierq_did_not_write(capsys, ws, model_dir, out, msg):
    _fails(capsys, ["quantize", "--model", str(model_dir), "--out", out, "--overwrite"] + QUICK, msg, ws)


def test_output_never_replaces_or_holds_the_input(capsys, ws, model_dir):
    _fails(capsys, ["quantize", "--model", str(model_dir), "--out", str(model_dir), "--overwrite"] + QUICK,
           "holds the input", model_dir.parent)
    _fails(capsys, ["quantize", "--model", str(model_dir), "--out", str(model_dir.parent), "--overwrite",
                    "--scheme", "float"] + QUICK, "holds the input", model_dir.parent)


def test_overwrite_replaces_its_own_checkpoint_and_nothing_else(capsys, ws, model_dir):
    argv = ["quantize", "--model", str(model_dir), "--scheme", "float", "--recipe", "none", "--out", "ckpt"] + QUICK
    assert main(argv) == 0
    _fails(capsys, argv, "pass --overwrite", ws)
    assert main(argv + ["--overwrite"]) == 0
    assert (ws / ".ckpt.old" / "mine.txt").read_text() == "a user's own .old folder"
    _fails(capsys, ["report", "--model", str(model_dir), "--out", "ckpt", "--overwrite"] + QUICK,
           "is an outlierq checkpoint, not an outlierq report", ws)


def test_a_directory_created_meanwhile_is_not_deleted(ws, model_dir, monkeypatch, capsys):
    import outlierq.checkpoint as ck

    real = ck._write_shards

    def racing(tensors, d, max_shard):  # another program creates the target while we write
        (ws / "ckpt").mkdir()
        (ws / "ckpt" / "theirs.txt").write_text("not ours")
        real(tensors, d, max_shard)
    monkeypatch.setattr(ck, "_write_shards", racing)
    rc = main(["quantize", "--model", str(model_dir), "--scheme", "float", "--recipe", "none", "--out", "ckpt"] + QUICK)
    assert rc == 2 and "not empty" in capsys.readouterr().err
    assert (ws / "ckpt" / "theirs.txt").read_text() == "not ours"
    assert not [p for p in ws.iterdir() if "outlierq-tmp" in p.name]


def _export(ws, model_dir) -> Path:
    assert main(["quantize", "--model", str(model_dir), "--recipe", "none", "--out", "ckpt"] + QUICK) == 0
    return ws / "ckpt"


@pytest.mark.parametrize("tamper, msg", [
    (lambda d: (d / "extra.safetensors").write_bytes((d / "model.safetensors").read_bytes()), "not in SHA256SUMS"),
    (lambda d: (d / "model.safetensors").rename(d / "renamed.safetensors"), "listed in SHA256SUMS but missing"),
    (lambda d: (d / "SHA256SUMS").write_text("garbage line\n"), "malformed"),
    (lambda d: (d / "config.json").write_text((d / "config.json").read_text() + " "), "fails its checksum"),
])
def test_verification_is_complete(capsys, ws, model_dir, tamper, msg):
    d = _export(ws, model_dir)
    tamper(d)
    _fails(capsys, ["ppl", "--model", str(d), "--windows", "1", "--seqlen", "16", "--out", "r.json"], msg, ws)


def test_sigterm_mid_export_leaves_nothing(ws, model_dir, monkeypatch, capsys):
    import outlierq.checkpoint as ck

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(ck, "_write_shards", killed)
    before = _snapshot(ws)
    rc = main(["quantize", "--model", str(model_dir), "--recipe", "none", "--out", "ckpt"] + QUICK)
    assert rc == 128 + signal.SIGTERM and "SIGTERM" in capsys.readouterr().err
    assert _snapshot(ws) == before and not (ws / "ckpt").exists()


def test_sigkill_leftovers_are_recognised_and_removed(ws, model_dir, capsys):
    left = abandoned_dir(ws / ".ckpt.outlierq-tmp-abandoned")
    (left / "model.safetensors").write_bytes(b"0" * 1000)
    _export(ws, model_dir)
    assert not left.exists() and "interrupted run" in capsys.readouterr().out


def test_statistics_of_another_model_are_refused(capsys, ws, model_dir, tmp_path_factory):
    other = tiny_model_dir(tmp_path_factory.mktemp("o") / "other", "LlamaForCausalLM")
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(other)  # same shapes, other weights
    for p in m.parameters():
        p.data.mul_(1.5)
    m.save_pretrained(other)
    assert main(["calibrate", "--model", str(other), "--out", "s.safetensors"] + QUICK) == 0
    argv = ["quantize", "--model", str(model_dir), "--stats", "s.safetensors", "--recipe",
            "smoothquant:alpha=0.5", "--out", "ckpt"]
    _fails(capsys, argv, "statistics are stale", ws)
    assert main(argv + ["--force-stats"]) == 0


@pytest.mark.parametrize("flags, msg", [
    (["--samples", "0"], "--samples: must be at least 1"),
    (["--seqlen", "1"], "--seqlen: must be at least 2"),
    (["--batch-size", "-3"], "--batch-size: must be at least 1"),
    (["--samples", "many"], "is not an integer"),
])
def test_numeric_flags(capsys, ws, model_dir, flags, msg):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", str(model_dir), "--out", "x"] + flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, msg", [
    (["calibrate", "--keep-rows", "-1"], "--keep-rows: must be at least 0"),
    (["calibrate", "--thresholds", "6,nan"], "finite numbers > 0"),
    (["calibrate", "--thresholds", "0"], "finite numbers > 0"),
    (["ppl", "--windows", "0"], "--windows: must be at least 1"),
])
def test_more_numeric_flags(capsys, flags, msg):
    with pytest.raises(SystemExit) as e:
        main(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("recipe, msg", [
    ("smoothquant:alpha=abc", "alpha must be a number"),
    ("smoothquant:alpha=1.5", "alpha must be a number in [0, 1]"),
    ("smoothquant:act=foo", "act must be token or tensor"),
    ("smoothquant:bogus=1", "unexpected keyword argument 'bogus'"),
    ("smoothquant++split", "empty step"),
    ("smoothquant:alpha", "write key=value"),
    ("hadamard", "unknown mitigation"),
    ("bad.json", "does not parse"),
    ("bad.yaml", "does not parse"),
    ("list.json", "must hold a list"),
])
def test_recipes(capsys, ws, model_dir, recipe, msg):
    (ws / "bad.json").write_text("[{oops")
    (ws / "bad.yaml").write_text("- smoothquant: {alpha: [1, 2\n")
    (ws / "list.json").write_text('{"smoothquant": {}}')
    _fails(capsys, ["quantize", "--model", str(model_dir), "--recipe", recipe, "--out", "ckpt"] + QUICK,
           msg, ws)


def test_token_for_typo(capsys, ws, model_dir):
    _fails(capsys, ["quantize", "--model", str(model_dir), "--scheme", "W8A8_STATIC:token_for=dwn_proj",
                    "--recipe", "none", "--out", "ckpt"] + QUICK, "matches no quantizable Linear", ws)


@pytest.mark.parametrize("flags, msg", [
    (["--tune", "range_tune:windows=2"], "use act='tensor'"),
    (["--scheme", "W8A8_STATIC", "--tune", "range_tune:windows=2", "--stats", "s.safetensors"], "drop --stats"),
    (["--scheme", "W8A8_STATIC", "--tune", "range_tune:windows=2", "--sequential"], "not available layer by layer"),
    (["--scheme", "W8A8_STATIC", "--tune", "quiet_tokens"], "set range_tune=N too"),
    (["--scheme", "W8A8_STATIC", "--tune", "range_tune:windows=2,each=dwn_proj"], "not the kind of any static Linear"),
    (["--scheme", "W8A8_STATIC", "--tune", "range_tune+quiet_tokens"], "quiet_tokens lives in memory only"),
    (["--scheme", "W8A8_STATIC", "--tune", "range_tune:windos=2"], "key one of windows, each"),
    (["--tune", "gtpq"], "unknown tuning step 'gtpq'"),
    (["--scheme", "W8A8:tokn_for=down_proj"], "option 'tokn_for=down_proj'"),
    (["--scheme", "W8A8_STATC"], "unknown scheme 'W8A8_STATC'"),
])
def test_range_tune_misuse(capsys, ws, model_dir, flags, msg):
    (ws / "s.safetensors").write_bytes(b"")
    _fails(capsys, ["quantize", "--model", str(model_dir), "--recipe", "none", "--out", "ckpt"] + flags + QUICK,
           msg, ws)
    assert main(["quantize", "--model", str(model_dir), "--recipe", "none", "--scheme", "W8A8_STATIC",
                 "--tune", "range_tune:windows=1,each=down_proj", "--out", "ckpt"] + QUICK) == 0
    assert "model.layers.0.mlp.down_proj" in json.loads((ws / "ckpt" / "outlierq.json").read_text())["range_tune"]


def test_truncated_statistics_file(capsys, ws, model_dir):
    assert main(["calibrate", "--model", str(model_dir), "--out", "s.safetensors"] + QUICK) == 0
    (ws / "s.safetensors").write_bytes((ws / "s.safetensors").read_bytes()[:100])
    _fails(capsys, ["quantize", "--model", str(model_dir), "--stats", "s.safetensors", "--out", "ckpt"],
           "not an outlierq statistics file", ws)


def test_files_that_are_not_ours_are_not_replaced(capsys, ws, model_dir):
    (ws / "s.safetensors").write_text("a user's file")
    _fails(capsys, ["calibrate", "--model", str(model_dir), "--out", "s.safetensors"] + QUICK,
           "not an outlierq statistics file", ws)
    (ws / "r.json").write_text('{"mine": 1}')
    _fails(capsys, ["ppl", "--model", str(model_dir), "--seqlen", "16", "--out", "r.json"],
           "not an outlierq record", ws)


def test_an_int8_export_is_not_a_float_model(capsys, ws, model_dir):
    d = _export(ws, model_dir)
    _fails(capsys, ["quantize", "--model", str(d), "--out", "again"] + QUICK, "already int8-quantized", ws)


def test_pickle_weights_and_custom_code_are_refused(capsys, ws, model_dir, tmp_path_factory):
    import shutil

    pk = tmp_path_factory.mktemp("p") / "pickled"
    shutil.copytree(model_dir, pk)
    (pk / "model.safetensors").rename(pk / "pytorch_model.bin")
    _fails(capsys, ["ppl", "--model", str(pk), "--seqlen", "16"], "pickle weights", ws)
    cc = tmp_path_factory.mktemp("c") / "custom"
    shutil.copytree(model_dir, cc)
    cfg = json.loads((cc / "config.json").read_text())
    cfg.update(architectures=["MyModelForCausalLM"], auto_map={"AutoConfig": "modeling_my.MyConfig"},
               model_type="my_model")
    (cc / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, ["ppl", "--model", str(cc), "--seqlen", "16"], "could not load model", ws)


def test_nan_perplexity_names_the_layer(capsys, ws, model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM
    import shutil

    d = tmp_path_factory.mktemp("n") / "nan"
    shutil.copytree(model_dir, d)
    m = AutoModelForCausalLM.from_pretrained(d)
    m.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("nan")
    m.save_pretrained(d)
    _fails(capsys, ["ppl", "--model", str(d), "--seqlen", "16", "--windows", "1", "--out", "r.json"],
           "model.layers.1.mlp.down_proj", ws)


def test_bench(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    assert e.value.code == 0
    rc = main(["bench", "kernels", "--shapes", "4000000x4000000", "--out", "nowhere"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "GiB" in err and len(err.splitlines()) == 1 and not Path("nowhere").exists()


def test_cache_path_is_a_file(capsys, ws, monkeypatch):
    (ws / "cachefile").write_text("x")
    monkeypatch.setenv("OUTLIERQ_CACHE", str(ws / "cachefile"))
    (ws / "m.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    _fails(capsys, ["ppl", "--model", "m.gguf"], "is a file", ws)


def test_slow_bf16_cpu_is_announced(model_dir, monkeypatch):
    from outlierq import load_model
    from outlierq.errors import OutlierqNotice
    from outlierq.ops import gemm

    monkeypatch.setattr(gemm, "cpu_slowdown", lambda dtype: 31.0)
    with pytest.warns(OutlierqNotice, match="31x slower than float32"):
        load_model(str(model_dir), "bfloat16")


def test_abbreviated_flags_and_too_many_processes_get_one_line(capsys):
    from outlierq.cli import main

    for argv in (["calibrate", "--model", "x", "--npro", "2"], ["calibrate", "--model", "x", "--nproc", "100000"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and "error" in err[0], err


def test_scheme_patterns_must_be_tuples():
    from outlierq.errors import OutlierqError
    from outlierq.quant import W8A8

    with pytest.raises(OutlierqError, match="takes a tuple"):
        W8A8(skip="lm_head")


def test_remote_code_in_an_exports_tokenizer_is_never_run(capsys, ws, model_dir, monkeypatch, tmp_path):
    """An export whose tokenizer config maps to code beside it (manifest recomputed, as a hostile
    sender would): outlierq.load never asks to run it and never runs it."""
    import io

    from outlierq.checkpoint import load

    d = _export(ws, model_dir)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    marker = tmp_path / "ran"
    (d / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                               "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    seal_dir(d)  # (a hostile author writes a consistent manifest)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # a prompt would read this and run it
    from outlierq.errors import OutlierqError

    with pytest.raises(OutlierqError, match="never runs checkpoint code"):
        load(d)
    assert not marker.exists()


@pytest.mark.parametrize("edit", [
    lambda qc: qc.pop("config_groups"),
    lambda qc: qc["config_groups"]["group_0"].update(input_activations=None),
    lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=4),
    lambda qc: qc.update(ignore="lm_head"),
])
def test_an_export_config_that_is_not_w8a8_gets_one_line(capsys, ws, model_dir, edit):
    d = _export(ws, model_dir)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))
    seal_dir(d)  # (a hostile author writes a consistent manifest)
    _fails(capsys, ["ppl", "--model", str(d), "--seqlen", "16", "--windows", "1"], "config.json", ws)


@pytest.mark.parametrize("flags, msg", [(["--scheme", "float:head=true"], "float takes none"),
                                       (["--scheme", "float", "--tune", "gptq"], "--tune gptq has nothing to tune"),
                                       (["--scheme", "float", "--tune", "range_tune:windows=2"], "nothing to tune")])
def test_quantizer_options_with_the_float_scheme_are_refused(capsys, ws, model_dir, flags, msg):
    _fails(capsys, ["quantize", "--model", str(model_dir), "--out", "fp"] + flags + QUICK, msg, ws)
