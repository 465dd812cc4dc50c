"""Reading one file out of a `multipart/form-data` body as it streams in.

The parsing is python-multipart's (the streaming parser Starlette uses); this module passes
the bytes of one field to a sink as they arrive (the image handler's is a spool file), bounds
everything else, and turns malformed bodies into problems. Memory stays at one chunk: other
fields are counted, not kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from handlers.base import ApiError

__all__ = ["FileField", "boundary_of"]

MAX_OTHER_FIELD_BYTES = 64 * 1024  # text fields a browser form may add beside the file
MAX_PARTS = 8


def boundary_of(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, or a 415 problem."""
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary", b"")
    if media_type != b"multipart/form-data" or not 1 <= len(boundary) <= 70:
        raise ApiError(
            415,
            "unsupported-media-type",
            "send the image as multipart/form-data with the file in the field `file`",
        )
    return boundary


class FileField:
    """Passes the bytes of the form field `name` (at most `max_bytes`) from body chunks to
    `sink`, piece by piece in order.

    `feed()` each chunk as it arrives, then `finish()`. Both raise `ApiError`: 413 when the
    file passes `max_bytes` (as soon as it does), 400 for a malformed body, 422 when the field
    is missing or given twice. `size` is the file's bytes so far.
    """

    def __init__(
        self, boundary: bytes, name: str, max_bytes: int, sink: Callable[[memoryview], object]
    ) -> None:
        self.name = name.encode()
        self.max_bytes = max_bytes
        self.sink = sink
        self.size = 0
        self.filename: str | None = None
        self._found = 0
        self._parts = 0
        self._other_bytes = 0
        self._in_field = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body."""
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise ApiError(
                400, "malformed-multipart", f"the form body is malformed: {exc}"
            ) from None

    def finish(self) -> None:
        """Check the end of the body, once it has all been fed."""
        try:
            self._parser.finalize()
        except MultipartParseError as exc:
            raise ApiError(
                400, "malformed-multipart", f"the form body is malformed: {exc}"
            ) from None
        if self._found == 0:
            raise ApiError(
                422, "missing-file", f"the form has no field `{self.name.decode()}` with a file"
            )

    # --- parser callbacks -----------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, "malformed-multipart", f"more than {MAX_PARTS} form fields")
        self._in_field = False
        self._disposition = b""

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_field).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._in_field = options.get(b"name") == self.name
        if self._in_field:
            self._found += 1
            if self._found > 1:
                raise ApiError(
                    422, "missing-file", f"send one file in `{self.name.decode()}`, not several"
                )
            filename = options.get(b"filename")
            self.filename = filename.decode("utf-8", "replace") if filename else None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_field:
            if self.size + end - start > self.max_bytes:
                raise ApiError(
                    413,
                    "upload-too-large",
                    f"the file passes {self.max_bytes} bytes, the most accepted",
                    max_bytes=self.max_bytes,
                )
            self.size += end - start
            self.sink(memoryview(data)[start:end])
        else:
            self._other_bytes += end - start
            if self._other_bytes > MAX_OTHER_FIELD_BYTES:
                raise ApiError(
                    413, "upload-too-large", "form fields besides the file are too large"
                )
