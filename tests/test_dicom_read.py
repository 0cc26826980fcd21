"""DICOM as scanners write it: geometry, rescale, enhanced multi-frame, compressed syntaxes.

Geometry is checked against the DICOM standard's own mapping (PS3.3 C.7.6.2.1-1): the centre of
pixel (column i, row j) of a slice lies at ``IPP + i * dc * row_cos + j * dr * col_cos`` (LPS, mm),
which gate's RAS affine must reproduce for every slice.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from gate.errors import InputError
from gate.volume import ReadOptions, discover, read_volumes

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _base(path: Path, sop_class: str, rows: int, cols: int) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = "PAT-DICOM"
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _rotation(degrees: float, axis: int) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def write_series(
    folder: Path,
    stack: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.5, 0.5),
    step: float = 2.0,
    thickness: float | None = None,
    rotation: np.ndarray | None = None,
    origin: tuple[float, float, float] = (-20.0, 30.0, 5.0),
    slopes: list[float] | None = None,
    intercept: float = 0.0,
    skip: tuple[int, ...] = (),
) -> list[np.ndarray]:
    """Write ``stack`` (Z, rows, cols) as one slice per file, files named in reverse order.

    Returns:
        The ImagePositionPatient of every slice written (LPS, mm).

    """
    rot = np.eye(3) if rotation is None else rotation
    row_cos, col_cos = rot[:, 0], rot[:, 1]
    normal = np.cross(row_cos, col_cos)
    uid = generate_uid()
    positions = []
    for z in range(stack.shape[0]):
        if z in skip:
            continue
        path = folder / f"img{stack.shape[0] - z:04d}.dcm"
        ds = _base(path, MRImageStorage, *stack.shape[1:])
        ds.SeriesInstanceUID = uid
        ipp = np.asarray(origin) + z * step * normal
        positions.append(ipp)
        ds.ImagePositionPatient = [float(v) for v in ipp]
        ds.ImageOrientationPatient = [float(v) for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = thickness if thickness is not None else step
        ds.SpacingBetweenSlices = step
        ds.RescaleSlope = slopes[z] if slopes else 1
        ds.RescaleIntercept = intercept
        ds.PixelData = stack[z].astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    return positions


def _assert_geometry(
    affine: np.ndarray, positions: list[np.ndarray], rot: np.ndarray, spacing: tuple[float, float]
) -> None:
    """gate's RAS affine against the standard's pixel-to-patient mapping, for every slice."""
    dr, dc = spacing
    for k, ipp in enumerate(positions):
        for i, j in ((0, 0), (3, 0), (0, 2), (5, 4)):
            lps = ipp + i * dc * rot[:, 0] + j * dr * rot[:, 1]
            np.testing.assert_allclose(affine @ [i, j, k, 1], LPS_TO_RAS @ [*lps, 1], atol=1e-6)


def test_submillimetre_pixels_thick_gapped_slices(tmp_path: Path, read_opts: ReadOptions) -> None:
    stack = np.random.default_rng(0).integers(0, 4000, size=(6, 8, 10))
    positions = write_series(tmp_path, stack, pixel_spacing=(0.43, 0.43), step=6.5, thickness=5.0)
    (vol,) = read_volumes(tmp_path, read_opts)
    assert vol.shape == (10, 8, 6)
    assert vol.spacing == pytest.approx((0.43, 0.43, 6.5))  # the step between slices, not the thickness
    np.testing.assert_array_equal(vol.data, np.transpose(stack, (2, 1, 0)).astype(np.float32))
    _assert_geometry(vol.affine, positions, np.eye(3), (0.43, 0.43))


def test_oblique_orientation(tmp_path: Path, read_opts: ReadOptions) -> None:
    rot = _rotation(30.0, 0) @ _rotation(-20.0, 2)
    stack = np.random.default_rng(1).integers(0, 4000, size=(5, 6, 7))
    positions = write_series(tmp_path, stack, pixel_spacing=(0.8, 0.6), step=3.0, rotation=rot)
    (vol,) = read_volumes(tmp_path, read_opts)
    assert vol.spacing == pytest.approx((0.6, 0.8, 3.0))
    _assert_geometry(vol.affine, positions, rot, (0.8, 0.6))
    # nibabel's reading of the same affine: the voxel axes' world directions
    ornt = nibabel.orientations.io_orientation(vol.affine)
    assert ornt.shape == (3, 2)


def test_rescale_slope_and_intercept_per_slice(tmp_path: Path, read_opts: ReadOptions) -> None:
    stack = np.random.default_rng(2).integers(0, 4000, size=(4, 5, 6))
    slopes = [0.5, 1.0, 2.0, 0.25]
    write_series(tmp_path, stack, slopes=slopes, intercept=-1024.0)
    (vol,) = read_volumes(tmp_path, read_opts)
    expected = np.stack([stack[z] * slopes[z] - 1024.0 for z in range(4)])
    np.testing.assert_allclose(vol.data, np.transpose(expected, (2, 1, 0)))


def test_missing_slice_refused(tmp_path: Path, read_opts: ReadOptions) -> None:
    write_series(tmp_path, np.ones((5, 4, 4)) * np.arange(4), step=2.0, skip=(2,))
    with pytest.raises(
        InputError,
        match=re.escape(f"{tmp_path}: DICOM slice steps are not uniform (2 to 4 mm): a slice is missing"),
    ):
        read_volumes(tmp_path, read_opts)


def test_single_slice_is_not_a_volume(tmp_path: Path, read_opts: ReadOptions) -> None:
    write_series(tmp_path, np.arange(16).reshape(1, 4, 4))
    (only,) = tmp_path.iterdir()
    expected = "a single 2D DICOM image (4x4), not a 3D volume; give the folder of its series"
    with pytest.raises(InputError, match=re.escape(f"{only}: {expected}")):
        read_volumes(tmp_path, read_opts)
    with pytest.raises(InputError, match=re.escape(f"{only}: {expected}")):
        read_volumes(only, read_opts)


def _enhanced(
    path: Path, stack: np.ndarray, order: list[int], rot: np.ndarray, step: float
) -> list[np.ndarray]:
    """An Enhanced MR object: frames stored in ``order``, geometry in per-frame groups, rescale shared."""
    ds = _base(path, EnhancedMRImageStorage, *stack.shape[1:])
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = len(order)
    normal = np.cross(rot[:, 0], rot[:, 1])
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [float(v) for v in (*rot[:, 0], *rot[:, 1])]
    measures = Dataset()
    measures.PixelSpacing = [0.7, 0.9]
    measures.SliceThickness = 1.0
    transform = Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 3, 100
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    groups, positions = [], {}
    for z in order:
        pos = Dataset()
        ipp = np.array([10.0, -5.0, 40.0]) + z * step * normal
        positions[z] = ipp
        pos.ImagePositionPatient = [float(v) for v in ipp]
        group = Dataset()
        group.PlanePositionSequence = Sequence([pos])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.PixelData = np.ascontiguousarray(stack[order]).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return [positions[z] for z in sorted(positions)]


def test_enhanced_multiframe(tmp_path: Path, read_opts: ReadOptions) -> None:
    stack = np.random.default_rng(3).integers(0, 4000, size=(6, 5, 7))
    rot = _rotation(15.0, 1)
    path = tmp_path / "enhanced.dcm"
    positions = _enhanced(path, stack, [3, 0, 5, 1, 4, 2], rot, step=2.5)
    for source in (path, tmp_path):  # the file, or the folder holding it
        (vol,) = read_volumes(source, read_opts)
        assert vol.shape == (7, 5, 6)
        assert vol.spacing == pytest.approx((0.9, 0.7, 2.5))
        np.testing.assert_allclose(vol.data, np.transpose(stack * 3 + 100, (2, 1, 0)))
        _assert_geometry(vol.affine, positions, rot, (0.7, 0.9))
    assert discover([tmp_path]) == [tmp_path]


def test_enhanced_single_frame_is_not_a_volume(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "one.dcm"
    _enhanced(path, np.ones((1, 4, 4)) * np.arange(4), [0], np.eye(3), step=1.0)
    with pytest.raises(
        InputError, match=re.escape(f"{path}: a single 2D DICOM image (4x4), not a 3D volume")
    ):
        read_volumes(path, read_opts)


def _testdata(name: str) -> Path:
    found = [p for p in _library_files() if p.name == name]
    if not found:
        pytest.skip(f"pydicom test file {name} not installed (pydicom-data holds it)")
    return found[0]


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (pylibjpeg-libjpeg)
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless (pylibjpeg-openjpeg)
        "MR_small_RLE.dcm",  # RLE lossless (pydicom itself)
    ],
)
def test_compressed_series_decodes_like_uncompressed(
    name: str, tmp_path: Path, read_opts: ReadOptions
) -> None:
    reference = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array
    source = pydicom.dcmread(_testdata(name))
    uid = generate_uid()
    for z in range(3):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 4.0 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(tmp_path / f"{z}.dcm", enforce_file_format=True)
    (vol,) = read_volumes(tmp_path, read_opts)
    assert vol.shape == (64, 64, 3) and vol.spacing == pytest.approx((0.3125, 0.3125, 4.0))
    for z in range(3):
        np.testing.assert_array_equal(vol.data[..., z], reference.T.astype(np.float32))


def test_jpeg_lossless_series(tmp_path: Path, read_opts: ReadOptions) -> None:
    source = pydicom.dcmread(_testdata("JPEG-LL.dcm"))  # JPEG lossless process 14 (pylibjpeg-libjpeg)
    reference = source.pixel_array
    uid = generate_uid()
    for z in range(2):
        ds = copy.deepcopy(source)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0.0, 0.0, 3.0 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(tmp_path / f"{z}.dcm", enforce_file_format=True)
    (vol,) = read_volumes(tmp_path, read_opts)
    slope, intercept = float(source.get("RescaleSlope", 1)), float(source.get("RescaleIntercept", 0))
    np.testing.assert_allclose(vol.data[..., 1], (reference * slope + intercept).T)


def test_rt_dose_grid_placed_by_frame_offsets(read_opts: ReadOptions) -> None:
    path = _testdata("rtdose.dcm")
    ds = pydicom.dcmread(path)
    (vol,) = read_volumes(path, read_opts)
    assert vol.shape == (int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames))
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert vol.spacing[2] == pytest.approx(abs(offsets[1] - offsets[0]))
    np.testing.assert_allclose(vol.data[..., 0], (ds.pixel_array[0] * float(ds.DoseGridScaling)).T, rtol=1e-6)


# ------------------------------------------------------------- sweep of the libraries' test data


def _library_files() -> list[Path]:
    """Every file of pydicom's bundled test data, of pydicom-data's (if installed) and of nibabel's
    test-data folders, found on disk (``get_testdata_files`` would try to download the rest)."""
    folders = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # pydicom-data's package

        folders.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    root = Path(nibabel.__file__).parent
    folders.extend(sorted(d for d in root.rglob("data") if d.is_dir() and "tests" in d.parts))
    return [p for d in folders if d.is_dir() for p in sorted(d.rglob("*")) if p.is_file()]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_library_test_file_is_read_or_refused_in_one_line(read_opts: ReadOptions) -> None:
    files = _library_files()
    if not files:
        pytest.skip("neither pydicom's nor nibabel's test data is installed")
    read, refused = [], {}
    for path in files:
        try:
            vols = read_volumes(path, read_opts)
        except InputError as err:
            assert "\n" not in str(err), path
            assert str(err).startswith(str(path)), path  # the file, or a file in the folder
            refused[path.name] = str(err)
        else:
            assert all(v.data.ndim == 3 and min(v.shape) >= 2 for v in vols), path
            read.append(path.name)
    # real volumes among them are read: NIfTI anatomy, the RT dose grid
    assert {"anatomical.nii", "rtdose.dcm"} <= set(read)
    if "CT_small.dcm" in refused:  # a single 2D slice is not a volume
        assert "a single 2D DICOM image (128x128), not a 3D volume" in refused["CT_small.dcm"]
    if "row_major.dconn.nii" in refused:  # CIFTI-2: was exit 4 ('Cifti2Image' has no affine)
        assert (
            "a CIFTI-2 file (surface / grayordinate data), not a 3D volume" in refused["row_major.dconn.nii"]
        )


def test_oblique_gapped_series_matches_simpleitk(tmp_path: Path, read_opts: ReadOptions) -> None:
    sitk = pytest.importorskip("SimpleITK")
    rot = _rotation(25.0, 0) @ _rotation(10.0, 1)
    stack = np.random.default_rng(4).integers(0, 4000, size=(5, 9, 11))
    write_series(
        tmp_path, stack, pixel_spacing=(0.43, 0.47), step=6.5, thickness=5.0, rotation=rot, slopes=[2.0] * 5
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    (vol,) = read_volumes(tmp_path, read_opts)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    sitk_lps = np.eye(4)
    sitk_lps[:3, :3] = direction * np.asarray(image.GetSpacing())
    sitk_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(vol.affine, LPS_TO_RAS @ sitk_lps, atol=1e-4)
    np.testing.assert_allclose(vol.data, np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)))


def test_dicom_folder_subfolders_are_walked_not_skipped(tmp_path: Path) -> None:
    write_series(tmp_path, np.ones((3, 4, 4)) * np.arange(4))
    (tmp_path / "more").mkdir()
    write_series(tmp_path / "more", np.ones((3, 4, 4)) * np.arange(4))
    assert discover([tmp_path]) == [tmp_path, tmp_path / "more"]


def test_dicom_folder_with_a_symlink_loop_or_fifo_refused(tmp_path: Path, read_opts: ReadOptions) -> None:
    write_series(tmp_path, np.ones((3, 4, 4)) * np.arange(4))
    loop = tmp_path / "zz.dcm"
    loop.symlink_to(loop)
    with pytest.raises(
        InputError, match=re.escape(f"{loop}: cannot open (Too many levels of symbolic links)")
    ):
        read_volumes(tmp_path, read_opts)
    loop.unlink()
    fifo = tmp_path / "zz.dcm"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=re.escape(f"{fifo}: not a regular file (a device, FIFO or socket)")):
        read_volumes(tmp_path, read_opts)


def test_series_over_the_voxel_limit_refused_from_headers(tmp_path: Path, pseudonymizer: object) -> None:
    write_series(tmp_path, np.ones((4, 8, 8)) * np.arange(8))
    opts = ReadOptions(pseudonymizer=pseudonymizer, max_voxels=200)  # type: ignore[arg-type]
    with pytest.raises(
        InputError,
        match=re.escape(
            f"{tmp_path}: volume has 256 voxels, more than the limit of 200 (raise --max-voxels)"
        ),
    ):
        read_volumes(tmp_path, opts)


def test_enhanced_over_the_voxel_limit_refused_from_header(tmp_path: Path, pseudonymizer: object) -> None:
    path = tmp_path / "big.dcm"
    _enhanced(path, np.ones((3, 8, 8)) * np.arange(8), [0, 1, 2], np.eye(3), step=1.0)
    opts = ReadOptions(pseudonymizer=pseudonymizer, max_voxels=100)  # type: ignore[arg-type]
    with pytest.raises(
        InputError, match=re.escape(f"{path}: volume has 192 voxels, more than the limit of 100")
    ):
        read_volumes(path, opts)


def test_gantry_tilt_keeps_the_measured_step(tmp_path: Path, read_opts: ReadOptions) -> None:
    stack = np.random.default_rng(5).integers(0, 4000, size=(4, 5, 6))
    uid = generate_uid()
    for z in range(4):  # each slice moves 3 mm along z and 1 mm along y: a tilted stack
        path = tmp_path / f"{z}.dcm"
        ds = _base(path, MRImageStorage, 5, 6)
        ds.SeriesInstanceUID = uid
        ds.ImagePositionPatient = [0.0, 1.0 * z, 3.0 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.PixelData = stack[z].astype(np.uint16).tobytes()
        ds.save_as(path, enforce_file_format=True)
    (vol,) = read_volumes(tmp_path, read_opts)
    np.testing.assert_allclose(vol.affine[:3, 2], LPS_TO_RAS[:3, :3] @ [0.0, 1.0, 3.0])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_gate_inspect_over_every_library_test_file_is_never_an_internal_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from gate.cli import main

    files = _library_files()
    if not files:
        pytest.skip("neither pydicom's nor nibabel's test data is installed")
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    result = CliRunner().invoke(main, ["inspect", *map(str, files)])
    assert result.exit_code == 3, result.output  # some are refused (exit 3), none is exit 4
    assert "internal error" not in result.output
