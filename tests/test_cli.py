"""Bad input: one line naming the problem, exit code 2, no traceback, nothing written."""
import subprocess
import sys

import pytest

from outlierq.cli import main
from conftest import tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import AutoTokenizer  # noqa: F401  (a real tokenizer is not needed here)
    d = tmp_path_factory.mktemp("tiny")
    tiny_model("LlamaForCausalLM").save_pretrained(d)
    return d


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("argv, msg", [
    (["ppl", "--model", "no-such-model"], "unknown model"),
    (["ppl", "--model", "./missing.gguf"], "not found"),
    (["calibrate", "--model", "./missing_dir/"], "unknown model"),
])
def test_bad_model(capsys, argv, msg, tmp_path):
    rc, err = _err(capsys, argv + ["--out", str(tmp_path / "o")] if argv[0] == "calibrate" else argv)
    assert rc == 2 and msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_not_gguf_and_bad_dir(capsys, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 definitely not gguf")
    rc, err = _err(capsys, ["ppl", "--model", str(f)])
    assert rc == 2 and "not a GGUF file" in err
    d = tmp_path / "empty"
    d.mkdir()
    rc, err = _err(capsys, ["ppl", "--model", str(d)])
    assert rc == 2 and "no config.json" in err


def test_architecture_transformers_cannot_build(capsys, tmp_path):
    """Every architecture transformers builds is taken (tests/test_contract.py); one it cannot build
    without running the checkpoint's own code gets one line."""
    (tmp_path / "config.json").write_text('{"model_type": "made_up_lm", "architectures": ["MadeUpForCausalLM"]}')
    rc, err = _err(capsys, ["ppl", "--model", str(tmp_path)])
    assert rc == 2 and "could not load model" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("content, msg", [(b"", "empty"), (b"\x00\x01\x02binary", "binary"),
                                          (b"\xff\xfe\xfa bad utf8", "not UTF-8")])
def test_bad_data_file(capsys, tmp_path, content, msg):
    from outlierq.data import read_text
    from outlierq.errors import OutlierqError
    f = tmp_path / "d.txt"
    f.write_bytes(content)
    with pytest.raises(OutlierqError, match=msg):
        read_text(str(f))


def test_stats_mismatch_and_missing(capsys, tmp_path):
    rc, err = _err(capsys, ["quantize", "--stats", str(tmp_path / "nope.safetensors"),
                            "--out", str(tmp_path / "q")])
    assert rc == 2 and "not found" in err
    assert not (tmp_path / "q").exists()


def test_no_traceback_from_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "outlierq", "ppl", "--model", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("outlierq: error:") and "Traceback" not in r.stderr


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import outlierq, torch\n"
            "from outlierq import ops\n"
            "assert not ops.triton_available()\n"
            "ops.channel_stats(torch.ones(3, 4))\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_every_command_in_the_readme_and_guide_parses():
    """The usage lines of README.md and docs/guide.md parse, and their schemes and tuning steps
    validate (nothing runs): the documentation cannot drift from the CLI."""
    import re
    import shlex
    from pathlib import Path

    from outlierq import cli

    root = Path(__file__).resolve().parents[1]
    lines = []
    for doc in ("README.md", "docs/guide.md"):
        text = (root / doc).read_text().replace("\\\n", " ")
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            lines += [re.split(r"\s#", ln)[0].strip() for ln in block.splitlines() if ln.startswith("outlierq ")]
    assert len(lines) > 10
    for line in lines:
        argv = shlex.split(line)[1:]
        a = cli._parser().parse_args(argv)
        cli._scheme_args(a)
        if a.cmd in ("quantize", "run"):
            cli._scheme(a, layer_by_layer=getattr(a, "sequential", False))
