"""The on-disk contract of an index folder: file names, the manifest, and the checks at load.

:mod:`gate.index` builds and searches; this module says what an index folder must hold and
refuses anything else (:func:`read_manifest`, :func:`check_compatible`, :func:`read_vectors`),
each with a message that names the folder and says to rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gate.calibration import Calibration
from gate.domain import Domain
from gate.errors import IntegrityError
from gate.poses import PoseSet
from gate.preprocess import PreprocessConfig

INDEX_FILE = "index.bin"
VECTORS_FILE = "vectors.npy"
MANIFEST_FILE = "manifest.json"
GRIDS_FILE = "grids.npy"
"""Verifying indexes only: float16 (volumes, X, Y, Z) preprocessed training grids in row order,
NaN where the grid holds no voxel of the scan (padding). Read by :func:`read_grids` only."""
FORMAT_VERSION = 5
"""Manifest format this code writes and reads (3: poses may cut the field of view, `window_cut_vox`;
4: the domain the index can judge, :class:`gate.domain.Domain`; 5: verification,
:class:`Verification` and ``grids.npy``)."""

SPACE = "cosine"
"""hnswlib space; its distance is ``1 - cos``, converted to cosine similarity in :meth:`search`."""
PSEUDONYM_PATTERN = r"^p-[0-9a-f]{16}$"
"""Patient ids in the manifest must be gate pseudonyms (gate.identity), never names or paths."""


class EmbeddingModel(Protocol):
    """What the index needs of an encoder (:class:`gate.embed.Encoder` satisfies it)."""

    sha256: str
    dim: int
    preprocess: PreprocessConfig

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        """(N, 1, X, Y, Z) preprocessed float32 -> (N, D) float32 unit rows."""
        ...


class IndexRow(BaseModel):
    """One indexed training volume.

    Attributes:
        patient_id: pseudonymous patient id.
        file_sha256: sha256 of the source file (of its files' digests for a DICOM series).
        voxel_sha256: :func:`gate.digest.sha256_voxels` of the preprocessed grid (as read).

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    patient_id: str = Field(pattern=PSEUDONYM_PATTERN)
    file_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    voxel_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SelfTest(BaseModel):
    """Result of planting perturbed copies of training vectors and searching for them.

    Attributes:
        probes: planted copies per cosine level.
        cosines: cosine of the copies to their source.
        recall_at_1: fraction whose top result is the source (or a row at least as close).
        passed: recall_at_1 == 1.0.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    probes: int
    cosines: tuple[float, ...]
    recall_at_1: float
    passed: bool


class Verification(BaseModel):
    """What a verifying index needs to re-score its retrieved patients (:mod:`gate.verify`).

    Attributes:
        max_shift_vox: integer shifts searched per axis (+-), voxels.
        grids_sha256: sha256 of ``grids.npy``.
        calibration: each reference patient's verified score (best masked NCC to its
            retrieved training patients), the same patients and method as the manifest's
            cosine calibration; ascending in [-1, 1].
        copies: simulated copies' verified scores (:func:`gate.verify.simulated_copies`),
            ascending; what a copy-aware policy threshold is read from.
        copies_cosine: the same copies' nearest cosine similarities, ascending.
        identity: the reference patients' identity scores (the same patients as
            ``calibration``; :meth:`gate.verify.Verifier._identity_score`), ascending; what a
            policy's ``identity`` percentile is read from. None on an index built before it.
        copies_identity: the simulated copies' identity scores, ascending.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_shift_vox: int = Field(ge=0, le=32)
    grids_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    calibration: Calibration
    copies: Calibration | None = None
    copies_cosine: Calibration | None = None
    identity: Calibration | None = None
    copies_identity: Calibration | None = None


class IndexManifest(BaseModel):
    """Everything that identifies an index and is checked at load. No names, no paths.

    ``rows`` holds one entry per training volume; the index holds ``len(poses)`` vectors per
    volume, volume-major: vector ``i`` is volume ``i // len(poses)`` under pose ``i % len(poses)``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int
    space: str
    dim: int = Field(ge=1)
    M: int = Field(ge=2)
    ef_construction: int = Field(ge=1)
    ef: int = Field(ge=1)
    candidates: int = Field(ge=1)
    count: int = Field(ge=1)
    n_patients: int = Field(ge=1)
    seed: int
    encoder_sha256: str
    preprocess_digest: str
    preprocess: PreprocessConfig
    poses: PoseSet
    poses_digest: str
    index_sha256: str
    vectors_sha256: str
    rows: tuple[IndexRow, ...]
    calibration: Calibration
    self_test: SelfTest
    domain: Domain | None
    verification: Verification | None = None
    gate_version: str
    hnswlib_version: str


def read_manifest(index_dir: Path) -> IndexManifest:
    """Read and validate ``index_dir/manifest.json``.

    Raises:
        IntegrityError: missing, unreadable, another format version, or invalid (the field path).

    """
    path = index_dir / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(f"{path}: not found; expected an index folder written by `gate index build`")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}: unreadable JSON ({err}); rebuild the index") from err
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        raise IntegrityError(
            f"{path}: format_version {data.get('format_version')!r}; "
            f"this gate reads {FORMAT_VERSION}; rebuild it"
        )
    try:
        return IndexManifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise IntegrityError(
            f"{path}: invalid manifest at {where}: {first['msg']}; rebuild the index"
        ) from err


def check_compatible(index_dir: Path, manifest: IndexManifest, encoder: EmbeddingModel) -> None:
    """Refuse an index that does not belong to ``encoder`` or whose manifest contradicts itself.

    Raises:
        IntegrityError: space, encoder digest, dimension, preprocessing digest, a failed build
            self-test, an edited pose set, or a row count that does not add up.

    """
    if manifest.space != SPACE:
        raise IntegrityError(f"{index_dir}: space {manifest.space!r}; expected {SPACE!r}")
    if manifest.encoder_sha256 != encoder.sha256:
        raise IntegrityError(
            f"{index_dir}: built with encoder {manifest.encoder_sha256[:12]}…, but the encoder in use is "
            f"{encoder.sha256[:12]}…; pass the matching --encoder or rebuild with `gate index build`"
        )
    if manifest.dim != encoder.dim:
        raise IntegrityError(
            f"{index_dir}: dimension {manifest.dim}, but the encoder makes {encoder.dim}-d embeddings; "
            "rebuild the index with this encoder"
        )
    if (
        manifest.preprocess_digest != encoder.preprocess.digest
        or manifest.preprocess.digest != manifest.preprocess_digest
    ):
        raise IntegrityError(
            f"{index_dir}: preprocessing digest {manifest.preprocess_digest[:12]}… differs from "
            f"the encoder's "
            f"{encoder.preprocess.digest[:12]}…; rebuild the index with this encoder"
        )
    if not manifest.self_test.passed or manifest.self_test.recall_at_1 < 1.0:
        raise IntegrityError(
            f"{index_dir}: build self-test recall@1 {manifest.self_test.recall_at_1:.4f} < 1.0; refusing an "
            "index that misses near-copies; rebuild it"
        )
    if manifest.poses.digest != manifest.poses_digest:
        raise IntegrityError(
            f"{index_dir}: poses digest {manifest.poses_digest[:12]}… does not match the recorded poses "
            f"({manifest.poses.digest[:12]}…); the manifest was edited; rebuild the index"
        )
    if len(manifest.rows) * len(manifest.poses) != manifest.count:
        raise IntegrityError(
            f"{index_dir}: manifest lists {len(manifest.rows)} volumes x {len(manifest.poses)} poses "
            f"but count {manifest.count}"
        )


def read_vectors(path: Path, manifest: IndexManifest) -> np.ndarray:
    """Load ``vectors.npy`` (no pickle) as float32 (count, dim) finite unit rows.

    Raises:
        IntegrityError: unreadable, wrong shape or dtype, or rows that are not finite unit vectors.

    """
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}: unreadable ({err}); rebuild the index") from err
    if vectors.shape != (manifest.count, manifest.dim) or vectors.dtype != np.float32:
        raise IntegrityError(
            f"{path}: {vectors.dtype} {vectors.shape}; expected float32 ({manifest.count}, {manifest.dim})"
        )
    norms = np.linalg.norm(vectors, axis=1)
    if not np.all(np.isfinite(vectors)) or np.max(np.abs(norms - 1.0)) > 1e-3:
        raise IntegrityError(f"{path}: rows must be finite unit vectors; rebuild the index")
    return vectors


def read_grids(path: Path, manifest: IndexManifest) -> np.ndarray:
    """Load ``grids.npy`` (no pickle) of a verifying index: float16 (volumes, X, Y, Z).

    The caller checks the file's sha256 against ``manifest.verification.grids_sha256`` first.

    Raises:
        IntegrityError: unreadable, wrong shape or dtype, values outside [0, 1] (NaN marks
            padding), or a grid without a single voxel.

    """
    try:
        grids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}: unreadable ({err}); rebuild the index") from err
    shape = (len(manifest.rows), *manifest.preprocess.grid)
    if grids.shape != shape or grids.dtype != np.float16:
        raise IntegrityError(f"{path}: {grids.dtype} {grids.shape}; expected float16 {shape}")
    finite = np.isfinite(grids)
    if np.any(np.isinf(grids)) or np.any((grids[finite] < 0) | (grids[finite] > 1)):
        raise IntegrityError(f"{path}: grid values must lie in [0, 1] (NaN for padding); rebuild the index")
    if not np.all(finite.reshape(len(grids), -1).any(axis=1)):
        raise IntegrityError(f"{path}: a training grid holds no voxel; rebuild the index")
    return grids
