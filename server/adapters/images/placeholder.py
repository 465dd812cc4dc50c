"""The blur placeholder: a tiny WebP as a `data:` URL, at most `MAX_PLACEHOLDER_CHARS` long.

Why a WebP data URL rather than ThumbHash or BlurHash: it is an image every browser we serve
WebP to already decodes, so the storefront, the service worker, server-rendered HTML and
e-mail use it as `src` or `background-image` with no decoder in JavaScript (ThumbHash and
BlurHash each need one, and a canvas, before anything shows). At 24 px on the long edge it
keeps the aspect ratio and the main shapes; the browser's upscaling plus a CSS blur makes the
blur. The price is size: ~150-250 characters against ~35 for a ThumbHash, well inside the
400-character budget for JSON and HTML.
"""

from __future__ import annotations

import base64

import pyvips

__all__ = ["MAX_PLACEHOLDER_CHARS", "placeholder_data_url"]

MAX_PLACEHOLDER_CHARS = 400
PREFIX = "data:image/webp;base64,"
# Tried in order until one fits the budget: (long edge px, WebP quality). The first fits all
# photographs we measured; the later ones bound pathological inputs (noise, confetti).
_ATTEMPTS = ((24, 50), (20, 35), (16, 25), (12, 15), (8, 10))


def placeholder_data_url(image: pyvips.Image) -> str:
    """A `data:image/webp;base64,...` URL of `image`, at most `MAX_PLACEHOLDER_CHARS` long.

    `image` is any decoded variant (the thumbnail is cheapest); alpha is kept.
    """
    url = ""
    for long_edge, quality in _ATTEMPTS:
        tiny = image.thumbnail_image(long_edge, height=long_edge, size="down").copy_memory()
        data: bytes = tiny.webpsave_buffer(Q=quality, effort=6, keep="none")
        url = PREFIX + base64.b64encode(data).decode("ascii")
        if len(url) <= MAX_PLACEHOLDER_CHARS:
            return url
    raise AssertionError(f"an 8 px WebP took {len(url)} characters")  # cannot happen
