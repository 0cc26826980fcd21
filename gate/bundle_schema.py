"""The one definition of a bundle's layout, used by the writer and the verifier alike.

A finished bundle holds exactly:

- ``manifest.json`` and, when signed, ``manifest.sig`` (the bundle's own documents);
- ``DATA_CARD.md`` and ``memorization.json`` (documents, listed in the manifest);
- per sample and format the paths the exporters name: ``samples/<id>.nii.gz`` (NIfTI) and
  ``samples/<id>_dicom/slice_<nnnn>.dcm`` (DICOM series).

Nothing else: no other folder, no symlink, hard link, device or FIFO, no path that is absolute,
unnormalised or leaves the bundle. :func:`layout_problems` checks a folder against this and
against a manifest; it looks at sizes (``lstat``) before anything is hashed.
"""

from __future__ import annotations

import os
import re
import stat
import zlib
from pathlib import Path, PurePosixPath

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
DATA_CARD_FILE = "DATA_CARD.md"
SAMPLES_DIR = "samples"
MEMORIZATION_FILE = "memorization.json"
DOCUMENTS = (DATA_CARD_FILE, MEMORIZATION_FILE)
"""Files the manifest lists that belong to no sample."""
UNLISTED = (MANIFEST_FILE, SIGNATURE_FILE)
"""Files a bundle may hold that the manifest does not list (it cannot list itself)."""

UNEXPORTED_ID_RE = re.compile(r"^c[0-9]{6}$")
"""The audit name of a candidate the pipeline did not export (``gate.pipeline.candidate_id``)."""

PARTIAL_RE = re.compile(r"^\.[^/]*\.partial-[^/]*$")
"""The name of a folder :class:`gate.bundle.BundleWriter` builds in (``.<name>.partial-XXXX``)."""

NIFTI_HEADER_BYTES = 352
"""NIfTI-1 header (348) + the 4-byte extension flag, all zero: where gate's voxels start."""

_SAMPLE_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_NIFTI_RE = re.compile(rf"^{SAMPLES_DIR}/({_SAMPLE_ID})\.nii\.gz$")
_DICOM_RE = re.compile(rf"^{SAMPLES_DIR}/({_SAMPLE_ID})_dicom/slice_[0-9]{{4}}\.dcm$")


def is_partial(path: Path) -> bool:
    """True for a folder a writer is building (or a killed one left): ``.<name>.partial-*``."""
    return bool(PARTIAL_RE.match(Path(path).name))


_PARTIAL_PID_RE = re.compile(r"\.partial-([0-9]+)-[^/]*$")


def partial_pid(path: Path) -> int | None:
    """The pid of the writer that made a partial folder (None when its name carries none)."""
    m = _PARTIAL_PID_RE.search(Path(path).name)
    return int(m.group(1)) if m else None


def path_problem(rel: str) -> str | None:
    """Why ``rel`` is not a relative, normalised, ``/``-separated path inside a bundle (or None)."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or re.match(r"^[A-Za-z]:", rel):
        return "not a relative path inside the bundle"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts) or PurePosixPath(rel).as_posix() != rel:
        return "not a normalised path inside the bundle (no '..', '.', '//')"
    return None


def sample_file_owner(rel: str) -> tuple[str, str] | None:
    """``(sample_id, format)`` a sample path belongs to by name, or None."""
    m = _NIFTI_RE.match(rel)
    if m:
        return m.group(1), "nifti"
    m = _DICOM_RE.match(rel)
    if m:
        return m.group(1), "dicom"
    return None


def walk(root: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """Every entry under ``root`` without following links.

    Returns:
        ``({relpath: lstat} of regular files, [problems])``: a problem per symlink, device,
        FIFO, socket, hard-linked file, or folder the writer does not make.

    """
    files: dict[str, os.stat_result] = {}
    problems: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(
                os.scandir(root / rel_dir) if rel_dir else os.scandir(root), key=lambda e: e.name
            )
        except OSError as err:
            problems.append(f"{rel_dir or '.'}: unreadable folder ({err.strerror})")
            continue
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{rel}: a symlink (bundles hold regular files only)")
            elif stat.S_ISDIR(st.st_mode):
                if rel == SAMPLES_DIR or re.match(rf"^{SAMPLES_DIR}/{_SAMPLE_ID}_dicom$", rel):
                    stack.append(rel)
                else:
                    problems.append(f"{rel}/: a folder the bundle writer does not make")
            elif not stat.S_ISREG(st.st_mode):
                problems.append(f"{rel}: not a regular file (device, FIFO or socket)")
            elif st.st_nlink > 1:
                problems.append(f"{rel}: a hard link ({st.st_nlink} links; bundles hold own files only)")
            else:
                files[rel] = st
    return files, problems


def gzip_body(path: Path, max_bytes: int = 2**31) -> tuple[bytes | None, list[str]]:
    """Inflate a single-member gzip file, at most ``max_bytes``; problems if not exactly one member."""
    name = path.name
    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, [f"{name}: unreadable ({err.strerror})"]
    d = zlib.decompressobj(wbits=31)
    try:
        body = d.decompress(raw, max_bytes)
    except zlib.error:
        return None, [f"{name}: not a single valid gzip stream"]
    if d.unconsumed_tail:
        return None, [f"{name}: inflates to more than {max_bytes} bytes"]
    if not d.eof:
        return None, [f"{name}: truncated gzip stream"]
    if d.unused_data:
        return body, [f"{name}: {len(d.unused_data)} byte(s) after the gzip stream (trailing data)"]
    return body, []


def nifti_body_problems(name: str, body: bytes) -> list[str]:
    """Structure of an inflated gate NIfTI: a 352-byte header, no extension, voxels, nothing more."""
    problems: list[str] = []
    n_voxels_bytes = None
    if len(body) < NIFTI_HEADER_BYTES:
        return [*problems, f"{name}: shorter than a NIfTI-1 header"]
    import numpy as np

    for order in ("<", ">"):
        if int(np.frombuffer(body[:4], dtype=f"{order}i4")[0]) == 348:
            break
    else:
        return [*problems, f"{name}: not a NIfTI-1 header"]
    if order != "<":
        problems.append(f"{name}: big-endian header (gate writes little-endian)")
    dim = np.frombuffer(body[40:56], dtype=f"{order}i2")
    vox_offset = float(np.frombuffer(body[108:112], dtype=f"{order}f4")[0])
    datatype = int(np.frombuffer(body[70:72], dtype=f"{order}i2")[0])
    if body[348:352] != b"\x00\x00\x00\x00" or vox_offset != NIFTI_HEADER_BYTES:
        problems.append(f"{name}: header extension or moved voxel offset (gate writes none)")
    if datatype != 16 or int(dim[0]) != 3:
        problems.append(f"{name}: not a 3D float32 image as gate writes")
    expected = n_voxels_bytes
    if expected is None:
        expected = int(np.prod([int(x) for x in dim[1:4]], dtype=np.int64)) * 4
    if len(body) != NIFTI_HEADER_BYTES + expected:
        problems.append(
            f"{name}: {len(body) - NIFTI_HEADER_BYTES} voxel byte(s), expected {expected} (extra data hidden)"
        )
    return problems


__all__ = [
    "DATA_CARD_FILE",
    "DOCUMENTS",
    "MANIFEST_FILE",
    "SAMPLES_DIR",
    "SIGNATURE_FILE",
    "UNLISTED",
    "gzip_body",
    "is_partial",
    "nifti_body_problems",
    "partial_pid",
    "path_problem",
    "sample_file_owner",
    "walk",
]
