"""Launches from the repository root (issue 27): `python -m` and `torchrun -m` put the working
directory first on sys.path, so the top-level kernels/ folder must never be imported as PyPI's
`kernels`, which transformers imports. Each launch runs as a user would, in a child process with
the repository root as its working directory."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--samples", "4", "--seqlen", "16", "--batch-size", "2"]


def _run(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", "LlamaForCausalLM")


def test_root_kernels_folder_does_not_shadow_pypi_kernels():
    code = ("import kernels, outlierq.kernels.int8_gemm as k, importlib.util as u;"
            "print(kernels.__file__ or 'namespace'); print(k.__file__);"
            "print(u.find_spec('transformers') is not None)")
    out = _run([sys.executable, "-c", code]).stdout.split("\n")
    if out[0] == "namespace":  # PyPI's kernels is not installed: only our folder answers, and harmlessly
        pytest.skip("PyPI's `kernels` is not installed here")
    assert Path(out[0]).resolve().parent != ROOT / "kernels", out[0]
    assert Path(out[1]).resolve() == ROOT / "kernels" / "int8_gemm.py"


def test_python_m_help_from_root():
    assert "calibrate" in _run([sys.executable, "-m", "outlierq", "--help"]).stdout


def test_python_m_nproc_from_root(src, tmp_path):
    out = tmp_path / "s.safetensors"
    _run([sys.executable, "-m", "outlierq", "calibrate", "--model", str(src), *QUICK, "--nproc", "2", "--out", str(out)])
    assert out.is_file()


def test_torchrun_m_from_root(src, tmp_path):
    out = tmp_path / "s.safetensors"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run(torchrun + ["-m", "outlierq", "calibrate", "--model", str(src), *QUICK, "--out", str(out)])
    assert out.is_file()
