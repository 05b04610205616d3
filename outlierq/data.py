"""Text for calibration and evaluation, and the token windows cut from it.

Built-in names resolve to ../shared/data (or $OUTLIERQ_DATA_DIR) with SHA256SUMS verified; where
neither exists, WikiText-2 falls back to HF `datasets` for users with a network."""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch

from .errors import OutlierqError

# name -> {purpose: relative path}. Evaluation never uses calibration text and vice versa.
BUILTIN_TEXT = {
    "wikitext2": {"eval": "wikitext2/test.raw.txt", "calib": "wikitext2/valid.tokens.txt"},
    "tinyshakespeare": {"eval": "tinyshakespeare/input.txt", "calib": "tinyshakespeare/input.txt"},
}


def data_dir() -> Path | None:
    candidates = []
    if os.environ.get("OUTLIERQ_DATA_DIR"):
        candidates.append(Path(os.environ["OUTLIERQ_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[1]
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data",
                   Path.cwd() / "shared" / "data"]
    for c in candidates:
        if (c / "SHA256SUMS").exists():
            return c
    return None


@functools.lru_cache(maxsize=None)
def _verify(root: Path, rel: str) -> None:
    sums = {}
    for line in (root / "SHA256SUMS").read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*").removeprefix("./")] = parts[0]
    want = sums.get(rel)
    if want is None:
        return
    got = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    if got != want:
        raise OutlierqError(f"{root / rel} fails its SHA256SUMS check; restore the original file")


def _from_hf_datasets(name: str, purpose: str) -> str:
    try:
        import datasets  # optional: only for users with a network
    except ImportError:
        raise OutlierqError(
            f"built-in text {name!r} not found: put the shared data folder at ../shared/data "
            "(beside the repo) or set OUTLIERQ_DATA_DIR to it (or pip install datasets, online)"
        ) from None
    split = "test" if purpose == "eval" else "validation"
    rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    return "\n\n".join(rows)


def read_text(spec: str, purpose: str = "eval") -> str:
    """Text of a built-in dataset (`wikitext2`, `tinyshakespeare`) or of a UTF-8 file."""
    if spec in BUILTIN_TEXT:
        root = data_dir()
        rel = BUILTIN_TEXT[spec][purpose]
        if root is None or not (root / rel).exists():
            if spec == "wikitext2":
                return _from_hf_datasets(spec, purpose)
            raise OutlierqError(f"built-in text {spec!r} not found: put the shared data folder at "
                                "../shared/data or set OUTLIERQ_DATA_DIR")
        _verify(root, rel)
        path = root / rel
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
    """The whole text tokenized once, as a 1-D LongTensor (no special tokens added by us)."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return ids


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
