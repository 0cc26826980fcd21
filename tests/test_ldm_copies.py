"""bench/ldm_copies.py: the reference scores, labels and metrics of the LDM-copies benchmark.

Only the pure functions on tiny synthetic arrays; the benchmark itself (generator training,
sampling, labelling, the gate's check) runs from bench/, its numbers are in docs/ldm_copies.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "ldm_copies", Path(__file__).resolve().parents[1] / "bench" / "ldm_copies.py"
)
assert _SPEC is not None and _SPEC.loader is not None
L = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(L)


def test_shift_ncc_matches_brute_force_at_every_shift() -> None:
    rng = np.random.default_rng(0)
    refs = rng.random((3, 7, 9, 6))
    a = rng.random((7, 9, 6))
    scores = L.ShiftNCC(refs, 2).scores(a)
    assert scores.shape == (3, 5, 5, 5)
    for m in range(3):
        for d in itertools.product(range(-2, 3), repeat=3):
            want = L.brute_ncc(a, refs[m], d)
            assert scores[(m, *(np.asarray(d) + 2))] == pytest.approx(want, abs=1e-5)


def test_shift_ncc_finds_the_shift_of_a_moved_copy() -> None:
    rng = np.random.default_rng(1)
    b = ndimage_smooth(rng.random((16, 20, 12)))
    moved = np.roll(b, (2, -1, 3), axis=(0, 1, 2))
    other = ndimage_smooth(rng.random((16, 20, 12)))
    scores = L.ShiftNCC(np.stack([other, moved]), 3).scores(b)
    best = scores.reshape(2, -1).max(1)
    assert best[1] == pytest.approx(1.0, abs=1e-5)
    assert best[0] < 0.9
    assert L._best_shift(scores[1], 3) == (2, -1, 3)


def ndimage_smooth(x: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(x, 1.5)


def test_overlap_cuts_both_volumes_to_the_shared_voxels() -> None:
    a = np.arange(4 * 5 * 6, dtype=float).reshape(4, 5, 6)
    x, y = L.overlap(a, a, (1, -2, 0))
    assert x.shape == y.shape == (3, 3, 6)
    assert np.array_equal(x, a[0:3, 2:5, :]) and np.array_equal(y, a[1:4, 0:3, :])


def test_ssim_is_one_for_identical_and_lower_for_noisy_volumes() -> None:
    rng = np.random.default_rng(2)
    a = ndimage_smooth(rng.random((12, 12, 12)))
    assert L.ssim3d(a, a) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
    assert L.ssim3d(a, noisy) < 0.9


def test_grades_follow_the_two_thresholds() -> None:
    assert [L.grade_of(s, 0.8, 0.9) for s in (0.5, 0.8, 0.89, 0.9, 0.99)] == [
        "different",
        "similar",
        "similar",
        "duplicate",
        "duplicate",
    ]


def test_class_metrics_confusion_and_macro_f1() -> None:
    truth = ["different", "different", "similar", "duplicate"]
    pred = ["different", "similar", "similar", "different"]
    m = L.class_metrics(truth, pred)
    assert m["confusion"]["rows_reference"] == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    pc = m["per_class"]
    assert pc["different"]["precision"] == 0.5 and pc["different"]["recall"] == 0.5
    assert pc["similar"]["precision"] == 0.5 and pc["similar"]["recall"] == 1.0
    assert pc["duplicate"]["precision"] == 0.0 and pc["duplicate"]["recall"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)


def test_macro_f1_averages_only_the_reference_classes_present() -> None:
    m = L.class_metrics(["different", "different"], ["different", "different"])
    assert m["macro_f1"] == 1.0


def test_choose_thresholds_separates_three_separable_groups() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.55, 0.6, 0.9, 0.95])
    truth = ["different"] * 3 + ["similar"] * 2 + ["duplicate"] * 2
    t1, t2, f = L.choose_thresholds(scores, truth)
    assert f == 1.0
    assert 0.3 < t1 <= 0.55 and 0.6 < t2 <= 0.9


def test_choose_thresholds_keeping_gives_up_f1_to_keep_every_duplicate() -> None:
    """A duplicate scored among the similar ones: the free choice drops it, the kept choice does not."""
    scores = np.array([0.1, 0.2, 0.3, 0.55, 0.6, 0.62, 0.64, 0.9, 0.95, 0.58])
    truth = ["different"] * 3 + ["similar"] * 4 + ["duplicate"] * 3
    free = L.choose_thresholds(scores, truth)
    kept = L.choose_thresholds_keeping(scores, truth)
    assert free[1] > 0.64 and free[2] > kept[2]  # the 0.58 duplicate graded similar
    assert kept[1] <= 0.58
    graded = L.grades_from_score(scores, kept[0], kept[1])
    assert all(g == "duplicate" for g, t in zip(graded, truth, strict=True) if t == "duplicate")


def test_two_scores_grade_copies_by_one_and_duplicates_by_the_other() -> None:
    """Copy against novel on the first score, duplicate against similar on the second."""
    copy = np.array([0.1, 0.2, 0.7, 0.72, 0.9, 0.95])
    grade = np.array([0.9, 0.9, 0.5, 0.55, 0.8, 0.85])  # high on the novel ones: must not matter
    truth = ["different", "different", "similar", "similar", "duplicate", "duplicate"]
    assert L.grades_from_two_scores(copy, grade, 0.5, 0.7) == truth
    t1, t2, f = L.choose_two_score_thresholds(copy, grade, truth)
    assert f == 1.0 and 0.2 < t1 <= 0.7 and 0.55 < t2 <= 0.8
    assert L.grades_from_two_scores(copy, grade, t1, t2) == truth


def test_binary_metrics_counts() -> None:
    m = L.binary_metrics([True, True, False, False], [True, False, True, False])
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    assert m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5


def test_split_halves_is_seeded_and_disjoint() -> None:
    v, t = L.split_halves(11)
    v2, t2 = L.split_halves(11)
    assert np.array_equal(v, v2) and np.array_equal(t, t2)
    assert len(v) == 5 and len(t) == 6 and not set(v) & set(t)


def test_reference_thresholds_from_measured_distributions() -> None:
    labels = {
        "real_pairs": {"aligned_ncc": [0.6, 0.7, 0.78]},
        "design": {"volumes": [{"multiplicity": 1}, {"multiplicity": 14}]},
        "samples": [
            {"generator": "mem", "nearest_multiplicity": 14, "aligned_ncc": 0.9},
            {"generator": "mem", "nearest_multiplicity": 14, "aligned_ncc": 0.94},
            {"generator": "mem", "nearest_multiplicity": 1, "aligned_ncc": 0.99},
            {"generator": "default", "nearest_multiplicity": 14, "aligned_ncc": 0.5},
        ],
    }
    t = L.thresholds_from(labels)
    assert t["similar"] == 0.78 and t["duplicate"] == pytest.approx(0.92)
    assert L.reference_grades(labels) == ["similar", "duplicate", "duplicate", "different"]


def test_methods_table_and_report_on_a_small_synthetic_run() -> None:
    rng = np.random.default_rng(3)
    ref = ["different"] * 10 + ["similar"] * 6 + ["duplicate"] * 4
    base = {"different": 0.7, "similar": 0.85, "duplicate": 0.95}
    rows = [
        {k: base[g] + rng.normal(0, 0.005) for k in ("pixel_ssim", "pixel_pearson", "aligned_ssim")}
        for g in ref
    ]
    perfect = [{"grade": g, "verdict": "pass" if g == "different" else "reject"} for g in ref]
    dar = {"threshold": 0.8, "scores": [base[g] for g in ref]}
    methods = L._methods_table(ref, rows, {"strict": perfect}, dar)
    assert methods["gate_strict"]["all"]["macro_f1"] == 1.0
    assert methods["pixel_pearson"]["test"]["macro_f1"] == 1.0
    assert methods["dar_binary"]["all"]["recall"] == 1.0 and methods["dar_binary"]["all"]["precision"] == 1.0
    out = {
        "n_samples": len(ref),
        "index": "i",
        "encoder": "e",
        "reference_thresholds": {"similar": 0.8, "duplicate": 0.9},
        "reference_counts": {"mem": {"different": 0, "similar": 6, "duplicate": 4}},
        "methods": methods,
        "policies": {
            "strict": {
                "passed": 10,
                "passed_closer_than_any_two_real_patients": 0,
                "passed_by_reference_grade": {"different": 10, "similar": 0, "duplicate": 0},
            }
        },
    }
    text = L.report_markdown(out)
    assert "| gate `strict` | all | 1.000 |" in text
    assert "| strict | 10 | 0 | 10 / 0 / 0 |" in text


def test_grades_ceiling_on_a_synthetic_score(tmp_path: Path) -> None:
    """`grades`: a verified score that orders the grades perfectly has a free-threshold ceiling of 1.0,
    and the policy grid is graded as the decision does (higher grade wins)."""
    import argparse
    import json

    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        ref = ("different", "similar", "duplicate")[i % 3]
        ver = {"different": 0.6, "similar": 0.86, "duplicate": 0.95}[ref] + 0.01 * rng.random()
        rows.append(
            {
                "sample": f"s{i}",
                "reference": ref,
                "aligned_ncc": ver,
                "gate_similarity": 0.5 + 0.1 * rng.random(),  # uninformative, below every cosine bound
                "gate_verified": ver,
            }
        )
    score = tmp_path / "score.json"
    score.write_text(json.dumps({"samples": rows, "reference_thresholds": {"similar": 0.82}}))
    out = tmp_path / "grades.json"
    index = Path(__file__).resolve().parents[1] / "gate" / "models" / "index"
    L.cmd_grades(argparse.Namespace(score=str(score), index=str(index), out=str(out)))
    res = json.loads(out.read_text())
    assert res["alone"]["verified"]["test"]["macro_f1"] == 1.0
    assert res["alone"]["cosine"]["test"]["macro_f1"] < 0.7
    best = res["policies"]["best_with_duplicate_recall_1"]
    assert best is not None and best["passed_closer_than_any_two_real_patients"] == 0
    assert res["policies"]["tried"] > 100


def test_design_links_give_each_volume_its_multiplicity_and_refuse_a_bad_design() -> None:
    design = {
        "volumes": [
            {"file": "hippocampus_001.nii.gz", "multiplicity": 1},
            {"file": "hippocampus_321.nii.gz", "multiplicity": 3},
        ],
        "per_epoch": 4,
    }
    assert L.design_links(design) == [
        ("hippocampus_001_c00.nii.gz", "hippocampus_001.nii.gz"),
        ("hippocampus_321_c00.nii.gz", "hippocampus_321.nii.gz"),
        ("hippocampus_321_c01.nii.gz", "hippocampus_321.nii.gz"),
        ("hippocampus_321_c02.nii.gz", "hippocampus_321.nii.gz"),
    ]
    with pytest.raises(ValueError, match="scans per epoch"):
        L.design_links({**design, "per_epoch": 5})
    with pytest.raises(ValueError, match="multiplicity"):
        L.design_links({"volumes": [{"file": "a.nii.gz", "multiplicity": 0}]})
    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "ldm_copies_design.json"
    shipped = json.loads(path.read_text())
    assert len(L.design_links(shipped)) == shipped["per_epoch"] == 44


def test_score_refuses_samples_that_differ_from_their_labels(tmp_path: Path) -> None:
    (tmp_path / "mem").mkdir()
    (tmp_path / "mem" / "a.nii.gz").write_bytes(b"one")
    (tmp_path / "mem" / "b.nii.gz").write_bytes(b"two")
    rows = [
        {"sample": "mem/a.nii.gz", "file_sha256": hashlib.sha256(b"one").hexdigest()},
        {"sample": "mem/b.nii.gz", "file_sha256": hashlib.sha256(b"one").hexdigest()},
        {"sample": "mem/c.nii.gz", "file_sha256": hashlib.sha256(b"one").hexdigest()},
    ]
    assert L.stale_samples(rows, tmp_path) == ["mem/b.nii.gz", "mem/c.nii.gz"]
    assert L.stale_samples(rows[:1], tmp_path) == []
