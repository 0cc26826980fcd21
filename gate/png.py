"""A minimal PNG writer (8-bit greyscale) on zlib + struct: montages without an imaging library."""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

COMPRESSION_LEVEL = 6
"""zlib's default: montages are a few hundred KiB at most; higher levels save little."""


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_gray(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W) image as a greyscale PNG.

    Args:
        image: uint8, shape (H, W), H and W >= 1; row 0 is the top of the picture.

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: not a non-empty 2D uint8 array.

    """
    if image.ndim != 2 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"expected a non-empty uint8 (H, W) image; got {image.dtype} {image.shape}")
    height, width = image.shape
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, greyscale, no interlace
    rows = np.concatenate([np.zeros((height, 1), np.uint8), np.ascontiguousarray(image)], axis=1)
    body = zlib.compress(rows.tobytes(), COMPRESSION_LEVEL)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def decode_gray(data: bytes) -> np.ndarray:
    """Decode a PNG written by :func:`encode_gray` (filter type 0 only); used by tests.

    Raises:
        ValueError: not such a PNG.

    """
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG file")
    pos, idat, width, height = len(PNG_SIGNATURE), b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + payload) & 0xFFFFFFFF != crc:
            raise ValueError(f"PNG chunk {kind!r} has a bad CRC")
        if kind == b"IHDR":
            width, height = struct.unpack(">II", payload[:8])
        elif kind == b"IDAT":
            idat += payload
        pos += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, width + 1)
    if np.any(rows[:, 0] != 0):
        raise ValueError("only PNG filter type 0 is supported")
    return rows[:, 1:].copy()
