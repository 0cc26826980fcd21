"""Reading volumes: NIfTI, DICOM series folders, NumPy .npy / .npz.

One entry point, :func:`read_volumes`, turns a path into validated :class:`~gate.values.Volume`
values; :func:`discover` expands folders into readable sources. Every failure is an
:class:`~gate.errors.InputError` whose message is one line ``<path>: <problem>``. Nothing is
skipped silently: callers either get every volume or an error.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from gate.errors import InputError
from gate.identity import Pseudonymizer
from gate.values import Volume

DEFAULT_MAX_VOXELS = 512 * 512 * 512
"""Refuse volumes above 134M voxels (512 MiB as float32) unless the limit is raised: enough for
a 512x512x512 CT, small enough that a mis-typed header cannot exhaust a 24 GB machine."""

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NUMPY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", "")
SUPPORTED = "expected .nii, .nii.gz, .npy, .npz or a DICOM series folder"


@dataclass(frozen=True)
class ReadOptions:
    """How to read and identify volumes.

    Attributes:
        pseudonymizer: turns clear labels (PatientID, CSV label, file name) into keyed ids.
        max_voxels: refuse volumes with more voxels than this.

    """

    pseudonymizer: Pseudonymizer
    max_voxels: int = DEFAULT_MAX_VOXELS


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in NIFTI_SUFFIXES + NUMPY_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' at byte 128."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def discover(paths: list[Path]) -> list[Path]:
    """Expand files and folders into the sources :func:`read_volumes` takes.

    A folder that directly holds DICOM files is one series source; any other folder is walked
    recursively and each of its files is a source (an unsupported one is rejected by
    :func:`read_volumes`, never skipped). Hidden files (dot-names) are ignored.

    Args:
        paths: files or folders given by the user.

    Returns:
        Sorted, de-duplicated list of files and DICOM series folders.

    Raises:
        InputError: a path does not exist, or a folder holds nothing readable.

    """
    found: list[Path] = []
    for path in paths:
        if not path.exists():
            raise InputError(path, "no such file or folder")
        if path.is_file():
            found.append(path)
            continue
        before = len(found)
        found.extend(_walk(path))
        if len(found) == before:
            raise InputError(path, f"folder holds no readable volume ({SUPPORTED})")
    return sorted(set(found))


def _walk(folder: Path) -> Iterator[Path]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    if any(_suffix(p) in (".dcm", ".dicom", ".ima") or _is_dicom_file(p) for p in files):
        yield folder
        return
    # Every other file is a source, even one of an unsupported type: read_volumes rejects it
    # by name, so nothing in a folder is skipped silently.
    yield from files
    for p in entries:
        if p.is_dir():
            yield from _walk(p)


def read_volumes(path: Path, options: ReadOptions) -> list[Volume]:
    """Read one source (file or DICOM series folder) into validated volumes.

    Args:
        path: .nii / .nii.gz / .npy / .npz file, or a folder holding one DICOM series.
        options: identity and size limits.

    Returns:
        One volume per 3D array in the source (a MedMNIST-style ``.npz`` holds many).

    Raises:
        InputError: unreadable, corrupt, not 3D, non-finite, empty, constant, too large,
            mixed DICOM series, or unsupported extension.

    """
    if path.is_dir():
        from gate.dicom_series import read_dicom_series

        raw, affine, label = read_dicom_series(path)
        label = label or options.pseudonymizer.label_for(path)
        arrays = [(str(path), raw)]
    else:
        suffix = _suffix(path)
        if suffix in NIFTI_SUFFIXES:
            raw, affine = _read_nifti(path)
            arrays = [(str(path), raw)]
        elif suffix == ".npy":
            arrays, affine = [(str(path), _read_npy(path))], np.eye(4)
        elif suffix == ".npz":
            arrays, affine = _read_npz(path), np.eye(4)
        else:
            raise InputError(path, f"unsupported extension '{suffix or path.name}' ({SUPPORTED})")
        label = None
    volumes = []
    for source, arr in arrays:
        data = _validate(path if source == str(path) else Path(source), arr, options.max_voxels)
        if label is not None:
            patient = label
        elif source == str(path):
            patient = options.pseudonymizer.label_for(path)
        else:  # one array of a multi-volume npz: one volume = one patient by default
            patient = options.pseudonymizer.label_for(path) + source[len(str(path)) :]
        spacing = tuple(float(s) for s in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
        volumes.append(
            Volume(
                data=data,
                affine=np.asarray(affine, dtype=np.float64),
                spacing=spacing,  # type: ignore[arg-type]
                source=source,
                patient_id=options.pseudonymizer.pseudonym(patient),
            )
        )
    return volumes


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for truncated / corrupt files
        raise InputError(path, f"cannot read NIfTI: truncated or corrupt file ({_short(err)})") from err
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(path, f"cannot read NumPy file: truncated or corrupt ({_short(err)})") from err


def _read_npz(path: Path) -> list[tuple[str, np.ndarray]]:
    """Arrays of an .npz, as (source, array) pairs.

    Every MedMNIST-style ``<split>_images`` stack (N, X, Y, Z[, 1]) is split into N volumes;
    without such keys, each array is one volume.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise InputError(path, f"cannot read NumPy file: truncated or corrupt ({_short(err)})") from err
    if not arrays:
        raise InputError(path, "empty .npz archive (no arrays)")
    stacks = {k: v for k, v in arrays.items() if k.endswith("_images")}
    out: list[tuple[str, np.ndarray]] = []
    if stacks:
        for key in sorted(stacks):
            stack = stacks[key]
            if stack.ndim == 5 and stack.shape[-1] == 1:
                stack = stack[..., 0]
            if stack.ndim != 4:
                raise InputError(path, f"'{key}' must be (N, X, Y, Z); found shape {stack.shape}")
            out.extend((f"{path}#{key}[{i}]", stack[i]) for i in range(stack.shape[0]))
    else:
        out.extend((f"{path}#{key}", arrays[key]) for key in sorted(arrays))
    return out


def _validate(path: Path, arr: np.ndarray, max_voxels: int) -> np.ndarray:
    """Check one raw array and return it as float32 (X, Y, Z)."""
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise InputError(path, f"voxels must be numeric; found dtype {arr.dtype}")
    if arr.ndim > 3:  # NIfTI often stores (X, Y, Z, 1)
        arr = arr.reshape(arr.shape[:3]) if all(s == 1 for s in arr.shape[3:]) else arr
    if arr.ndim != 3:
        raise InputError(path, f"expected a 3D volume, found shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise InputError(path, f"empty volume (shape {tuple(arr.shape)})")
    if arr.size > max_voxels:
        raise InputError(
            path, f"volume has {arr.size} voxels, more than the limit of {max_voxels} (raise --max-voxels)"
        )
    if np.iscomplexobj(arr):
        raise InputError(path, f"voxels must be real; found dtype {arr.dtype}")
    data = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int(data.size - finite.sum())
        raise InputError(path, f"voxels contain NaN or Inf ({bad} of {data.size})")
    if data.min() == data.max():
        raise InputError(path, f"constant volume (every voxel is {float(data.flat[0]):g})")
    return data


def _short(err: BaseException) -> str:
    """First line of an exception message, for one-line error reports."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
