"""Helpers for the index / check tests: a tiny numpy encoder and index builders.

``ProjectionEncoder`` has the interface of :class:`gate.embed.Encoder` that the index uses
(sha256, dim, preprocess, embed_array): a fixed random projection of the preprocessed grid,
normalised. Near copies of a volume project close to it; different blobs do not.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gate.calibration import leave_one_patient_out
from gate.domain import Domain, IntensityStats
from gate.index import Probe, build_index
from gate.preprocess import PreprocessConfig
from gate.values import Embedding

GRID = (8, 8, 8)

WIDE_DOMAIN = Domain(
    n_volumes=1,
    canonical=True,
    fov_mm_min=(1.0, 1.0, 1.0),
    fov_mm_max=(1e4, 1e4, 1e4),
    shape_min=(1, 1, 1),
    shape_max=(10_000, 10_000, 10_000),
    spacing_mm_min=(0.01, 0.01, 0.01),
    spacing_mm_max=(100.0, 100.0, 100.0),
    intensity=IntensityStats(
        p_low_min=0.0,
        p_low_max=0.0,
        p_high_min=1.0,
        p_high_max=1.0,
        foreground_fraction_min=0.0,
        foreground_fraction_max=1.0,
    ),
)
"""A domain that admits any test volume, for indexes built from vectors (no volumes to measure)."""


class ProjectionEncoder:
    """Numpy stand-in for gate.embed.Encoder: random projection of the grid, unit norm."""

    provider = "CPUExecutionProvider"

    def __init__(self, dim: int = 16, seed: int = 0, grid: tuple[int, int, int] = GRID) -> None:
        self.dim = dim
        self.preprocess = PreprocessConfig(grid=grid)
        rng = np.random.default_rng(seed)
        self._proj = rng.standard_normal((int(np.prod(grid)), dim)).astype(np.float32)
        self.sha256 = f"{seed:02x}{dim:02x}".ljust(64, "e")

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        flat = batch.reshape(len(batch), -1)
        flat = flat - flat.mean(axis=1, keepdims=True)
        # one product per row: a (N, D) @ (D, K) matmul rounds a row differently for different N
        # (OpenBLAS kernels), and a volume's embedding must not depend on its batch (gate.embed)
        out = np.stack([row @ self._proj for row in flat]) if len(flat) else flat @ self._proj
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def pid(i: int) -> str:
    return f"p-{i:016x}"


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build_from_vectors(
    vectors: np.ndarray, out_dir: Path, encoder: ProjectionEncoder, per_patient: int = 1
) -> list[str]:
    """Build an index over given unit vectors (patient i owns rows i*per_patient...)."""
    ids = [pid(i // per_patient) for i in range(len(vectors))]
    probes = [Probe(Embedding(v, encoder.sha256, f"row{i}"), f"{i:064x}") for i, v in enumerate(vectors)]
    build_index(
        probes,
        ids,
        ["ab" * 32] * len(vectors),
        encoder,
        out_dir,
        leave_one_patient_out(vectors, ids, 0),
        domain=WIDE_DOMAIN,
    )
    return ids
