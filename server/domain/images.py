"""`ImageService`: an upload in, a product image out (variants stored, the catalog updated).

    spool      the handler streams the file into a `SpooledUpload` (`spool()`), its digest
               computed on the way: the node never holds the upload whole
    probe      type from magic bytes, size and pixel caps from the header, read from the
               spool file (on a thread of the node, so a refusal never waits behind other
               uploads' renders)
    dedupe     the same bytes on the same product: the recorded image, no work
    render     in the worker process, which reads the spool file by its path: decode once,
               derive four sizes, twelve encodes and the placeholder (or reuse the rendition
               of the same bytes on another product)
    store      content-addressed files, concurrently and durably, then the manifest naming
               them
    record     the catalog row; the product's cached pages are invalidated

Nothing is written before every check has passed, so a refused upload leaves no file and no
row. Free of HTTP: the handler maps the `ImageRejected` errors to problems.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from server.adapters.images.intake import IntakeLimits, probe_file
from server.adapters.images.pipeline import EXTENSIONS, SIZES, Encoding, Rendition
from server.adapters.images.spool import SpooledUpload, clear_stale
from server.adapters.images.storage import ImageStorage, content_name, digest, manifest_name
from server.adapters.images.workers import ImageWorkers, Slot
from server.common.logs import get_logger
from server.domain.catalog import CatalogService

__all__ = ["ImageService", "Manifest"]

_log = get_logger("finalmarket.images")
PIPELINE_VERSION = 1  # bump when decode/derive change what a rendition looks like
MANIFEST_CACHE_ENTRIES = 10_000  # manifests never change, so a plain LRU is exact


@dataclass(frozen=True, slots=True)
class Manifest:
    """A rendition of one upload: its variants by size and format (storage names), the
    placeholder and the large variant's dimensions. Stored as JSON beside the variants."""

    key: str
    width: int
    height: int
    placeholder: str
    variants: dict[str, dict[str, str]]

    def to_json(self) -> bytes:
        """The stored form."""
        return json.dumps(
            {
                "key": self.key,
                "width": self.width,
                "height": self.height,
                "placeholder": self.placeholder,
                "variants": self.variants,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Read the stored form."""
        raw = json.loads(data)
        return cls(raw["key"], raw["width"], raw["height"], raw["placeholder"], raw["variants"])


class _Stopwatch:
    """Milliseconds between laps, for the log line of a rendered upload."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self._last) * 1000, 1)
        self._last = now


class ImageService:
    """Product images for one node: intake, rendering, storage, catalog, serving lookups."""

    def __init__(
        self,
        catalog: CatalogService,
        storage: ImageStorage,
        workers: ImageWorkers,
        limits: IntakeLimits,
        *,
        encoding: Encoding | None = None,
        url_prefix: str = "/images",
        spool_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """`spool_dir` holds upload bodies while they stream in (default: the system's
        temporary directory); files a crashed node left there are removed now."""
        self.catalog = catalog
        self.storage = storage
        self.workers = workers
        self.limits = limits
        self.encoding = encoding or Encoding()
        self.url_prefix = url_prefix.rstrip("/")
        self._fingerprint = f"v{PIPELINE_VERSION}|{SIZES}|{self.encoding}".encode()
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self.spool_dir = os.fspath(spool_dir) if spool_dir is not None else tempfile.gettempdir()
        clear_stale(self.spool_dir)

    # --- uploads ----------------------------------------------------------------------------

    def admit(self) -> Slot:
        """A place for one upload (`ImagesBusy` when the node has no room): take it before
        reading the body, release it when the request ends."""
        return self.workers.admit()

    def spool(self) -> SpooledUpload:
        """A new spool file for an upload's body (the caller discards it when done)."""
        return SpooledUpload(self.spool_dir)

    async def check_product(self, product_id: int) -> None:
        """`NotFound` unless the product exists (a cached read: cheap before a big body)."""
        await self.catalog.product_page(product_id)

    async def add_product_image(
        self, product_id: int, upload: SpooledUpload, actor: int | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Turn a spooled upload into a product image; returns the image and whether it is
        new. The spool file is the caller's to discard (it is read, never changed).

        Raises the `ImageRejected` errors (nothing written) or `NotFound`.
        """
        upload.close()
        clock = _Stopwatch()
        header = await asyncio.to_thread(probe_file, upload.path, self.limits)
        content_hash = upload.digest
        existing = await self.catalog.find_image(product_id, content_hash)
        clock.lap("probe_ms")  # with the dedupe query
        if existing is not None:
            return existing, False
        key = digest(content_hash.encode() + b"|" + self._fingerprint)
        manifest = await self.manifest(key)
        if manifest is None:
            rendition = await self.workers.render(upload.path, header, self.encoding)
            clock.lap("render_ms")
            manifest, files = self._manifest_of(key, rendition)
            await self.storage.put_many(files)  # every variant durable before ...
            await self.storage.put_many({manifest_name(key): manifest.to_json()})  # ... this
            clock.lap("store_ms")
            self._remember(manifest)
            rendered = {
                "source": f"{header.type.name} {header.width}x{header.height}",
                "upload_bytes": upload.size,
                "bytes": sum(len(output) for output in files.values()),
            }
        else:
            rendered = None  # the same bytes on another product: its rendition, no work
        image, created = await self.catalog.add_image(
            product_id,
            content_hash=content_hash,
            placeholder=manifest.placeholder,
            variants={
                size: {fmt: self.url_of(name) for fmt, name in formats.items()}
                for size, formats in manifest.variants.items()
            },
            src={size: f"{self.url_prefix}/{key}/{size}" for size in SIZES},
            width=manifest.width,
            height=manifest.height,
            actor=actor,
        )
        clock.lap("record_ms")  # the catalog row and the cache bumps
        if rendered is not None:
            _log.info("image_rendered", key=key, **rendered, **clock.laps)
        return image, created

    @staticmethod
    def _manifest_of(key: str, rendition: Rendition) -> tuple[Manifest, dict[str, bytes]]:
        """The manifest of a rendition and its files by storage name."""
        files: dict[str, bytes] = {}
        variants: dict[str, dict[str, str]] = {size: {} for size in SIZES}
        for size, fmt, output in rendition.variants:
            name = content_name(output, EXTENSIONS[fmt])
            files[name] = output
            variants[size][fmt] = name
        manifest = Manifest(key, rendition.width, rendition.height, rendition.placeholder, variants)
        return manifest, files

    # --- serving ----------------------------------------------------------------------------

    def url_of(self, name: str) -> str:
        """The URL a stored variant is served at."""
        return f"{self.url_prefix}/{name}"

    async def variant(self, name: str) -> bytes | None:
        """The bytes of a stored variant (`3f/3fa9...c1.avif`), or None."""
        return await self.storage.get(name)

    async def manifest(self, key: str) -> Manifest | None:
        """The rendition named `key`, or None (manifests are immutable, so kept in an LRU)."""
        cached = self._manifests.get(key)
        if cached is not None:
            self._manifests.move_to_end(key)
            return cached
        data = await self.storage.get(manifest_name(key))
        if data is None:
            return None
        manifest = Manifest.from_json(data)
        self._remember(manifest)
        return manifest

    def _remember(self, manifest: Manifest) -> None:
        self._manifests[manifest.key] = manifest
        self._manifests.move_to_end(manifest.key)
        while len(self._manifests) > MANIFEST_CACHE_ENTRIES:
            self._manifests.popitem(last=False)

    async def aclose(self) -> None:
        """Stop the worker process and release the storage."""
        await self.workers.aclose()
        await self.storage.aclose()
