"""The training-data index: hnswlib over the training embeddings, with a JSON manifest.

An index directory holds three files and never goes into a bundle::

    index.bin      hnswlib graph (space "cosine"), labels = row numbers
    vectors.npy    float32 (N, D) unit rows, the exact vectors (for re-ranking; no pickle)
    manifest.json  IndexManifest: parameters, digests, pseudonymous patient id per row,
                   file and voxel hashes, calibration, self-test result

Every training volume is indexed under the poses of a :class:`~gate.poses.PoseSet` (the
identity, a flip, small shifts and turns; see :mod:`gate.poses`), one row per pose, all under
the volume's patient id.

Search is "HNSW proposes, exact cosine decides": hnswlib returns the manifest's ``candidates`` rows,
their exact cosine similarity to the query is recomputed from ``vectors.npy`` (and checked
against hnswlib's ``1 - cos``, converted here and nowhere else), rows are aggregated per
patient (max), and the closest patients come back as :class:`~gate.values.Neighbours`.

Recall is a privacy property (an ANN miss is a false pass), so every build runs a self-test
(planted perturbed copies of training vectors must come back as their source, recall@1 = 1.0),
records it in the manifest, and :meth:`TrainingIndex.load` refuses an index that failed it,
re-running a smaller self-test after every load.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import hnswlib
import numpy as np

from gate import __version__
from gate.calibration import Calibration
from gate.digest import sha256_file, sha256_voxels
from gate.domain import Domain
from gate.errors import IntegrityError, UsageError
from gate.index_manifest import (
    FORMAT_VERSION,
    GRIDS_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    PSEUDONYM_PATTERN,
    SPACE,
    VECTORS_FILE,
    EmbeddingModel,
    IndexManifest,
    IndexRow,
    SelfTest,
    Verification,
    check_compatible,
    read_grids,
    read_manifest,
    read_vectors,
)
from gate.poses import IDENTITY_ONLY, PoseSet, posed_grids
from gate.values import Embedding, Neighbours, Volume
from gate.verify import Verifier, VerifySetup, volume_ordinals

log = logging.getLogger(__name__)

DEFAULT_INDEX_DIR = Path(__file__).resolve().parent / "models" / "index"
"""The shipped index of the shipped encoder (built on the 261 MSD hippocampus volumes)."""


HNSW_M = 32
"""Graph degree. hnswlib's defaults (M=16, ef=10) gave recall@1 0.39 on near-copies at 100k;
with M=32 and the ef / candidates below, bench/index_bench.py measured recall@1 = 1.0 on 500
planted near-copies (cosine 0.9) at 10k, 100k and 1M random 128-d unit vectors (ef=10 on the
same graph: 1.0 / 0.93 / 0.43). Costs 256 B of links per row at level 0."""

EF_CONSTRUCTION = 200
"""Build-time beam width: 200 is hnswlib's recommendation for high-recall graphs; build time
grows ~linearly with it."""

EF_SEARCH = 256
"""Query beam width (hnswlib does not persist ef: set after every load). Must be >= the
number of candidates. Measured per query on one core, with re-ranking: 0.6 ms at 10k, 1.5 ms at
100k, 1.9 ms at 1M rows (bench/index_bench.py, 2026-11-25; docs/benchmarks.md)."""

CANDIDATES = 64
"""Rows retrieved from hnswlib before exact re-ranking (at least; see :func:`candidates_for`).
A patient rarely has more than a few volumes, so 64 rows cover the k <= 100 patients of any
report in practice, and more rows are a cheap safety margin for the nearest one."""

CANDIDATE_VOLUMES_POSED = 16
"""With P poses per volume, at least this many volumes' worth of rows (16 P) are retrieved,
so the poses of one close patient cannot crowd the next patients out of a k = 5 report. The
nearest row, which decides the verdict, is always among them (self-test)."""


def candidates_for(count: int, n_poses: int) -> int:
    """Rows to retrieve before re-ranking for an index of ``count`` rows with ``n_poses`` poses."""
    return max(1, min(count, max(CANDIDATES, CANDIDATE_VOLUMES_POSED * n_poses)))


DISTANCE_TOLERANCE = 1e-3
"""Max |hnswlib cosine - exact cosine| of a candidate. float32 dot products of unit vectors
agree to ~1e-6; a wrong-dimension or corrupted graph disagrees by ~0.1 or returns NaN."""

SELF_TEST_PROBES = 1000
"""Planted near-copies per build self-test (all rows when fewer): at recall 0.999 a miss
would show with probability 1 - 0.999^1000 = 63%; every miss fails the build."""

LOAD_SELF_TEST_PROBES = 64
"""Smaller self-test after every load: catches a graph that loads but answers wrongly."""

SELF_TEST_COSINES = (0.99, 0.95, 0.9)
"""Cosine of the planted copies to their source: from a resaved scan to a heavy edit."""

DEFAULT_K = 5
"""Patients reported when the caller does not say (policies set their own k)."""

BUILD_THREADS = 1
"""Single-threaded insertion makes the graph, and so index.bin's sha256, reproducible. Measured
build time on one core: 2.9 s at 10k, 113 s at 100k, 27 min at 1M rows of 128-d
(docs/benchmarks.md); the shipped 22,446-row index (261 volumes x 86 poses) builds in ~3 min,
embedding included."""

DEFAULT_SEED = 0
"""Seed of hnswlib's level generator and of the self-test's perturbations."""

EMBED_BATCH = 16
"""Volumes per encoder call: 16 x 32x48x32 float32 = 3 MiB of input."""


@dataclass(frozen=True)
class Probe:
    """One volume made ready for search.

    Attributes:
        embedding: its unit embedding.
        voxel_sha256: hash of its preprocessed grid (the exact-duplicate key).

    """

    embedding: Embedding
    voxel_sha256: str


def embed_volumes(
    volumes: Sequence[Volume], encoder: EmbeddingModel, poses: PoseSet = IDENTITY_ONLY
) -> list[Probe]:
    """Preprocess once, re-pose, hash each grid, embed in batches.

    Args:
        volumes: as read from disk, any shape.
        encoder: the encoder (its preprocessing config is used).
        poses: poses per volume (training volumes for an index); candidates use the default,
            the identity alone.

    Returns:
        ``len(poses)`` :class:`Probe` per volume, volume-major (volume 0's poses first).

    Raises:
        IntegrityError: the encoder returned a non-finite or non-unit vector.

    """
    probes: list[Probe] = []
    pending: list[tuple[Volume, np.ndarray]] = []
    for vol in volumes:  # preprocess lazily: at most one batch of grids is held at a time
        for grid in posed_grids(vol, encoder.preprocess, poses):
            pending.append((vol, grid))
            if len(pending) == EMBED_BATCH:
                probes.extend(_embed_batch(pending, encoder))
                pending = []
    if pending:
        probes.extend(_embed_batch(pending, encoder))
    return probes


def _embed_batch(posed: Sequence[tuple[Volume, np.ndarray]], encoder: EmbeddingModel) -> list[Probe]:
    """Embed one batch of (volume, preprocessed grid) pairs; hash each grid."""
    return embed_grids([grid for _, grid in posed], encoder, [vol.source for vol, _ in posed])


def embed_grids(grids: Sequence[np.ndarray], encoder: EmbeddingModel, sources: Sequence[str]) -> list[Probe]:
    """Embed preprocessed grids (one encoder call) and hash each: probes ready for search.

    Args:
        grids: N float32 arrays of shape ``encoder.preprocess.grid``, already preprocessed.
        encoder: the encoder.
        sources: where each grid came from (error messages only).

    Raises:
        IntegrityError: the encoder returned a non-finite or non-unit vector.

    """
    batch = np.stack(grids)[:, None].astype(np.float32, copy=False)
    vectors = np.asarray(encoder.embed_array(batch))
    if vectors.shape != (len(grids), encoder.dim) or not np.all(np.isfinite(vectors)):
        raise IntegrityError(
            f"encoder returned {vectors.shape} with non-finite values or a wrong shape; expected "
            f"({len(grids)}, {encoder.dim}) finite unit vectors"
        )
    probes = []
    for source, grid, vec in zip(sources, grids, vectors, strict=True):
        try:
            emb = Embedding(vector=vec.astype(np.float32), encoder_sha256=encoder.sha256, source=source)
        except ValueError as err:
            raise IntegrityError(f"{source}: encoder output is not a unit vector ({err})") from err
        probes.append(Probe(embedding=emb, voxel_sha256=sha256_voxels(grid)))
    return probes


def _new_graph(vectors: np.ndarray, seed: int, candidates: int) -> hnswlib.Index:
    graph = hnswlib.Index(space=SPACE, dim=vectors.shape[1])
    graph.init_index(max_elements=len(vectors), ef_construction=EF_CONSTRUCTION, M=HNSW_M, random_seed=seed)
    graph.set_num_threads(BUILD_THREADS)
    graph.add_items(vectors, np.arange(len(vectors)))
    graph.set_ef(max(EF_SEARCH, candidates))
    return graph


def _planted_copies(vectors: np.ndarray, rows: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """Make unit vectors at exactly ``cosine`` to ``vectors[rows]``, in a random orthogonal direction."""
    rng = np.random.default_rng(seed)
    src = vectors[rows].astype(np.float64)
    noise = rng.standard_normal(src.shape)
    noise -= (noise * src).sum(axis=1, keepdims=True) * src
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    out = cosine * src + np.sqrt(1.0 - cosine**2) * noise
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def _top_rows(
    graph: hnswlib.Index, vectors: np.ndarray, queries: np.ndarray, candidates: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate rows (Q, C) and their exact cosine similarities (Q, C), checked against hnswlib.

    Raises:
        IntegrityError: hnswlib returned non-finite distances, or distances that disagree with
            the exact vectors (corrupted graph, wrong dimension).

    """
    n = min(candidates, len(vectors))
    labels, distances = graph.knn_query(queries, k=n)
    labels = labels.astype(np.int64)
    if not np.all(np.isfinite(distances)):
        raise IntegrityError("the index returned non-finite distances; rebuild it with `gate index build`")
    hnsw_cos = 1.0 - distances.astype(np.float64)
    exact = np.einsum("qcd,qd->qc", vectors[labels].astype(np.float64), queries.astype(np.float64))
    if np.max(np.abs(hnsw_cos - exact)) > DISTANCE_TOLERANCE:
        raise IntegrityError(
            "the index's distances disagree with its stored vectors (max difference "
            f"{np.max(np.abs(hnsw_cos - exact)):.3g} > {DISTANCE_TOLERANCE}); the graph is corrupted or of "
            "another dimension; rebuild it with `gate index build`"
        )
    return labels, np.clip(exact, -1.0, 1.0)


def run_self_test(
    graph: hnswlib.Index, vectors: np.ndarray, probes: int, seed: int, candidates: int = CANDIDATES
) -> SelfTest:
    """Plant perturbed copies of training rows and check each comes back as its source.

    A probe is a hit when the top re-ranked row is its source or a row at least as similar
    (then the decision sees a similarity at least as high: no privacy miss).

    Args:
        graph: the hnswlib graph over ``vectors``.
        vectors: float32 (N, D) unit rows.
        probes: copies per cosine level (capped at N).
        seed: chooses the rows and the perturbation directions.
        candidates: rows retrieved per query before re-ranking (as in search).

    """
    rng = np.random.default_rng(seed)
    n = min(probes, len(vectors))
    rows = rng.choice(len(vectors), size=n, replace=False)
    hits = total = 0
    for i, cosine in enumerate(SELF_TEST_COSINES):
        queries = _planted_copies(vectors, rows, cosine, seed + 1 + i)
        labels, sims = _top_rows(graph, vectors, queries, candidates)
        src_sim = (vectors[rows].astype(np.float64) * queries.astype(np.float64)).sum(axis=1)
        best = sims.max(axis=1)
        hit = (labels[np.arange(n), sims.argmax(axis=1)] == rows) | (best >= src_sim - 1e-6)
        hits += int(hit.sum())
        total += n
    recall = hits / total
    return SelfTest(probes=n, cosines=SELF_TEST_COSINES, recall_at_1=recall, passed=recall == 1.0)


def build_index(
    probes: Sequence[Probe],
    patient_ids: Sequence[str],
    file_sha256s: Sequence[str],
    encoder: EmbeddingModel,
    out_dir: Path,
    calibration: Calibration,
    seed: int = DEFAULT_SEED,
    poses: PoseSet = IDENTITY_ONLY,
    domain: Domain | None = None,
    verification: VerifySetup | None = None,
) -> IndexManifest:
    """Build the graph, self-test it, and write the index directory atomically.

    Args:
        probes: ``len(poses)`` per training volume, volume-major (from :func:`embed_volumes`
            with the same ``poses``).
        patient_ids: pseudonymous patient id per volume (several volumes may share one).
        file_sha256s: sha256 of each volume's source file.
        encoder: the encoder the probes came from.
        out_dir: must not exist; built under a temporary name beside it and renamed.
        calibration: from :mod:`gate.calibration` (holdout or leave-one-patient-out).
        seed: hnswlib level seed and self-test seed.
        poses: the poses the probes were embedded under (recorded in the manifest).
        domain: what the index can judge (:func:`gate.domain.measure_domain` of the training
            volumes); None records none, and every check against the index is then refused.
        verification: the training grids and verified calibration
            (:func:`gate.verify.prepare_verification`, same volume order); None: the index
            does not verify.

    Returns:
        The written manifest.

    Raises:
        UsageError: ``out_dir`` exists, no probes, mismatched lengths, or a patient id that is
            not a pseudonym.
        IntegrityError: the self-test failed (nothing is written).

    """
    if out_dir.exists():
        raise UsageError(
            f"{out_dir}: already exists; choose a new --out folder (indexes are never overwritten)"
        )
    n_poses = len(poses)
    if not probes or not len(probes) == n_poses * len(patient_ids) == n_poses * len(file_sha256s):
        raise UsageError(
            f"need one patient id and file hash per volume and {n_poses} probe(s) per volume; got "
            f"{len(probes)} probes, {len(patient_ids)} ids, {len(file_sha256s)} hashes"
        )
    for pid in patient_ids:
        if not re.fullmatch(PSEUDONYM_PATTERN, pid):
            raise UsageError(
                f"patient id {pid!r} is not a gate pseudonym (p-<16 hex>); the index never stores clear "
                "ids: read volumes with gate.volume.read_volumes"
            )
    for p in probes:
        if p.embedding.encoder_sha256 != encoder.sha256:
            raise IntegrityError(
                f"{p.embedding.source}: embedded by another encoder than {encoder.sha256[:12]}"
            )
    rows = tuple(
        IndexRow(patient_id=pid, file_sha256=fsha, voxel_sha256=p.voxel_sha256)
        for p, pid, fsha in zip(probes[::n_poses], patient_ids, file_sha256s, strict=True)
    )
    vectors = np.stack([p.embedding.vector for p in probes]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    candidates = candidates_for(len(vectors), n_poses)
    graph = _new_graph(vectors, seed, candidates)
    self_test = run_self_test(graph, vectors, SELF_TEST_PROBES, seed, candidates)
    log.info("self-test recall@1 %.4f over %d probes x %d levels", self_test.recall_at_1, self_test.probes, 3)
    if not self_test.passed:
        raise IntegrityError(
            f"index self-test failed: recall@1 {self_test.recall_at_1:.4f} < 1.0 on planted near-copies; "
            f"raise gate.index.EF_SEARCH / HNSW_M (now {EF_SEARCH} / {HNSW_M})"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; an index is shared, read-only data
    try:
        graph.save_index(str(tmp / INDEX_FILE))
        np.save(tmp / VECTORS_FILE, vectors, allow_pickle=False)
        verification_record = None
        if verification is not None:
            if verification.grids.shape != (len(rows), *encoder.preprocess.grid):
                raise UsageError(
                    f"verification grids {verification.grids.shape} do not match {len(rows)} volumes of "
                    f"{encoder.preprocess.grid}"
                )
            np.save(tmp / GRIDS_FILE, verification.grids.astype(np.float16), allow_pickle=False)
            verification_record = verification.record(sha256_file(tmp / GRIDS_FILE))
        manifest = IndexManifest(
            format_version=FORMAT_VERSION,
            space=SPACE,
            dim=vectors.shape[1],
            M=HNSW_M,
            ef_construction=EF_CONSTRUCTION,
            ef=max(EF_SEARCH, candidates),
            candidates=candidates,
            count=len(vectors),
            n_patients=len(set(patient_ids)),
            seed=seed,
            encoder_sha256=encoder.sha256,
            preprocess_digest=encoder.preprocess.digest,
            preprocess=encoder.preprocess,
            poses=poses,
            poses_digest=poses.digest,
            index_sha256=sha256_file(tmp / INDEX_FILE),
            vectors_sha256=sha256_file(tmp / VECTORS_FILE),
            rows=rows,
            calibration=calibration,
            self_test=self_test,
            domain=domain,
            verification=verification_record,
            gate_version=__version__,
            hnswlib_version=_hnswlib_version(),
        )
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_grids(index_dir: Path, manifest: IndexManifest) -> np.ndarray | None:
    """The training grids of a verifying index, digest-checked (None for an index that does not verify).

    Raises:
        IntegrityError: ``grids.npy`` missing, edited or malformed; or present in an index whose
            manifest records no verification (an unaccounted file).

    """
    path = index_dir / GRIDS_FILE
    if manifest.verification is None:
        if path.exists():
            raise IntegrityError(
                f"{path}: present, but the manifest records no verification; the folder was edited; "
                "rebuild it"
            )
        return None
    if not path.is_file():
        raise IntegrityError(f"{path}: missing; the index verifies and needs it; rebuild the index")
    found = sha256_file(path)
    if found != manifest.verification.grids_sha256:
        raise IntegrityError(
            f"{path}: sha256 {found[:12]}… does not match the manifest's "
            f"{manifest.verification.grids_sha256[:12]}…; the file was modified or replaced; "
            "rebuild the index"
        )
    return read_grids(path, manifest)


def _hnswlib_version() -> str:
    try:
        return metadata.version("hnswlib")
    except metadata.PackageNotFoundError:
        return "unknown"


class TrainingIndex:
    """A loaded, verified index. Create with :meth:`load`.

    Attributes:
        manifest: the verified manifest.
        sha256: the index file's digest (= ``manifest.index_sha256``).
        vectors: float32 (N, D) unit rows.

    """

    def __init__(
        self,
        manifest: IndexManifest,
        graph: hnswlib.Index,
        vectors: np.ndarray,
        grids: np.ndarray | None = None,
    ) -> None:
        self.manifest = manifest
        self.sha256 = manifest.index_sha256
        self.vectors = vectors
        self.grids = grids
        self._verifier: Verifier | None = None
        self._graph = graph
        n_poses = len(manifest.poses)
        self._patient_ids = [manifest.rows[i // n_poses].patient_id for i in range(manifest.count)]
        self._n_poses = n_poses
        self._ordinals = volume_ordinals([r.patient_id for r in manifest.rows])
        self._voxel_hashes = frozenset(r.voxel_sha256 for r in manifest.rows)
        rows_of: dict[str, list[int]] = {}
        for row, pid in enumerate(self._patient_ids):
            rows_of.setdefault(pid, []).append(row)
        self._rows_of = {pid: np.asarray(rows, dtype=np.int64) for pid, rows in rows_of.items()}

    @property
    def calibration(self) -> Calibration:
        """The calibration distribution recorded at build time."""
        return self.manifest.calibration

    @property
    def domain(self) -> Domain | None:
        """The domain recorded at build time (None: none recorded; checks are refused)."""
        return self.manifest.domain

    @property
    def verification(self) -> Verification | None:
        """The verification record (None: the index does not verify)."""
        return self.manifest.verification

    @property
    def verifier(self) -> Verifier | None:
        """The verification stage of a verifying index (None: the index does not verify)."""
        v = self.manifest.verification
        if v is None or self.grids is None:
            return None
        if self._verifier is None:
            self._verifier = Verifier(
                list(self.grids),
                [r.patient_id for r in self.manifest.rows],
                self.manifest.poses,
                self.manifest.preprocess,
                v.max_shift_vox,
            )
        return self._verifier

    @classmethod
    def load(cls, index_dir: Path, encoder: EmbeddingModel) -> TrainingIndex:
        """Load and verify an index for use with ``encoder``.

        Checks, in order: manifest readable and of this format; space; encoder digest,
        dimension and preprocessing digest; recorded self-test passed; index and vector file
        digests; vector shape, finiteness and unit norm; the graph's count and stored vectors;
        then sets ``ef`` and re-runs a small self-test.

        Raises:
            IntegrityError: any mismatch, with what was expected and found.

        """
        manifest = read_manifest(index_dir)
        check_compatible(index_dir, manifest, encoder)
        for name, expected in ((INDEX_FILE, manifest.index_sha256), (VECTORS_FILE, manifest.vectors_sha256)):
            path = index_dir / name
            if not path.is_file():
                raise IntegrityError(f"{path}: missing; the index folder is incomplete, rebuild it")
            found = sha256_file(path)
            if found != expected:
                raise IntegrityError(
                    f"{path}: sha256 {found[:12]}… does not match the manifest's {expected[:12]}…; "
                    "the file was modified or replaced; rebuild the index"
                )
        vectors = read_vectors(index_dir / VECTORS_FILE, manifest)
        grids = load_grids(index_dir, manifest)
        graph = hnswlib.Index(space=SPACE, dim=manifest.dim)
        try:
            graph.load_index(str(index_dir / INDEX_FILE), max_elements=manifest.count)
        except (RuntimeError, ValueError) as err:
            raise IntegrityError(f"{index_dir / INDEX_FILE}: hnswlib cannot load it ({err})") from err
        if graph.get_current_count() != manifest.count:
            raise IntegrityError(
                f"{index_dir / INDEX_FILE}: holds {graph.get_current_count()} items; "
                f"manifest says {manifest.count}"
            )
        graph.set_ef(manifest.ef)  # hnswlib does not persist ef
        sample = np.linspace(0, manifest.count - 1, num=min(16, manifest.count)).astype(np.int64)
        stored = np.asarray(graph.get_items(sample), dtype=np.float32)
        if stored.shape != (len(sample), manifest.dim) or not np.allclose(stored, vectors[sample], atol=1e-4):
            raise IntegrityError(
                f"{index_dir / INDEX_FILE}: the graph's vectors differ from {VECTORS_FILE}; rebuild the index"
            )
        check = run_self_test(graph, vectors, LOAD_SELF_TEST_PROBES, manifest.seed + 7, manifest.candidates)
        if not check.passed:
            raise IntegrityError(
                f"{index_dir}: self-test after load failed "
                f"(recall@1 {check.recall_at_1:.4f} < 1.0); rebuild it"
            )
        return cls(manifest, graph, vectors, grids)

    def search_many(
        self,
        embeddings: Sequence[Embedding],
        voxel_sha256s: Sequence[str | None],
        k: int = DEFAULT_K,
        include: Sequence[Sequence[str]] | None = None,
    ) -> list[Neighbours]:
        """Nearest training patients of several candidates (see :meth:`search`).

        Args:
            embeddings: the candidates' embeddings, from this index's encoder.
            voxel_sha256s: per candidate, the hash of its preprocessed grid (or None).
            k: distinct patients per candidate, by cosine.
            include: per candidate, patients answered after the ``k`` with their exact cosine
                (max over their rows) whatever their rank, when this index holds them (the
                verification's voxel channel, :meth:`gate.verify.Verifier.voxel_patients`).

        """
        if include is not None and len(include) != len(embeddings):
            raise IntegrityError(f"{len(include)} include lists for {len(embeddings)} candidates")
        if not embeddings:
            return []
        for emb in embeddings:
            if emb.encoder_sha256 != self.manifest.encoder_sha256:
                raise IntegrityError(
                    f"{emb.source}: embedded by encoder {emb.encoder_sha256[:12]}…, but the index was built "
                    f"with {self.manifest.encoder_sha256[:12]}…; embed with the index's encoder"
                )
            if emb.dim != self.manifest.dim:
                raise IntegrityError(
                    f"{emb.source}: embedding dimension {emb.dim}; index expects {self.manifest.dim}"
                )
        queries = np.stack([e.vector for e in embeddings]).astype(np.float32)
        labels, sims = _top_rows(self._graph, self.vectors, queries, self.manifest.candidates)
        out = []
        for i, (row_labels, row_sims, voxel) in enumerate(zip(labels, sims, voxel_sha256s, strict=True)):
            best: dict[str, float] = {}
            match: dict[str, tuple[int, int]] = {}
            for label, sim in zip(row_labels.tolist(), row_sims.tolist(), strict=True):
                pid = self._patient_ids[label]
                if sim > best.get(pid, -2.0):  # patient-level aggregation: max
                    best[pid] = sim
                    volume, pose = divmod(label, self._n_poses)
                    match[pid] = (self._ordinals[volume], pose)
            ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)[:k]
            kept = {pid for pid, _ in ranked}
            for pid in include[i] if include is not None else ():
                rows = self._rows_of.get(pid)
                if rows is None or pid in kept:
                    continue
                exact = self.vectors[rows].astype(np.float64) @ queries[i].astype(np.float64)
                label = int(rows[int(np.argmax(exact))])
                volume, pose = divmod(label, self._n_poses)
                match[pid] = (self._ordinals[volume], pose)
                ranked.append((pid, min(max(float(exact.max()), -1.0), 1.0)))
                kept.add(pid)
            ranked.sort(key=lambda kv: kv[1], reverse=True)
            out.append(
                Neighbours(
                    patient_ids=tuple(pid for pid, _ in ranked),
                    similarities=np.asarray([s for _, s in ranked], dtype=np.float64),
                    exact_duplicate=voxel is not None and voxel in self._voxel_hashes,
                    matched=tuple(match[pid] for pid, _ in ranked),
                )
            )
        return out

    def search(self, embedding: Embedding, voxel_sha256: str | None = None, k: int = DEFAULT_K) -> Neighbours:
        """Nearest training patients of one candidate.

        Args:
            embedding: the candidate's embedding, from this index's encoder.
            voxel_sha256: hash of its preprocessed grid, for the exact-duplicate check.
            k: at most this many distinct patients are returned.

        Returns:
            Neighbours with exact cosine similarities (patient-level max), closest first.

        Raises:
            IntegrityError: wrong encoder or dimension, or the graph answers inconsistently.

        """
        return self.search_many([embedding], [voxel_sha256], k)[0]
