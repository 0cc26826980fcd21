"""Builders of tiny test volumes (16^3) written into tmp_path."""

from __future__ import annotations

import gzip
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


# ------------------------------------------------------------- hostile inputs (bounded readers)

YAML_BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)
"""The classic "billion laughs": 9^9 strings from a few hundred bytes."""


def nifti_header_bytes(shape: tuple[int, ...], dtype: type = np.uint8) -> bytes:
    """A valid NIfTI-1 header (+ 4-byte extension flag) declaring ``shape`` voxels of ``dtype``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4


def write_gzip_bomb(path: Path, shape: tuple[int, ...], inflated_bytes: int) -> Path:
    """A .nii.gz whose header declares ``shape`` (uint8) followed by zeros inflating to
    ``inflated_bytes`` in all: many identical gzip members of 64 MiB of zeros each (~64 KiB
    compressed), so a 10 GB bomb is written in well under a second."""
    chunk = 1 << 26
    member = gzip.compress(b"\0" * chunk, compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(nifti_header_bytes(shape)))
        for _ in range(max(1, inflated_bytes // chunk)):
            f.write(member)
    return path


def write_huge_npy(path: Path, shape: tuple[int, ...]) -> Path:
    """An .npy whose header declares ``shape`` float32 but holds no data."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f,
            {
                "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                "fortran_order": False,
                "shape": shape,
            },
        )
    return path
