"""gate.encoder.benchmark: metrics against hand-computed values, perturbations, a tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from gate.encoder.benchmark import (
    COMPOSITE_GEOMETRIC,
    COMPOSITE_INTENSITY,
    COMPOSITE_SEED_FLOOR,
    FAMILIES,
    DarScorer,
    EmbeddingScorer,
    PearsonScorer,
    auroc,
    composite_draw,
    family_metrics,
    markdown_methods,
    markdown_sweep,
    markdown_table,
    perturb,
    run_benchmark,
    split,
    tpr_at_fpr,
    validation_split,
    validation_threshold,
)
from gate.poses import Pose, PoseSet
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


def test_composite_draws_are_seeded_mixtures() -> None:
    a = [composite_draw(i, seed=7) for i in range(40)]
    assert a == [composite_draw(i, seed=7) for i in range(40)]
    assert a != [composite_draw(i, seed=8) for i in range(40)]
    for pieces in a:
        fams = [p.family for p in pieces]
        assert 3 <= len(fams) <= 5 and len(set(fams)) == len(fams)
        assert set(fams) & set(COMPOSITE_GEOMETRIC) and set(fams) & set(COMPOSITE_INTENSITY)
        for p in pieces:
            fam = FAMILIES[p.family]
            assert p.seed >= COMPOSITE_SEED_FLOOR  # never a single-family seed
            if p.family != "crop_shift":
                assert fam.severities[0] <= p.severity <= fam.default  # mild to moderate
    # a sweep scales the same pieces
    strong = composite_draw(3, seed=7, scale=2.0)
    assert [(p.family, p.seed) for p in strong] == [(p.family, p.seed) for p in a[3]]
    rot = [(p, q) for p, q in zip(a[3], strong, strict=True) if p.family == "rotation"]
    for p, q in rot:
        assert q.severity == pytest.approx(2 * p.severity)


def test_composite_copies_are_deterministic_per_seed() -> None:
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(3)
    grids = preprocess_batch(vols, cfg)
    one = perturb("composite", 1.0, grids, vols, cfg, seed=5)
    assert np.array_equal(one, perturb("composite", 1.0, grids, vols, cfg, seed=5))
    assert not np.array_equal(one, perturb("composite", 1.0, grids, vols, cfg, seed=6))


def test_stronger_composites_are_further_on_real_volumes(hippocampus_dir, read_opts) -> None:
    from gate.volume import discover, read_volumes

    cfg = PreprocessConfig()
    vols = [v for f in discover([hippocampus_dir])[:6] for v in read_volumes(f, read_opts)]
    grids = preprocess_batch(vols, cfg)
    pearson = PearsonScorer()
    pearson.fit(grids)
    means = [
        float(pearson.score(perturb("composite", s, grids, vols, cfg, seed=0)).mean()) for s in (0.5, 1, 2)
    ]
    assert 1.0 > means[0] > means[1] > means[2]


def test_validation_split_is_disjoint_and_covers() -> None:
    val, test = validation_split(52, 0.5, seed=0)
    assert len(val) == 26 and len(test) == 26 and not set(val) & set(test)
    assert sorted([*val, *test]) == list(range(52))
    with pytest.raises(ValueError, match="validation fraction must be in"):
        validation_split(52, 1.0, seed=0)


def test_test_patients_never_set_the_threshold() -> None:
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(16)
    grids = preprocess_batch(vols, cfg)
    train, holdout = grids[:10], grids[10:].copy()
    res = run_benchmark(train, vols[:10], holdout, [PearsonScorer()], cfg, sweep=False)
    vs = res["validation_split"]
    val, test = np.array(vs["novel_validation"]), np.array(vs["novel_test"])
    assert len(val) == 3 and len(test) == 3 and not set(val) & set(test)
    assert not set(vs["positive_validation"]) & set(vs["positive_test"])
    # turn the test holdout patients into copies of training volumes: their scores jump to 1,
    # the all-holdout threshold moves, the validation threshold does not
    holdout[test] = train[: len(test)]
    res2 = run_benchmark(train, vols[:10], holdout, [PearsonScorer()], cfg, sweep=False)
    m, m2 = res["methods"]["raw_voxel_pearson"], res2["methods"]["raw_voxel_pearson"]
    assert m2["test"]["threshold"] == m["test"]["threshold"]
    assert m2["threshold"] > m["threshold"]
    assert m2["test"]["pooled"]["fpr_at_threshold"] == 1.0  # the copies are caught on the test side
    pearson = PearsonScorer()
    pearson.fit(train)
    assert m["test"]["threshold"] == validation_threshold(pearson.score(holdout), val)
    assert m["test"]["n_positives_per_family"] == len(vs["positive_test"])


def _unit(x: np.ndarray) -> np.ndarray:
    """A zero-mean unit "embedding": the centred, normalised voxels (so Dar's rule equals cosine)."""
    f = x.reshape(len(x), -1).astype(np.float64)
    f = f - f.mean(axis=1, keepdims=True)
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_methods_table_and_identical_rows() -> None:
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(12)
    grids = preprocess_batch(vols, cfg)
    shift = PoseSet(poses=(Pose(), Pose(translate_vox=(2.0, 0.0, 0.0))))
    scorers = [
        EmbeddingScorer("enc", _unit),
        DarScorer("dar:enc", _unit),
        PearsonScorer(),
        PearsonScorer(shift, vols[:9], cfg),
    ]
    res = run_benchmark(grids[:9], vols[:9], grids[9:], scorers, cfg, sweep=False)
    assert res["methods"]["dar:enc"]["identical_to"] == "enc"  # zero-mean embeddings: same rule
    m = res["methods"]["enc"]
    assert m["pooled_single_families"]["n"] == m["pooled"]["n"] - 9  # the 9 composites left out
    assert "identical_to" not in res["methods"]["raw_voxel_pearson+poses"]
    assert res["methods"]["raw_voxel_pearson+poses"]["families"]["exact"]["0.0"][
        "min_score"
    ] == pytest.approx(1.0)
    table = markdown_methods(res)
    for name in ("raw_voxel_pearson+poses", "dar:enc"):
        assert f"| {name} |" in table
    assert "identical to enc" in table and "test: composite TPR@FPR5%" in table
    assert "| enc | composite | 1 |" in markdown_table(res)


def test_sweep_reaches_wide_severities() -> None:
    assert max(FAMILIES["rotation"].severities) == 20.0
    assert max(FAMILIES["translation"].severities) == 8.0 and FAMILIES["translation"].default == 3.0
    assert max(FAMILIES["crop_shift"].severities) == 8.0 and FAMILIES["crop_shift"].default == 4.0
    cfg = PreprocessConfig(grid=GRID)
    vols = _volumes(12)
    grids = preprocess_batch(vols, cfg)
    res = run_benchmark(grids[:9], vols[:9], grids[9:], [PearsonScorer()], cfg, sweep=True)
    sweep = markdown_sweep(res)
    assert "| raw_voxel_pearson | translation | 8.0 |" in sweep
    assert "| raw_voxel_pearson | composite | 2.0 |" in sweep


def test_verified_scorer_scores_copies_above_new_patients(hippocampus_dir, read_opts) -> None:
    """VerifiedScorer runs the product's retrieve-then-verify: a blurred, shifted copy of a training
    volume verifies near 1 against it, a patient it never saw does not; the combined score ranks
    by the higher of the two calibrated ranks."""
    from scipy import ndimage

    from gate.encoder.benchmark import VerifiedScorer
    from gate.poses import COMPACT_POSES
    from gate.preprocess import preprocess
    from gate.verify import voxel_vector
    from gate.volume import discover, read_volumes

    config = PreprocessConfig()
    vols = [v for f in discover([hippocampus_dir])[:7] for v in read_volumes(f, read_opts)]
    train, novel = vols[:6], vols[6]
    proj = np.random.default_rng(0).standard_normal((768, 16)).astype(np.float32)

    def embed(x: np.ndarray) -> np.ndarray:  # a fixed projection of block means: a stand-in encoder
        e = np.stack([voxel_vector(g[0]) for g in x]) @ proj
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    scorers = {}
    shared: dict = {}
    for mode in ("combined", "verified"):
        s = VerifiedScorer("v", embed, COMPACT_POSES, train, config, mode=mode, shared=shared)
        s.fit(np.zeros((len(train), 1, *config.grid), np.float32))
        scorers[mode] = s
    grid = preprocess(train[2], config).data
    copy = np.roll(ndimage.gaussian_filter(grid, 1.0), 2, axis=1)
    new = preprocess(novel, config).data
    batch = np.stack([copy, new])[:, None].astype(np.float32)
    ver = scorers["verified"].score(batch)
    assert ver[0] > 0.9 and ver[1] < ver[0] - 0.05, ver
    comb = scorers["combined"].score(batch)
    assert comb[0] > comb[1] and comb[0] >= 1.0  # above every training patient's own LOO scores
    cos, lopo_ver = scorers["combined"]._fitted["lopo"]
    assert len(cos) == len(lopo_ver) == len(train)
    out = scorers["verified"].judge(embed(batch[:1])[0], VerifiedScorer.candidate_view(copy))
    assert out.verified_patient_id == "p-0000000000000002"
