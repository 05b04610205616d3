"""Built-in texts: the copies shipped in the package equal the shared folder's, and every file
read is verified (a missing $OUTLIERQ_DATA_DIR, an unlisted or truncated file are errors)."""
import shutil

import pytest

from outlierq import data
from outlierq.errors import OutlierqError


@pytest.fixture(autouse=True)
def _fresh_sums():
    data._sums.cache_clear()
    yield
    data._sums.cache_clear()


def test_packaged_texts_verify_and_match_the_shared_folder(monkeypatch):
    monkeypatch.setenv("OUTLIERQ_DATA_DIR", str(data.PACKAGED))
    shipped = {(n, p): data.read_text(n, p) for n in data.BUILTIN_TEXT for p in ("eval", "calib")}
    assert len(shipped[("wikitext2", "eval")]) == 1_294_336  # 1,307,975 bytes, CRLF -> LF
    monkeypatch.delenv("OUTLIERQ_DATA_DIR")
    if data.data_dir() == data.PACKAGED:
        pytest.skip("no shared data folder beside this clone to compare with")
    for (n, p), text in shipped.items():
        assert data.read_text(n, p) == text


def _copy(tmp_path, drop_listing=None, truncate=None):
    root = tmp_path / "d"
    shutil.copytree(data.PACKAGED, root)
    if drop_listing:
        lines = (root / "SHA256SUMS").read_text().splitlines()
        (root / "SHA256SUMS").write_text("\n".join(x for x in lines if drop_listing not in x) + "\n")
    if truncate:
        f = root / truncate
        f.write_bytes(f.read_bytes()[:1000])
    return root


@pytest.mark.parametrize("setup, msg", [
    (dict(), None),
    (dict(drop_listing="test.raw"), "not listed"),
    (dict(truncate="wikitext2/test.raw.txt.xz"), "damaged|fails its SHA256SUMS"),
])
def test_every_read_is_verified(tmp_path, monkeypatch, setup, msg):
    monkeypatch.setenv("OUTLIERQ_DATA_DIR", str(_copy(tmp_path, **setup)))
    if msg is None:
        assert data.read_text("wikitext2").startswith("\n\n = Robert Boulter = ")
    else:
        with pytest.raises(OutlierqError, match=msg):
            data.read_text("wikitext2")


def test_a_set_but_missing_data_dir_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OUTLIERQ_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(OutlierqError, match="OUTLIERQ_DATA_DIR"):
        data.read_text("tinyshakespeare")


def test_tokenize_reads_control_token_strings_as_text():
    """A literal "<unk>" in calibration text (WikiText-2's word-level split has 11,718) stays
    characters: the special <unk> id never appears, and the bos the tokenizer adds still does."""
    from conftest import char_tokenizer

    tok = char_tokenizer()
    ids = data.tokenize(tok, "a <unk> b").tolist()
    assert tok.unk_token_id not in ids
    assert ids == tok("a <unk> b", split_special_tokens=True).input_ids
    assert [tok.convert_ids_to_tokens(i) for i in ids if i != tok.bos_token_id] == list("a <unk> b")
