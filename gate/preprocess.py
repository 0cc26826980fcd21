"""Pure preprocessing shared by encoder training, index building and checking.

The same :class:`PreprocessConfig` (and so the same digest) travels with every model and index
made from it; a mismatch at load time is an integrity error. Every function takes a
:class:`~gate.values.Volume` and returns a new one; nothing is modified in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

import nibabel as nib
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)
from scipy import ndimage

from gate.digest import sha256_json
from gate.values import Volume

DEFAULT_GRID: tuple[int, int, int] = (32, 48, 32)
"""Fixed grid (X, Y, Z) in voxels. The MSD hippocampus crops are 1 mm isotropic with median
shape 35x50x36 (min 31x40x24, max 43x59x47): 32x48x32 keeps the median crop almost whole, is
divisible by 8 (three 2x downsamplings in the encoder and the autoencoder) and costs 1.5x a
32^3 cube."""


def grid_voxels(grid: Sequence[int]) -> int:
    """Voxels of one grid of shape ``grid`` (at least 1): what batch sizes are budgeted in."""
    return max(1, int(np.prod([int(g) for g in grid])))


DEFAULT_GRID_VOXELS = grid_voxels(DEFAULT_GRID)
"""Voxels of the default grid (49,152): the unit the batch budgets of embedding and search use."""

DEFAULT_SPACING_MM: tuple[float, float, float] = (1.0, 1.0, 1.0)
"""Target voxel size: the native spacing of the shared hippocampus set, so no resampling blur."""

DEFAULT_CLIP_PERCENTILES: tuple[float, float] = (0.5, 99.5)
"""Robust intensity window. The hippocampus set mixes uint8 volumes (max 112-255) with float32
volumes reaching ~1.7e6; clipping at the 0.5th/99.5th percentiles of each volume removes the
few extreme voxels that would otherwise squash the rest into a sliver of [0, 1]."""


FOREGROUND_MIN_FRACTION = 0.01
"""Foreground percentiles fall back to all voxels when fewer than 1% of the volume lies above its
minimum (a nearly empty volume has no foreground to measure)."""

ADDED_FIELDS: tuple[str, ...] = ("intensity", "hu_window", "percentile_region", "fov")
"""Fields added after the shipped encoder was exported: they enter the digest only when set to a
non-default value, so every config made before them keeps its digest (and the shipped encoder
and index stay bound) while any new choice changes it."""


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
        intensity: "percentile" (MR: clip at the volume's own percentiles) or "hu_window"
            (CT: clip at the fixed ``hu_window`` in Hounsfield units), then scale to [0, 1].
        hu_window: (low, high) HU, low < high; required by, and only allowed with, "hu_window".
        percentile_region: "all" voxels, or "foreground" (voxels above the volume's minimum),
            so a large zero background does not pull the percentiles down.
        fov: "crop" (centre-crop or zero-pad the resampled volume to ``grid``) or "fit"
            (resample the whole field of view onto ``grid``: nothing is cut, spacing varies).

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: tuple[int, int, int] = DEFAULT_GRID
    spacing_mm: tuple[float, float, float] = DEFAULT_SPACING_MM
    clip_percentiles: tuple[float, float] = DEFAULT_CLIP_PERCENTILES
    canonical_orientation: bool = Field(default=True)
    intensity: Literal["percentile", "hu_window"] = "percentile"
    hu_window: tuple[float, float] | None = None
    percentile_region: Literal["all", "foreground"] = "all"
    fov: Literal["crop", "fit"] = "crop"

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

    @model_validator(mode="after")
    def _hu_window_with_intensity(self) -> PreprocessConfig:
        if self.intensity == "hu_window":
            if self.hu_window is None or not self.hu_window[0] < self.hu_window[1]:
                raise ValueError(
                    f"intensity hu_window needs hu_window (low, high) with low < high; got {self.hu_window}"
                )
        elif self.hu_window is not None:
            raise ValueError("hu_window is set but intensity is 'percentile'; set intensity: hu_window")
        return self

    @model_serializer(mode="wrap")
    def _omit_default_added_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Every dump (digests, manifests, nested configs) leaves out added fields at their default."""
        data = handler(self)
        for name in ADDED_FIELDS:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON of this config (added fields only when not default)."""
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
    return shifted(volume, out, shift)


def shifted(volume: Volume, data: np.ndarray, shift: Sequence[int]) -> Volume:
    """``data`` as a Volume whose voxel (0, 0, 0) is ``volume``'s voxel ``shift`` (world coords kept).

    Args:
        volume: the volume ``data`` was cut from or padded out of.
        data: the new voxels.
        shift: (X, Y, Z) voxel offset of ``data``'s origin in ``volume`` (negative: padding).

    """
    translate = np.eye(4)
    translate[:3, 3] = shift
    return Volume(
        data=data,
        affine=volume.affine @ translate,
        spacing=volume.spacing,
        source=volume.source,
        patient_id=volume.patient_id,
    )


def normalize_intensity(
    volume: Volume,
    clip_percentiles: tuple[float, float],
    region: str = "all",
    hu_window: tuple[float, float] | None = None,
) -> Volume:
    """Clip at the volume's own percentiles (or a fixed HU window), then scale linearly to [0, 1].

    Args:
        volume: any intensity range (uint8-derived or float up to ~1e6; CT in HU).
        clip_percentiles: (low, high) percentiles in [0, 100].
        region: "all" voxels or "foreground" (above the minimum) for the percentiles.
        hu_window: (low, high) fixed window; when given, percentiles are not used.

    Returns:
        Volume with intensities in [0, 1]; a constant volume maps to all zeros.

    """
    if hu_window is not None:
        lo, hi = hu_window
    else:
        values = volume.data
        if region == "foreground":
            fg = values[values > values.min()]
            if fg.size >= FOREGROUND_MIN_FRACTION * values.size:
                values = fg
        lo, hi = np.percentile(values, clip_percentiles)
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
    if config.fov == "fit":
        volume = fit_to_grid(volume, config.grid)
    return normalize_for(volume, config)


def normalize_for(volume: Volume, config: PreprocessConfig) -> Volume:
    """:func:`normalize_intensity` as ``config`` asks (percentiles, their region, or an HU window)."""
    return normalize_intensity(
        volume,
        config.clip_percentiles,
        config.percentile_region,
        config.hu_window if config.intensity == "hu_window" else None,
    )


def fit_to_grid(volume: Volume, grid: tuple[int, int, int]) -> Volume:
    """Resample the whole field of view onto ``grid`` (trilinear; anisotropic when the shapes differ).

    Args:
        volume: any shape (X, Y, Z).
        grid: output shape.

    Returns:
        Volume of shape ``grid`` covering the same field of view (spacing scaled per axis).

    """
    factors = np.asarray(grid, dtype=np.float64) / np.asarray(volume.data.shape[:3], dtype=np.float64)
    if np.allclose(factors, 1.0):
        return volume
    data = ndimage.zoom(volume.data, factors, order=1, mode="nearest", grid_mode=True)
    data = crop_or_pad(
        Volume(data, volume.affine, volume.spacing, volume.source, volume.patient_id), grid
    ).data
    return Volume(
        data=np.ascontiguousarray(data, dtype=np.float32),
        affine=volume.affine @ np.diag([1.0 / f for f in factors] + [1.0]),
        spacing=tuple(float(s / f) for s, f in zip(volume.spacing, factors, strict=True)),  # type: ignore[arg-type]
        source=volume.source,
        patient_id=volume.patient_id,
    )


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
    return with_margin(preprocess_uncropped(volume, config), config.grid, margin).data


def with_margin(volume: Volume, grid: tuple[int, int, int], margin: int) -> Volume:
    """An uncropped volume zero-padded by ``margin`` and centre-cropped/padded to ``grid + 2 margin``.

    The one definition of a grid with context, for :func:`preprocess_with_margin` and
    :func:`gate.verify.grid_with_mask` (which applies it to a volume of ones for the mask).

    Args:
        volume: preprocessed but not yet cropped (:func:`preprocess_uncropped`).
        grid: the preprocessing grid.
        margin: voxels added on each side, >= 0.

    Returns:
        Volume of shape ``grid + 2 margin`` (affine moved by the padding).

    """
    padded = np.pad(volume.data, margin, mode="constant", constant_values=0.0)
    shift = np.eye(4)
    shift[:3, 3] = -margin
    wide = tuple(g + 2 * margin for g in grid)
    moved = Volume(padded, volume.affine @ shift, volume.spacing, volume.source, volume.patient_id)
    return crop_or_pad(moved, wide)  # type: ignore[arg-type]


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


CT_MIN_INTENSITY = -500.0
"""A volume whose minimum is below -500 is taken for CT in HU (air is -1000 HU; MR magnitudes
are >= 0): :func:`suggest_config` then proposes a fixed HU window instead of percentiles."""

DEFAULT_HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
"""Suggested CT window: air to dense bone, the range MAISI-style CT generators normalise to."""

GRID_MULTIPLE = 16
"""Grid sizes are suggested as multiples of 16: the encoder (gate.encoder.model.EncoderSpec)
downsamples 2x four times."""


BACKGROUND_FOREGROUND_SWITCH = 0.2
"""Suggest foreground percentiles when the median volume has more than 20% of its voxels at its
minimum (a zero background around the anatomy): whole-volume percentiles would then be pulled
towards the background and saturate the tissue (issue 11: 86% of a pasted crop saturated)."""


def suggest_config(
    shapes: np.ndarray, spacings: np.ndarray, min_intensity: float, background_fraction: float = 0.0
) -> PreprocessConfig:
    """A starting PreprocessConfig for a data set (what ``gate inspect`` prints).

    Args:
        shapes: (N, 3) voxels per volume.
        spacings: (N, 3) mm per voxel.
        min_intensity: the lowest voxel value over the data set.
        background_fraction: median over volumes of the fraction of voxels at the volume's minimum.

    Returns:
        Spacing: the median voxel size (0.1 mm steps); grid: the median field of view at that
        spacing, rounded down to a multiple of 16 (>= 16), so the median volume is cropped
        least; a fixed HU window for CT-like data (minimum < -500), else percentiles, over the
        foreground when the background fraction exceeds 0.2.

    """
    spacing = np.maximum(np.round(np.median(np.asarray(spacings, dtype=np.float64), axis=0), 1), 0.1)
    fov = np.median(np.asarray(shapes, dtype=np.float64) * np.asarray(spacings, dtype=np.float64), axis=0)
    grid = np.maximum(GRID_MULTIPLE, (fov / spacing // GRID_MULTIPLE) * GRID_MULTIPLE).astype(int)
    common: dict[str, Any] = {
        "grid": tuple(int(g) for g in grid),
        "spacing_mm": tuple(float(s) for s in spacing),
    }
    if min_intensity < CT_MIN_INTENSITY:
        return PreprocessConfig(**common, intensity="hu_window", hu_window=DEFAULT_HU_WINDOW)
    region = "foreground" if background_fraction > BACKGROUND_FOREGROUND_SWITCH else "all"
    return PreprocessConfig(**common, percentile_region=region)


def config_flags(config: PreprocessConfig) -> str:
    """The ``gate encoder train`` flags that set ``config``."""
    flags = [
        "--grid " + " ".join(str(g) for g in config.grid),
        "--spacing " + " ".join(f"{s:g}" for s in config.spacing_mm),
        f"--fov {config.fov}",
        f"--intensity {config.intensity}",
    ]
    if config.hu_window is not None:
        flags.append(f"--hu-window {config.hu_window[0]:g} {config.hu_window[1]:g}")
    else:
        flags.append(f"--percentile-region {config.percentile_region}")
    return " ".join(flags)
