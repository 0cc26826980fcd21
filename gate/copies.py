"""Simulated copies: what a copy of a training patient looks like, drawn at index build time.

A policy that knows only real new patients sets its thresholds blind to where copies fall
(strict rejected half of all new patients and still passed LDM copies; issue 12). So
``gate index build`` also draws, for every training volume, seeded near copies (several mild to
moderate changes applied together: a shift of the field of view, a turn, a mirror, smoothing,
noise, a gamma change, a smooth bias field) and scores them like candidates. Their scores are
stored beside the novel patients' (:class:`gate.index_manifest.Verification`), and a policy
threshold of kind ``copies`` is read from them (:mod:`gate.policy`).

The draws use their own seed stream (:data:`COPY_SEED_OFFSET`), disjoint from every benchmark
draw (gate.encoder.benchmark seeds < 2**62 with other offsets), and numpy + scipy only: index
builds do not need torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from gate.poses import rotation_matrix

COPY_SEED_OFFSET = 7_919_000_000
"""Copies of volume ``i`` are drawn from ``default_rng(seed + COPY_SEED_OFFSET + i)``: no
benchmark draw (seeds ``seed + 101 * family`` and composite seeds in [2**32, 2**62)) uses these."""

COPIES_PER_VOLUME = 2
"""Simulated copies per training volume: 2 x 261 = 522 for the shipped index, enough that the
0.1st percentile (strict's copy threshold) is an interpolation between real draws."""

FAMILIES_PER_COPY = (2, 4)
"""Each copy applies between 2 and 4 of the changes in :data:`RANGES` (inclusive)."""

RANGES: dict[str, tuple[float, float]] = {
    "shift": (1.0, 6.0),
    "rotation": (2.0, 12.0),
    "blur": (0.5, 1.5),
    "noise": (0.01, 0.05),
    "gamma": (1.1, 1.6),
    "bias": (0.05, 0.3),
}
"""Severity ranges (shift: voxels of the field of view, any direction; rotation: degrees about a
random axis; blur: Gaussian sigma, voxels; noise: Gaussian sigma on [0, 1] intensities; gamma:
factor, either way; bias: max |log gain| of a smooth field). Mild to moderate: the benchmark's
default severities sit inside them, its sweep's strongest (rotation 20, shift 8) outside. A
left-right flip is added to a quarter of the copies on top."""

FLIP_PROBABILITY = 0.25


@dataclass(frozen=True)
class Copy:
    """One simulated copy of a training volume.

    Attributes:
        volume: index of the training volume it copies.
        image: float32 (X + 2S, Y + 2S, Z + 2S) the copied grid with its margin, in [0, 1].
        mask: bool, same shape: where the copy holds voxels.
        changes: the changes applied, name -> severity (flip: 1.0).

    """

    volume: int
    image: np.ndarray
    mask: np.ndarray
    changes: dict[str, float]

    def centre(self, margin: int) -> np.ndarray:
        """The copy's grid (what gets embedded): the view without its margin."""
        if margin == 0:
            return self.image
        inner = (slice(margin, -margin),) * 3
        return np.ascontiguousarray(self.image[inner])


def _smooth_field(shape: Sequence[int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    coarse = rng.uniform(-1.0, 1.0, size=(4, 4, 4))
    field = ndimage.zoom(coarse, [s / 4 for s in shape], order=3, mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    return amplitude * field / max(float(np.abs(field).max()), 1e-6)


def draw_copy(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Apply a seeded draw of :data:`RANGES` changes to one margin grid.

    Args:
        image: float32 (X, Y, Z) in [0, 1], a training grid with its margin of context.
        mask: bool, same shape.
        rng: the draw's generator.

    Returns:
        The changed image (float32, [0, 1]), its mask, and the changes applied.

    """
    names = list(RANGES)
    count = int(rng.integers(FAMILIES_PER_COPY[0], FAMILIES_PER_COPY[1] + 1))
    chosen = [names[i] for i in sorted(rng.choice(len(names), count, replace=False))]
    changes: dict[str, float] = {}
    x = image.astype(np.float32)
    m = mask.astype(np.float32)
    if rng.random() < FLIP_PROBABILITY:
        x, m = x[::-1].copy(), m[::-1].copy()
        changes["flip"] = 1.0
    for name in chosen:
        lo, hi = RANGES[name]
        sev = float(rng.uniform(lo, hi))
        changes[name] = sev
        if name in ("shift", "rotation"):
            centre = (np.asarray(x.shape, dtype=np.float64) - 1.0) / 2.0
            direction = rng.normal(size=3)
            direction /= max(float(np.linalg.norm(direction)), 1e-9)
            if name == "shift":
                rot, t = np.eye(3), direction * sev
            else:
                rot, t = rotation_matrix(direction * np.radians(sev)), np.zeros(3)
            offset = centre - rot.T @ (centre + t)
            x = ndimage.affine_transform(x, rot.T, offset=offset, order=1, mode="constant", cval=0.0)
            m = ndimage.affine_transform(m, rot.T, offset=offset, order=1, mode="constant", cval=0.0)
        elif name == "blur":
            x = ndimage.gaussian_filter(x, sev)
        elif name == "noise":
            x = x + rng.normal(scale=sev, size=x.shape).astype(np.float32)
        elif name == "gamma":
            g = sev if rng.random() < 0.5 else 1.0 / sev
            x = np.clip(x, 0.0, 1.0) ** g
        elif name == "bias":
            x = x * np.exp(_smooth_field(x.shape, rng, sev)).astype(np.float32)
    keep = m > 0.5
    x = np.where(keep, np.clip(x, 0.0, 1.0), 0.0).astype(np.float32)
    return x, keep, changes


def simulated_copies(
    views: Sequence[tuple[np.ndarray, np.ndarray]], seed: int, per_volume: int = COPIES_PER_VOLUME
) -> list[Copy]:
    """``per_volume`` seeded copies of every training volume.

    Args:
        views: per training volume, its grid with margin and mask
            (:func:`gate.verify.grid_with_mask`).
        seed: the build seed; volume ``i`` draws from ``seed + COPY_SEED_OFFSET + i``.
        per_volume: copies per volume.

    Returns:
        ``per_volume * len(views)`` copies, volume-major.

    """
    out = []
    for i, (image, mask) in enumerate(views):
        rng = np.random.default_rng(seed + COPY_SEED_OFFSET + i)
        for _ in range(per_volume):
            x, m, changes = draw_copy(image, mask, rng)
            out.append(Copy(volume=i, image=x, mask=m, changes=changes))
    return out
