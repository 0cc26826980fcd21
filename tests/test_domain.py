"""gate.domain: the domain an index records and the guard that refuses what it cannot judge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from gate.cli import main
from gate.domain import FOV_TOLERANCE, check_in_domain, geometry, measure_domain
from gate.errors import DomainError, ExitCode
from gate.preprocess import PreprocessConfig
from gate.values import Volume
from tests.volumes import make_blob

LARGE_FOV = (256, 256, 160)
"""A head MR field of view (voxels at 1 mm), 4-8x the hippocampus crops per axis."""


def _vol(shape: tuple[int, int, int], spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Volume:
    affine = np.diag([*spacing, 1.0])
    return Volume(make_blob(shape), affine, spacing, f"mem:{shape}", "p-0000000000000000")


def _training() -> list[Volume]:
    return [_vol((16 + i, 16, 12 + i)) for i in range(4)]


def test_measure_records_ranges_per_axis() -> None:
    domain = measure_domain(_training(), PreprocessConfig(grid=(8, 8, 8)))
    assert domain.n_volumes == 4
    assert domain.fov_mm_min == (16.0, 16.0, 12.0) and domain.fov_mm_max == (19.0, 16.0, 15.0)
    assert domain.shape_min == (16, 16, 12) and domain.shape_max == (19, 16, 15)
    assert domain.spacing_mm_min == domain.spacing_mm_max == (1.0, 1.0, 1.0)
    assert domain.grid == (8, 8, 8) and domain.grid_spacing_mm == (1.0, 1.0, 1.0)
    assert domain.intensity.p_low_min <= domain.intensity.p_high_max
    with pytest.raises(ValueError, match="at least one volume"):
        measure_domain([])


def test_training_volumes_and_the_grid_are_in_domain() -> None:
    domain = measure_domain(_training(), PreprocessConfig(grid=(8, 8, 8)))
    for vol in _training():
        check_in_domain(vol, domain)
    check_in_domain(_vol((8, 8, 8)), domain)  # a generator's output on the preprocessing grid
    check_in_domain(_vol((17, 17, 14)), domain)  # within the ranges


def test_larger_field_of_view_is_refused_with_one_line() -> None:
    domain = measure_domain(_training())
    big = _vol((40, 16, 12))
    with pytest.raises(
        DomainError,
        match=r"^mem:\(40, 16, 12\): outside the index's domain: it covers "
        r"field of view 16-19 x 16-16 x 12-15 mm.*found 40x16x12 voxels at 1x1x1 mm",
    ) as err:
        check_in_domain(big, domain)
    assert "\n" not in str(err.value) and err.value.exit_code is ExitCode.INPUT
    edge = int(19 * (1 + FOV_TOLERANCE))
    check_in_domain(_vol((edge, 16, 12)), domain)
    with pytest.raises(DomainError, match="outside the index's domain"):
        check_in_domain(_vol((edge + 1, 16, 12)), domain)
    with pytest.raises(DomainError, match="outside the index's domain"):
        check_in_domain(_vol((10, 16, 12)), domain)  # smaller than anything indexed


def test_other_spacing_is_refused_even_at_the_same_field_of_view() -> None:
    domain = measure_domain(_training())
    with pytest.raises(DomainError, match=r"found 32x32x24 voxels at 0.5x0.5x0.5 mm = 16x16x12 mm"):
        check_in_domain(_vol((32, 32, 24), (0.5, 0.5, 0.5)), domain)


def test_no_recorded_domain_is_refused() -> None:
    with pytest.raises(DomainError, match="the index records no domain"):
        check_in_domain(_vol((16, 16, 12)), None)


def test_modality_mismatch_is_refused() -> None:
    domain = measure_domain(_training(), modality="MR")
    check_in_domain(_vol((16, 16, 12)), domain, modality="MR")
    with pytest.raises(DomainError, match="modality CT, the index covers MR"):
        check_in_domain(_vol((16, 16, 12)), domain, modality="CT")


def test_geometry_is_in_canonical_axis_order() -> None:
    # array axes (z, x, y) stored with a permuted affine: canonical order is (x, y, z)
    affine = np.zeros((4, 4))
    affine[0, 1], affine[1, 2], affine[2, 0], affine[3, 3] = 2.0, 1.0, 3.0, 1.0
    vol = Volume(np.zeros((5, 6, 7), np.float32), affine, (3.0, 2.0, 1.0), "mem", "p-0000000000000000")
    shape, spacing, fov = geometry(vol)
    assert shape.tolist() == [6, 7, 5] and spacing.tolist() == [2.0, 1.0, 3.0]
    assert fov.tolist() == [12.0, 7.0, 15.0]
    assert geometry(vol, canonical=False)[2].tolist() == [15.0, 12.0, 7.0]


def paste(
    data: np.ndarray, fov: tuple[int, int, int], corner: tuple[int, int, int] | None, background: str
) -> np.ndarray:
    """``data`` placed into a larger field of view at ``corner`` (None: centred)."""
    if background == "zero":
        out = np.zeros(fov, np.float32)
    else:  # smooth tissue-like background at the volume's own intensity scale
        rng = np.random.default_rng(0)
        field = ndimage.gaussian_filter(rng.standard_normal(fov).astype(np.float32), 6.0)
        field = (field - field.min()) / (np.ptp(field) + 1e-9)
        out = (0.2 + 0.4 * field) * float(np.percentile(data, 99))
    if corner is None:
        corner = tuple((f - n) // 2 for f, n in zip(fov, data.shape, strict=True))  # type: ignore[assignment]
    sl = tuple(slice(c, c + n) for c, n in zip(corner, data.shape, strict=True))  # type: ignore[arg-type]
    out[sl] = data
    return out.astype(np.float32)


Placements = dict[str, tuple[tuple[int, int, int] | None, str]]
"""Candidate name -> (corner or None for centred, background) for :func:`write_pasted`."""


def write_pasted(data: np.ndarray, fov: tuple[int, int, int], cases: Placements, folder: Path) -> None:
    """Write ``pasted_<name>.nii.gz`` (1 mm, identity affine) into ``folder`` for every placement."""
    folder.mkdir(exist_ok=True)
    for name, (corner, background) in cases.items():
        pasted = paste(data, fov, corner, background)
        nib.save(nib.Nifti1Image(pasted, np.eye(4)), folder / f"pasted_{name}.nii.gz")


@pytest.mark.realdata
def test_large_candidates_are_refused_by_the_shipped_index(
    hippocampus_dir: Path, tmp_path: Path, shipped_models: None
) -> None:
    cand = tmp_path / "cand"
    cand.mkdir()
    source = nib.load(hippocampus_dir / "hippocampus_001.nii.gz")
    data = np.asarray(source.dataobj, dtype=np.float32)
    rng = np.random.default_rng(1)
    nib.save(
        nib.Nifti1Image(rng.normal(50, 10, LARGE_FOV).astype(np.float32), np.eye(4)), cand / "head.nii.gz"
    )
    cases: Placements = {
        "centre": (None, "zero"), "offset": ((30, 170, 90), "zero"), "tissue": ((120, 40, 20), "tissue")
    }  # fmt: skip
    write_pasted(data, LARGE_FOV, cases, cand)
    shutil.copy(hippocampus_dir / "hippocampus_001.nii.gz", cand / "copy.nii.gz")
    for policy in ("strict", "standard"):
        result = CliRunner().invoke(main, ["check", str(cand), "--policy", policy, "--device", "cpu"])
        assert result.exit_code == 3, result.output
        assert "checked 1: 0 pass, 0 flag, 1 reject; 4 unreadable" in result.output
        assert (
            result.output.count("outside the index's domain: it covers field of view 31-43 x 40-59 x 24-47")
            == 4
        )
        assert "found 256x256x160 voxels at 1x1x1 mm = 256x256x160 mm" in result.output


PARTIAL_FOV = (80, 112, 80)
"""A field of view 2-3x the hippocampus crops per axis, inside the shipped index's window field of view."""


@pytest.mark.realdata
def test_partial_copies_are_rejected_by_the_shipped_index(
    hippocampus_dir: Path, tmp_path: Path, shipped_models: None
) -> None:
    """hippocampus_001 (indexed) pasted into a larger field of view is judged on windows and rejected."""
    from gate.identity import Pseudonymizer, load_or_create_key
    from gate.report import DEMO_KEY_FILE
    from gate.volume import ReadOptions, read_volumes

    cand = tmp_path / "cand"
    path = hippocampus_dir / "hippocampus_001.nii.gz"
    (source,) = read_volumes(path, ReadOptions(Pseudonymizer(key=load_or_create_key(DEMO_KEY_FILE))))
    data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    cases: Placements = {
        "centre": (None, "zero"), "offset": ((44, 3, 41), "zero"), "tissue": ((2, 60, 37), "tissue")
    }  # fmt: skip
    write_pasted(data, PARTIAL_FOV, cases, cand)
    for policy in ("strict", "standard"):
        log = tmp_path / f"{policy}.jsonl"
        result = CliRunner(env={"GATE_AUDIT_LOG": str(log)}).invoke(
            main, ["check", str(cand), "--policy", policy, "--device", "cpu"]
        )
        assert result.exit_code == 1, result.output
        assert "checked 3: 0 pass, 0 flag, 3 reject" in result.output, result.output
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert [r["grade"] for r in records] == ["duplicate"] * 3
        assert {r["verified_patient_id"] for r in records} == {source.patient_id}
        assert min(r["verified"] for r in records) > 0.95


def test_verify_bundle_refuses_samples_outside_the_index_domain(tmp_path: Path) -> None:
    from gate.errors import ExitCode
    from gate.policy import load_policy
    from gate.publication import verify_bundle
    from tests.bundle_helpers import build_world

    world = build_world(tmp_path)
    training = world["training"]
    policy = load_policy(str(world["release"]))
    assert verify_bundle(world["good"], policy, training.index, training.encoder, world["log"]).exit_code == 0
    narrow = measure_domain([_vol((8, 8, 8))])  # the bundle's 16^3 samples are twice as large
    training.index.manifest = training.index.manifest.model_copy(update={"domain": narrow})
    report = verify_bundle(world["good"], policy, training.index, training.encoder, world["log"])
    assert report.exit_code is ExitCode.INPUT
    assert report.samples and all(s.verdict == "error" for s in report.samples)
    problems = [p for s in report.samples for p in s.problems]
    assert all(
        "outside the index's domain: it covers field of view 8-8 x 8-8 x 8-8 mm" in p for p in problems
    )
    assert all(str(world["good"]) not in p for p in problems)
