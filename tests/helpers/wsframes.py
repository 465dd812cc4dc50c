"""Client-to-server WebSocket frames built independently of `realtime.wsframe`, for tests
(including deliberately broken ones)."""

from __future__ import annotations

import struct

MASK = b"\x37\xfa\x21\x3d"
ASCII = bytes(i & 0x7F for i in range(256))  # bytes.translate table folding onto ASCII


def xor_mask(mask: bytes, payload: bytes) -> bytes:
    """RFC 6455 section 5.3 masking, written independently of the code under test."""
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def client_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    mask: bytes | None = MASK,
    rsv: int = 0,
    length: int | None = None,
) -> bytes:
    """A client-to-server frame; ``mask=None`` leaves it unmasked, ``length`` overrides the
    declared payload length (which then no longer matches the payload)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes((b0, mask_bit | n))
    elif n < 0x10000:
        header = struct.pack("!BBH", b0, mask_bit | 126, n)
    else:
        header = struct.pack("!BBQ", b0, mask_bit | 127, n)
    if mask is None:
        return header + payload
    return header + mask + xor_mask(mask, payload)
