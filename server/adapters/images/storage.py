"""Where image files live, behind a tiny interface; the backend is chosen by `FM_IMAGE_STORAGE`.

Names are content addresses: a variant is named by the BLAKE2b digest of its own bytes
(`3f/3fa9...c1.avif`), so a URL can never come to mean other bytes, identical variants are
stored once, and writes are idempotent (a name that exists already holds exactly those bytes).
Manifests (which variant serves which size of an image, for `Accept` negotiation) are named
by the image key (`manifests/ab/ab12....json`) and written once.

Only `local` exists so far: a directory, the embedded default. It does not share files
between nodes; an object-storage backend would implement the same three methods.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

__all__ = ["ImageStorage", "LocalImageStorage", "content_name", "open_storage"]

DIGEST_BYTES = 20  # 160-bit BLAKE2b: collisions are not a practical concern at any scale
_NAME = re.compile(r"^(?:manifests/)?[0-9a-f]{2}/[0-9a-f]{40}\.(?:jpg|webp|avif|json)$")


def digest(data: bytes | bytearray) -> str:
    """Hex BLAKE2b-160 of `data` (hashlib releases the GIL for large inputs)."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).hexdigest()


def content_name(data: bytes, extension: str) -> str:
    """The storage name of a file with these bytes: `<2 hex>/<40 hex>.<extension>`."""
    hex_digest = digest(data)
    return f"{hex_digest[:2]}/{hex_digest}.{extension}"


def manifest_name(key: str) -> str:
    """The storage name of the manifest of image `key` (40 hex)."""
    return f"manifests/{key[:2]}/{key}.json"


def valid_name(name: str) -> bool:
    """Whether `name` is one this module makes (so it can never escape the storage root)."""
    return bool(_NAME.match(name))


class ImageStorage(Protocol):
    """Stores and returns image files by name. Implementations must be safe to share."""

    async def put_many(self, files: Mapping[str, bytes]) -> None:
        """Store every file, durably once this returns (in no particular order: a file that
        names others is stored by a later call); a name that exists is left as it is."""
        ...

    async def get(self, name: str) -> bytes | None:
        """The bytes stored under `name`, or None."""
        ...

    async def aclose(self) -> None:
        """Release connections or handles (nothing for a directory)."""
        ...


class LocalImageStorage:
    """Files under a directory, written atomically and durably (temporary file, fsync,
    rename, fsync of the directory).

    File I/O runs in the default thread pool, off the event loop; the files of one
    `put_many` are written concurrently. The directory is created on
    first write, so a node that never stores an image leaves no trace.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path_of(self, name: str) -> Path:
        """Where `name` lives on disk (`ValueError` for a name this module would not make)."""
        if not valid_name(name):
            raise ValueError(f"not an image storage name: {name!r}")
        return self.root / name

    async def put_many(self, files: Mapping[str, bytes]) -> None:
        # Each file on a thread of its own, so their fsyncs overlap.
        await asyncio.gather(
            *(asyncio.to_thread(self._write_one, name, data) for name, data in files.items())
        )

    async def get(self, name: str) -> bytes | None:
        if not valid_name(name):
            return None
        return await asyncio.to_thread(self._read, self.root / name)

    async def aclose(self) -> None:
        return None

    def _write_one(self, name: str, data: bytes) -> None:
        """Write `name` durably: a temporary file, fsync, rename, fsync of the directory
        (and of the root when the directory is new), so a crash never leaves a name that
        holds partial bytes or loses a name already answered."""
        path = self.path_of(name)
        if path.exists():
            return  # content-addressed: the same name holds the same bytes
        directory = path.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            _fsync_directory(directory.parent)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _fsync_directory(directory)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None


def _fsync_directory(directory: Path) -> None:
    """Make the names in `directory` durable (a rename is not, until its directory is)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_storage(kind: str, directory: str) -> ImageStorage:
    """The storage backend named by `FM_IMAGE_STORAGE`."""
    if kind == "local":
        return LocalImageStorage(directory)
    raise ValueError(f"unknown image storage {kind!r}; expected 'local'")
