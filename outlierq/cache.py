"""outlierq's cache: the native kernels' shared library and float conversions of GGUF models.

    $OUTLIERQ_CACHE, else $XDG_CACHE_HOME/outlierq, else ~/.cache/outlierq

What is loaded from here runs as the user (a shared library) or is served as the user's model, and
the path can be pointed anywhere by the environment, so nothing is trusted for being there:
- the directory and its parts are created private (0700); one not owned by the user, or writable
  by anyone else, is refused with one line (another user could have planted what it holds);
- entries are named by the hash of what they were made from (the GGUF file's bytes, not its path
  and mtime, which `cp -p`, `rsync -t` and `tar x` preserve across different contents);
- each entry carries the sha256 of its own bytes, written when it was built, and is checked
  against it before it is loaded: a truncated or altered entry is rebuilt, never loaded.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import OutlierqError
from .provenance import output_files, sha256_file


def root() -> Path:
    if os.environ.get("OUTLIERQ_CACHE"):
        return Path(os.environ["OUTLIERQ_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "outlierq"


def cache_dir(part: str | None = None) -> Path:
    """The cache (or its sub-directory `part`), created private, checked to be ours alone."""
    d = root()
    if d.exists() and not d.is_dir():
        raise OutlierqError(f"the outlierq cache path {d} is a file; point OUTLIERQ_CACHE at a directory")
    for p in (d, d / part) if part else (d,):
        try:
            p.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise OutlierqError(f"cannot create the outlierq cache {p}: {e.strerror or e}; "
                                "point OUTLIERQ_CACHE at a directory you can write") from None
        check_private(p)
    return d / part if part else d


def check_private(p: Path) -> None:
    """`p` is owned by this user and writable by no one else (a directory: the same)."""
    st = os.stat(p)  # (follows a symlinked ~/.cache: its target must be ours)
    if st.st_uid != os.getuid():
        raise OutlierqError(f"the outlierq cache {p} belongs to uid {st.st_uid}, not to you: another user "
                            "could have planted what it holds; point OUTLIERQ_CACHE at a directory of yours")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OutlierqError(f"the outlierq cache {p} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                            f"run chmod go-w {p}, or point OUTLIERQ_CACHE at a private directory")


def _owned_file(p: Path) -> bool:
    try:
        st = os.lstat(p)
    except OSError:
        return False
    return (stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def seal(path: Path) -> None:
    """Record the sha256 of file `path` beside it (`<name>.sha256`), once it is complete."""
    tmp = path.with_name(f".{path.name}.sha256.tmp")
    tmp.write_text(sha256_file(path) + "\n")
    os.replace(tmp, path.with_name(path.name + ".sha256"))


def verified(path: Path) -> bool:
    """True if file `path` and its seal are ours alone and the seal matches its bytes. Anything
    else (missing, planted, truncated, altered) is False: the caller rebuilds it."""
    side = path.with_name(path.name + ".sha256")
    if not (_owned_file(path) and _owned_file(side)):
        return False
    try:
        return side.read_text().strip() == sha256_file(path)
    except OSError:
        return False


def seal_dir(d: Path) -> None:
    """A directory entry's seal: SHA256SUMS over its files (the same manifest as an export's)."""
    files = [p for p in output_files(d) if p.name != "SHA256SUMS"]  # (the in-progress marker aside)
    (d / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))


def verified_dir(d: Path) -> bool:
    """True if directory `d` is ours alone and holds exactly the files its seal lists, each intact."""
    try:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        listed = dict(reversed(line.split("  ", 1)) for line in (d / "SHA256SUMS").read_text().splitlines())
        present = {p.name for p in d.iterdir()} - {"SHA256SUMS"}
        return present == set(listed) and all(
            _owned_file(d / n) and sha256_file(d / n) == h for n, h in listed.items())
    except (OSError, ValueError):
        return False
