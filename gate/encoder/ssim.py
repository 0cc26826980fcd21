"""3D structural similarity (SSIM, Wang et al. 2004) in torch, batched.

Used as the regression target of the ``ssim`` objective (DeepSSIM carried to 3D) and as the
image-space baseline of the detection benchmark. Intensities are in [0, 1] (data range 1).
"""

from __future__ import annotations

import torch

SSIM_WINDOW = 7
"""Uniform window width in voxels (7^3), the default of scikit-image's ``structural_similarity``;
a box filter by cumulative sums costs O(1) per voxel, ~10x cheaper than a Gaussian window on
CPU, which matters for the all-pairs target matrix of the ``ssim`` objective."""

C1 = (0.01 * 1.0) ** 2
"""Stabiliser of the luminance term, K1 = 0.01 at data range 1 (Wang et al. 2004)."""

C2 = (0.03 * 1.0) ** 2
"""Stabiliser of the contrast-structure term, K2 = 0.03 at data range 1."""


def _box(x: torch.Tensor) -> torch.Tensor:
    """Mean over every 7x7x7 window of (..., X, Y, Z), valid region only (cumulative sums)."""
    w = SSIM_WINDOW
    for dim in (-3, -2, -1):
        c = torch.cumsum(x, dim=dim)
        zero = torch.zeros_like(c.narrow(dim, 0, 1))
        c = torch.cat([zero, c], dim=dim)
        n = c.shape[dim]
        x = c.narrow(dim, w, n - w) - c.narrow(dim, 0, n - w)
    return x / float(w**3)


def _ssim_map(
    mx: torch.Tensor, my: torch.Tensor, sxx: torch.Tensor, syy: torch.Tensor, sxy: torch.Tensor
) -> torch.Tensor:
    num = (2 * mx * my + C1) * (2 * sxy + C2)
    den = (mx * mx + my * my + C1) * (sxx + syy + C2)
    return num / den


def ssim3d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean 3D SSIM of paired volumes.

    Args:
        x: (N, 1, X, Y, Z) in [0, 1].
        y: same shape as ``x`` (or broadcastable along N).

    Returns:
        (N,) mean SSIM over the valid region, in [-1, 1]; 1 for identical volumes.

    """
    x, y = torch.broadcast_tensors(x.double(), y.double())
    mx, my = _box(x), _box(y)
    sxx = _box(x * x) - mx * mx
    syy = _box(y * y) - my * my
    sxy = _box(x * y) - mx * my
    return _ssim_map(mx, my, sxx, syy, sxy).mean(dim=(1, 2, 3, 4)).float()


def ssim_to_set(
    x: torch.Tensor, ref: torch.Tensor, ref_stats: tuple[torch.Tensor, ...] | None = None
) -> torch.Tensor:
    """SSIM of each volume in ``x`` against every volume in ``ref``.

    Args:
        x: (M, 1, X, Y, Z) in [0, 1].
        ref: (N, 1, X, Y, Z) in [0, 1].
        ref_stats: optional ``set_stats(ref)``, to reuse across calls.

    Returns:
        (M, N) float32.

    """
    my, syy, ref64 = ref_stats if ref_stats is not None else set_stats(ref)
    out = torch.empty((x.shape[0], ref.shape[0]), dtype=torch.float32)
    with torch.no_grad():
        for i in range(x.shape[0]):
            xi = x[i : i + 1].double()
            mx = _box(xi)
            sxx = _box(xi * xi) - mx * mx
            sxy = _box(xi * ref64) - mx * my
            out[i] = _ssim_map(mx, my, sxx, syy, sxy).mean(dim=(1, 2, 3, 4)).float()
    return out


def set_stats(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local means and variances of a reference set, for :func:`ssim_to_set`."""
    ref64 = ref.double()
    my = _box(ref64)
    return my, _box(ref64 * ref64) - my * my, ref64


def ssim_matrix(x: torch.Tensor) -> torch.Tensor:
    """All-pairs SSIM of a set of volumes (ones on the diagonal).

    Args:
        x: (N, 1, X, Y, Z) in [0, 1].

    Returns:
        (N, N) float32, symmetric up to round-off.

    """
    out = ssim_to_set(x, x)
    out = (out + out.T) / 2
    out.fill_diagonal_(1.0)
    return out
