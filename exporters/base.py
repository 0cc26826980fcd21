"""The exporter interface and the write discipline every format shares.

An exporter turns one passed candidate into files: it refuses any decision that is not a pass
(fail closed), validates before writing, writes under a temporary name in the target folder and
moves it into place without ever replacing an existing file or folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gate.errors import GateError, UsageError
from gate.values import Decision, Volume

SAMPLE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,55}$"
"""Sample ids become file names and DICOM PatientIDs (``SYN-<id>``, LO: at most 64 characters):
letters, digits, ``_`` and ``-`` only, so no id can climb out of the output folder or break a VR."""

PUBLISHED_FILE_MODE = 0o644
"""Exported files are meant to be shared: temporary files are created 0600, so set this."""

PUBLISHED_DIR_MODE = 0o755
"""Likewise for exported folders (temporary folders are created 0700)."""


class ExportRefusedError(GateError):
    """An exporter was handed a candidate that is not allowed out (a bug in the caller: exit 4)."""


def check_exportable(volume: Volume, decision: Decision, sample_id: str) -> None:
    """Refuse anything but a passed, finite, validly named sample.

    Raises:
        ExportRefusedError: the decision is not ``pass``.
        UsageError: a sample id that is not a safe file name.
        ValueError: non-finite voxels (a Volume should never hold them).

    """
    if not decision.passed:
        raise ExportRefusedError(
            f"sample {sample_id}: decision is {decision.verdict.value} ({decision.grade.value}, similarity "
            f"{decision.similarity:.4f}, threshold {decision.threshold:.4f}, policy {decision.policy_id}); "
            "only a pass may be exported"
        )
    if not re.fullmatch(SAMPLE_ID_PATTERN, sample_id):
        raise UsageError(
            f"sample id {sample_id!r} is not allowed; expected 1-56 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    if not np.all(np.isfinite(volume.data)):
        raise ValueError(f"sample {sample_id}: voxels are not all finite; nothing was exported")


def refuse_existing(path: Path) -> None:
    """Raise UsageError when ``path`` exists: exporters never overwrite."""
    if path.exists() or path.is_symlink():
        raise UsageError(
            f"{path}: already exists; exporters never overwrite; choose a new sample id or folder"
        )


def publish_file(out_path: Path, write: Callable[[Path], None], suffix: str) -> Path:
    """Write a file through ``write(tmp_path)`` and link it into place without replacing.

    Args:
        out_path: the final path; must not exist.
        write: writes the complete file to the path it is given.
        suffix: the temporary file's suffix (some writers pick the format from it).

    Returns:
        ``out_path``.

    Raises:
        UsageError: ``out_path`` exists (checked before writing, and again atomically by
            ``os.link``, which never replaces).

    """
    refuse_existing(out_path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=suffix, dir=out_path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, PUBLISHED_FILE_MODE)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, out_path)
        except FileExistsError as err:
            raise UsageError(f"{out_path}: already exists; exporters never overwrite") from err
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def publish_folder(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder through ``write(tmp_dir)`` and rename it into place.

    Raises:
        UsageError: ``out_dir`` exists.

    """
    refuse_existing(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        write(tmp)
        os.chmod(tmp, PUBLISHED_DIR_MODE)
        for f in tmp.iterdir():
            os.chmod(f, PUBLISHED_FILE_MODE)
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        refuse_existing(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


class Exporter(ABC):
    """Writes one passed sample in one format.

    Attributes:
        name: registry key (``nifti``, ``dicom``).
        suffix: what the written path ends with (``.nii.gz``; ``_dicom`` for a series folder).

    """

    name: str = ""
    suffix: str = ""

    def target(self, sample_id: str, out_dir: Path) -> Path:
        """Return the path :meth:`write` creates for ``sample_id`` in ``out_dir``."""
        return out_dir / f"{sample_id}{self.suffix}"

    @abstractmethod
    def write(self, volume: Volume, decision: Decision, sample_id: str, out_dir: Path) -> list[Path]:
        """Validate, then write one sample into ``out_dir``.

        Args:
            volume: the candidate's voxels (float32 (X, Y, Z)) and RAS affine in mm.
            decision: its decision; anything but ``pass`` is refused.
            sample_id: the sample's public name (:data:`SAMPLE_ID_PATTERN`).
            out_dir: an existing folder.

        Returns:
            The written files (a DICOM series: every slice file).

        Raises:
            ExportRefusedError: the decision is not a pass.
            UsageError: bad sample id or the target exists.

        """
