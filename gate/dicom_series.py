"""Reading DICOM into a voxel array and a RAS affine: series folders and single files.

A series folder holds one 2D image per file; slices are sorted by the projection of
ImagePositionPatient onto the slice normal (the cross product of the ImageOrientationPatient
row and column cosines), not by file name or InstanceNumber. A folder mixing several
SeriesInstanceUIDs is refused with the UIDs listed. An enhanced multi-frame object (one file,
many frames) is placed frame by frame from its per-frame functional groups (Plane Position,
Plane Orientation, Pixel Measures, Pixel Value Transformation); a multi-frame RT dose grid from
its GridFrameOffsetVector. The slice step is measured between positions, so thick gapped slices
(SpacingBetweenSlices > SliceThickness) and tilted stacks get their true geometry. Compressed
transfer syntaxes (JPEG, JPEG-LS, JPEG 2000) decode through pydicom's pylibjpeg plugins.

A single 2D image is not a volume: one slice, or one frame, is refused.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from gate.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates are LPS; gate (like nibabel) uses RAS."""

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
"""Any of these holds the image; a file with none is not an image (DICOMDIR, SR, RT plan)."""

DEFER_BYTES = 1 << 16
"""Element values above 64 KiB (pixel data) are read only when used: headers are checked
against --max-voxels before any pixel data is loaded."""

STEP_TOLERANCE = 0.01
"""Slice steps may differ by 1% (or 0.01 mm) from their mean: scanners write positions rounded
to ~1e-3 mm; a larger spread is a missing slice or a non-uniform stack, refused rather than
resampled silently."""


@dataclass(frozen=True)
class _Plane:
    """One 2D image placed in 3D (LPS, mm)."""

    position: np.ndarray  # (3,)
    orientation: np.ndarray  # (6,) row cosines, column cosines
    spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float
    source: Path
    frame: int | None  # index into a multi-frame pixel array, None for a single-frame file


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_BYTES)
    except OSError as err:
        if err.errno is not None:
            raise InputError(path, f"cannot read ({err.strerror})") from err
        raise InputError(path, f"cannot read DICOM: truncated or corrupt file ({_short(err)})") from err
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError) as err:
        raise InputError(path, f"cannot read DICOM: truncated or corrupt file ({_short(err)})") from err
    if not any(k in ds for k in PIXEL_KEYWORDS):
        sop = ds.get("SOPClassUID")
        what = f"; a {getattr(sop, 'name', sop)} object, not an image" if sop else ""
        raise InputError(path, f"cannot read DICOM: truncated or corrupt file (no PixelData{what})")
    return ds


def _floats(value: Any, n: int, path: Path, keyword: str) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise InputError(path, f"DICOM {keyword} is not numeric ({value!r})") from err
    if out.shape != (n,) or not np.isfinite(out).all():
        raise InputError(path, f"DICOM {keyword} must be {n} finite numbers; found {value!r}")
    return out


def _number(path: Path, ds: Dataset, keyword: str, default: float, cast: type = float) -> Any:
    """A numeric header value, or ``default`` when absent or empty; a malformed one is refused."""
    try:
        value = ds.get(keyword)
        return default if value is None or value == "" else cast(value)
    except (TypeError, ValueError, OverflowError) as err:
        raise InputError(path, f"DICOM {keyword} is not a number ({_short(err)})") from err


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def _check_pixels(path: Path, ds: Dataset, images: int, max_voxels: int | None) -> None:
    """Refuse colour data and volumes above ``max_voxels`` from the header alone."""
    samples = _number(path, ds, "SamplesPerPixel", 1, int)
    if samples != 1:
        raise InputError(
            path,
            f"colour DICOM ({samples} samples per pixel, {ds.get('PhotometricInterpretation', '?')}); "
            "expected grey-level images",
        )
    voxels = _number(path, ds, "Rows", 0, int) * _number(path, ds, "Columns", 0, int) * images
    if max_voxels is not None and voxels > max_voxels:
        raise InputError(
            path, f"volume has {voxels} voxels, more than the limit of {max_voxels} (raise --max-voxels)"
        )


def _rescale(path: Path, ds: Dataset) -> tuple[float, float]:
    return _number(path, ds, "RescaleSlope", 1.0), _number(path, ds, "RescaleIntercept", 0.0)


def read_dicom_series(
    folder: Path, max_voxels: int | None = None
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read every file of a series folder.

    Args:
        folder: a folder holding the slices of exactly one series (or one multi-frame file).
        max_voxels: refuse from the headers, before pixel data is decoded, above this.

    Returns:
        ``(data, affine, patient_label)``: data (X=columns, Y=rows, Z=slices) with rescale
        slope/intercept applied, a RAS voxel-to-world affine in mm, and the clear PatientID
        (``None`` if absent) for the caller to pseudonymise. The label never leaves memory.

    Raises:
        InputError: unreadable slice, mixed series, missing geometry, inconsistent slice size,
            a single 2D slice, non-uniform slice steps, colour data, too many voxels.

    """
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise InputError(folder, f"cannot list folder ({err.strerror})") from err
    files = []
    for p in entries:  # every entry but a subfolder (walked on its own) is a slice or an error
        try:
            mode = os.stat(p).st_mode
        except OSError as err:
            raise InputError(p, f"cannot open ({err.strerror or type(err).__name__})") from err
        if stat.S_ISREG(mode):
            files.append(p)
        elif not stat.S_ISDIR(mode):
            raise InputError(p, "not a regular file (a device, FIFO or socket) in a DICOM folder")
    datasets = [(f, _read(f)) for f in files]
    if not datasets:
        raise InputError(folder, "DICOM folder holds no file")
    missing = [f for f, ds in datasets if "SeriesInstanceUID" not in ds]
    if missing:
        raise InputError(missing[0], "cannot read DICOM: truncated or corrupt file (no SeriesInstanceUID)")
    uids = sorted({str(ds.SeriesInstanceUID) for _, ds in datasets})
    if len(uids) > 1:
        raise InputError(folder, f"DICOM folder mixes {len(uids)} series: {', '.join(uids)}")
    if len(datasets) == 1:
        return read_dicom_file(datasets[0][0], max_voxels, datasets[0][1])
    multi = [f for f, ds in datasets if _number(f, ds, "NumberOfFrames", 1, int) > 1]
    if multi:
        raise InputError(
            multi[0], "a multi-frame DICOM file inside a series folder; give the file on its own"
        )
    _check_pixels(folder, datasets[0][1], len(datasets), max_voxels)
    planes = []
    for f, ds in datasets:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise InputError(f, f"DICOM slice lacks {keyword}; cannot place it in 3D")
        spacing = _floats(ds.PixelSpacing, 2, f, "PixelSpacing")
        planes.append(
            _Plane(
                _floats(ds.ImagePositionPatient, 3, f, "ImagePositionPatient"),
                _floats(ds.ImageOrientationPatient, 6, f, "ImageOrientationPatient"),
                (float(spacing[0]), float(spacing[1])),
                *_rescale(f, ds),
                f,
                None,
            )
        )
    by_file = dict(datasets)
    data, affine = _assemble(folder, planes, lambda p: _pixels(p.source, by_file[p.source]))
    first = datasets[0][1]
    label = str(first.PatientID) if getattr(first, "PatientID", "") else None
    return data, affine, label


def read_dicom_file(
    path: Path, max_voxels: int | None = None, ds: Dataset | None = None
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read one DICOM file: a multi-frame volume (enhanced or RT dose), or refuse a single image.

    Args:
        path: the file.
        max_voxels: refuse from the header, before pixel data is decoded, above this.
        ds: the file already read (deferred pixel data), if the caller has it.

    Returns:
        ``(data, affine, patient_label)`` as :func:`read_dicom_series`.

    Raises:
        InputError: not an image, a single 2D image, frames without geometry, colour data,
            too many voxels, pixel data that cannot be decoded.

    """
    ds = _read(path) if ds is None else ds
    frames = _number(path, ds, "NumberOfFrames", 1, int)
    rows, cols = _number(path, ds, "Rows", 0, int), _number(path, ds, "Columns", 0, int)
    if frames <= 1:
        raise InputError(
            path, f"a single 2D DICOM image ({rows}x{cols}), not a 3D volume; give the folder of its series"
        )
    _check_pixels(path, ds, frames, max_voxels)
    planes = _frame_planes(path, ds, frames)
    pixels: dict[str, np.ndarray] = {}

    def frame(p: _Plane) -> np.ndarray:
        if "all" not in pixels:
            pixels["all"] = _pixels(path, ds)
        arr = pixels["all"]
        if arr.ndim != 3 or arr.shape[0] != frames:
            raise InputError(path, f"expected {frames} frames of {rows}x{cols}, decoded shape {arr.shape}")
        return arr[p.frame]

    data, affine = _assemble(path, planes, frame)
    label = str(ds.PatientID) if getattr(ds, "PatientID", "") else None
    return data, affine, label


def _item(seq_parent: Dataset | None, keyword: str) -> Dataset | None:
    """First item of a functional-group sequence, or None."""
    if seq_parent is None or keyword not in seq_parent:
        return None
    seq = seq_parent[keyword].value
    return seq[0] if len(seq) else None


def _frame_planes(path: Path, ds: Dataset, frames: int) -> list[_Plane]:
    """Geometry of every frame: per-frame functional groups over shared ones, else an RT grid."""
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = list(ds.PerFrameFunctionalGroupsSequence) if "PerFrameFunctionalGroupsSequence" in ds else []
    if per_frame:
        if len(per_frame) != frames:
            raise InputError(
                path, f"DICOM has {frames} frames but {len(per_frame)} per-frame functional groups"
            )
        planes = []
        for i, group in enumerate(per_frame):

            def find(sequence: str, keyword: str, group: Dataset = group) -> Any:
                for parent in (group, shared):
                    item = _item(parent, sequence)
                    if item is not None and keyword in item:
                        return item[keyword].value
                return None

            position = find("PlanePositionSequence", "ImagePositionPatient")
            orientation = find("PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = find("PixelMeasuresSequence", "PixelSpacing")
            for keyword, value in (
                ("ImagePositionPatient", position),
                ("ImageOrientationPatient", orientation),
                ("PixelSpacing", spacing),
            ):
                if value is None:
                    raise InputError(path, f"DICOM frame {i + 1} lacks {keyword}; cannot place it in 3D")
            slope = find("PixelValueTransformationSequence", "RescaleSlope")
            intercept = find("PixelValueTransformationSequence", "RescaleIntercept")
            if slope is None and intercept is None:
                slope, intercept = _rescale(path, ds)
            ps = _floats(spacing, 2, path, "PixelSpacing")
            planes.append(
                _Plane(
                    _floats(position, 3, path, "ImagePositionPatient"),
                    _floats(orientation, 6, path, "ImageOrientationPatient"),
                    (float(ps[0]), float(ps[1])),
                    float(slope if slope is not None else 1.0),
                    float(intercept if intercept is not None else 0.0),
                    path,
                    i,
                )
            )
        return planes
    geometry = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "GridFrameOffsetVector")
    if all(k in ds for k in geometry):  # RT dose: one position, offsets along the normal
        position = _floats(ds.ImagePositionPatient, 3, path, "ImagePositionPatient")
        orientation = _floats(ds.ImageOrientationPatient, 6, path, "ImageOrientationPatient")
        offsets = _floats(ds.GridFrameOffsetVector, frames, path, "GridFrameOffsetVector")
        normal = np.cross(orientation[:3], orientation[3:])
        ps = _floats(ds.PixelSpacing, 2, path, "PixelSpacing")
        slope = _number(path, ds, "DoseGridScaling", 1.0)
        return [
            _Plane(position + o * normal, orientation, (float(ps[0]), float(ps[1])), slope, 0.0, path, i)
            for i, o in enumerate(offsets)
        ]
    raise InputError(
        path,
        f"multi-frame DICOM ({frames} frames) without per-frame positions (no Plane Position "
        "functional groups); cannot place its frames in 3D",
    )


def _pixels(path: Path, ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises many types for bad or undecodable pixel data
        text = str(err).strip().splitlines()
        raise InputError(
            path, f"cannot decode DICOM pixel data ({text[0][:200] if text else type(err).__name__})"
        ) from err


def _assemble(where: Path, planes: list[_Plane], pixels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sort planes along the normal, check a regular grid, stack (X, Y, Z) and build the affine."""
    first = planes[0]
    for p in planes:
        if not np.allclose(p.orientation, first.orientation, atol=1e-4):
            raise InputError(p.source, "DICOM slices differ in orientation; not one 3D grid")
        if not np.allclose(p.spacing, first.spacing, rtol=1e-4):
            raise InputError(
                p.source, f"DICOM slices differ in pixel spacing: {first.spacing} vs {p.spacing}"
            )
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_cos, col_cos)
    if not math.isclose(float(np.linalg.norm(normal)), 1.0, abs_tol=1e-3):
        raise InputError(where, "DICOM ImageOrientationPatient is not two orthogonal unit vectors")
    order = np.argsort([float(p.position @ normal) for p in planes], kind="stable")
    planes = [planes[i] for i in order]
    if len(planes) < 2:
        raise InputError(where, "a single 2D DICOM image, not a 3D volume; give the folder of its series")
    positions = np.stack([p.position for p in planes])
    steps = np.diff(positions, axis=0)
    step = (positions[-1] - positions[0]) / (len(planes) - 1)
    if float(np.linalg.norm(step)) < 1e-6:
        raise InputError(first.source, "DICOM slices are co-located; slice positions do not advance")
    spread = float(np.abs(np.linalg.norm(steps - step, axis=1)).max())
    if spread > max(STEP_TOLERANCE * float(np.linalg.norm(step)), STEP_TOLERANCE):
        lengths = np.linalg.norm(steps, axis=1)
        raise InputError(
            where,
            f"DICOM slice steps are not uniform ({lengths.min():.3g} to {lengths.max():.3g} mm): "
            "a slice is missing or the stack is irregular",
        )
    slices = []
    for p in planes:
        arr = np.asarray(pixels(p))
        if arr.ndim != 2:
            raise InputError(p.source, f"expected a 2D grey-level image, found shape {arr.shape}")
        slices.append(arr.astype(np.float64) * p.slope + p.intercept)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise InputError(where, f"DICOM slices differ in size: {sorted(shapes)}")
    # pixel_array is (rows, columns) = (Y, X); gate's voxel order is (X, Y, Z).
    data = np.stack([s.T for s in slices], axis=-1)
    row_spacing, col_spacing = first.spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    if abs(np.linalg.det(affine_lps[:3, :3])) < 1e-9:
        raise InputError(first.source, "DICOM slices are co-located; slice positions do not advance")
    return data, LPS_TO_RAS @ affine_lps
