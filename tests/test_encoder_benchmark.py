"""gate.encoder.benchmark: metrics against hand-computed values, perturbations, a tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from gate.encoder.benchmark import (
    FAMILIES,
    PearsonScorer,
    auroc,
    family_metrics,
    perturb,
    run_benchmark,
    split,
    tpr_at_fpr,
)
from gate.preprocess import PreprocessConfig, preprocess_batch
from gate.values import Volume

GRID = (16, 16, 16)


def test_auroc_matches_mann_whitney() -> None:
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 50).round(1), rng.normal(0, 1, 40).round(1)  # ties on purpose
    u = mannwhitneyu(pos, neg, alternative="greater").statistic
    assert auroc(pos, neg) == pytest.approx(u / (50 * 40))
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert auroc(np.array([0.0]), np.array([1.0])) == 0.0


def test_tpr_at_fpr() -> None:
    neg = np.arange(100) / 100.0  # 0.00 .. 0.99
    pos = np.array([0.985, 0.995, 0.5, 1.2])
    assert tpr_at_fpr(pos, neg, 0.0) == 0.5  # must beat 0.99
    assert tpr_at_fpr(pos, neg, 0.01) == 0.75  # one negative (0.99) may be above: beat 0.98
    m = family_metrics(pos, neg, threshold=0.95)
    assert m["tpr_at_threshold"] == 0.75 and m["fpr_at_threshold"] == pytest.approx(0.05)


def test_split_is_seeded_and_disjoint() -> None:
    a, b = split(50, 0.2, seed=3)
    assert len(b) == 10 and len(a) == 40 and not set(a) & set(b)
    a2, b2 = split(50, 0.2, seed=3)
    assert (a == a2).all() and (b == b2).all()
    assert not (split(50, 0.2, seed=4)[1] == b).all()


def _volumes(n: int) -> list[Volume]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        data = rng.random((18, 17, 16)).astype(np.float32) * 100
        out.append(
            Volume(data=data, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), source=f"v{i}", patient_id="p-1")
        )
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_perturbations_keep_grid_and_range(family: str) -> None:
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(3)
    grids = preprocess_batch(vols, cfg)
    out = perturb(family, FAMILIES[family].default, grids, vols, cfg, seed=0)
    assert out.shape == grids.shape and out.dtype == np.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    if family == "exact":
        assert (out == grids).all()
    else:
        assert not np.array_equal(out, grids)


def test_unknown_family() -> None:
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(1)
    with pytest.raises(ValueError, match="unknown perturbation family 'melt'"):
        perturb("melt", 1.0, preprocess_batch(vols, cfg), vols, cfg, seed=0)


def test_benchmark_end_to_end_on_noise_volumes() -> None:
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(12)
    grids = preprocess_batch(vols, cfg)
    res = run_benchmark(grids[:9], vols[:9], grids[9:], [PearsonScorer()], cfg, sweep=False)
    m = res["methods"]["raw_voxel_pearson"]
    # white noise: exact and mildly noised copies are trivially found, unrelated volumes are not
    assert m["families"]["exact"]["0.0"]["tpr_at_threshold"] == 1.0
    assert m["families"]["noise"]["0.05"]["auroc"] == 1.0
    assert m["novel"]["max"] < 0.2
