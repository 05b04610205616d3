"""Text for calibration and evaluation, and the token windows cut from it.

Built-in names resolve, in order, to $OUTLIERQ_DATA_DIR (an error if set but missing),
../shared/data beside the repository, or the xz-compressed copies shipped in outlierq/texts/, so a
clone anywhere works offline. Every file read is checked against its folder's SHA256SUMS; a file
the list does not name is an error."""
from __future__ import annotations

import functools
import hashlib
import lzma
import os
from pathlib import Path

import torch

from .errors import OutlierqError

# name -> {purpose: relative path}. Evaluation never uses calibration text and vice versa.
BUILTIN_TEXT = {
    "wikitext2": {"eval": "wikitext2/test.raw.txt", "calib": "wikitext2/valid.tokens.txt"},
    "tinyshakespeare": {"eval": "tinyshakespeare/input.txt", "calib": "tinyshakespeare/input.txt"},
}
PACKAGED = Path(__file__).resolve().parent / "texts"


def data_dir() -> Path:
    """The folder built-in texts come from (see the module doc for the order)."""
    env = os.environ.get("OUTLIERQ_DATA_DIR")
    if env:
        if not (Path(env) / "SHA256SUMS").is_file():
            raise OutlierqError(f"OUTLIERQ_DATA_DIR={env} has no SHA256SUMS (missing or not a data "
                                "folder); fix the path or unset it to use the texts shipped with outlierq")
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    for c in (repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if (c / "SHA256SUMS").is_file():
            return c
    return PACKAGED


@functools.lru_cache(maxsize=None)
def _sums(root: Path) -> dict[str, str]:
    sums = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0]
    return sums


def _read_verified(root: Path, rel: str) -> bytes:
    """The bytes of `rel` (or of its shipped .xz copy), checked against root/SHA256SUMS."""
    want = _sums(root).get(rel)
    if want is None:
        raise OutlierqError(f"{root / rel} is not listed in {root / 'SHA256SUMS'}; refusing an "
                            "unverifiable text (add its checksum or restore the original folder)")
    path = root / rel
    if not path.is_file() and (root / f"{rel}.xz").is_file():
        path = root / f"{rel}.xz"
    if not path.is_file():
        raise OutlierqError(f"{root / rel} is missing from the data folder {root}")
    raw = path.read_bytes()
    if path.suffix == ".xz":
        try:
            raw = lzma.decompress(raw)
        except lzma.LZMAError as e:
            raise OutlierqError(f"{path} is damaged ({e}); reinstall outlierq") from None
    if hashlib.sha256(raw).hexdigest() != want:
        raise OutlierqError(f"{path} fails its SHA256SUMS check (truncated or altered); restore "
                            "the original file")
    return raw


def read_text(spec: str, purpose: str = "eval") -> str:
    """Text of a built-in dataset (`wikitext2`, `tinyshakespeare`) or of a UTF-8 file."""
    if spec in BUILTIN_TEXT:
        root = data_dir()
        path = root / BUILTIN_TEXT[spec][purpose]
        raw = _read_verified(root, BUILTIN_TEXT[spec][purpose])
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise OutlierqError(f"data {spec!r} is neither a built-in name "
                                f"({', '.join(BUILTIN_TEXT)}) nor a readable file")
        raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise OutlierqError(f"{path} looks binary (NUL bytes); pass a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OutlierqError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    # Universal newlines, as Python's text mode reads files: the shared WikiText-2 file has CRLF in
    # places, and the literature's numbers (304,986 SmolLM2 tokens) were measured on "\n" text.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise OutlierqError(f"{path} is empty; pass a file with text in it")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text tokenized once, as a 1-D LongTensor (no special tokens added by us).

    Text is text: a literal "<unk>" or "<eos>" in the file stays characters, not the model's
    control token (split_special_tokens). WikiText-2's word-level validation split, the default
    calibration text, holds 11,718 "<unk>" placeholders; Gemma-3's tokenizer read each as its
    special <unk> id, a token no real text produces, and those tokens set the static ranges of
    several layers (results/static_diagnosis_gemma3-270m.md). The evaluation text has none, so
    its ids are unchanged; SmolLM2's vocabulary has no "<unk>", so its calibration is too."""
    return tokenizer(text, return_tensors="pt", split_special_tokens=True).input_ids[0]


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of `seqlen` tokens from the start; the remainder is dropped."""
    n = ids.numel() // seqlen
    if n == 0:
        raise OutlierqError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                            "use a longer text or a smaller --seqlen")
    if windows is not None:
        if windows < 1:
            raise OutlierqError("--windows must be at least 1")
        n = min(n, windows)
    return ids[: n * seqlen].view(n, seqlen)


def calib_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens (seeded), as a [samples, seqlen] tensor."""
    if samples < 1 or seqlen < 1:
        raise OutlierqError("--samples and --seqlen must be positive")
    if ids.numel() < samples * seqlen:
        raise OutlierqError(f"calibration text has {ids.numel()} tokens, fewer than "
                            f"samples x seqlen = {samples} x {seqlen} = {samples * seqlen}; "
                            "use a longer text or fewer/shorter samples")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])


def check_seqlen(model, seqlen: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise OutlierqError(f"seqlen {seqlen} exceeds the model's context of {limit} tokens; "
                            f"use --seqlen {limit} or less")
