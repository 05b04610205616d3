"""Provenance stamps and atomic file writes shared by every writer in outlierq."""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import OutlierqError

_REPO = Path(__file__).resolve().parents[1]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(_REPO), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return "unknown"
        # results/ is what the benchmarks write, not code: a study appending its own rows must
        # not stamp its later rows -dirty
        dirty = subprocess.run(["git", "-C", str(_REPO), "status", "--porcelain", "-uno", "--", ".",
                                ":(exclude)results"], capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("outlierq", "torch", "transformers", "triton", "safetensors", "compressed-tensors",
                "bitsandbytes", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def stamp() -> dict[str, Any]:
    """What every results file records about where it came from."""
    return {
        "git_sha": git_sha(),
        "versions": versions(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch threads {_torch_threads()}",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_kind() -> str:
    """The CPU as speed depends on it: torch's kernel capability, and AMX where the CPU has it
    (vLLM's CPU int8 and bf16 kernels take AMX tiles when they exist)."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}" + (" AMX" if amx else "")


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


MARKER = ".outlierq"          # in every directory outlierq writes: {"kind": ...}
_PARTIAL = ".outlierq-partial"  # inside a directory still being written: {"pid": ...}
_TMP_TAG = ".outlierq-tmp-"


def _kind_of_dir(path: Path) -> str | None:
    """The kind in the directory's marker; outputs of outlierq versions before the marker are
    recognised by their own files (a checkpoint's manifest, a report's report.json)."""
    try:
        return json.loads((path / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        pass
    if (path / "outlierq.json").is_file() and (path / "SHA256SUMS").is_file():
        return "checkpoint"
    try:
        if {"detection", "heatmaps"} <= json.loads((path / "report.json").read_text()).keys():
            return "report"
    except (OSError, ValueError, AttributeError):
        pass
    return None


def check_writable(path: str | os.PathLike, kind: str) -> None:
    """Before any work: `path` can be written. Not a dangling symlink; the nearest existing parent
    is a directory we can create a file in (probed for real: a read-only mount, a full quota or
    permissions all show here, not after an hour of calibration). Creates nothing that stays."""
    p = Path(path).expanduser()
    if p.is_symlink() and not p.exists():
        raise OutlierqError(f"{p} is a symlink to {os.readlink(p)}, which does not exist; "
                            f"choose another path for the {kind}")
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutlierqError(f"cannot write the {kind} at {p}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".outlierq-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutlierqError(f"cannot write the {kind} in {parent}: {e.strerror or e}") from None


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its write errors as the OSError they are (a full disk reaches
    the CLI as one line naming the path, not a SafetensorError traceback)."""
    import errno

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        msg = str(e)
        code = errno.ENOSPC if "os error 28" in msg or "No space" in msg else errno.EIO
        raise OSError(code, os.strerror(code) if code == errno.ENOSPC else msg, str(path)) from None


def check_target(path: str | os.PathLike, kind: str, overwrite: bool = False,
                 inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse, with one line, to write outlierq output `kind` at `path` unless `path` is new, an
    empty directory, or (with `overwrite`) a directory outlierq wrote as the same kind. Never the
    home directory, the current directory, `/`, an input or a directory holding an input."""
    check_writable(path, kind)
    p = Path(path).expanduser().resolve()
    danger: dict[Path, str] = {}
    for d, what in ((Path(p.anchor), "the file-system root"), (Path.home().resolve(), "your home directory"),
                    (Path.cwd().resolve(), "the current directory")):
        danger.setdefault(d, what)
    if p in danger:
        raise OutlierqError(f"refusing to write {kind} output to {p}: it is {danger[p]}")
    for inp in inputs:
        q = Path(inp).expanduser().resolve()
        if q == p or p in q.parents:
            raise OutlierqError(f"refusing to write {kind} output to {p}: it holds the input {q}")
    if not p.exists():
        return
    if not p.is_dir():
        raise OutlierqError(f"{p} exists and is a file; choose a directory for the {kind} output")
    if not any(p.iterdir()):
        return
    if not overwrite:
        raise OutlierqError(f"{p} exists and is not empty; pass --overwrite to replace an earlier "
                            f"outlierq {kind} there")
    found = _kind_of_dir(p)
    if found != kind:
        what = f"an outlierq {found}" if found else "not an outlierq output (no .outlierq marker)"
        raise OutlierqError(f"refusing to replace {p}: it is {what}, not an outlierq {kind}")


def check_file_target(path: str | os.PathLike, kind: str, is_kind) -> None:
    """A file output replaces only a file outlierq wrote as the same kind (`is_kind(path)`)."""
    p = Path(path).expanduser()
    check_writable(p, kind)
    if p.is_dir():
        raise OutlierqError(f"{p} is a directory; give a file name for the {kind}")
    if p.exists() and not is_kind(p):
        raise OutlierqError(f"refusing to replace {p}: it is not an outlierq {kind}")


def is_record(path: Path) -> bool:
    """A JSON results record outlierq wrote (it carries the provenance stamp)."""
    try:
        d = json.loads(path.read_text())
        return isinstance(d, dict) and "git_sha" in d and "versions" in d
    except (OSError, ValueError):
        return False


def clean_abandoned(parent: Path, name: str) -> None:
    """Tidy what killed runs left beside `parent/name`: their temporary directories are removed;
    a replaced output caught mid-swap is put back where it was."""
    target = parent / name
    for d in parent.glob(f".{name}{_TMP_TAG}*"):
        pid = _marked_pid(d)
        if pid is None or pid == os.getpid() or _alive(pid):
            continue  # not recognisably ours, or still being written
        if (d / "replaced").is_dir() and not target.exists():
            os.replace(d / "replaced", target)
            print(f"outlierq: restored {target}, which an interrupted run was replacing", flush=True)
        print(f"outlierq: removing {d}, left by an interrupted run (pid {pid})", flush=True)
        shutil.rmtree(d, ignore_errors=True)


def _marked_pid(d: Path) -> int | None:
    """The pid in a temporary directory's in-progress marker; None where there is no valid one
    (a stray file of someone else's is left alone, never a reason to fail)."""
    try:
        if d.is_symlink() or d.stat().st_uid != os.getuid():
            return None
        pid = json.loads((d / _PARTIAL).read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if type(pid) is int and 0 < pid < 1 << 22 else None


def scratch_dir(kind: str) -> Path:
    """A private temporary directory (mkdtemp: 0700) under $TMPDIR, marked with our pid. What runs
    killed outright (SIGKILL, the OOM killer) left there of the same kind is removed first."""
    base = Path(tempfile.gettempdir())
    for d in base.glob(f"outlierq-{kind}-*"):
        pid = _marked_pid(d)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
    d = Path(tempfile.mkdtemp(prefix=f"outlierq-{kind}-"))
    (d / _PARTIAL).write_text(json.dumps({"pid": os.getpid()}))
    return d


def output_files(d: Path) -> list[Path]:
    """The files of an output directory being written (its in-progress marker excluded)."""
    return sorted(p for p in d.iterdir() if p.is_file() and p.name != _PARTIAL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str, overwrite: bool = False,
               owned: bool = False) -> Iterator[Path]:
    """Build a directory under a temporary name beside `path`, then swap it into place.

    The temporary directory carries the pid that writes it, so a run killed outright (SIGKILL)
    leaves only that, which the next run writing beside it removes. On any failure (an
    interrupt included) it is removed and an existing target is left untouched; an existing
    target is replaced only with `overwrite` and only if outlierq wrote it as the same `kind`
    (checked again at the end: a directory that appeared meanwhile is not replaced). `owned`:
    the path lies in outlierq's own cache and is replaced whatever is there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_abandoned(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}", dir=path.parent))
    (tmp / _PARTIAL).write_text(json.dumps({"pid": os.getpid()}))
    (tmp / MARKER).write_text(json.dumps({"kind": kind}))
    try:
        yield tmp
        (tmp / _PARTIAL).unlink()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            if not owned:
                check_target(path, kind, overwrite)
            _swap(path, tmp)
        else:
            if path.exists():
                path.rmdir()  # empty
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _swap(path: Path, new: Path) -> None:
    """Replace directory `path` by `new`; whatever interrupts, `path` ends up old or new."""
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}old-", dir=path.parent))
    (old / _PARTIAL).write_text(json.dumps({"pid": os.getpid()}))  # found by clean_abandoned
    moved = False
    try:
        os.replace(path, old / "replaced")
        moved = True
        os.replace(new, path)
        moved = False
    finally:
        if moved and not path.exists():
            os.replace(old / "replaced", path)
    shutil.rmtree(old, ignore_errors=True)
