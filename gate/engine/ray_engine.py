"""The Ray engine: read + preprocess as Ray tasks, embed in onnxruntime actors, search in shard actors.

Stages (the driver is this process)::

    discover (driver) -> read + preprocess + hash (tasks, ``batch_size`` sources each; the grids
    stay in the object store) -> embed (EmbedActor pool, one gate.embed.Encoder each; CPU or
    ``num_gpus`` with CUDA checked) -> search (one ShardActor per index shard, each a verified
    TrainingIndex; answers merged by gate.shards.merge_neighbours) -> decide + audit (driver, in
    input order, one writer).

Fault handling: actors restart (``max_restarts``) and their calls are retried
(``max_task_retries``); every call is idempotent, and nothing is recorded before every answer is
in, so a retried call can neither lose nor double a record. When the retries run out the run fails
closed with :class:`gate.errors.WorkerError` and :func:`gate.engine.judge` writes one error
record per candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError, RayTaskError
from ray.util import ActorPool

from gate.calibration import Calibration
from gate.digest import sha256_voxels
from gate.domain import Domain
from gate.engine import EngineConfig, Item
from gate.errors import (
    DomainError,
    GateError,
    InputError,
    IntegrityError,
    ProviderError,
    UsageError,
    WorkerError,
)
from gate.index import DEFAULT_K, Probe
from gate.index_manifest import EmbeddingModel, IndexManifest, read_manifest
from gate.poses import IDENTITY_ONLY, PoseSet, posed_grids
from gate.preprocess import PreprocessConfig
from gate.shards import (
    EncoderIdentity,
    check_set,
    is_sharded,
    merge_neighbours,
    read_shard_set,
    verify_shard_files,
)
from gate.values import Embedding, Neighbours, Volume
from gate.volume import ReadOptions, discover, read_volumes

log = logging.getLogger(__name__)

MAX_RESTARTS = 2
"""Restarts of a dead actor (and retries of its calls) before the run fails closed."""

CUDA = "CUDAExecutionProvider"

READ_TASK_CPUS = 0
"""CPUs a read + preprocess task reserves. Zero: the actors' reservations must never starve the
reads of a later :data:`gate.engine.JUDGE_CHUNK` (a deadlock, not an error); the number of reads
in flight is bounded by one chunk's ``JUDGE_CHUNK / batch_size`` tasks instead."""


def _read_chunk(
    sources: list[str], options: ReadOptions, preprocess: PreprocessConfig, domain: Domain | None
) -> tuple[tuple[list[tuple[str, str, str]], list[tuple[str, str]], list[tuple[str, str]]], np.ndarray]:
    """Read, check the domain, preprocess (identity pose) and hash some sources.

    Returns:
        ((source, candidate sha256, voxel sha256) per volume, (path, problem) per unreadable
        source, (path, problem) per volume outside the index's domain), and the (n, 1, X, Y, Z)
        float32 grids.

    """
    from gate.domain import check_in_domain

    rows: list[tuple[str, str, str]] = []
    errors: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []
    grids: list[np.ndarray] = []
    for source in sources:
        try:
            vols = read_volumes(Path(source), options)
        except InputError as err:
            errors.append((err.path, err.problem))
            continue
        for vol in vols:
            try:
                check_in_domain(vol, domain)
            except InputError as err:
                refused.append((err.path, err.problem))
                continue
            (grid,) = posed_grids(vol, preprocess, IDENTITY_ONLY)
            rows.append((vol.source, sha256_voxels(vol.data), sha256_voxels(grid)))
            grids.append(grid)
    shape = (0, 1, *preprocess.grid)
    batch = np.stack(grids)[:, None].astype(np.float32) if grids else np.zeros(shape, np.float32)
    return (rows, errors, refused), batch


class EmbedActor:
    """One verified :class:`gate.embed.Encoder` (the only place an InferenceSession is made)."""

    def __init__(self, encoder_dir: str | None, device: str, threads: int | None) -> None:
        from gate.embed import DEFAULT_ENCODER_DIR, Encoder

        self.failure: GateError | None = None  # raised by info(): a constructor error kills the actor
        try:
            path = Path(encoder_dir) if encoder_dir else DEFAULT_ENCODER_DIR
            self.encoder = Encoder(path, device, threads)  # type: ignore[arg-type]
        except GateError as err:
            self.failure = err

    def info(self) -> tuple[str, str]:
        """(encoder sha256, execution provider); raises the load error, if any."""
        if self.failure is not None:
            raise self.failure
        return self.encoder.sha256, self.encoder.provider

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        """:meth:`gate.embed.Encoder.embed_array`."""
        return self.encoder.embed_array(batch)

    def embed_volumes(self, volumes: list[Volume], poses: PoseSet) -> list[Probe]:
        """:func:`gate.index.embed_volumes` on this actor's encoder."""
        from gate.index import embed_volumes

        return embed_volumes(volumes, self.encoder, poses)


class ShardActor:
    """One verified index folder (a shard, or a whole unsharded index)."""

    def __init__(self, index_dir: str, encoder: EncoderIdentity) -> None:
        from gate.index import TrainingIndex

        self.failure: GateError | None = None  # raised by manifest(), so the driver sees the reason
        try:
            self.index = TrainingIndex.load(Path(index_dir), encoder)
        except GateError as err:
            self.failure = err

    def manifest(self) -> IndexManifest:
        """The shard's verified manifest; raises the load error, if any."""
        if self.failure is not None:
            raise self.failure
        return self.index.manifest

    def search_many(self, embeddings: list[Embedding], voxels: list[str | None], k: int) -> list[Neighbours]:
        """:meth:`gate.index.TrainingIndex.search_many`."""
        return self.index.search_many(embeddings, voxels, k)


def _get(refs: Any) -> Any:
    """``ray.get`` that turns worker failures into gate errors (a gate error raised remotely is re-raised)."""
    try:
        return ray.get(refs)
    except RayTaskError as err:
        cause = err.cause if isinstance(err.cause, BaseException) else None
        if isinstance(cause, GateError):
            raise cause from None
        raise WorkerError(f"a Ray worker failed: {type(cause or err).__name__}: {cause or err}") from err
    except RayError as err:
        raise WorkerError(
            f"a Ray worker died and its {MAX_RESTARTS} retries ran out ({type(err).__name__}); "
            "nothing was exported"
        ) from err


class RemoteEncoder:
    """An :class:`~gate.index_manifest.EmbeddingModel` whose ``embed_array`` runs on the actor pool."""

    def __init__(self, engine: RayEngine, encoder: EmbeddingModel) -> None:
        self._engine = engine
        self.sha256 = encoder.sha256
        self.dim = encoder.dim
        self.preprocess = encoder.preprocess

    @property
    def provider(self) -> str:
        """The actors' execution provider."""
        return self._engine.provider

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        """Split into ``batch_size`` parts, embed on the pool, concatenate in order."""
        size = self._engine.config.batch_size
        parts = [batch[i : i + size] for i in range(0, len(batch), size)]
        if not parts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(self._engine.map_embed([ray.put(p) for p in parts]))


class RayIndex:
    """A verified index (sharded or not) served by one :class:`ShardActor` per shard."""

    def __init__(
        self, sha256: str, calibration: Calibration, domain: Domain | None, actors: list[Any]
    ) -> None:
        self.sha256 = sha256
        self.domain = domain
        self._calibration = calibration
        self._actors = actors

    @property
    def calibration(self) -> Calibration:
        """The calibration recorded at build time (over every row)."""
        return self._calibration

    def search_many(
        self, embeddings: Sequence[Embedding], voxel_sha256s: Sequence[str | None], k: int = DEFAULT_K
    ) -> list[Neighbours]:
        """Fan out to every shard actor and merge the top ``k`` patients per candidate."""
        if not embeddings:
            return []
        emb_ref, vox_ref = ray.put(list(embeddings)), ray.put(list(voxel_sha256s))
        per_shard = _get([a.search_many.remote(emb_ref, vox_ref, k) for a in self._actors])
        return [merge_neighbours(parts, k) for parts in zip(*per_shard, strict=True)]


class RayEngine:
    """Runs the stages on Ray; see the module docstring."""

    def __init__(self, config: EngineConfig, encoder: EmbeddingModel) -> None:
        if config.num_gpus > 0 and config.device != "cuda":
            raise UsageError("--num-gpus > 0 needs --device cuda (a GPU actor never falls back to CPU)")
        self.config = config
        self._driver_encoder = encoder
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            try:
                ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError) as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise UsageError(
                    f"--ray-address {config.ray_address}: cannot start or join Ray ({first})"
                ) from err
        self._embedders: list[Any] = []
        self._provider: str | None = None
        self._chunks: list[Any] = []
        self._shard_actors: list[Any] = []
        self._index: RayIndex | None = None
        self.encoder = RemoteEncoder(self, encoder)
        # Read tasks reserve no CPU: the embedding actors hold theirs for the whole run, so once
        # --workers actors fill a node, a CPU-reserving read of the next chunk would wait forever
        # (measured: gate check of 10,000 candidates with 2 actors on 2 CPUs hung at chunk 2).
        self._read = ray.remote(num_returns=2, max_retries=MAX_RESTARTS, num_cpus=READ_TASK_CPUS)(_read_chunk)

    # -- embedding actors -------------------------------------------------------------------
    def _pool(self) -> list[Any]:
        if not self._embedders:
            cls = ray.remote(EmbedActor).options(
                num_cpus=1,
                num_gpus=self.config.num_gpus,
                max_restarts=MAX_RESTARTS,
                max_task_retries=MAX_RESTARTS,
            )
            enc_dir = str(self.config.encoder_dir) if self.config.encoder_dir else None
            self._embedders = [
                cls.remote(enc_dir, self.config.device, None) for _ in range(self.config.workers)
            ]
            infos = _get([a.info.remote() for a in self._embedders])
            for sha, provider in infos:
                if sha != self._driver_encoder.sha256:
                    raise IntegrityError(
                        f"a Ray embedding actor loaded encoder {sha[:12]}…, the driver "
                        f"{self._driver_encoder.sha256[:12]}…; every node must hold the same --encoder"
                    )
                if self.config.num_gpus > 0 and provider != CUDA:
                    raise ProviderError(f"a GPU embedding actor runs {provider}, not {CUDA}")
            providers = {p for _, p in infos}
            if len(providers) != 1:
                raise ProviderError(f"embedding actors run different providers {sorted(providers)}")
            self._provider = providers.pop()
        return self._embedders

    @property
    def provider(self) -> str:
        """The execution provider every embedding actor runs (starts them)."""
        self._pool()
        assert self._provider is not None
        return self._provider

    def map_embed(self, batch_refs: list[Any]) -> list[np.ndarray]:
        """Embed each batch on the pool; results in order."""
        pool = ActorPool(self._pool())
        try:
            return list(pool.map(lambda a, ref: a.embed_array.remote(ref), batch_refs))
        except RayTaskError as err:
            if isinstance(err.cause, GateError):
                raise err.cause from None
            raise WorkerError(f"a Ray embedding call failed: {err.cause}") from err
        except RayError as err:
            raise WorkerError(
                f"a Ray embedding actor died and its {MAX_RESTARTS} retries ran out "
                f"({type(err).__name__}); nothing was exported"
            ) from err

    # -- stages -----------------------------------------------------------------------------
    def read(self, paths: Sequence[Path], options: ReadOptions) -> tuple[list[Item], list[InputError]]:
        """Discover here; read, preprocess and hash in tasks of ``batch_size`` sources."""
        errors: list[InputError] = []
        sources: list[str] = []
        for path in paths:
            try:
                sources.extend(str(s) for s in discover([path]))
            except InputError as err:
                errors.append(err)
        size = self.config.batch_size
        pre = self._driver_encoder.preprocess
        opts_ref = ray.put(options)
        if self._index is None:
            raise UsageError("open the index before reading: the read tasks check its domain")
        dom_ref = ray.put(self._index.domain)
        refs = [
            self._read.remote(sources[i : i + size], opts_ref, pre, dom_ref)
            for i in range(0, len(sources), size)
        ]
        metas = _get([m for m, _ in refs])
        self._chunks = [g for _, g in refs]
        items: list[Item] = []
        refused: list[InputError] = []
        for c, (rows, errs, outside) in enumerate(metas):
            errors.extend(InputError(path, problem) for path, problem in errs)
            refused.extend(DomainError(path, problem) for path, problem in outside)
            for r, (source, cand_sha, voxel_sha) in enumerate(rows):
                items.append(Item(source, cand_sha, (c, r, voxel_sha)))
        return items, [*errors, *refused]

    def embed(self, items: Sequence[Item]) -> list[Probe]:
        """Embed the grids of the last :meth:`read` on the actor pool (identity pose)."""
        if not items:
            return []
        used = sorted({it.ref[0] for it in items})
        vectors = dict(zip(used, self.map_embed([self._chunks[c] for c in used]), strict=True))
        probes = []
        for it in items:
            c, r, voxel_sha = it.ref
            vec = vectors[c][r]
            try:
                emb = Embedding(vector=vec, encoder_sha256=self.encoder.sha256, source=it.source)
            except ValueError as err:
                raise IntegrityError(f"{it.source}: encoder output is not a unit vector ({err})") from err
            probes.append(Probe(embedding=emb, voxel_sha256=voxel_sha))
        return probes

    def embed_volumes(self, volumes: Sequence[Volume], poses: PoseSet) -> list[Probe]:
        """:func:`gate.index.embed_volumes` in chunks on the actor pool (index build)."""
        size = max(1, self.config.batch_size // len(poses))
        chunks = [list(volumes[i : i + size]) for i in range(0, len(volumes), size)]
        pool = ActorPool(self._pool())
        try:
            parts = list(pool.map(lambda a, ch: a.embed_volumes.remote(ch, poses), chunks))
        except RayTaskError as err:
            if isinstance(err.cause, GateError):
                raise err.cause from None
            raise WorkerError(f"a Ray embedding call failed: {err.cause}") from err
        except RayError as err:
            raise WorkerError(f"a Ray embedding actor died ({type(err).__name__}); no index written") from err
        return [p for part in parts for p in part]

    def mapper(self, fn: Any, jobs: list[tuple[Any, ...]]) -> list[Any]:
        """Run shard builds as Ray tasks (one CPU each), results in order.

        The embedding actors are stopped first: they hold a CPU each, and the builds need them.
        """
        for actor in self._embedders:
            ray.kill(actor, no_restart=True)
        self._embedders = []
        task = ray.remote(num_cpus=1, max_retries=MAX_RESTARTS)(fn)
        return _get([task.remote(*args) for args in jobs])

    def open_index(self, index_dir: Path) -> RayIndex:
        """Verify the set here, load every shard in its own actor, check the shards against the set."""
        identity = EncoderIdentity(self._driver_encoder)
        cls = ray.remote(ShardActor).options(
            num_cpus=0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS
        )
        if is_sharded(index_dir):
            manifest = read_shard_set(index_dir)
            if manifest.encoder_sha256 != identity.sha256:
                raise IntegrityError(
                    f"{index_dir}: built with encoder {manifest.encoder_sha256[:12]}…, but the encoder in "
                    f"use is {identity.sha256[:12]}…; pass the matching --encoder or rebuild the index"
                )
            verify_shard_files(index_dir, manifest)
            actors = [cls.remote(str(index_dir / e.name), identity) for e in manifest.shards]
            manifests = _get([a.manifest.remote() for a in actors])
            check_set(index_dir, manifest, manifests)
            from gate.digest import sha256_file
            from gate.shards import SHARDS_FILE

            index = RayIndex(
                sha256_file(index_dir / SHARDS_FILE), manifest.calibration, manifest.domain, actors
            )
        else:
            read_manifest(index_dir)  # a clear error here before any actor starts
            actors = [cls.remote(str(index_dir), identity)]
            (m,) = _get([a.manifest.remote() for a in actors])
            index = RayIndex(m.index_sha256, m.calibration, m.domain, actors)
        self._shard_actors.extend(actors)
        self._index = index
        return index

    def close(self) -> None:
        """Stop the actors; shut Ray down if this engine started it."""
        for actor in [*self._embedders, *self._shard_actors]:
            ray.kill(actor, no_restart=True)
        self._embedders, self._shard_actors, self._chunks = [], [], []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
