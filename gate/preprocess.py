"""Pure preprocessing shared by encoder training, index building and checking.

The same :class:`PreprocessConfig` (and so the same digest) travels with every model and index
made from it; a mismatch at load time is an integrity error. Every function takes a
:class:`~gate.values.Volume` and returns a new one; nothing is modified in place.
"""

from __future__ import annotations

from functools import cached_property

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import ndimage

from gate.digest import sha256_json
from gate.values import Volume

DEFAULT_GRID: tuple[int, int, int] = (32, 48, 32)
"""Fixed grid (X, Y, Z) in voxels. The MSD hippocampus crops are 1 mm isotropic with median
shape 35x50x36 (min 31x40x24, max 43x59x47): 32x48x32 keeps the median crop almost whole, is
divisible by 8 (three 2x downsamplings in the encoder and the autoencoder) and costs 1.5x a
32^3 cube."""

DEFAULT_SPACING_MM: tuple[float, float, float] = (1.0, 1.0, 1.0)
"""Target voxel size: the native spacing of the shared hippocampus set, so no resampling blur."""

DEFAULT_CLIP_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Robust intensity window. The hippocampus set mixes uint8 volumes (max 112-255) with float32
volumes reaching ~1.7e6; clipping at the 0.5th/99.5th percentiles of each volume removes the
few extreme voxels that would otherwise squash the rest into a sliver of [0, 1]."""


IDENTITY_ORNT = np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])
"""nibabel orientation transform that keeps every axis and its direction."""


class PreprocessConfig(BaseModel):
    """Preprocessing as data: serialised beside every model and index, identified by digest.

    Attributes:
        grid: output shape (X, Y, Z) in voxels, each >= 8.
        spacing_mm: target voxel size in mm, each > 0.
        clip_percentiles: (low, high) percentiles of each volume's intensities to clip at,
            0 <= low < high <= 100; the clipped range is then scaled to [0, 1].
        canonical_orientation: reorient to RAS+ before resampling.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: tuple[int, int, int] = DEFAULT_GRID
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM
    clip_percentiles: tuple[float, float] = DEFAULT_CLIP_PERCENTILES
    canonical_orientation: bool = Field(default=True)

    @field_validator("grid")
    @classmethod
    def _grid_positive(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(g < 8 for g in v):
            raise ValueError(f"every grid size must be >= 8 voxels; got {v}")
        return v

    @field_validator("spacing_mm")
    @classmethod
    def _spacing_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not (s > 0) for s in v):
            raise ValueError(f"every spacing must be > 0 mm; got {v}")
        return v

    @model_validator(mode="after")
    def _percentiles_ordered(self) -> PreprocessConfig:
        lo, hi = self.clip_percentiles
        if not (0.0 <= lo < hi <= 100.0):
            raise ValueError(
                f"clip_percentiles must satisfy 0 <= low < high <= 100; got {self.clip_percentiles}"
            )
        return self

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON of this config."""
        return sha256_json(self.model_dump(mode="json"))


def to_canonical(volume: Volume) -> Volume:
    """Reorient voxels so array axes run along R, A, S (nibabel's closest canonical).

    Args:
        volume: any orientation.

    Returns:
        A volume whose affine has a positive diagonal-dominant direction matrix (RAS+).

    """
    ornt = nib.orientations.io_orientation(volume.affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    if np.array_equal(transform, IDENTITY_ORNT):
        return volume
    data = nib.orientations.apply_orientation(volume.data, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.data.shape)
    spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(
        data=np.ascontiguousarray(data, dtype=np.float32),
        affine=affine,
        spacing=spacing,  # type: ignore[arg-type]
        source=volume.source,
        patient_id=volume.patient_id,
    )


def resample(volume: Volume, spacing_mm: tuple[float, float, float]) -> Volume:
    """Trilinear resampling to a target voxel size; a no-op when spacing already matches.

    Args:
        volume: input with ``volume.spacing`` in mm.
        spacing_mm: target voxel size in mm.

    Returns:
        Volume with shape ~ round(shape * spacing / spacing_mm) and the target spacing.

    """
    factors = np.asarray(volume.spacing, dtype=np.float64) / np.asarray(spacing_mm, dtype=np.float64)
    if np.allclose(factors, 1.0, atol=1e-3):
        return volume
    data = ndimage.zoom(volume.data, factors, order=1, mode="nearest", grid_mode=True)
    scale = np.diag([1.0 / f for f in factors] + [1.0])
    return Volume(
        data=np.ascontiguousarray(data, dtype=np.float32),
        affine=volume.affine @ scale,
        spacing=tuple(float(s) for s in spacing_mm),  # type: ignore[arg-type]
        source=volume.source,
        patient_id=volume.patient_id,
    )


def crop_or_pad(volume: Volume, grid: tuple[int, int, int]) -> Volume:
    """Centre-crop or zero-pad (after normalisation, 0 is the background) to ``grid``.

    Args:
        volume: input, shape (X, Y, Z).
        grid: output shape (X', Y', Z').

    Returns:
        Volume of shape ``grid``; the affine is shifted so world coordinates are preserved.

    """
    out = np.zeros(grid, dtype=np.float32)
    src_sl, dst_sl, shift = [], [], []
    for n, g in zip(volume.data.shape, grid, strict=True):
        if n >= g:
            start = (n - g) // 2
            src_sl.append(slice(start, start + g))
            dst_sl.append(slice(0, g))
            shift.append(start)
        else:
            start = (g - n) // 2
            src_sl.append(slice(0, n))
            dst_sl.append(slice(start, start + n))
            shift.append(-start)
    out[tuple(dst_sl)] = volume.data[tuple(src_sl)]
    translate = np.eye(4)
    translate[:3, 3] = shift
    return Volume(
        data=out,
        affine=volume.affine @ translate,
        spacing=volume.spacing,
        source=volume.source,
        patient_id=volume.patient_id,
    )


def normalize_intensity(volume: Volume, clip_percentiles: tuple[float, float]) -> Volume:
    """Clip at the volume's own percentiles, then scale linearly to [0, 1].

    Args:
        volume: any intensity range (uint8-derived or float up to ~1e6).
        clip_percentiles: (low, high) percentiles in [0, 100].

    Returns:
        Volume with intensities in [0, 1]; a constant volume maps to all zeros.

    """
    lo, hi = np.percentile(volume.data, clip_percentiles)
    span = float(hi - lo)
    if span <= 0.0:
        data = np.zeros_like(volume.data)
    else:
        data = ((np.clip(volume.data, lo, hi) - lo) / span).astype(np.float32)
    return Volume(
        data=data,
        affine=volume.affine,
        spacing=volume.spacing,
        source=volume.source,
        patient_id=volume.patient_id,
    )


def preprocess_uncropped(volume: Volume, config: PreprocessConfig) -> Volume:
    """Everything but the fixed grid: canonical orientation, resampling, intensity normalisation.

    Args:
        volume: as read from disk.
        config: the preprocessing that the model / index was made with.

    Returns:
        Volume of the resampled shape, spacing ``config.spacing_mm``, intensities in [0, 1].

    """
    if config.canonical_orientation:
        volume = to_canonical(volume)
    volume = resample(volume, config.spacing_mm)
    return normalize_intensity(volume, config.clip_percentiles)


def preprocess(volume: Volume, config: PreprocessConfig) -> Volume:
    """Full pipeline: canonical orientation, resampling, intensity normalisation, fixed grid.

    Args:
        volume: as read from disk.
        config: the preprocessing that the model / index was made with.

    Returns:
        Volume of shape ``config.grid``, spacing ``config.spacing_mm``, intensities in [0, 1].

    """
    return crop_or_pad(preprocess_uncropped(volume, config), config.grid)


def preprocess_with_margin(volume: Volume, config: PreprocessConfig, margin: int) -> np.ndarray:
    """The preprocessed grid with ``margin`` more voxels of the scan (or zeros) on every side.

    The volume is zero-padded by ``margin`` before the centred crop/pad to the enlarged grid,
    so the centre window ``[m:-m, m:-m, m:-m]`` equals :func:`preprocess` exactly, whatever
    the parity of the scan and grid sizes.

    Args:
        volume: as read from disk.
        config: preprocessing.
        margin: voxels added on each side, >= 0.

    Returns:
        float32 (X + 2 margin, Y + 2 margin, Z + 2 margin).

    """
    if margin == 0:
        return preprocess(volume, config).data
    v = preprocess_uncropped(volume, config)
    padded = np.pad(v.data, margin, mode="constant", constant_values=0.0)
    shift = np.eye(4)
    shift[:3, 3] = -margin
    wide = tuple(g + 2 * margin for g in config.grid)
    out = crop_or_pad(Volume(padded, v.affine @ shift, v.spacing, v.source, v.patient_id), wide)  # type: ignore[arg-type]
    return out.data


def preprocess_batch(volumes: list[Volume], config: PreprocessConfig, margin: int = 0) -> np.ndarray:
    """Preprocess several volumes into one network input.

    Args:
        volumes: N volumes of any shape.
        config: preprocessing config.
        margin: extra voxels of context on every side (:func:`preprocess_with_margin`).

    Returns:
        float32 array (N, 1, X + 2 margin, Y + 2 margin, Z + 2 margin); ``config.grid`` for margin 0.

    """
    grid = tuple(g + 2 * margin for g in config.grid)
    out = np.empty((len(volumes), 1, *grid), dtype=np.float32)
    for i, vol in enumerate(volumes):
        out[i, 0] = preprocess_with_margin(vol, config, margin)
    return out
