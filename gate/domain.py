"""The domain an index can judge, recorded at build time and enforced before judging.

An encoder and its index were made from training volumes of some physical field of view, grid
and voxel size. A candidate far outside that (a 256x256x160 head MR against an index of
hippocampus crops) would be cut to a central crop and judged on a fraction of its voxels: the
gate would pass what it never looked at. :func:`measure_domain` records the training
volumes' ranges in the index manifest (:class:`Domain`); :func:`check_in_domain` refuses, with
one line, any candidate outside them (fail closed: a :class:`~gate.errors.DomainError`, exit 3),
before it is preprocessed.

All per-axis quantities are in canonical (RAS+) axis order when the preprocessing reorients
(as the default does), so a candidate stored LPS or with permuted axes is measured the way it
will be preprocessed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gate.errors import DomainError
from gate.preprocess import PreprocessConfig
from gate.values import Volume

FOV_TOLERANCE = 0.10
"""Relative margin on the physical field of view (mm per axis) beyond the training min/max.
Measured leave-one-out on the 261 MSD hippocampus volumes (training FOV 31-43 x 40-59 x 24-47
mm): the widest margin any held-out volume needs to fall inside the other 260's range is 0.083
(bench/domain_tolerance.py); 0.10 admits every held-out real volume and still refuses a
candidate 2x larger on any axis (a 256x256x160 head MR is 4-8x)."""

SHAPE_TOLERANCE = FOV_TOLERANCE
"""Relative margin on the grid shape (voxels per axis). The training set is 1 mm isotropic, so
shape and field of view are the same numbers and the same leave-one-out measurement (0.083)
applies."""

SPACING_TOLERANCE = 0.10
"""Relative margin on the voxel size (mm per axis). All 261 training volumes are exactly 1 mm
(leave-one-out needs 0); no measurement can set a margin from identical values, so the field
of view's 10% is used: it admits scanner round-off and mild resampling, and refuses a 0.43 mm
in-plane or a 6.5 mm slice-step series against a 1 mm index."""


class IntensityStats(BaseModel):
    """Raw intensity statistics of the training volumes (recorded, not enforced).

    The hippocampus set mixes uint8 volumes (max 112-255) with float volumes reaching ~1.7e6,
    so a range check on raw intensities would admit anything; the statistics are recorded for
    the reviewer and for indexes of calibrated modalities (CT in HU).

    Attributes:
        p_low_min / p_low_max: range over volumes of each volume's 0.5th percentile.
        p_high_min / p_high_max: range over volumes of each volume's 99.5th percentile.
        foreground_fraction_min / _max: range of the fraction of voxels above each volume's
            10th percentile + 5% of its 0.5-99.5 span (a crude foreground).

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    p_low_min: float
    p_low_max: float
    p_high_min: float
    p_high_max: float
    foreground_fraction_min: float = Field(ge=0.0, le=1.0)
    foreground_fraction_max: float = Field(ge=0.0, le=1.0)


class Domain(BaseModel):
    """What an index can judge: per-axis ranges over its training volumes, canonical axes.

    Attributes:
        n_volumes: training volumes measured.
        canonical: axes are in RAS+ order (the preprocessing reorients).
        fov_mm_min / fov_mm_max: physical field of view (shape x spacing) per axis, mm.
        shape_min / shape_max: grid shape per axis, voxels.
        spacing_mm_min / spacing_mm_max: voxel size per axis, mm.
        intensity: raw intensity statistics (recorded only).
        modality: "MR", "CT", ... where known, else None.
        grid / grid_spacing_mm: the preprocessing grid (voxels) and voxel size (mm): a volume
            of exactly this shape and spacing (a generator's output) is judged whole, so it is
            in the domain whatever the training volumes' ranges.
        fov_tolerance / shape_tolerance / spacing_tolerance: the relative margins in force.
        window_fov_mm: the largest candidate field of view (mm per axis) the index judges by
            windows (:mod:`gate.windows`), set by ``gate index build --window-fov``; None: no
            windows, a candidate beyond the training ranges is refused.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_volumes: int = Field(ge=1)
    canonical: bool
    fov_mm_min: tuple[float, float, float]
    fov_mm_max: tuple[float, float, float]
    shape_min: tuple[int, int, int]
    shape_max: tuple[int, int, int]
    spacing_mm_min: tuple[float, float, float]
    spacing_mm_max: tuple[float, float, float]
    intensity: IntensityStats
    modality: str | None = None
    grid: tuple[int, int, int] | None = None
    grid_spacing_mm: tuple[float, float, float] | None = None
    fov_tolerance: float = Field(default=FOV_TOLERANCE, ge=0.0)
    shape_tolerance: float = Field(default=SHAPE_TOLERANCE, ge=0.0)
    spacing_tolerance: float = Field(default=SPACING_TOLERANCE, ge=0.0)
    window_fov_mm: tuple[float, float, float] | None = None

    def describe(self) -> str:
        """One phrase: what this domain covers (field of view and spacing, mm)."""
        fov = " x ".join(f"{lo:g}-{hi:g}" for lo, hi in zip(self.fov_mm_min, self.fov_mm_max, strict=True))
        sp = " x ".join(
            f"{lo:g}-{hi:g}" for lo, hi in zip(self.spacing_mm_min, self.spacing_mm_max, strict=True)
        )
        windows = (
            ""
            if self.window_fov_mm is None
            else f", by windows up to {'x'.join(f'{x:g}' for x in self.window_fov_mm)} mm"
        )
        return f"field of view {fov} mm, spacing {sp} mm (+-{self.fov_tolerance:.0%}){windows}"


def geometry(volume: Volume, canonical: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shape (voxels), spacing (mm) and field of view (mm) per axis, in canonical order if asked.

    Args:
        volume: any orientation; ``volume.spacing`` in mm.
        canonical: permute to RAS+ axis order as :func:`gate.preprocess.to_canonical` would.

    Returns:
        (shape, spacing, fov): three float64 arrays of length 3.

    """
    shape = np.asarray(volume.data.shape[:3], dtype=np.float64)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    if canonical:
        order = nib.orientations.io_orientation(volume.affine)[:, 0]
        if np.all(np.isfinite(order)):
            dst = order.astype(int)
            shape_c, spacing_c = np.empty(3), np.empty(3)
            shape_c[dst], spacing_c[dst] = shape, spacing
            shape, spacing = shape_c, spacing_c
    return shape, spacing, shape * spacing


def _intensity(volumes: Sequence[Volume]) -> IntensityStats:
    lows, highs, fg = [], [], []
    for vol in volumes:
        lo, p10, hi = (float(x) for x in np.percentile(vol.data, (0.5, 10.0, 99.5)))
        lows.append(lo)
        highs.append(hi)
        fg.append(float(np.mean(vol.data > p10 + 0.05 * (hi - lo))))
    return IntensityStats(
        p_low_min=min(lows),
        p_low_max=max(lows),
        p_high_min=min(highs),
        p_high_max=max(highs),
        foreground_fraction_min=min(fg),
        foreground_fraction_max=max(fg),
    )


def measure_domain(
    volumes: Sequence[Volume],
    config: PreprocessConfig | None = None,
    modality: str | None = None,
    window_fov_mm: tuple[float, float, float] | None = None,
) -> Domain:
    """The domain of a set of training volumes (as read, before preprocessing).

    Args:
        volumes: the index's training volumes, at least one.
        config: the encoder's preprocessing (its orientation handling, grid and spacing);
            None: canonical axes, no grid recorded.
        modality: "MR", "CT", ... when known.
        window_fov_mm: judge candidates up to this field of view (mm per axis) by windows;
            needs ``config`` with ``fov: crop``.

    Returns:
        Per-axis min/max of shape, spacing and field of view, and intensity statistics.

    Raises:
        ValueError: no volumes, or windows asked of a ``fov: fit`` preprocessing or smaller
            than the training volumes.

    """
    if not volumes:
        raise ValueError("measure_domain needs at least one volume")
    if window_fov_mm is not None and (config is None or config.fov != "crop"):
        raise ValueError("window judging needs the encoder's fov: crop (fov: fit sees the whole view)")
    canonical = True if config is None else config.canonical_orientation
    geo = [geometry(v, canonical) for v in volumes]
    shapes = np.stack([g[0] for g in geo])
    spacings = np.stack([g[1] for g in geo])
    fovs = np.stack([g[2] for g in geo])

    def t(a: np.ndarray) -> tuple[float, float, float]:
        return (float(a[0]), float(a[1]), float(a[2]))

    return Domain(
        n_volumes=len(volumes),
        canonical=canonical,
        fov_mm_min=t(fovs.min(axis=0)),
        fov_mm_max=t(fovs.max(axis=0)),
        shape_min=tuple(int(x) for x in shapes.min(axis=0)),  # type: ignore[arg-type]
        shape_max=tuple(int(x) for x in shapes.max(axis=0)),  # type: ignore[arg-type]
        spacing_mm_min=t(spacings.min(axis=0)),
        spacing_mm_max=t(spacings.max(axis=0)),
        intensity=_intensity(volumes),
        modality=modality,
        grid=None if config is None else config.grid,
        grid_spacing_mm=None if config is None else config.spacing_mm,
        window_fov_mm=_window_fov(window_fov_mm, fovs.max(axis=0)),
    )


def _window_fov(
    window_fov_mm: tuple[float, float, float] | None, training_max: np.ndarray
) -> tuple[float, float, float] | None:
    if window_fov_mm is None:
        return None
    if any(not (w > 0) for w in window_fov_mm):
        raise ValueError(f"window field of view must be > 0 mm per axis; got {window_fov_mm}")
    if np.any(np.asarray(window_fov_mm) < training_max):
        raise ValueError(
            f"window field of view {window_fov_mm} mm is smaller than the training volumes' "
            f"{tuple(float(x) for x in training_max)} mm on some axis"
        )
    return (float(window_fov_mm[0]), float(window_fov_mm[1]), float(window_fov_mm[2]))


def _outside(found: np.ndarray, lo: Sequence[float], hi: Sequence[float], tol: float) -> bool:
    low = np.asarray(lo, dtype=np.float64) / (1.0 + tol)
    high = np.asarray(hi, dtype=np.float64) * (1.0 + tol)
    return bool(np.any(found < low - 1e-9) or np.any(found > high + 1e-9))


def _fmt(a: np.ndarray) -> str:
    return "x".join(f"{x:g}" for x in np.round(a, 3))


JudgeMode = Literal["whole", "windows"]
"""How a candidate in the domain is judged: ``whole`` (preprocessed to the grid, as training
volumes are) or ``windows`` (:func:`gate.windows.judge_windows`, every part of it)."""


def check_in_domain(
    volume: Volume, domain: Domain | None, modality: str | None = None, windows: bool = False
) -> JudgeMode:
    """Refuse a candidate the index cannot judge (before it is preprocessed); say how to judge it.

    Args:
        volume: the candidate as read.
        domain: the index's recorded domain; None (an index that records none) is refused.
        modality: the candidate's modality when known; refused when it differs from a known
            index modality.
        windows: the caller can judge by windows (:mod:`gate.windows`); when it cannot, a
            candidate that needs them is refused rather than judged on a crop.

    Returns:
        ``whole`` or, for an index built with ``--window-fov`` and a candidate larger than the
        preprocessing grid, ``windows``.

    Raises:
        DomainError: one line: the file, what the index covers, what was found.

    """
    if domain is None:
        raise DomainError(
            volume.source,
            "the index records no domain (field of view, spacing) it can judge; rebuild it with "
            "`gate index build`",
        )
    shape, spacing, fov = geometry(volume, domain.canonical)
    if (
        domain.grid is not None
        and domain.grid_spacing_mm is not None
        and tuple(int(x) for x in volume.data.shape[:3]) == domain.grid
        and np.allclose(volume.spacing, domain.grid_spacing_mm, rtol=1e-3)
    ):
        return "whole"  # on the preprocessing grid already: judged whole
    found = f"found {_fmt(shape)} voxels at {_fmt(spacing)} mm = {_fmt(fov)} mm"
    refusal = (
        f"outside the index's domain: it covers {domain.describe()} ({domain.n_volumes} "
        f"training volumes); {found}; judge it with an index built for this domain"
    )
    if _outside(spacing, domain.spacing_mm_min, domain.spacing_mm_max, domain.spacing_tolerance):
        raise DomainError(volume.source, refusal)
    if modality is not None and domain.modality is not None and modality != domain.modality:
        raise DomainError(
            volume.source,
            f"outside the index's domain: modality {modality}, the index covers {domain.modality}",
        )
    if domain.window_fov_mm is not None and domain.grid is not None and domain.grid_spacing_mm is not None:
        if _outside(fov, domain.fov_mm_min, domain.window_fov_mm, domain.fov_tolerance):
            raise DomainError(volume.source, refusal)
        resampled = fov / np.asarray(domain.grid_spacing_mm, dtype=np.float64)
        if not np.any(np.round(resampled) > np.asarray(domain.grid)):
            return "whole"
        if not windows:
            raise DomainError(
                volume.source,
                f"larger than the index's grid ({found}): it is judged by windows, which this "
                "path does not run; use gate check",
            )
        return "windows"
    if _outside(fov, domain.fov_mm_min, domain.fov_mm_max, domain.fov_tolerance) or _outside(
        shape, domain.shape_min, domain.shape_max, domain.shape_tolerance
    ):
        raise DomainError(volume.source, refusal)
    return "whole"
