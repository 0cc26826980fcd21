"""NIfTI-1 export (``<sample_id>.nii.gz``): float32 voxels and the RAS affine, nothing else."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from gate.errors import IntegrityError
from gate.exporters.base import Exporter, check_exportable, publish_file
from gate.values import Decision, Volume

DESCRIPTION = "synthetic image; no real patient"
"""NIfTI header ``descrip`` (80 bytes max): says what the file is and carries no provenance that
could identify a training file."""


def canonical_image(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """The image gate writes for float32 voxels (X, Y, Z) and a RAS affine (4, 4), in mm."""
    image = nib.Nifti1Image(
        np.ascontiguousarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64)
    )
    image.header["descrip"] = DESCRIPTION.encode("ascii")
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


QFORM_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim")
"""Header fields derived from the float64 affine at export: a float32 affine read back can give
them in another last bit, so a verifier takes the file's values when they agree to
:data:`QFORM_TOLERANCE`."""

QFORM_TOLERANCE = 1e-5
"""Measured: 100 random rotations x spacings differ by < 1e-6 between export and re-derivation."""


def canonical_bytes(data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Header | None = None) -> bytes:
    """The uncompressed NIfTI-1 bytes (352-byte header, then voxels) gate writes for these voxels.

    Args:
        data: float32 voxels (X, Y, Z).
        affine: RAS affine (4, 4), mm.
        like: a header read from a file: its :data:`QFORM_FIELDS` are used where they agree.

    """
    image = canonical_image(data, affine)
    if like is not None:
        header = image.header
        for key in QFORM_FIELDS:
            if np.allclose(like[key], header[key], atol=QFORM_TOLERANCE, rtol=0):
                header[key] = like[key]
    return image.to_bytes()


class NiftiExporter(Exporter):
    """One gzipped NIfTI-1 file per sample, float32, qform and sform = the volume's affine."""

    name = "nifti"
    suffix = ".nii.gz"

    def write(self, volume: Volume, decision: Decision, sample_id: str, out_dir: Path) -> list[Path]:
        """Write ``<out_dir>/<sample_id>.nii.gz`` and read it back to prove it.

        See :meth:`exporters.base.Exporter.write`.

        Raises:
            IntegrityError: the file read back differs from the volume.

        """
        check_exportable(volume, decision, sample_id)
        affine = np.asarray(volume.affine, dtype=np.float64)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError(f"sample {sample_id}: affine is singular or not finite; nothing was exported")
        image = canonical_image(volume.data, affine)
        target = self.target(sample_id, out_dir)

        def _write(tmp: Path) -> None:
            nib.save(image, tmp)
            back = nib.load(tmp)
            data = np.asanyarray(back.dataobj)
            if data.dtype != np.float32 or not np.array_equal(data, volume.data):
                raise IntegrityError(f"{target}: voxels read back differ from the sample; not exported")
            if not np.allclose(back.affine, affine, atol=1e-4):
                raise IntegrityError(f"{target}: affine read back differs from the sample; not exported")

        return [publish_file(target, _write, suffix=".nii.gz")]
