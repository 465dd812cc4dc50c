"""Spool files: what is written is what is read, digested on the way, and removed after."""

from __future__ import annotations

import os
import time
from pathlib import Path

from server.adapters.images.spool import SpooledUpload, clear_stale
from server.adapters.images.storage import digest


def test_a_spooled_upload_holds_its_chunks_and_their_digest(tmp_path: Path) -> None:
    upload = SpooledUpload(tmp_path / "spool")
    chunks = [os.urandom(70_000), b"", memoryview(os.urandom(1000))[10:500]]
    for chunk in chunks:
        upload.write(chunk)
    whole = b"".join(bytes(chunk) for chunk in chunks)
    assert upload.digest == digest(whole) and upload.size == len(whole)
    assert Path(upload.path).read_bytes() == whole
    upload.discard()
    upload.discard()
    assert list((tmp_path / "spool").iterdir()) == []


def test_clear_stale_removes_only_old_spool_files(tmp_path: Path) -> None:
    old, fresh = SpooledUpload(tmp_path), SpooledUpload(tmp_path)
    other = tmp_path / "notes.txt"
    other.write_text("not ours")
    an_hour_ago = time.time() - 3700
    os.utime(old.path, (an_hour_ago, an_hour_ago))
    os.utime(other, (an_hour_ago, an_hour_ago))
    assert clear_stale(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [Path(fresh.path).name, "notes.txt"]
    )
    assert clear_stale(tmp_path / "missing") == 0
