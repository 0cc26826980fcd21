"""Reading a folder of training volumes onto the preprocessing grid, with a data digest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gate.digest import sha256_file, sha256_json
from gate.errors import UsageError
from gate.preprocess import PreprocessConfig, preprocess_batch
from gate.values import Volume
from gate.volume import ReadOptions, discover, read_volumes


def load_folder(
    folder: Path, options: ReadOptions, config: PreprocessConfig, margin: int = 0
) -> tuple[np.ndarray, list[Volume], str]:
    """Read and preprocess every volume under ``folder`` (sorted by path).

    Args:
        folder: a folder or one file.
        options: reading options (pseudonymisation, size limit).
        config: preprocessing.
        margin: voxels of extra context on every side of the grid (window-shift augmentation).

    Returns:
        (N, 1, X + 2 margin, Y + 2 margin, Z + 2 margin) float32 grids, the raw volumes, and
        the data digest: sha256 of the canonical JSON list of the files' sha256 in path order.

    Raises:
        UsageError: no volumes found.
        InputError: an unreadable file (never skipped).

    """
    files = discover([folder])
    if not files:
        raise UsageError(f"{folder}: expected NIfTI/NumPy/DICOM volumes; found none")
    volumes: list[Volume] = []
    for path in files:
        volumes.extend(read_volumes(path, options))
    digest = sha256_json([sha256_file(p) if p.is_file() else str(p.name) for p in files])
    return preprocess_batch(volumes, config, margin), volumes, digest
