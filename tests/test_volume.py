from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from gate.errors import InputError
from gate.identity import Pseudonymizer
from gate.volume import ReadOptions, discover, read_volumes
from tests.conftest import TEST_KEY
from tests.volumes import make_blob, write_nifti


def _one_line(err: pytest.ExceptionInfo[InputError]) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_nifti_roundtrip(tmp_path: Path, read_opts: ReadOptions) -> None:
    data = make_blob()
    affine = np.diag([2.0, 1.5, 1.0, 1.0])
    (vol,) = read_volumes(write_nifti(tmp_path / "a.nii.gz", data, affine), read_opts)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    assert vol.spacing == (2.0, 1.5, 1.0)
    assert re.fullmatch(r"p-[0-9a-f]{16}", vol.patient_id)
    assert "a.nii" not in vol.patient_id


def test_nifti_trailing_singleton_axis_is_3d(tmp_path: Path, read_opts: ReadOptions) -> None:
    (vol,) = read_volumes(write_nifti(tmp_path / "a.nii", make_blob()[..., None]), read_opts)
    assert vol.shape == (16, 16, 16)


def test_truncated_nifti(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = write_nifti(tmp_path / "t.nii.gz", make_blob())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"t\.nii\.gz: cannot read NIfTI: truncated or corrupt file") as err:
        read_volumes(path, read_opts)
    assert _one_line(err).startswith(str(path))


def test_corrupt_nifti(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "c.nii"
    path.write_bytes(b"not a nifti header at all" * 20)
    with pytest.raises(InputError, match=r"c\.nii: cannot read NIfTI: truncated or corrupt file"):
        read_volumes(path, read_opts)


def test_corrupt_gzip_nifti(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "g.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 10))
    with pytest.raises(InputError, match=r"g\.nii\.gz: cannot read NIfTI: truncated or corrupt file"):
        read_volumes(path, read_opts)


def test_not_3d(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "flat.npy"
    np.save(path, np.ones((8, 8), dtype=np.float32))
    with pytest.raises(InputError, match=re.escape(f"{path}: expected a 3D volume, found shape (8, 8)")):
        read_volumes(path, read_opts)


def test_4d_not_singleton(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = write_nifti(tmp_path / "four.nii.gz", np.random.default_rng(0).random((4, 4, 4, 2)).astype("f4"))
    with pytest.raises(InputError, match=re.escape("expected a 3D volume, found shape (4, 4, 4, 2)")):
        read_volumes(path, read_opts)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(tmp_path: Path, read_opts: ReadOptions, bad: float) -> None:
    data = make_blob()
    data[3, 4, 5] = bad
    path = write_nifti(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InputError, match=re.escape(f"{path}: voxels contain NaN or Inf (1 of 4096)")):
        read_volumes(path, read_opts)


def test_empty(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0, 4, 4), dtype=np.float32))
    with pytest.raises(InputError, match=re.escape(f"{path}: empty volume (shape (0, 4, 4))")):
        read_volumes(path, read_opts)


def test_constant(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = write_nifti(tmp_path / "const.nii.gz", np.full((8, 8, 8), 7.0, dtype=np.float32))
    with pytest.raises(InputError, match=re.escape(f"{path}: constant volume (every voxel is 7)")):
        read_volumes(path, read_opts)


def test_voxel_limit(tmp_path: Path, pseudonymizer: Pseudonymizer) -> None:
    path = write_nifti(tmp_path / "big.nii.gz", make_blob())
    opts = ReadOptions(pseudonymizer=pseudonymizer, max_voxels=1000)
    with pytest.raises(
        InputError,
        match=re.escape(f"{path}: volume has 4096 voxels, more than the limit of 1000 (raise --max-voxels)"),
    ):
        read_volumes(path, opts)


def test_unsupported_extension(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "scan.mha"
    path.write_bytes(b"x")
    with pytest.raises(InputError, match=re.escape(f"{path}: unsupported extension '.mha' (expected .nii")):
        read_volumes(path, read_opts)


def test_unsupported_file_in_folder_is_not_skipped(tmp_path: Path, read_opts: ReadOptions) -> None:
    write_nifti(tmp_path / "ok.nii.gz", make_blob())
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden").write_text("ignored")
    sources = discover([tmp_path])
    assert sources == [tmp_path / "notes.txt", tmp_path / "ok.nii.gz"]
    with pytest.raises(InputError, match=r"notes\.txt: unsupported extension '\.txt'"):
        read_volumes(sources[0], read_opts)


def test_discover_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope: no such file or folder"):
        discover([tmp_path / "nope"])


def test_discover_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"folder holds no readable volume"):
        discover([tmp_path])


def test_truncated_npy(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "t.npy"
    np.save(path, make_blob())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(InputError, match=r"t\.npy: cannot read NumPy file: truncated or corrupt"):
        read_volumes(path, read_opts)


def test_medmnist_npz_splits_into_volumes(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "organmnist3d.npz"
    stack = np.stack([make_blob((8, 8, 8), seed=i) for i in range(3)])
    np.savez(path, train_images=stack.astype(np.uint8), train_labels=np.arange(3))
    vols = read_volumes(path, read_opts)
    assert [v.source for v in vols] == [f"{path}#train_images[{i}]" for i in range(3)]
    assert len({v.patient_id for v in vols}) == 3
    np.testing.assert_array_equal(vols[1].data, stack[1].astype(np.uint8).astype(np.float32))


def test_same_patient_from_mapping_and_pattern(tmp_path: Path) -> None:
    a = write_nifti(tmp_path / "sub-01_scanA.nii.gz", make_blob(seed=1))
    b = write_nifti(tmp_path / "sub-01_scanB.nii.gz", make_blob(seed=2))
    c = write_nifti(tmp_path / "sub-02_scanA.nii.gz", make_blob(seed=3))
    by_pattern = Pseudonymizer(key=TEST_KEY, pattern=re.compile(r"(?P<patient>sub-\d+)_"))
    ids = [read_volumes(p, ReadOptions(by_pattern))[0].patient_id for p in (a, b, c)]
    assert ids[0] == ids[1] != ids[2]
    by_map = Pseudonymizer(key=TEST_KEY, mapping={a.name: "X", c.name: "X"})
    ids = [read_volumes(p, ReadOptions(by_map))[0].patient_id for p in (a, b, c)]
    assert ids[0] == ids[2] != ids[1]


# ---------------------------------------------------------------- DICOM series


def _write_slice(
    folder: Path, z: int, pixels: np.ndarray, series_uid: str, patient_id: str = "PAT-0001"
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"slice_{series_uid[-4:]}_{z:03d}.dcm"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.Modality = "MR"
    ds.ImagePositionPatient = [0.0, 0.0, float(z) * 2.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.75]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -10
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _series(folder: Path, n: int = 5, uid: str | None = None) -> np.ndarray:
    uid = uid or generate_uid()
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 1000, size=(n, 6, 7))
    for z in rng.permutation(n):  # written in shuffled order: reader must sort by position
        _write_slice(folder, int(z), stack[z], uid)
    return stack


def test_dicom_series_sorted_and_scaled(tmp_path: Path, read_opts: ReadOptions) -> None:
    stack = _series(tmp_path)
    assert discover([tmp_path]) == [tmp_path]
    (vol,) = read_volumes(tmp_path, read_opts)
    assert vol.shape == (7, 6, 5)  # (X=columns, Y=rows, Z=slices)
    np.testing.assert_allclose(vol.data, np.transpose(stack, (2, 1, 0)) * 2 - 10)
    assert vol.spacing == pytest.approx((0.75, 0.5, 2.0))
    assert vol.patient_id == read_opts.pseudonymizer.pseudonym("PAT-0001")
    assert "PAT-0001" not in repr(vol.__dict__.values())


def test_dicom_mixed_series_lists_uids(tmp_path: Path, read_opts: ReadOptions) -> None:
    _series(tmp_path, n=2, uid="1.2.3.4.1111")
    _series(tmp_path, n=2, uid="1.2.3.4.2222")
    with pytest.raises(
        InputError, match=re.escape(f"{tmp_path}: DICOM folder mixes 2 series: 1.2.3.4.1111, 1.2.3.4.2222")
    ):
        read_volumes(tmp_path, read_opts)


def test_dicom_truncated_slice(tmp_path: Path, read_opts: ReadOptions) -> None:
    _series(tmp_path, n=3)
    victim = sorted(tmp_path.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:300])
    expected = f"{victim}: cannot read DICOM: truncated or corrupt file"
    with pytest.raises(InputError, match=re.escape(expected)):
        read_volumes(tmp_path, read_opts)


@pytest.mark.realdata
def test_reads_real_hippocampus(hippocampus_dir: Path, read_opts: ReadOptions) -> None:
    files = sorted(hippocampus_dir.glob("*.nii.gz"))[:3]
    vols = [v for f in files for v in read_volumes(f, read_opts)]
    assert len(vols) == 3
    assert all(v.spacing == (1.0, 1.0, 1.0) for v in vols)
    assert all(24 <= min(v.shape) and max(v.shape) <= 59 for v in vols)
    _ = pydicom  # pydicom is exercised by the DICOM tests above


@pytest.mark.parametrize("klass", ["Nifti1Image", "Nifti2Image"])
@pytest.mark.parametrize("order", ["<", ">"])
def test_nifti_1_and_2_either_byte_order(
    tmp_path: Path, read_opts: ReadOptions, klass: str, order: str
) -> None:
    import nibabel as nib

    data = make_blob()
    affine = np.diag([0.8, 1.2, 3.0, 1.0])
    cls = getattr(nib, klass)
    img = cls(data, affine, header=cls.header_class(endianness=order))
    img.header.set_slope_inter(2.0, -5.0)
    path = tmp_path / f"{klass}{'be' if order == '>' else 'le'}.nii.gz"
    nib.save(img, path)
    size = 348 if klass == "Nifti1Image" else 540
    assert gzip.decompress(path.read_bytes())[:4] == size.to_bytes(4, "little" if order == "<" else "big")
    (vol,) = read_volumes(path, read_opts)
    np.testing.assert_allclose(vol.data, data * 2.0 - 5.0, rtol=1e-5)
    assert vol.spacing == pytest.approx((0.8, 1.2, 3.0))
