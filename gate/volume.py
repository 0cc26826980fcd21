"""Reading volumes: NIfTI, DICOM series folders, NumPy .npy / .npz.

One entry point, :func:`read_volumes`, turns a path into validated :class:`~gate.values.Volume`
values; :func:`discover` expands folders into readable sources. Every failure is an
:class:`~gate.errors.InputError` whose message is one line ``<path>: <problem>``. Nothing is
skipped silently: callers either get every volume or an error.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import stat
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np

from gate.errors import InputError
from gate.identity import Pseudonymizer
from gate.values import Volume

DEFAULT_MAX_VOXELS = 512 * 512 * 512
"""Refuse volumes above 134M voxels (512 MiB as float32) unless the limit is raised: enough for
a 512x512x512 CT, small enough that a mis-typed header cannot exhaust a 24 GB machine."""

MAX_NIFTI_OFFSET = 64 * 1024 * 1024
"""Refuse a NIfTI header whose voxel data starts more than 64 MiB in (header + extensions): the
largest extensions seen in practice (CIFTI-2 XML, nibabel's test data) are a few MiB, and every
byte before the voxels is inflated and held in memory."""

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
    recursively and each of its entries is a source (an unsupported, unreadable or dangling one
    is rejected by :func:`read_volumes`, never skipped). Hidden files (dot-names) are ignored.

    Args:
        paths: files or folders given by the user.

    Returns:
        Sorted, de-duplicated list of files and DICOM series folders.

    Raises:
        InputError: a path does not exist or cannot be opened (permission, symlink loop), a
            folder cannot be listed or loops back onto itself, or holds nothing readable.

    """
    found: list[Path] = []
    for path in paths:
        mode = _stat_mode(path)
        if not stat.S_ISDIR(mode):
            found.append(path)
            continue
        before = len(found)
        found.extend(_walk(path, frozenset()))
        if len(found) == before:
            raise InputError(path, f"folder holds no readable volume ({SUPPORTED})")
    return sorted(set(found))


def _stat_mode(path: Path) -> int:
    """``st_mode`` of ``path`` (symlinks followed); OS errors as one-line :class:`InputError`."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError as err:
        if os.path.islink(path):
            raise InputError(path, "broken symbolic link (its target does not exist)") from err
        raise InputError(path, "no such file or folder") from err
    except OSError as err:
        raise InputError(path, f"cannot open ({_os_reason(err)})") from err


def _os_reason(err: OSError) -> str:
    """The OS's words for an error (``Permission denied``), without the path they repeat."""
    return err.strerror or type(err).__name__


def _entry_mode(path: Path) -> int:
    """``st_mode`` of a folder entry; 0 (neither folder nor regular file) if it cannot be stat'ed."""
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


def _walk(folder: Path, seen: frozenset[tuple[int, int]]) -> Iterator[Path]:
    try:
        info = os.stat(folder)
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise InputError(folder, f"cannot list folder ({_os_reason(err)})") from err
    key = (info.st_dev, info.st_ino)
    if key in seen:
        raise InputError(folder, "folder loop: a symbolic link leads back to a folder above it")
    seen = seen | {key}
    modes = {p: _entry_mode(p) for p in entries}
    files = [p for p in entries if not stat.S_ISDIR(modes[p])]
    regular = [p for p in files if stat.S_ISREG(modes[p])]
    if any(_suffix(p) in (".dcm", ".dicom", ".ima") or _is_dicom_file(p) for p in regular):
        yield folder  # one series: its files are read (or refused) together; subfolders below
    else:
        # Every other entry is a source, even an unsupported, unreadable or dangling one:
        # read_volumes rejects it by name, so nothing in a folder is skipped silently.
        yield from files
    for p in entries:
        if stat.S_ISDIR(modes[p]):
            yield from _walk(p, seen)


def read_volumes(path: Path, options: ReadOptions) -> list[Volume]:
    """Read one source (file or DICOM series folder) into validated volumes.

    Every reader refuses from the header (shape x dtype against ``options.max_voxels``) before
    it allocates or inflates voxels.

    Args:
        path: .nii / .nii.gz / .npy / .npz / DICOM file, or a folder holding one DICOM series.
        options: identity and size limits.

    Returns:
        One volume per 3D array in the source (a MedMNIST-style ``.npz`` holds many).

    Raises:
        InputError: unreadable (OS error), corrupt, not 3D, a single 2D slice, non-finite,
            empty, constant, too large, mixed DICOM series, or unsupported extension.

    """
    mode = _stat_mode(path)
    if stat.S_ISDIR(mode):
        from gate.dicom_series import read_dicom_series

        raw, affine, label = read_dicom_series(path, options.max_voxels)
        label = label or options.pseudonymizer.label_for(path)
        arrays = [(str(path), raw)]
    elif not stat.S_ISREG(mode):
        raise InputError(path, "not a regular file (a device, FIFO or socket); expected a volume file")
    else:
        try:
            arrays, affine, label = _read_file(path, options.max_voxels)
        except OSError as err:
            raise InputError(path, f"cannot read ({_os_reason(err)})") from err
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


def _read_file(path: Path, max_voxels: int) -> tuple[list[tuple[str, np.ndarray]], np.ndarray, str | None]:
    """Arrays, affine and clear patient label (DICOM only) of one regular file, by extension."""
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        raw, affine = _read_nifti(path, max_voxels)
        return [(str(path), raw)], affine, None
    if suffix == ".npy":
        return [(str(path), _read_npy(path, max_voxels))], np.eye(4), None
    if suffix == ".npz":
        return _read_npz(path, max_voxels), np.eye(4), None
    if suffix in (".dcm", ".dicom", ".ima") or _is_dicom_file(path):
        from gate.dicom_series import read_dicom_file

        raw, affine, label = read_dicom_file(path, max_voxels)
        return [(str(path), raw)], affine, label
    raise InputError(path, f"unsupported extension '{suffix or path.name}' ({SUPPORTED})")


def check_shape(path: str | Path, shape: tuple[int, ...], max_voxels: int) -> None:
    """Refuse from a header's shape, before any voxel is allocated.

    Args:
        path: named in the error.
        shape: the declared array shape (trailing singleton axes allowed beyond 3).
        max_voxels: the limit.

    Raises:
        InputError: more than 3 non-singleton axes, or more voxels than ``max_voxels``.

    """
    if len(shape) > 3 and any(s != 1 for s in shape[3:]):
        raise InputError(path, f"expected a 3D volume, found shape {tuple(shape)}")
    voxels = math.prod(int(s) for s in shape)
    if voxels > max_voxels:
        raise InputError(
            path, f"volume has {voxels} voxels, more than the limit of {max_voxels} (raise --max-voxels)"
        )


def _nifti_image_class(head: bytes) -> type[Any]:
    """NIfTI-1 or NIfTI-2 image class from ``sizeof_hdr`` (348 / 540, either byte order)."""
    if len(head) >= 4:
        for order in "<>":
            size = struct.unpack(order + "i", head[:4])[0]
            if size == 348:
                return nib.Nifti1Image
            if size == 540:
                return nib.Nifti2Image
    raise ValueError("no NIfTI-1 or NIfTI-2 header (sizeof_hdr is neither 348 nor 540)")


def _corrupt(err: BaseException) -> bool:
    """A format error rather than the OS's: gzip's OSError subclass, or any error without errno."""
    return not isinstance(err, OSError) or isinstance(err, gzip.BadGzipFile) or err.errno is None


def _read_nifti(path: Path, max_voxels: int) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI-1/2 file, refusing from its header before voxels are read or inflated.

    ``.nii.gz`` is inflated as a stream and never beyond the bytes the header says the file
    needs (header, extensions, voxels): a small file that inflates to gigabytes costs no more
    than the volume it declares, and a declared volume above ``max_voxels`` costs nothing.
    """
    gz = path.name.lower().endswith(".gz")
    try:
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = _read_upto(f, 540)
            klass = _nifti_image_class(head)
            header = klass.header_class.from_fileobj(io.BytesIO(head))
            shape = tuple(int(s) for s in header.get_data_shape())
            if 3000 <= int(header["intent_code"]) < 3100:
                raise InputError(path, "a CIFTI-2 file (surface / grayordinate data), not a 3D volume")
            check_shape(path, shape, max_voxels)
            dtype = header.get_data_dtype()
            offset = int(header.get_data_offset())
            if offset > MAX_NIFTI_OFFSET:
                raise InputError(
                    path, f"NIfTI voxels start at byte {offset}, beyond the limit of {MAX_NIFTI_OFFSET}"
                )
            need = max(offset, int(header["sizeof_hdr"])) + math.prod(shape) * dtype.itemsize
            raw = head[:need] if need <= len(head) else head + _read_upto(f, need - len(head))
        if len(raw) < need:
            raise ValueError(f"file holds {len(raw)} of the {need} bytes its header declares")
        img = klass.from_bytes(raw)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except InputError:
        raise
    except Exception as err:  # nibabel, gzip and zlib raise many types for truncated / corrupt files
        if not _corrupt(err):
            raise
        raise InputError(path, f"cannot read NIfTI: truncated or corrupt file ({_short(err)})") from err
    return data, affine


def estimate_voxels(path: Path) -> int:
    """About how many voxels reading ``path`` will hold, without reading them (for batching).

    NIfTI: the header's shape (540 bytes read, inflated as a stream for ``.nii.gz``); a folder
    (a DICOM series): its files' bytes / 2; any other file: its bytes / 2 (uncompressed
    formats hold at least 2 bytes a voxel). A file whose header cannot be read counts 0: the
    read itself reports it.
    """
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) // 2
        if _suffix(path) in (".nii", ".nii.gz"):
            gz = path.name.lower().endswith(".gz")
            with gzip.open(path, "rb") if gz else open(path, "rb") as f:
                head = _read_upto(f, 540)
            header = _nifti_image_class(head).header_class.from_fileobj(io.BytesIO(head))
            return math.prod(int(x) for x in header.get_data_shape())
        return path.stat().st_size // 2
    except Exception:  # an estimate only: the read itself refuses what it cannot read
        return 0


def _read_upto(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes of a stream (fewer at its end), read in 16 MiB chunks; never more."""
    chunks, left = [], n
    while left > 0:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an .npy header, without reading the array."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    return tuple(int(s) for s in shape), dtype


def _check_dtype(path: str | Path, dtype: np.dtype[Any]) -> None:
    if dtype.hasobject or not np.issubdtype(dtype, np.number):
        raise InputError(path, f"voxels must be numeric; found dtype {dtype}")


def _read_npy(path: Path, max_voxels: int) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            shape, dtype = _npy_header(f)
            start = f.tell()
        _check_dtype(path, dtype)
        check_shape(path, shape, max_voxels)
        need, size = start + math.prod(shape) * dtype.itemsize, os.path.getsize(path)
        if size < need:
            raise ValueError(f"file holds {size} of the {need} bytes its header declares")
        return np.load(path, allow_pickle=False)
    except InputError:
        raise
    except Exception as err:
        if not _corrupt(err):
            raise
        raise InputError(path, f"cannot read NumPy file: truncated or corrupt ({_short(err)})") from err


def _check_npz(path: Path, max_voxels: int) -> None:
    """Refuse an .npz from its members' headers: per volume and in all, against ``max_voxels``.

    Each member is inflated only as far as its .npy header; the whole archive may not declare
    more than ``max_voxels`` voxels, so a small archive cannot inflate to gigabytes.
    """
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            with zf.open(info) as f:
                shape, dtype = _npy_header(f)  # type: ignore[arg-type]
            _check_dtype(f"{path}#{key}", dtype)
            volume = shape[1:] if key.endswith("_images") else shape
            if key.endswith("_images") and len(volume) == 4 and volume[-1] == 1:
                volume = volume[:3]
            check_shape(f"{path}#{key}", volume, max_voxels)
            total += math.prod(shape)
    if total > max_voxels:
        raise InputError(
            path,
            f"archive holds {total} voxels in all, more than the limit of {max_voxels} (raise --max-voxels)",
        )


def _read_npz(path: Path, max_voxels: int) -> list[tuple[str, np.ndarray]]:
    """Arrays of an .npz, as (source, array) pairs.

    Every MedMNIST-style ``<split>_images`` stack (N, X, Y, Z[, 1]) is split into N volumes;
    without such keys, each array is one volume.
    """
    try:
        _check_npz(path, max_voxels)
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except InputError:
        raise
    except Exception as err:
        if not _corrupt(err):
            raise
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
