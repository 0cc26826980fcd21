"""A verifying index end to end: build, check (local, sharded, Ray), and refusal of edited grids."""

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

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Indexes of 10 real training volumes: verifying (compact poses), sharded, and --no-verify."""
    from tests.conftest import HIPPOCAMPUS_DIR

    files = sorted((HIPPOCAMPUS_DIR / "imagesTr").glob("*.nii.gz"))[:12]
    if len(files) < 12:
        pytest.skip("real data not found")
    root = tmp_path_factory.mktemp("verify")
    train = root / "train"
    train.mkdir()
    for f in files[:10]:
        (train / f.name).symlink_to(f)
    runner = CliRunner(env={"GATE_ID_KEY_FILE": str(root / "key")})
    outputs = {}
    for name, extra in (("verify", []), ("sharded", ["--shards", "2"]), ("plain", ["--no-verify"])):
        args = [
            "index",
            "build",
            "--data",
            str(train),
            "--out",
            str(root / name),
            "--poses",
            "compact",
            *extra,
        ]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        outputs[name] = result.output
    (root / "build_output.json").write_text(json.dumps(outputs))
    return {"root": root, "files": files, **{n: root / n for n in ("verify", "sharded", "plain")}}  # type: ignore[dict-item]


def _copies(files: list[Path], out: Path) -> Path:
    """A training volume cut short by 3 voxels and blurred; another turned 8 degrees and shifted."""
    out.mkdir(exist_ok=True)
    for i, f in enumerate(files[:2]):
        src = nib.load(f)
        data = np.asarray(src.dataobj, dtype=np.float32)
        if i == 0:
            data = ndimage.gaussian_filter(data[3:], 1.0)
        else:
            data = ndimage.rotate(data, 8.0, axes=(0, 2), reshape=False, order=1)
            data = ndimage.shift(data, (0, 3, -2), order=1)
        nib.save(nib.Nifti1Image(data, src.affine), out / f"copy_{i}.nii.gz")
    return out


def _check(
    built: dict[str, Path], index: str, cand: Path, log: Path, *extra: str
) -> tuple[int, str, list[dict]]:
    env = {"GATE_ID_KEY_FILE": str(built["root"] / "key"), "GATE_AUDIT_LOG": str(log)}
    args = ["check", str(cand), "--index", str(built[index]), "--policy", "standard", *extra]
    result = CliRunner(env=env).invoke(main, args)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result.exit_code, result.output, rows


def test_build_records_verification_and_prints_policy_rates(built: dict[str, Path]) -> None:
    manifest = json.loads((built["verify"] / "manifest.json").read_text())
    v = manifest["verification"]
    assert v["max_shift_vox"] == 8 and v["calibration"]["n_patients"] == 10
    assert v["copies"]["method"] == "simulated_copies" and v["copies"]["n_patients"] == 20
    grids = np.load(built["verify"] / "grids.npy")
    assert grids.dtype == np.float16 and grids.shape == (10, 32, 48, 32)
    assert np.isfinite(grids).any(axis=(1, 2, 3)).all()
    assert json.loads((built["plain"] / "manifest.json").read_text())["verification"] is None
    assert not (built["plain"] / "grids.npy").exists()
    out = json.loads((built["root"] / "build_output.json").read_text())
    for policy in ("permissive", "standard", "strict"):
        assert f"policy {policy}: blocks " in out["verify"]
    assert "verification: off (--no-verify)" in out["plain"]


def test_verified_copies_are_rejected_with_the_verified_score_on_record(
    built: dict[str, Path], tmp_path: Path
) -> None:
    cand = _copies(built["files"], tmp_path / "cand")  # type: ignore[arg-type]
    code, out, rows = _check(built, "verify", cand, tmp_path / "v.jsonl")
    assert code == 1, out
    assert "checked 2: 0 pass" in out, out
    for row in rows:
        assert row["verdict"] in ("reject", "flag")
        assert row["verified"] is not None and row["verified"] >= row["verified_similar_threshold"]
        assert row["verified_patient_id"] is not None
    _, _, plain = _check(built, "plain", cand, tmp_path / "p.jsonl")
    assert all(r["verified"] is None for r in plain)


def test_sharded_and_ray_verify_like_a_single_index(built: dict[str, Path], tmp_path: Path) -> None:
    cand = _copies(built["files"], tmp_path / "cand")  # type: ignore[arg-type]
    (cand / "novel.nii.gz").symlink_to(built["files"][11])  # type: ignore[index]
    keys = ("verdict", "grade", "nearest_patient_id", "verified_patient_id")
    _, _, base = _check(built, "verify", cand, tmp_path / "a.jsonl")
    _, _, sharded = _check(built, "sharded", cand, tmp_path / "b.jsonl")
    assert [{k: r[k] for k in keys} for r in base] == [{k: r[k] for k in keys} for r in sharded]
    np.testing.assert_allclose([r["verified"] for r in base], [r["verified"] for r in sharded], atol=1e-6)
    pytest.importorskip("ray")
    _, out, ray_rows = _check(
        built, "verify", cand, tmp_path / "c.jsonl", "--engine", "ray", "--workers", "1"
    )
    assert [{k: r[k] for k in keys} for r in base] == [{k: r[k] for k in keys} for r in ray_rows], out
    np.testing.assert_allclose([r["verified"] for r in base], [r["verified"] for r in ray_rows], atol=1e-5)


def test_edited_missing_or_unaccounted_grids_are_refused(built: dict[str, Path], tmp_path: Path) -> None:
    cand = tmp_path / "cand"
    cand.mkdir()
    (cand / "x.nii.gz").symlink_to(built["files"][11])  # type: ignore[index]
    edited = tmp_path / "edited"
    shutil.copytree(built["verify"], edited)
    grids = np.load(edited / "grids.npy")
    grids[0] = grids[1]  # swap a patient's voxels, keep the shape
    np.save(edited / "grids.npy", grids)
    built["edited"] = edited
    code, out, _ = _check(built, "edited", cand, tmp_path / "e.jsonl")
    assert code == 3 and "grids.npy: sha256" in out and "does not match the manifest" in out, out
    (edited / "grids.npy").unlink()
    code, out, _ = _check(built, "edited", cand, tmp_path / "f.jsonl")
    assert code == 3 and "grids.npy: missing" in out, out
    foreign = tmp_path / "foreign"
    shutil.copytree(built["plain"], foreign)
    shutil.copyfile(built["verify"] / "grids.npy", foreign / "grids.npy")
    built["foreign"] = foreign
    code, out, _ = _check(built, "foreign", cand, tmp_path / "g.jsonl")
    assert code == 3 and "the manifest records no verification" in out, out
