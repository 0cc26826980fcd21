from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from gate.dicom_series import read_dicom_series
from gate.errors import UsageError
from gate.exporters import EXPORTERS, DicomExporter, ExportRefusedError, NiftiExporter
from gate.exporters.dicom import DCIODVFY_ALLOWED_FINDINGS, WRITTEN_KEYWORDS, build_series
from gate.values import Decision, Grade, Verdict, Volume
from tests.volumes import make_blob

SECRET_SOURCE = "/data/train/Doe_Jane_case_017.nii.gz"
SECRET_PATIENT = "p-0123456789abcdef"


def volume(shape: tuple[int, int, int] = (16, 12, 8), affine: np.ndarray | None = None) -> Volume:
    if affine is None:
        affine = np.diag([1.0, 1.5, 2.0, 1.0])
        affine[:3, 3] = [10.0, -5.0, 3.0]
    return Volume(
        data=make_blob(shape, seed=3),
        affine=affine,
        spacing=tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),  # type: ignore[arg-type]
        source=SECRET_SOURCE,
        patient_id=SECRET_PATIENT,
    )


def decision(verdict: Verdict = Verdict.PASS, grade: Grade = Grade.DIFFERENT) -> Decision:
    return Decision(verdict, grade, "p-00000000000000aa", 0.31, 0.97, "release", "a" * 64)


def test_registry() -> None:
    assert EXPORTERS == {"nifti": NiftiExporter, "dicom": DicomExporter}


def test_nifti_round_trip(tmp_path: Path) -> None:
    vol = volume()
    (path,) = NiftiExporter().write(vol, decision(), "s-001", tmp_path)
    assert path == tmp_path / "s-001.nii.gz"
    img = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.data)
    np.testing.assert_allclose(img.affine, vol.affine)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-001.nii.gz"]  # no temporary file left


def test_dicom_round_trip_geometry_and_identity(tmp_path: Path) -> None:
    vol = volume()
    files = DicomExporter().write(vol, decision(), "s-001", tmp_path)
    assert len(files) == vol.shape[2] and all(f.parent == tmp_path / "s-001_dicom" for f in files)
    data, affine, label = read_dicom_series(tmp_path / "s-001_dicom")
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert np.max(np.abs(data - vol.data)) <= slope / 2 + 1e-6
    np.testing.assert_allclose(affine, vol.affine, atol=1e-4)
    assert label == "SYN-s-001"
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert ds.SyntheticData == "YES" and ds.PatientIdentityRemoved == "YES"
    assert str(ds.PatientName) == "Synthetic^s-001"
    purpose = ds.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "109100",
        "DCM",
        "Synthesizing Equipment",
    )


def test_dicom_uids_fresh_per_sample_and_shared_within(tmp_path: Path) -> None:
    a = [pydicom.dcmread(f) for f in DicomExporter().write(volume(), decision(), "a", tmp_path)]
    b = [pydicom.dcmread(f) for f in DicomExporter().write(volume(), decision(), "b", tmp_path)]
    for series in (a, b):
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            assert len({str(ds.data_element(key).value) for ds in series}) == 1
        assert len({str(ds.SOPInstanceUID) for ds in series}) == len(series)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert str(a[0].data_element(key).value) != str(b[0].data_element(key).value)


def test_dicom_holds_only_attributes_made_by_the_exporter(tmp_path: Path) -> None:
    files = DicomExporter().write(volume(), decision(), "s-001", tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        assert {e.keyword for e in ds.iterall()} <= WRITTEN_KEYWORDS
        raw = f.read_bytes()
        assert SECRET_PATIENT.encode() not in raw and b"Doe_Jane" not in raw and b"case_017" not in raw


def dciodvfy_findings(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (out.stdout + out.stderr).splitlines()
    return [
        ln for ln in lines if re.match(r"^\s*(\(.*\)\s+\?\s+- )?(Error|Warning)", ln) or " - Warning - " in ln
    ]


def unexplained(findings: list[str]) -> list[str]:
    return [f for f in findings if not any(re.search(p, f) for p in DCIODVFY_ALLOWED_FINDINGS)]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) not installed")
def test_dciodvfy_reports_only_documented_findings(tmp_path: Path) -> None:
    files = DicomExporter().write(volume(), decision(), "s-001", tmp_path)
    for f in (files[0], files[-1]):
        findings = dciodvfy_findings(f)
        assert findings, "dciodvfy printed nothing: is the parser of its output broken?"
        assert unexplained(findings) == []
    # the filter is not vacuous: a file missing a required attribute is reported
    ds = pydicom.dcmread(files[0])
    del ds.PatientID
    del ds.Modality
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken, enforce_file_format=True)
    assert any("Modality" in f for f in unexplained(dciodvfy_findings(broken)))


@pytest.mark.parametrize("exporter", [NiftiExporter(), DicomExporter()], ids=["nifti", "dicom"])
@pytest.mark.parametrize(
    ("verdict", "grade"), [(Verdict.REJECT, Grade.DUPLICATE), (Verdict.FLAG, Grade.SIMILAR)]
)
def test_refuses_anything_but_pass(tmp_path: Path, exporter: object, verdict: Verdict, grade: Grade) -> None:
    with pytest.raises(
        ExportRefusedError,
        match=re.escape(
            f"sample s-001: decision is {verdict.value} ({grade.value}, similarity 0.3100, threshold 0.9700, "
            "policy release); only a pass may be exported"
        ),
    ):
        exporter.write(volume(), decision(verdict, grade), "s-001", tmp_path)  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exporter", [NiftiExporter(), DicomExporter()], ids=["nifti", "dicom"])
def test_refuses_to_overwrite(tmp_path: Path, exporter: object) -> None:
    first = exporter.write(volume(), decision(), "s-001", tmp_path)  # type: ignore[attr-defined]
    before = {p: p.read_bytes() for p in first}
    target = exporter.target("s-001", tmp_path)  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match=re.escape(f"{target}: already exists; exporters never overwrite")):
        exporter.write(volume(), decision(), "s-001", tmp_path)  # type: ignore[attr-defined]
    assert {p: p.read_bytes() for p in first} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad", ["../escape", "", "a/b", "x" * 57, ".hidden"])
def test_refuses_unsafe_sample_ids(tmp_path: Path, bad: str) -> None:
    with pytest.raises(
        UsageError, match=re.escape(f"sample id {bad!r} is not allowed; expected 1-56 letters")
    ):
        NiftiExporter().write(volume(), decision(), bad, tmp_path)


def test_dicom_refuses_shear(tmp_path: Path) -> None:
    affine = np.eye(4)
    affine[0, 1] = 0.5
    with pytest.raises(ValueError, match="affine axes are not orthogonal \\(shear\\)"):
        DicomExporter().write(volume(affine=affine), decision(), "s-001", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_dicom_oblique_geometry_round_trips(tmp_path: Path) -> None:
    theta = np.deg2rad(20)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.8, 1.2, 2.5])
    affine[:3, 3] = [-20.0, 4.0, 7.5]
    vol = volume(affine=affine)
    DicomExporter().write(vol, decision(), "obl", tmp_path)
    _, back, _ = read_dicom_series(tmp_path / "obl_dicom")
    np.testing.assert_allclose(back, affine, atol=1e-4)


def test_build_series_validates_each_slice() -> None:
    series = build_series(volume(), decision(), "s-001")
    assert [int(ds.InstanceNumber) for ds in series] == list(range(1, 9))
    assert all(len(ds.PixelData) == 16 * 12 * 2 for ds in series)


@pytest.mark.realdata
def test_real_volume_exports_and_round_trips(
    hippocampus_dir: Path, read_opts: object, tmp_path: Path
) -> None:
    from gate.volume import read_volumes

    vol = read_volumes(hippocampus_dir / "hippocampus_003.nii.gz", read_opts)[0]  # type: ignore[arg-type]
    (nii,) = NiftiExporter().write(vol, decision(), "real", tmp_path)
    np.testing.assert_array_equal(np.asanyarray(nib.load(nii).dataobj), vol.data)
    files = DicomExporter().write(vol, decision(), "real", tmp_path)
    data, affine, _ = read_dicom_series(tmp_path / "real_dicom")
    slope = float(pydicom.dcmread(files[0]).RescaleSlope)
    assert np.max(np.abs(data - vol.data)) <= slope / 2 + 1e-3
    np.testing.assert_allclose(affine, vol.affine, atol=1e-4)
    if shutil.which("dciodvfy"):
        assert unexplained(dciodvfy_findings(files[len(files) // 2])) == []
