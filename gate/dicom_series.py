"""Reading one DICOM series folder into a voxel array and a RAS affine.

Slices are sorted by the projection of ImagePositionPatient onto the slice normal (the cross
product of the ImageOrientationPatient row and column cosines), not by file name or
InstanceNumber. A folder mixing several SeriesInstanceUIDs is refused with the UIDs listed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from gate.errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates are LPS; gate (like nibabel) uses RAS."""


REQUIRED_KEYWORDS = ("SeriesInstanceUID", "PixelData")
"""A slice without these is truncated or is not an image: pydicom reads such files lazily
without complaint, so they are checked explicitly."""


def read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Read every file of a series folder.

    Args:
        folder: a folder holding the slices of exactly one series.

    Returns:
        ``(data, affine, patient_label)``: data (X=columns, Y=rows, Z=slices) with rescale
        slope/intercept applied, a RAS voxel-to-world affine in mm, and the clear PatientID
        (``None`` if absent) for the caller to pseudonymise. The label never leaves memory.

    Raises:
        InputError: unreadable slice, mixed series, missing geometry, inconsistent slice size.

    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            raise InputError(f, f"cannot read DICOM: truncated or corrupt file ({err})") from err
        missing = [k for k in REQUIRED_KEYWORDS if k not in ds]
        if missing:
            raise InputError(f, f"cannot read DICOM: truncated or corrupt file (no {', '.join(missing)})")
        datasets.append((f, ds))
    if not datasets:
        raise InputError(folder, "DICOM folder holds no file")
    uids = sorted({str(ds.SeriesInstanceUID) for _, ds in datasets})
    if len(uids) > 1:
        raise InputError(folder, f"DICOM folder mixes {len(uids)} series: {', '.join(uids)}")
    first_path, first = datasets[0]
    for f, ds in datasets:
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise InputError(f, f"DICOM slice lacks {keyword}; cannot place it in 3D")
    iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = [np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in datasets]
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    slices = []
    for i in order:
        f, ds = datasets[i]
        try:
            pixels = ds.pixel_array.astype(np.float64)
        except Exception as err:  # pydicom raises many types for bad pixel data
            raise InputError(f, f"cannot decode DICOM pixel data ({err})") from err
        if pixels.ndim != 2:
            raise InputError(f, f"expected a 2D slice per file, found shape {pixels.shape}")
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        slices.append(pixels * slope + intercept)
    shapes = {s.shape for s in slices}
    if len(shapes) > 1:
        raise InputError(folder, f"DICOM slices differ in size: {sorted(shapes)}")
    # pixel_array is (rows, columns) = (Y, X); gate's voxel order is (X, Y, Z).
    data = np.stack([s.T for s in slices], axis=-1)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    sorted_pos = [positions[i] for i in order]
    if len(sorted_pos) > 1:
        step = (sorted_pos[-1] - sorted_pos[0]) / (len(sorted_pos) - 1)
    else:
        step = normal * float(getattr(first, "SliceThickness", 1.0) or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * col_spacing
    affine_lps[:3, 1] = col_cos * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = sorted_pos[0]
    if abs(np.linalg.det(affine_lps[:3, :3])) < 1e-9:
        raise InputError(first_path, "DICOM slices are co-located; slice positions do not advance")
    label = str(first.PatientID) if getattr(first, "PatientID", "") else None
    return data, LPS_TO_RAS @ affine_lps, label
