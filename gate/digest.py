"""Content digests: the provenance currency of gate.

Every artefact (model, index, policy, preprocessing config, bundle file, audit record) is
identified by a sha256 of its bytes, or, for configuration data, of its canonical JSON
(sorted keys, no whitespace), so that equal configs have equal digests on every machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

CHUNK_BYTES = 1 << 20
"""Read files in 1 MiB chunks: large enough to be I/O bound, small enough for any memory."""


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def sha256_source(source: Path) -> str:
    """sha256 of a source: a file's bytes, or the sorted (name, sha256) list of a DICOM folder's files.

    Hidden files (dot-names) in a folder are skipped, as :func:`gate.volume.discover` does.
    """
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
        return sha256_json([[p.name, sha256_file(p)] for p in files])
    return sha256_file(source)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte form that digests are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(obj: Any) -> str:
    """Hex sha256 of :func:`canonical_json` of ``obj``."""
    return sha256_bytes(canonical_json(obj).encode("utf-8"))


def sha256_voxels(data: np.ndarray) -> str:
    """Hex sha256 of a voxel array: its shape, dtype and C-order bytes.

    Used for the exact-duplicate check: two arrays hash equal only if they are bit-identical
    after conversion to float32 C order.
    """
    arr = np.ascontiguousarray(data, dtype=np.float32)
    h = hashlib.sha256()
    h.update(str(arr.shape).encode("ascii"))
    h.update(arr.tobytes())
    return h.hexdigest()
