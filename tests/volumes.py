"""Builders of tiny test volumes (16^3) written into tmp_path."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def make_blob(shape: tuple[int, int, int] = (16, 16, 16), seed: int = 0) -> np.ndarray:
    """A smooth random 'anatomy' in float32: a few Gaussian blobs plus mild noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    vol = np.zeros(shape, dtype=np.float64)
    for _ in range(4):
        centre = rng.uniform(-0.6, 0.6, size=3)
        width = rng.uniform(0.2, 0.5)
        vol += rng.uniform(50, 200) * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width**2))
    vol += rng.normal(0, 2, size=shape)
    return vol.astype(np.float32)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path
