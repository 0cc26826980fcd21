"""A sharded training index: one hnswlib graph per shard, bound by a top-level manifest.

hnswlib has no distributed build or merge, so an index that outgrows one graph is split by
patient into N shards, each a complete :mod:`gate.index` folder (its own graph, vectors,
digests and self-test)::

    shards.json        ShardSetManifest: the shards in order, each bound by the sha256 of its
                       manifest.json, index.bin and vectors.npy, plus the set's calibration
    shard-000/         a gate.index folder (index.bin, vectors.npy, manifest.json)
    shard-001/         ...

A patient's rows never straddle shards, so the patient-level max similarity of one shard is
exact for that patient, and the set's top k is the top k of the union of every shard's top k.
Search fans out, each shard re-ranks exactly (``HNSW proposes, exact cosine decides``), and the
answers merge. The set is identified by the sha256 of ``shards.json`` (stamped on audit records
as ``index_sha256``). Calibration is computed once over every row and recorded in the set and in
every shard, so decisions equal those of the unsharded index on the same data.

Loading checks every shard as :meth:`TrainingIndex.load` does, then the set: no shard missing,
unlisted, swapped (digests bound by position) or edited; no patient in two shards; counts add up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gate import __version__
from gate.calibration import Calibration
from gate.digest import sha256_file
from gate.domain import Domain
from gate.errors import IntegrityError, UsageError
from gate.index import DEFAULT_K, DEFAULT_SEED, Probe, TrainingIndex, build_index
from gate.index_manifest import (
    INDEX_FILE,
    MANIFEST_FILE,
    VECTORS_FILE,
    EmbeddingModel,
    IndexManifest,
    Verification,
    read_manifest,
)
from gate.poses import IDENTITY_ONLY, PoseSet
from gate.values import Embedding, Neighbours, merge_neighbours
from gate.verify import Verifier, VerifySetup

SHARDS_FILE = "shards.json"
SHARD_FORMAT_VERSION = 1
"""Layout of ``shards.json`` this code writes and reads."""

MAX_SHARDS = 1024


def shard_name(i: int) -> str:
    """Folder name of shard ``i`` (``shard-000``)."""
    return f"shard-{i:03d}"


class ShardEntry(BaseModel):
    """One shard as the set binds it.

    Attributes:
        name: folder name inside the set.
        manifest_sha256: sha256 of the shard's manifest.json.
        index_sha256: sha256 of its index.bin (as in its manifest).
        vectors_sha256: sha256 of its vectors.npy (as in its manifest).
        count: vectors in the shard.
        n_patients: patients in the shard.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^shard-[0-9]{3,4}$")
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    index_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    vectors_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int = Field(ge=1)
    n_patients: int = Field(ge=1)


class ShardSetManifest(BaseModel):
    """``shards.json``: the shards of one index, in order, and what they share."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: int = Field(ge=SHARD_FORMAT_VERSION, le=SHARD_FORMAT_VERSION)
    encoder_sha256: str
    preprocess_digest: str
    poses_digest: str
    dim: int = Field(ge=1)
    count: int = Field(ge=1)
    n_patients: int = Field(ge=1)
    seed: int
    calibration: Calibration
    domain: Domain | None
    shards: tuple[ShardEntry, ...] = Field(min_length=1, max_length=MAX_SHARDS)
    gate_version: str


def assign_shards(patient_ids: Sequence[str], rows_per_volume: Sequence[int], n_shards: int) -> list[int]:
    """Shard of each volume: whole patients, balanced by rows, deterministic.

    Patients (sorted by id, largest first) go to the shard with the fewest rows so far (ties:
    the lowest shard), so every patient's volumes land in one shard.

    Args:
        patient_ids: pseudonymous id per volume.
        rows_per_volume: vectors per volume (poses).
        n_shards: number of shards, at least 1 and at most the number of patients.

    Returns:
        Shard number per volume.

    Raises:
        UsageError: ``n_shards`` out of range.

    """
    patients = sorted(set(patient_ids))
    if not 1 <= n_shards <= min(len(patients), MAX_SHARDS):
        raise UsageError(
            f"--shards {n_shards}: need 1 <= shards <= number of patients ({len(patients)}) "
            f"and <= {MAX_SHARDS}"
        )
    size: dict[str, int] = dict.fromkeys(patients, 0)
    for p, r in zip(patient_ids, rows_per_volume, strict=True):
        size[p] += r
    load = [0] * n_shards
    owner: dict[str, int] = {}
    for p in sorted(patients, key=lambda q: (-size[q], q)):
        s = min(range(n_shards), key=lambda i: (load[i], i))
        owner[p] = s
        load[s] += size[p]
    return [owner[p] for p in patient_ids]


Mapper = Callable[[Callable[..., Any], list[tuple[Any, ...]]], list[Any]]
"""Runs ``fn(*args)`` for each args tuple, possibly in parallel, and returns results in order."""


def process_map(fn: Callable[..., Any], jobs: list[tuple[Any, ...]]) -> list[Any]:
    """The local engine's mapper: one process per job, at most one per CPU."""
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(fn, *args) for args in jobs]
        return [f.result() for f in futures]


class EncoderIdentity:
    """What building or loading an index needs of an encoder (digest, dimension, preprocessing), picklable."""

    def __init__(self, encoder: EmbeddingModel) -> None:
        self.sha256 = encoder.sha256
        self.dim = encoder.dim
        self.preprocess = encoder.preprocess

    def embed_array(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - never called
        """Never called: building or loading an index embeds nothing."""
        raise NotImplementedError("an EncoderIdentity embeds nothing; use the encoder itself")


def _build_one(
    probes: list[Probe],
    patient_ids: list[str],
    file_sha256s: list[str],
    encoder: EncoderIdentity,
    out_dir: Path,
    calibration: Calibration,
    seed: int,
    poses: PoseSet,
    domain: Domain | None,
    verification: VerifySetup | None = None,
) -> IndexManifest:
    return build_index(
        probes, patient_ids, file_sha256s, encoder, out_dir, calibration, seed, poses, domain, verification
    )


def build_sharded(
    probes: Sequence[Probe],
    patient_ids: Sequence[str],
    file_sha256s: Sequence[str],
    encoder: EmbeddingModel,
    out_dir: Path,
    calibration: Calibration,
    n_shards: int,
    seed: int = DEFAULT_SEED,
    poses: PoseSet = IDENTITY_ONLY,
    mapper: Mapper = process_map,
    domain: Domain | None = None,
    verification: VerifySetup | None = None,
) -> ShardSetManifest:
    """Split by patient, build every shard with :func:`gate.index.build_index` (in parallel), bind them.

    Args:
        probes: ``len(poses)`` per training volume, volume-major.
        patient_ids: pseudonymous patient id per volume.
        file_sha256s: sha256 of each volume's source file.
        encoder: the encoder the probes came from.
        out_dir: must not exist; built under a temporary name beside it and renamed.
        calibration: computed over every row (the set's and every shard's calibration).
        n_shards: number of shards.
        seed: hnswlib and self-test seed of every shard.
        poses: the poses the probes were embedded under.
        mapper: runs the shard builds (:func:`process_map` locally; the Ray engine passes tasks).
        domain: what the index can judge, measured over every training volume (recorded in the
            set and in every shard).
        verification: every volume's grid and the verified calibration over every volume; each
            shard stores its own volumes' grids and the same calibration.

    Returns:
        The written set manifest.

    Raises:
        UsageError: ``out_dir`` exists, bad ``n_shards`` or mismatched lengths.
        IntegrityError: a shard's self-test failed (nothing is written).

    """
    if out_dir.exists():
        raise UsageError(
            f"{out_dir}: already exists; choose a new --out folder (indexes are never overwritten)"
        )
    n_poses = len(poses)
    if not probes or len(probes) != n_poses * len(patient_ids) or len(patient_ids) != len(file_sha256s):
        raise UsageError(
            f"need one patient id and file hash per volume and {n_poses} probe(s) per volume; got "
            f"{len(probes)} probes, {len(patient_ids)} ids, {len(file_sha256s)} hashes"
        )
    owner = assign_shards(patient_ids, [n_poses] * len(patient_ids), n_shards)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        jobs = []
        for s in range(n_shards):
            vols = [i for i, o in enumerate(owner) if o == s]
            jobs.append(
                (
                    [probes[i * n_poses + j] for i in vols for j in range(n_poses)],
                    [patient_ids[i] for i in vols],
                    [file_sha256s[i] for i in vols],
                    EncoderIdentity(encoder),
                    tmp / shard_name(s),
                    calibration,
                    seed,
                    poses,
                    domain,
                    None
                    if verification is None
                    else dataclasses.replace(verification, grids=verification.grids[vols]),
                )
            )
        manifests: list[IndexManifest] = mapper(_build_one, jobs)
        entries = tuple(
            ShardEntry(
                name=shard_name(s),
                manifest_sha256=sha256_file(tmp / shard_name(s) / MANIFEST_FILE),
                index_sha256=m.index_sha256,
                vectors_sha256=m.vectors_sha256,
                count=m.count,
                n_patients=m.n_patients,
            )
            for s, m in enumerate(manifests)
        )
        manifest = ShardSetManifest(
            format_version=SHARD_FORMAT_VERSION,
            encoder_sha256=encoder.sha256,
            preprocess_digest=encoder.preprocess.digest,
            poses_digest=poses.digest,
            dim=manifests[0].dim,
            count=sum(e.count for e in entries),
            n_patients=len(set(patient_ids)),
            seed=seed,
            calibration=calibration,
            domain=domain,
            shards=entries,
            gate_version=__version__,
        )
        (tmp / SHARDS_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_shard_set(index_dir: Path) -> ShardSetManifest:
    """Read and validate ``index_dir/shards.json``.

    Raises:
        IntegrityError: unreadable or invalid.

    """
    path = index_dir / SHARDS_FILE
    try:
        return ShardSetManifest.model_validate(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}: unreadable ({err}); rebuild the index") from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise IntegrityError(f"{path}: invalid at {where}: {first['msg']}; rebuild the index") from err


def verify_shard_files(index_dir: Path, manifest: ShardSetManifest) -> None:
    """The set-level checks (before any shard loads): every listed shard present and unedited.

    Raises:
        IntegrityError: a shard missing, unlisted, or whose files do not match its entry.

    """
    listed = {e.name for e in manifest.shards}
    if len(listed) != len(manifest.shards):
        raise IntegrityError(f"{index_dir / SHARDS_FILE}: lists a shard twice; rebuild the index")
    present = {p.name for p in index_dir.iterdir() if p.name.startswith("shard-")}
    if present - listed:
        raise IntegrityError(
            f"{index_dir}: unlisted shard folder(s) {sorted(present - listed)}; rebuild the index"
        )
    for entry in manifest.shards:
        shard = index_dir / entry.name
        for name, expected in (
            (MANIFEST_FILE, entry.manifest_sha256),
            (INDEX_FILE, entry.index_sha256),
            (VECTORS_FILE, entry.vectors_sha256),
        ):
            path = shard / name
            if not path.is_file():
                raise IntegrityError(f"{path}: missing; the sharded index is incomplete, rebuild it")
            found = sha256_file(path)
            if found != expected:
                raise IntegrityError(
                    f"{path}: sha256 {found[:12]}… does not match {SHARDS_FILE}'s {expected[:12]}…; "
                    "the shard was edited, replaced or swapped; rebuild the index"
                )


def check_set(index_dir: Path, manifest: ShardSetManifest, shards: Sequence[IndexManifest]) -> None:
    """Loaded shards agree with their entries and with the set; no patient is in two shards.

    Raises:
        IntegrityError: a count, the calibration, encoder, poses or seed differ, a patient
            appears in two shards, or the totals do not add up.

    """
    seen: set[str] = set()
    for entry, m in zip(manifest.shards, shards, strict=True):
        if (
            m.count != entry.count
            or m.n_patients != entry.n_patients
            or m.index_sha256 != entry.index_sha256
            or m.encoder_sha256 != manifest.encoder_sha256
            or m.poses_digest != manifest.poses_digest
            or m.calibration != manifest.calibration
            or m.domain != manifest.domain
            or m.seed != manifest.seed
        ):
            raise IntegrityError(
                f"{index_dir / entry.name}: does not belong to this shard set (count, encoder, poses, "
                f"seed or calibration differ from {SHARDS_FILE}); rebuild the index"
            )
        first = shards[0].verification
        if (m.verification is None) != (first is None) or (
            m.verification is not None
            and first is not None
            and m.verification.model_dump(exclude={"grids_sha256"})
            != first.model_dump(exclude={"grids_sha256"})
        ):
            raise IntegrityError(
                f"{index_dir / entry.name}: its verification differs from the other shards'; "
                "rebuild the index"
            )
        ids = {r.patient_id for r in m.rows}
        if ids & seen:
            raise IntegrityError(f"{index_dir}: a patient appears in two shards; rebuild the index")
        seen |= ids
    if sum(m.count for m in shards) != manifest.count or len(seen) != manifest.n_patients:
        raise IntegrityError(f"{index_dir}: shard counts do not add up to {SHARDS_FILE}'s; rebuild it")


class ShardedIndex:
    """A loaded, verified shard set. Create with :meth:`load`; searches like :class:`TrainingIndex`.

    Attributes:
        set_manifest: the verified ``shards.json``.
        sha256: sha256 of ``shards.json`` (the set's identity on audit records).
        shards: the loaded shards, in order.

    """

    def __init__(self, set_manifest: ShardSetManifest, sha256: str, shards: list[TrainingIndex]) -> None:
        self.set_manifest = set_manifest
        self.sha256 = sha256
        self.shards = shards
        self._verifier: Verifier | None = None

    @property
    def calibration(self) -> Calibration:
        """The calibration over every row, recorded at build time."""
        return self.set_manifest.calibration

    @property
    def domain(self) -> Domain | None:
        """The domain of every training volume, recorded at build time."""
        return self.set_manifest.domain

    @property
    def manifest(self) -> IndexManifest:
        """The first shard's manifest (encoder, preprocessing and poses are the set's)."""
        return self.shards[0].manifest

    @classmethod
    def load(cls, index_dir: Path, encoder: EmbeddingModel) -> ShardedIndex:
        """Verify the set, then load every shard with :meth:`TrainingIndex.load`.

        Raises:
            IntegrityError: the set manifest is invalid or of another encoder; a shard is
                missing, unlisted, swapped or edited; a shard fails its own checks; a patient
                appears in two shards.

        """
        manifest = read_shard_set(index_dir)
        if manifest.encoder_sha256 != encoder.sha256:
            raise IntegrityError(
                f"{index_dir}: built with encoder {manifest.encoder_sha256[:12]}…, but the encoder in use "
                f"is {encoder.sha256[:12]}…; pass the matching --encoder or rebuild the index"
            )
        verify_shard_files(index_dir, manifest)
        shards = [TrainingIndex.load(index_dir / e.name, encoder) for e in manifest.shards]
        check_set(index_dir, manifest, [s.manifest for s in shards])
        return cls(manifest, sha256_file(index_dir / SHARDS_FILE), shards)

    @property
    def verification(self) -> Verification | None:
        """The verification record every shard shares (None: the set does not verify)."""
        return self.shards[0].manifest.verification

    @property
    def verifier(self) -> Verifier | None:
        """One verifier over every shard's training grids (None: the set does not verify)."""
        if self._verifier is None:
            self._verifier = combined_verifier(
                self.shards[0].manifest, [(s.manifest, s.grids) for s in self.shards]
            )
        return self._verifier

    def search_many(
        self,
        embeddings: Sequence[Embedding],
        voxel_sha256s: Sequence[str | None],
        k: int = DEFAULT_K,
        include: Sequence[Sequence[str]] | None = None,
    ) -> list[Neighbours]:
        """Fan out to every shard, merge the top ``k`` patients (and ``include``'s) per candidate."""
        per_shard = [s.search_many(embeddings, voxel_sha256s, k, include) for s in self.shards]
        keep = include if include is not None else [()] * len(embeddings)
        return [
            merge_neighbours(parts, k, kept)
            for parts, kept in zip(zip(*per_shard, strict=True), keep, strict=True)
        ]

    def search(self, embedding: Embedding, voxel_sha256: str | None = None, k: int = DEFAULT_K) -> Neighbours:
        """Nearest training patients of one candidate (see :meth:`TrainingIndex.search`)."""
        return self.search_many([embedding], [voxel_sha256], k)[0]


class Searcher(Protocol):
    """What gate check and the publication check need of an index (sharded or not)."""

    sha256: str

    @property
    def calibration(self) -> Calibration: ...  # noqa: D102

    @property
    def domain(self) -> Domain | None: ...  # noqa: D102

    @property
    def verification(self) -> Verification | None: ...  # noqa: D102

    @property
    def verifier(self) -> Verifier | None: ...  # noqa: D102

    def search_many(  # noqa: D102
        self,
        embeddings: Sequence[Embedding],
        voxel_sha256s: Sequence[str | None],
        k: int = DEFAULT_K,
        include: Sequence[Sequence[str]] | None = None,
    ) -> list[Neighbours]: ...


def combined_verifier(
    first: IndexManifest, parts: Sequence[tuple[IndexManifest, np.ndarray | None]]
) -> Verifier | None:
    """A :class:`~gate.verify.Verifier` over the grids of several shards (None if they do not verify)."""
    if first.verification is None:
        return None
    grids: list[np.ndarray] = []
    pids: list[str] = []
    for m, g in parts:
        if g is None:
            raise IntegrityError("a shard of a verifying set holds no training grids; rebuild the index")
        grids.extend(g)
        pids.extend(r.patient_id for r in m.rows)
    return Verifier(grids, pids, first.poses, first.preprocess, first.verification.max_shift_vox)


def is_sharded(index_dir: Path) -> bool:
    """Whether ``index_dir`` is a shard set (holds ``shards.json``)."""
    return (index_dir / SHARDS_FILE).is_file()


def shard_dirs(index_dir: Path) -> list[Path]:
    """The index folders to load: the shards of a set (verified first), or ``index_dir`` itself."""
    if not is_sharded(index_dir):
        return [index_dir]
    manifest = read_shard_set(index_dir)
    verify_shard_files(index_dir, manifest)
    return [index_dir / e.name for e in manifest.shards]


def index_encoder_sha256(index_dir: Path) -> str:
    """The ONNX digest of the encoder an index was built with (``shards.json``'s for a set).

    Raises:
        IntegrityError: the set's or the index's manifest is unreadable or invalid.

    """
    if is_sharded(index_dir):
        return read_shard_set(index_dir).encoder_sha256
    return read_manifest(index_dir).encoder_sha256


def load_index(index_dir: Path, encoder: EmbeddingModel) -> TrainingIndex | ShardedIndex:
    """Load a sharded index (``shards.json``) or a single one, fully verified."""
    if is_sharded(index_dir):
        return ShardedIndex.load(index_dir, encoder)
    return TrainingIndex.load(index_dir, encoder)
