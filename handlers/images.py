"""Product images over HTTP: the admin upload, and serving the variants.

`POST /api/v1/products/{id}/images` (admins, `multipart/form-data`, the file in `file`)
streams its body: everything that can be refused is refused before the body is read
(Content-Length over the cap, not an admin, no such product, not multipart, no room in the
image queue: 503 with `Retry-After`), the file goes to a spool file as it arrives (the node
never holds it whole; the worker process reads it by its path), and it is cut off with a 413
problem as soon as it passes `FM_IMAGE_MAX_UPLOAD_BYTES`. The spool file is removed when the
request ends. The answer is 201 with the image (200 with the
existing one when the same file was already added to the product):
`{id, placeholder, variants: {size: {jpeg, webp, avif}}, src: {size}, width, height}`.

`GET /images/<2 hex>/<40 hex>.<jpg|webp|avif>` serves one variant by its content address:
immutable, cached for 30 days. `GET /images/<key>/<size>` serves the best format the client
accepts (AVIF, then WebP, then JPEG) with `Vary: Accept`, cached for 30 days too (the choice
can change with the client's `Accept`, the bytes behind each choice never do). Both answer
`ETag` (the variant's digest) and 304 to `If-None-Match`.

Added to the app by `server.wiring.app.make_app` with `routes(gate, images)`.
"""

from __future__ import annotations

from typing import Any

import tornado.web
from typing_extensions import override

from handlers.api import ApiHandler
from handlers.base import ApiError, BaseHandler
from handlers.gate import Gate
from handlers.multipart import FileField, boundary_of
from handlers.openapi import Operation
from handlers.products import product_id_of
from server.adapters.images import (
    MEDIA_TYPES,
    ImageRejected,
    ImagesBusy,
    TooManyPixels,
    UnreadableImage,
    UnsupportedImageType,
    UploadTooLarge,
)
from server.adapters.images.spool import SpooledUpload
from server.adapters.images.workers import Slot
from server.domain.images import ImageService

MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the file
MAX_AGE_S = 30 * 24 * 3600
IMMUTABLE_CACHE_CONTROL = f"public, max-age={MAX_AGE_S}, immutable"
NEGOTIATED_CACHE_CONTROL = f"public, max-age={MAX_AGE_S}"
_EXTENSION_FORMATS = {"jpg": "jpeg", "webp": "webp", "avif": "avif"}
_STATUS_OF: dict[type[ImageRejected], int] = {
    UnsupportedImageType: 415,
    UploadTooLarge: 413,
    TooManyPixels: 422,
    UnreadableImage: 422,
}


def problem_of(error: ImageRejected) -> ApiError:
    """The problem for a refused upload (its kind and fields travel unchanged)."""
    status = next((code for cls, code in _STATUS_OF.items() if isinstance(error, cls)), 422)
    return ApiError(status, error.kind, error.detail, **error.fields)


def busy_problem(busy: ImagesBusy) -> ApiError:
    """503 with `Retry-After`: no room for the upload now."""
    return ApiError(503, busy.kind, busy.detail, headers={"Retry-After": str(busy.retry_after_s)})


def choose_format(accept: str) -> str:
    """`avif` if `accept` lists image/avif, else `webp` if it lists image/webp, else `jpeg`.

    Our preference decides among acceptable types (q-values only rule a type out at q=0).
    Wildcards do not count: a client that says `*/*` may not decode AVIF, and every client
    decodes JPEG.
    """
    listed: set[str] = set()
    for item in accept.split(","):
        media_type, _, parameters = item.partition(";")
        quality = 1.0
        for parameter in parameters.split(";"):
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            listed.add(media_type.strip().lower())
    for fmt in ("avif", "webp"):
        if MEDIA_TYPES[fmt] in listed:
            return fmt
    return "jpeg"


@tornado.web.stream_request_body
class ProductImagesHandler(ApiHandler):
    """`POST /api/v1/products/{id}/images` (admins): add an image, rendered in 12 variants."""

    openapi_path = "/api/v1/products/{id}/images"
    openapi = {
        "POST": Operation(
            "Add an image (admin): multipart `file`; 201 {id, placeholder, variants: "
            "{thumbnail|small|medium|large: {jpeg, webp, avif}}, src, width, height} "
            "(200 with the existing image when this file was added before)",
            ok=201,
            auth="admin",
            upload="file",
            problems={
                400: "malformed multipart body",
                404: "no such product",
                413: "upload over FM_IMAGE_MAX_UPLOAD_BYTES",
                415: "not multipart, or the file is not a JPEG, PNG, WebP, AVIF/HEIF or GIF",
                422: "too many pixels, unreadable (truncated) image, or no `file` field",
                503: "the image queue is full (Retry-After)",
            },
        )
    }

    images: ImageService
    _form: FileField | None = None
    _slot: Slot | None = None
    _upload: SpooledUpload | None = None
    _product_id = 0
    _received = 0

    def initialize(self, gate: Gate, images: ImageService) -> None:  # type: ignore[override]
        super().initialize(gate)
        self.images = images

    @override
    def max_body_bytes(self) -> int:
        return self.images.limits.max_bytes + MULTIPART_OVERHEAD_BYTES

    @override
    async def prepare(self) -> None:
        # Tornado's own body limit answers with a bare 400; ours (below) with problems.
        declared = int(self.request.headers.get("Content-Length") or 0)
        set_max_body_size = getattr(self.request.connection, "set_max_body_size", None)
        if set_max_body_size is not None:  # Tornado's and ours (adapters/http1.py)
            set_max_body_size(max(declared, self.max_body_bytes()))
        await super().prepare()  # 413 by Content-Length, rate limits, authentication, CSRF
        if self.request.method != "POST":
            return
        self.require_admin()
        self._product_id = product_id_of(self.path_args[0])
        await self.images.check_product(self._product_id)
        boundary = boundary_of(self.request.headers.get("Content-Type", ""))
        max_file = self.images.limits.max_bytes
        try:
            self._slot = self.images.admit()
        except ImagesBusy as busy:
            raise busy_problem(busy) from None
        try:
            self._upload = self.images.spool()
        except OSError as exc:
            self._release()
            raise _spool_problem(exc) from None
        self._form = FileField(boundary, "file", max_file, self._upload.write)

    @override
    def data_received(self, chunk: bytes) -> None:
        if self._finished or self._form is None:
            return
        self._received += len(chunk)
        try:
            if self._received > self.max_body_bytes():
                raise ApiError(
                    413,
                    "upload-too-large",
                    f"the body passes {self.max_body_bytes()} bytes, the most accepted",
                )
            try:
                self._form.feed(chunk)
            except OSError as exc:  # the spool's disk is full or failing
                raise _spool_problem(exc) from None
        except ApiError as error:
            # Answer now; Tornado then closes the connection instead of reading the rest.
            self._release()
            self.send_error(error.status_code, exc_info=(ApiError, error, None))

    async def post(self, raw_id: str) -> None:
        session = self.require_admin()
        assert self._form is not None and self._upload is not None  # set by prepare
        try:
            self._form.finish()
            self._form = None
            image, created = await self.images.add_product_image(
                self._product_id, self._upload, actor=session.user_id
            )
        except ImageRejected as rejected:
            raise problem_of(rejected) from None
        except ImagesBusy as busy:
            raise busy_problem(busy) from None
        finally:
            self._release()
        self.write_json(image, status=201 if created else 200)

    def _release(self) -> None:
        """Give the upload's place back and remove its spool file (idempotent)."""
        if self._upload is not None:
            self._upload.discard()
            self._upload = None
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    @override
    def on_finish(self) -> None:
        self._release()
        super().on_finish()

    @override
    def on_connection_close(self) -> None:
        self._release()
        super().on_connection_close()


def _spool_problem(exc: OSError) -> ApiError:
    """503: the upload cannot be written to the spool (disk full or failing); retry later."""
    return ApiError(
        503,
        "images-busy",
        f"the upload cannot be stored now ({exc.strerror or exc}); retry later",
        headers={"Retry-After": "30"},
    )


class _ImageHandler(BaseHandler):
    """Sends stored variants with caching headers; GET and HEAD."""

    images: ImageService

    def initialize(self, gate: Gate, images: ImageService) -> None:  # type: ignore[override]
        super().initialize(gate)
        self.images = images

    async def send_variant(self, name: str, cache_control: str, *, body: bool) -> None:
        """200 with the variant stored under `name` (304 when the client has it, 404 if gone)."""
        digest = name.rsplit("/", 1)[-1].split(".", 1)[0]
        extension = name.rsplit(".", 1)[-1]
        self.set_header("ETag", f'"{digest}"')
        self.set_header("Cache-Control", cache_control)
        if self.check_etag_header():
            self.set_status(304)
            self.finish()
            return
        data = await self.images.variant(name)
        if data is None:
            self.clear_header("ETag")
            self.clear_header("Cache-Control")
            raise ApiError(404, "not-found", f"no image at {self.request.path}")
        self.set_header("Content-Type", MEDIA_TYPES[_EXTENSION_FORMATS[extension]])
        self.set_header("X-Content-Type-Options", "nosniff")
        if body:
            self.finish(data)
        else:
            self.set_header("Content-Length", str(len(data)))
            self.finish()


class ImageFileHandler(_ImageHandler):
    """`GET /images/<2 hex>/<40 hex>.<ext>`: one variant by its content address, immutable."""

    async def get(self, name: str) -> None:
        await self._send(name, body=True)

    async def head(self, name: str) -> None:
        await self._send(name, body=False)

    async def _send(self, name: str, *, body: bool) -> None:
        if name[:2] != name[3:5]:  # the directory is the digest's first two characters
            raise ApiError(404, "not-found", f"no image at {self.request.path}")
        await self.send_variant(name, IMMUTABLE_CACHE_CONTROL, body=body)


class NegotiatedImageHandler(_ImageHandler):
    """`GET /images/<key>/<size>`: the size in the best format the client accepts."""

    async def get(self, key: str, size: str) -> None:
        await self._send(key, size, body=True)

    async def head(self, key: str, size: str) -> None:
        await self._send(key, size, body=False)

    async def _send(self, key: str, size: str, *, body: bool) -> None:
        manifest = await self.images.manifest(key)
        if manifest is None:
            raise ApiError(404, "not-found", f"no image at {self.request.path}")
        self.set_header("Vary", "Accept")
        fmt = choose_format(self.request.headers.get("Accept", ""))
        await self.send_variant(manifest.variants[size][fmt], NEGOTIATED_CACHE_CONTROL, body=body)


def routes(gate: Gate, images: ImageService) -> list[Any]:
    """The image routes, for `server.wiring.app.make_app`."""
    args = {"gate": gate, "images": images}
    return [
        (r"/api/v1/products/([^/]+)/images", ProductImagesHandler, args),
        (r"/images/([0-9a-f]{2}/[0-9a-f]{40}\.(?:jpg|webp|avif))", ImageFileHandler, args),
        (r"/images/([0-9a-f]{40})/(thumbnail|small|medium|large)", NegotiatedImageHandler, args),
    ]
