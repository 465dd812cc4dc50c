"""Upload bodies on disk as they arrive, so the node never holds an upload whole.

The handler writes the file part of a multipart body into a `SpooledUpload` chunk by chunk;
its content digest is computed on the way (no second pass over the bytes); the node reads the
header from the file and the worker process decodes from the file's path, so the upload's
bytes are never copied into the node's memory or through the pipe to the worker. The file is
removed when the request ends, whatever its outcome.

Spool files live in a directory beside the image storage (same file system, so a large body
lands where there is room for images); a node that crashed mid-upload leaves `upload-*` files
there, which `clear_stale()` removes at start.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path

from server.adapters.images.storage import DIGEST_BYTES

__all__ = ["SpooledUpload", "clear_stale"]

PREFIX = "upload-"
STALE_AFTER_S = 3600.0  # no upload streams for an hour (the body timeout ends it sooner)


class SpooledUpload:
    """One upload's file in the spool directory: `write()` chunks, `close()`, then read it
    by `path`; `discard()` (idempotent) removes it.

    Writes go to the page cache (a regular file's `write` does not wait for the disk), so
    the event loop may call `write` as body chunks arrive.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=directory, prefix=PREFIX)
        self.path = path
        self.size = 0
        self._file = os.fdopen(fd, "wb")
        self._hash = hashlib.blake2b(digest_size=DIGEST_BYTES)
        self._digest: str | None = None

    def write(self, chunk: bytes | memoryview) -> None:
        """Append `chunk` (and add it to the digest)."""
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def close(self) -> None:
        """Finish writing (idempotent); the file is then complete at `path`."""
        if not self._file.closed:
            self._file.close()
            self._digest = self._hash.hexdigest()

    @property
    def digest(self) -> str:
        """Hex BLAKE2b-160 of the bytes written (`storage.digest` of the whole file)."""
        self.close()
        assert self._digest is not None
        return self._digest

    def discard(self) -> None:
        """Close and remove the file (idempotent)."""
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def clear_stale(directory: str | os.PathLike[str], older_than_s: float = STALE_AFTER_S) -> int:
    """Remove spool files left by a node that stopped mid-upload; how many were removed.

    Only files older than `older_than_s` go, so another node sharing the directory keeps the
    uploads it is receiving.
    """
    removed = 0
    cutoff = time.time() - older_than_s
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.startswith(PREFIX) and entry.is_file():
                with contextlib.suppress(OSError):
                    if entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
    return removed
