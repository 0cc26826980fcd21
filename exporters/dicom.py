"""DICOM export: one MR Image Storage series per sample, one file per slice.

Why per-slice MR Image Storage rather than an enhanced multi-frame object: every viewer,
PACS and validator reads it, and gate's own DICOM reader (:mod:`gate.dicom_series`) reads it
back, which is how each export is proven.

Every attribute is made here, from the sample and constants: nothing is copied from any file
(:data:`WRITTEN_KEYWORDS` lists all of them; a test checks written files hold nothing else).
The identity is synthetic (``Synthetic^<sample id>`` / ``SYN-<sample id>``), Synthetic Data
(0008,001C) = YES, Patient Identity Removed = YES, and a Contributing Equipment item says gate
was the "Synthesizing Equipment" (DCM 109100, DICOM PS3.16 CID 7005). Study, series, frame of
reference and instance UIDs are fresh (``pydicom.uid.generate_uid``) for every sample.

Voxels are stored as unsigned 16-bit integers with Rescale Slope / Intercept mapping them back
to the sample's float values (maximum error: half a slope, i.e. range / 131070).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds, validate_value

from gate import __version__
from gate.errors import IntegrityError
from gate.exporters.base import Exporter, check_exportable, publish_folder
from gate.values import Decision, Volume

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""gate volumes carry RAS affines (like NIfTI); DICOM patient coordinates are LPS."""

STORED_MAX = 65535
"""Unsigned 16-bit pixels: the full range keeps quantisation error at range / 131070."""

SYNTHESIZING_EQUIPMENT = codes.DCM.SynthesizingEquipment
"""(109100, DCM, "Synthesizing Equipment") from CID 7005 "Contributing Equipment Purposes of
Reference" (not 109104, which is "De-identifying Equipment")."""

DEIDENTIFICATION_METHOD = "synthetic image made by a generative model; no patient identity"
"""Deidentification Method (LO, <= 64 chars), required (type 1C) with Patient Identity Removed."""

MANUFACTURER = "gate"
"""Manufacturer of the synthesizing equipment (this software)."""

ORTHOGONALITY_TOLERANCE = 1e-4
"""Largest |cos| allowed between affine axes: DICOM's per-slice geometry cannot express shear."""

WRITTEN_KEYWORDS: frozenset[str] = frozenset(
    """
    ImageType InstanceCreationDate InstanceCreationTime SOPClassUID SOPInstanceUID StudyDate SeriesDate
    ContentDate StudyTime SeriesTime ContentTime AccessionNumber Modality Manufacturer
    ReferringPhysicianName StudyDescription SeriesDescription ManufacturerModelName PatientName
    PatientID PatientBirthDate PatientSex PatientIdentityRemoved DeidentificationMethod SyntheticData
    ScanningSequence SequenceVariant ScanOptions MRAcquisitionType SliceThickness RepetitionTime
    EchoTime EchoTrainLength SoftwareVersions StudyInstanceUID SeriesInstanceUID StudyID SeriesNumber
    InstanceNumber Laterality PatientPosition ImagePositionPatient ImageOrientationPatient FrameOfReferenceUID
    PositionReferenceIndicator SamplesPerPixel PhotometricInterpretation Rows Columns PixelSpacing
    BitsAllocated BitsStored HighBit PixelRepresentation WindowCenter WindowWidth RescaleIntercept
    RescaleSlope RescaleType ContributingEquipmentSequence PurposeOfReferenceCodeSequence CodeValue
    CodingSchemeDesignator CodeMeaning ContributionDateTime ContributionDescription PixelData
    """.split()
)
"""Every data-element keyword the exporter writes (file meta aside). Nothing else may appear."""

DCIODVFY_ALLOWED_FINDINGS: dict[str, str] = {
    r"\(0x0008,0x001c\).*Unrecognized tag": "dicom3tools 1.00~20220618 (Debian bookworm) predates Synthetic "
    "Data (0008,001C), which the DICOM standard added later; the issue requires it",
    r"not a recognized standard attribute - \(0x0008,0x001c\)": "same: Synthetic Data unknown to this "
    "dicom3tools dictionary",
    r"not present in standard DICOM IOD - \(0x0008,0x001c\)": "same: Synthetic Data unknown to "
    "this dicom3tools",
    r"Non-identity Modality LUT Module .* <Rescale(Slope|Intercept)>": "deliberate: Rescale Slope / "
    "Intercept keep the sample's float intensities (16-bit storage); common in MR practice and applied by "
    "gate's reader, pydicom and every major viewer",
    r"not present in standard DICOM IOD - \(0x0028,0x105[234]\)": "same: Rescale Intercept / Slope / Type",
    r"Standard Extended SOP Class": "follows from the two attributes above (Synthetic Data, Rescale)",
    r"only permitted to be empty when actually unknown.*<Laterality>": "the side of a synthetic volume is "
    "actually unknown, which is what an empty Laterality means",
}
"""dciodvfy findings (regular expressions over its Error/Warning lines) that exported files may
show, each with why. Any other finding fails the exporter tests."""

REQUIRED_KEYWORDS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "PatientID",
    "PatientIdentityRemoved",
    "SyntheticData",
    "ContributingEquipmentSequence",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "PixelData",
)
"""Checked on every dataset before anything is written (validate, then write)."""


class DicomExporter(Exporter):
    """A folder ``<sample_id>_dicom/`` with one MR Image Storage file per Z slice."""

    name = "dicom"
    suffix = "_dicom"

    def write(self, volume: Volume, decision: Decision, sample_id: str, out_dir: Path) -> list[Path]:
        """Build every slice, validate all of them, write the series folder, read it back.

        See :meth:`exporters.base.Exporter.write`.

        Raises:
            ValueError: an affine DICOM cannot express (shear, singular, non-finite).
            IntegrityError: the series read back differs from the sample.

        """
        check_exportable(volume, decision, sample_id)
        datasets = build_series(volume, decision, sample_id)
        for ds in datasets:
            validate_dataset(ds)
        target = self.target(sample_id, out_dir)
        slope = float(datasets[0].RescaleSlope)

        def _write(tmp: Path) -> None:
            for k, ds in enumerate(datasets):
                ds.save_as(tmp / f"slice_{k:04d}.dcm", enforce_file_format=True)
            _prove(tmp, volume, slope, target)

        publish_folder(target, _write)
        return sorted(target.iterdir())


def _prove(folder: Path, volume: Volume, slope: float, target: Path) -> None:
    """Read the series back with gate's own reader; voxels within half a slope, same affine."""
    from gate.dicom_series import read_dicom_series

    data, affine, _ = read_dicom_series(folder)
    if data.shape != volume.data.shape:
        raise IntegrityError(f"{target}: read back as {data.shape}, expected {volume.data.shape}")
    err = float(np.max(np.abs(data - volume.data.astype(np.float64))))
    if err > slope * 0.51 + 1e-6 * max(1.0, float(np.max(np.abs(volume.data)))):
        raise IntegrityError(f"{target}: voxels read back differ by {err:g} (> half a slope {slope / 2:g})")
    if not np.allclose(affine, volume.affine, atol=1e-3):
        raise IntegrityError(f"{target}: affine read back differs from the sample's")


def _geometry(volume: Volume) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """LPS affine, unit row/column cosines (6,), and spacing (x, y, z) mm; refuses shear."""
    lps = LPS_FROM_RAS @ np.asarray(volume.affine, dtype=np.float64)
    axes = lps[:3, :3]
    if not np.all(np.isfinite(lps)):
        raise ValueError("affine is not finite; DICOM cannot place the slices")
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing < 1e-9):
        raise ValueError("affine is singular; DICOM cannot place the slices")
    unit = axes / spacing
    gram = unit.T @ unit - np.eye(3)
    if np.max(np.abs(gram)) > ORTHOGONALITY_TOLERANCE:
        raise ValueError("affine axes are not orthogonal (shear); per-slice DICOM cannot express it")
    cosines = np.concatenate([unit[:, 0], unit[:, 1]])
    return lps, cosines, (float(spacing[0]), float(spacing[1]), float(spacing[2]))


def _ds(value: float) -> str:
    """Format a decimal string (DS, at most 16 characters)."""
    return format_number_as_ds(float(value))


def build_series(volume: Volume, decision: Decision, sample_id: str) -> list[Dataset]:
    """Make one dataset per Z slice of ``volume`` (nothing is written).

    Args:
        volume: float32 (X, Y, Z); slice k is ``data[:, :, k]``, stored as rows = Y, columns = X.
        decision: the (passed) decision, named in the contribution description.
        sample_id: the sample's public name, used for the synthetic identity.

    Returns:
        Z datasets sharing study, series and frame-of-reference UIDs.

    """
    lps, cosines, (sx, sy, sz) = _geometry(volume)
    data = volume.data.astype(np.float64)
    lo, hi = float(data.min()), float(data.max())
    slope = float(_ds((hi - lo) / STORED_MAX)) if hi > lo else 1.0
    intercept = float(_ds(lo))
    stored = np.clip(np.rint((data - intercept) / slope), 0, STORED_MAX).astype(np.uint16)
    now = dt.datetime.now(dt.UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    contribution = Dataset()
    contribution.Manufacturer = MANUFACTURER
    contribution.ManufacturerModelName = "gate privacy gate"
    contribution.SoftwareVersions = __version__
    contribution.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    contribution.ContributionDescription = (
        f"synthesized by a generative model; passed gate policy {decision.policy_id}"
    )[:64]
    purpose = Dataset()
    purpose.CodeValue = SYNTHESIZING_EQUIPMENT.value
    purpose.CodingSchemeDesignator = SYNTHESIZING_EQUIPMENT.scheme_designator
    purpose.CodeMeaning = SYNTHESIZING_EQUIPMENT.meaning
    contribution.PurposeOfReferenceCodeSequence = Sequence([purpose])
    out = []
    for k in range(volume.shape[2]):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = MANUFACTURER
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "synthetic image"
        ds.SeriesDescription = f"synthetic sample {sample_id}"[:64]
        ds.ManufacturerModelName = "gate privacy gate"
        ds.PatientName = f"Synthetic^{sample_id}"
        ds.PatientID = f"SYN-{sample_id}"
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = DEIDENTIFICATION_METHOD
        ds.SyntheticData = "YES"
        ds.ScanningSequence = "RM"  # research mode: no real acquisition happened
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.SliceThickness = _ds(sz)
        ds.RepetitionTime = None
        ds.EchoTime = None
        ds.EchoTrainLength = None
        ds.SoftwareVersions = __version__
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.Laterality = ""  # type 2C: a synthetic image has no side
        ds.PatientPosition = ""  # type 2C for MR: no patient was positioned
        ds.InstanceNumber = k + 1
        position = lps @ np.array([0.0, 0.0, float(k), 1.0])
        ds.ImagePositionPatient = [_ds(v) for v in position[:3]]
        ds.ImageOrientationPatient = [_ds(v) for v in cosines]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]  # (between rows, between columns)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.WindowCenter = _ds((lo + hi) / 2)
        ds.WindowWidth = _ds(max(hi - lo, 1e-6))
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = _ds(intercept), _ds(slope), "US"
        ds.ContributingEquipmentSequence = Sequence([contribution])
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        out.append(ds)
    return out


def validate_dataset(ds: Dataset) -> None:
    """Check one slice before anything is written: required attributes, VR values, pixel size.

    Raises:
        ValueError: a missing attribute, a value its VR does not allow, or wrong pixel bytes.

    """
    missing = [k for k in REQUIRED_KEYWORDS if k not in ds]
    if missing:
        raise ValueError(f"DICOM slice lacks {', '.join(missing)}; nothing was exported")
    extra = sorted({e.keyword for e in ds.iterall()} - WRITTEN_KEYWORDS)
    if extra:
        raise ValueError(f"DICOM slice holds unexpected attributes {extra}; nothing was exported")
    for elem in ds.iterall():
        if elem.VR == "SQ" or elem.keyword == "PixelData":
            continue
        if elem.VM == 0:
            continue  # an empty type 2 attribute
        values = elem.value if elem.VM > 1 else [elem.value]
        for value in values:
            text = str(value) if elem.VR in ("DS", "IS") else value  # validators read the string form
            validate_value(elem.VR, text, pydicom.config.RAISE)
    expected = int(ds.Rows) * int(ds.Columns) * 2
    if len(ds.PixelData) != expected:
        raise ValueError(f"DICOM pixel data is {len(ds.PixelData)} bytes; expected {expected}")


FIXED_VALUES: dict[str, str] = {
    "ImageType": "['DERIVED', 'SECONDARY', 'OTHER']",
    "SOPClassUID": str(MRImageStorage),
    "AccessionNumber": "",
    "Modality": "MR",
    "Manufacturer": MANUFACTURER,
    "ReferringPhysicianName": "",
    "StudyDescription": "synthetic image",
    "ManufacturerModelName": "gate privacy gate",
    "PatientBirthDate": "",
    "PatientSex": "",
    "PatientIdentityRemoved": "YES",
    "DeidentificationMethod": DEIDENTIFICATION_METHOD,
    "SyntheticData": "YES",
    "ScanningSequence": "RM",
    "SequenceVariant": "NONE",
    "ScanOptions": "",
    "MRAcquisitionType": "3D",
    "StudyID": "1",
    "SeriesNumber": "1",
    "Laterality": "",
    "PatientPosition": "",
    "PositionReferenceIndicator": "",
    "SamplesPerPixel": "1",
    "PhotometricInterpretation": "MONOCHROME2",
    "BitsAllocated": "16",
    "BitsStored": "16",
    "HighBit": "15",
    "PixelRepresentation": "0",
    "RescaleType": "US",
    "CodeValue": str(SYNTHESIZING_EQUIPMENT.value),
    "CodingSchemeDesignator": str(SYNTHESIZING_EQUIPMENT.scheme_designator),
    "CodeMeaning": str(SYNTHESIZING_EQUIPMENT.meaning),
}
"""Attributes whose value gate's exporter always writes the same (publication check: exact)."""


def slice_problems(path: Path, sample_id: str, policy_id: str) -> list[str]:
    """Is this file exactly what :func:`build_series` + ``save_as`` write for ``sample_id``?

    Checks, one line per problem: the file re-encodes to the same bytes (no trailing data, no
    preamble payload, no re-encoding), no private tag, only :data:`WRITTEN_KEYWORDS`, the
    synthetic identity of ``sample_id``, :data:`FIXED_VALUES`, the contribution description of
    ``policy_id``, pixel data of Rows x Columns x 2 bytes.

    """
    name = path.name
    try:
        return _slice_problems(path, sample_id, policy_id)
    except Exception as err:  # pydicom raises many types on hostile input, some lazily
        return [f"{name}: not a DICOM file gate's exporter writes ({type(err).__name__})"]


def _slice_problems(path: Path, sample_id: str, policy_id: str) -> list[str]:
    import io

    from pydicom.datadict import keyword_for_tag

    name = path.name
    raw = path.read_bytes()
    ds = pydicom.dcmread(io.BytesIO(raw))
    problems = []
    tags = list(ds.keys())  # raw tags: nothing is decoded yet
    nested: list[Dataset] = []
    for tag in tags:
        if keyword_for_tag(tag) == "ContributingEquipmentSequence":
            for item in ds[tag].value:
                nested.append(item)
                for sub in item:
                    if sub.VR == "SQ":
                        nested.extend(sub.value)
    all_tags = tags + [t for item in nested for t in item.keys()]
    private = [str(t) for t in all_tags if t.is_private]
    if private:
        problems.append(f"{name}: private tag(s) {', '.join(private[:3])} (gate writes none)")
    extra = sorted({keyword_for_tag(t) or str(t) for t in all_tags} - WRITTEN_KEYWORDS)
    if extra and not private:
        problems.append(f"{name}: attributes gate's exporter does not write: {', '.join(extra[:5])}")
    expected = {
        "PatientName": f"Synthetic^{sample_id}",
        "PatientID": f"SYN-{sample_id}",
        "SeriesDescription": f"synthetic sample {sample_id}"[:64],
        "ContributionDescription": (f"synthesized by a generative model; passed gate policy {policy_id}")[
            :64
        ],
        **FIXED_VALUES,
    }
    for where in (ds, *nested):
        for keyword, want in expected.items():
            if keyword in where and str(where[keyword].value) != want:
                got = str(where[keyword].value)[:40]
                problems.append(f"{name}: {keyword} is {got!r}, gate writes {want!r}")
    for keyword in ("PatientName", "PatientID", "SyntheticData", "PatientIdentityRemoved"):
        if keyword not in ds:
            problems.append(f"{name}: {keyword} missing (gate writes {expected[keyword]!r})")
    if ds.preamble not in (None, bytes(128)):
        problems.append(f"{name}: non-zero 128-byte preamble (gate writes zeros)")
    if not tags or tags[-1] != 0x7FE00010:
        problems.append(f"{name}: pixel data is not the last element (gate writes it last)")
    else:
        pixels = ds.get_item(0x7FE00010)
        end = pixels.value_tell + pixels.length
        if end != len(raw):
            problems.append(f"{name}: {len(raw) - end} byte(s) after the pixel data (trailing data)")
        if "Rows" in ds and "Columns" in ds and pixels.length != int(ds.Rows) * int(ds.Columns) * 2:
            problems.append(f"{name}: pixel data is not Rows x Columns x 2 bytes")
    return problems
