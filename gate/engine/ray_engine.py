"""The Ray engine: read + preprocess on ray.data, embed in onnxruntime actors, search in shard actors.

Stages (the driver is this process)::

    discover (driver) -> read + domain check + preprocess + hash (a ray.data Dataset: one
    map_batches task per ``batch_size`` sources, materialized; the grids stay in its blocks in
    the object store) -> embed (EmbedActor pool, one gate.embed.Encoder each, fed the blocks by
    reference; CPU or ``num_gpus`` with CUDA checked) -> search (one ShardActor per index shard,
    each a verified TrainingIndex; answers merged by gate.values.merge_neighbours) -> decide +
    audit (driver, in input order, one writer).

Fault handling: actors restart (``max_restarts``) and their calls are retried
(``max_task_retries``); read tasks are retried on a worker's death (Ray's default for tasks);
every call is idempotent, and nothing is recorded before every answer is in, so a retried call
can neither lose nor double a record. When the retries run out the run fails closed with
:class:`gate.errors.WorkerError` and :func:`gate.engine.judge` writes one error record per
candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.block import BlockAccessor
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
from gate.index_manifest import EmbeddingModel, IndexManifest, Verification, read_manifest
from gate.poses import IDENTITY_ONLY, PoseSet, posed_grids
from gate.preprocess import PreprocessConfig
from gate.shards import (
    EncoderIdentity,
    check_set,
    is_sharded,
    read_shard_set,
    verify_shard_files,
)
from gate.values import Embedding, Neighbours, Volume, merge_neighbours
from gate.verify import Verifier, View
from gate.volume import ReadOptions, discover, read_volumes

log = logging.getLogger(__name__)

MAX_RESTARTS = 2
"""Restarts of a dead actor (and retries of its calls) before the run fails closed."""

CUDA = "CUDAExecutionProvider"

READ_TASK_CPUS = 0
"""CPUs a ray.data read + preprocess task reserves. Zero: the embedding actors hold theirs for the
whole run, so once ``--workers`` actors fill a node, a CPU-reserving read of the next
:data:`gate.engine.JUDGE_CHUNK` would wait forever (measured: ``gate check`` of 10,000 candidates
with 2 actors on 2 CPUs hung at chunk 2). The reads in flight are bounded by :func:`read_tasks`
instead; reading and embedding alternate per chunk, so they do not compete."""

VOLUME, UNREADABLE, OUTSIDE, WINDOWED = "volume", "unreadable", "outside", "windowed"
"""Row kinds of the read Dataset; a :data:`WINDOWED` volume (larger than an index's grid built
with ``--window-fov``) carries no grid: the driver reads it again and judges it by windows
(:mod:`gate.windows`), embedding on the actor pool and searching on the shard actors."""
"""What a row of the read Dataset holds: a volume and its grid, or a source that could not be
read, or a volume outside the index's domain (both with a zero grid, never embedded)."""

META = ("pos", "sub", "kind", "source", "candidate_sha256", "voxel_sha256", "problem")
"""The read Dataset's columns besides ``grid``; the driver fetches only these."""


def read_tasks() -> int:
    """Read tasks in flight at once: one per CPU of the cluster (what a 1-CPU reservation would allow)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _read_batch(
    batch: dict[str, np.ndarray],
    options: ReadOptions,
    preprocess: PreprocessConfig,
    domain: Domain | None,
    margin: int = 0,
) -> dict[str, np.ndarray]:
    """The ray.data read stage: read, check the domain, preprocess (identity pose) and hash.

    Args:
        batch: ``pos`` (the source's position in the chunk) and ``source`` (its path) per source.
        options: how to read.
        preprocess: the encoder's preprocessing.
        domain: the index's domain.
        margin: a verifying index's shift range: each volume row also carries its ``view``
            (the grid with ``margin`` voxels of context) and ``view_mask``
            (:func:`gate.verify.grid_with_mask`); 0: no such columns.

    Returns:
        One row per volume (``kind`` :data:`VOLUME`, its (1, X, Y, Z) float32 ``grid``), per
        unreadable source and per volume outside the domain (``problem`` set, zero grid):
        columns :data:`META` + ``grid``; ``sub`` numbers the volumes of one source.

    """
    from gate.domain import check_in_domain
    from gate.verify import grid_with_mask

    cols: dict[str, list[Any]] = {name: [] for name in (*META, "grid", "view", "view_mask")}
    zeros = np.zeros((1, *preprocess.grid), np.float32)
    wide = tuple(g + 2 * margin for g in preprocess.grid) if margin else (1, 1, 1)
    no_view, no_mask = np.zeros(wide, np.float32), np.zeros(wide, bool)

    def row(
        pos: int,
        sub: int,
        kind: str,
        source: str,
        cand: str,
        voxel: str,
        problem: str,
        grid: np.ndarray,
        view: tuple[np.ndarray, np.ndarray] = (no_view, no_mask),
    ) -> None:
        for name, value in zip(
            (*META, "grid", "view", "view_mask"),
            (pos, sub, kind, source, cand, voxel, problem, grid, *view),
            strict=True,
        ):
            cols[name].append(value)

    for pos, source in zip(batch["pos"].tolist(), batch["source"].tolist(), strict=True):
        try:
            vols = read_volumes(Path(source), options)
        except InputError as err:
            row(pos, 0, UNREADABLE, err.path, "", "", err.problem, zeros)
            continue
        for sub, vol in enumerate(vols):
            try:
                mode = check_in_domain(vol, domain, windows=True)
            except InputError as err:
                row(pos, sub, OUTSIDE, err.path, "", "", err.problem, zeros)
                continue
            if mode == "windows":
                row(pos, sub, WINDOWED, vol.source, sha256_voxels(vol.data), "", "", zeros)
                continue
            (grid,) = posed_grids(vol, preprocess, IDENTITY_ONLY)
            grid = grid.astype(np.float32, copy=False)
            view = grid_with_mask(vol, preprocess, margin) if margin else (no_view, no_mask)
            row(
                pos,
                sub,
                VOLUME,
                vol.source,
                sha256_voxels(vol.data),
                sha256_voxels(grid),
                "",
                grid[None],
                view,
            )
    out = {name: np.asarray(cols[name]) for name in META}
    out["grid"] = np.stack(cols["grid"]) if cols["grid"] else np.zeros((0, *zeros.shape), np.float32)
    out["view"] = np.stack(cols["view"]) if cols["view"] else np.zeros((0, *wide), np.float32)
    out["view_mask"] = np.stack(cols["view_mask"]) if cols["view_mask"] else np.zeros((0, *wide), bool)
    return out


def _gate_cause(err: BaseException) -> GateError | None:
    """The gate error a Ray or ray.data failure wraps, if any (raised remotely, re-raised here)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, GateError):
            return e
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
    return None


RAY_DATA_CONSOLE_LEVEL = logging.ERROR
"""ray.data's console log level under gate: its INFO lines (each execution's start and end) and
the WARNING that the cluster has no free CPU (by design: :data:`READ_TASK_CPUS`) would interleave
with gate's report; everything still goes to the session's ``ray-data.log``."""


def _quiet_ray_data() -> None:
    """Raise ray.data's console handlers to :data:`RAY_DATA_CONSOLE_LEVEL` (its file log is kept)."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(RAY_DATA_CONSOLE_LEVEL)


def _quiet(context: ray.data.DataContext) -> None:
    """No progress bars, execution banners or stats logs for one Dataset (its own context copy)."""
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    context.enable_auto_log_stats = False


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

    def embed_block(self, block: Any) -> tuple[np.ndarray, np.ndarray]:
        """Embed the :data:`VOLUME` rows of one block of the read Dataset.

        Returns:
            (n, 2) int64 (``pos``, ``sub``) keys and the (n, D) float32 embeddings, in block order.

        """
        rows = BlockAccessor.for_block(block).to_batch_format("numpy")
        keep = rows["kind"] == VOLUME
        keys = np.stack([rows["pos"][keep], rows["sub"][keep]], axis=1).astype(np.int64)
        if not keep.any():
            return keys, np.zeros((0, self.encoder.dim), np.float32)
        return keys, self.encoder.embed_array(np.ascontiguousarray(rows["grid"][keep], np.float32))

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

    def search_many(
        self,
        embeddings: list[Embedding],
        voxels: list[str | None],
        k: int,
        include: list[Sequence[str]] | None = None,
    ) -> list[Neighbours]:
        """:meth:`gate.index.TrainingIndex.search_many`."""
        return self.index.search_many(embeddings, voxels, k, include)


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


def _driver_verifier(dirs: Sequence[Path], manifests: Sequence[IndexManifest]) -> Verifier | None:
    """The verification stage on the driver: every shard's grids, digest-checked here."""
    from gate.index import load_grids
    from gate.shards import combined_verifier

    return combined_verifier(
        manifests[0], [(m, load_grids(d, m)) for d, m in zip(dirs, manifests, strict=True)]
    )


class RayIndex:
    """A verified index (sharded or not) served by one :class:`ShardActor` per shard."""

    def __init__(
        self,
        sha256: str,
        calibration: Calibration,
        domain: Domain | None,
        actors: list[Any],
        verification: Verification | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.sha256 = sha256
        self.domain = domain
        self.verification = verification
        self.verifier = verifier
        self._calibration = calibration
        self._actors = actors

    @property
    def calibration(self) -> Calibration:
        """The calibration recorded at build time (over every row)."""
        return self._calibration

    def search_many(
        self,
        embeddings: Sequence[Embedding],
        voxel_sha256s: Sequence[str | None],
        k: int = DEFAULT_K,
        include: Sequence[Sequence[str]] | None = None,
    ) -> list[Neighbours]:
        """Fan out to every shard actor and merge the top ``k`` patients (and ``include``'s) per candidate."""
        if not embeddings:
            return []
        emb_ref, vox_ref = ray.put(list(embeddings)), ray.put(list(voxel_sha256s))
        inc = None if include is None else [list(p) for p in include]
        per_shard = _get([a.search_many.remote(emb_ref, vox_ref, k, inc) for a in self._actors])
        keep = inc if inc is not None else [[] for _ in embeddings]
        return [
            merge_neighbours(parts, k, kept)
            for parts, kept in zip(zip(*per_shard, strict=True), keep, strict=True)
        ]


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
        self._blocks: list[Any] = []
        self._shard_actors: list[Any] = []
        self._index: RayIndex | None = None
        self.encoder = RemoteEncoder(self, encoder)
        _quiet_ray_data()

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
        return self._map_pool(lambda a, ref: a.embed_array.remote(ref), batch_refs)

    def _map_pool(self, call: Any, values: list[Any]) -> list[Any]:
        """``call(actor, value)`` for each value on the embedding pool; results in order."""
        pool = ActorPool(self._pool())
        try:
            return list(pool.map(call, values))
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
        """Discover here; read, check, preprocess and hash on ray.data, ``batch_size`` sources a task.

        The Dataset is materialized: its blocks (grids included) stay in the object store for
        :meth:`embed`; only the :data:`META` columns come to the driver.
        """
        if self._index is None:
            raise UsageError("open the index before reading: the read tasks check its domain")
        errors: list[InputError] = []
        sources: list[str] = []
        for path in paths:
            try:
                sources.extend(str(s) for s in discover([path]))
            except InputError as err:
                errors.append(err)
        self._blocks = []
        if not sources:
            return [], errors
        size = self.config.batch_size
        rows = [{"pos": i, "source": s} for i, s in enumerate(sources)]
        n_blocks = -(-len(rows) // size)
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
        _quiet(ds.context)
        verification = self._index.verification
        kwargs = {
            "options": options,
            "preprocess": self._driver_encoder.preprocess,
            "domain": self._index.domain,
            "margin": verification.max_shift_vox if verification is not None else 0,
        }
        try:
            read = ds.map_batches(
                _read_batch,
                batch_size=size,
                batch_format="numpy",
                fn_kwargs=kwargs,
                compute=ray.data.TaskPoolStrategy(size=min(read_tasks(), n_blocks)),
                num_cpus=READ_TASK_CPUS,
            ).materialize()
            self._blocks = [ref for bundle in read.iter_internal_ref_bundles() for ref in bundle.block_refs]
            meta = read.select_columns(list(META), num_cpus=0).take_all()
        except Exception as err:  # ray.data wraps a task's failure in its own exceptions
            cause = _gate_cause(err)
            if cause is not None:
                raise cause from None
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise WorkerError(f"a Ray read task failed ({first}); nothing was exported") from err
        meta.sort(key=lambda r: (r["pos"], r["sub"]))
        items: list[Item] = []
        refused: list[InputError] = []
        for r in meta:
            source, problem = str(r["source"]), str(r["problem"])
            if r["kind"] == UNREADABLE:
                errors.append(InputError(source, problem))
            elif r["kind"] == OUTSIDE:
                refused.append(DomainError(source, problem))
            elif r["kind"] == WINDOWED:
                items.append(self._reread(source, int(r["sub"]), str(r["candidate_sha256"]), options))
            else:
                key = (int(r["pos"]), int(r["sub"]), str(r["voxel_sha256"]))
                items.append(Item(source, str(r["candidate_sha256"]), key))
        return items, [*errors, *refused]

    @staticmethod
    def _reread(source: str, sub: int, candidate_sha256: str, options: ReadOptions) -> Item:
        """A :data:`WINDOWED` volume read again here, checked to be the bytes the read task hashed."""
        vol = read_volumes(Path(source), options)[sub]
        if sha256_voxels(vol.data) != candidate_sha256:
            raise IntegrityError(f"{source}: changed while it was being checked; check it again")
        return Item(source, candidate_sha256, vol)

    def embed(self, items: Sequence[Item]) -> list[Probe]:
        """Embed the grids of the last :meth:`read` on the actor pool, block by block (identity pose)."""
        if not items:
            return []
        vectors: dict[tuple[int, int], np.ndarray] = {}
        for keys, vecs in self._map_pool(lambda a, ref: a.embed_block.remote(ref), self._blocks):
            vectors.update(zip(map(tuple, keys.tolist()), vecs, strict=True))
        probes = []
        for it in items:
            pos, sub, voxel_sha = it.ref
            vec = vectors.get((pos, sub))
            if vec is None:
                raise IntegrityError(f"{it.source}: not in the last read on Ray; read it before embedding")
            try:
                emb = Embedding(vector=vec, encoder_sha256=self.encoder.sha256, source=it.source)
            except ValueError as err:
                raise IntegrityError(f"{it.source}: encoder output is not a unit vector ({err})") from err
            probes.append(Probe(embedding=emb, voxel_sha256=voxel_sha))
        return probes

    def views(self, items: Sequence[Item], verifier: Verifier) -> list[View]:
        """The items' views from the last :meth:`read`'s blocks (the read tasks made them), in order."""
        wanted = {(it.ref[0], it.ref[1]) for it in items if isinstance(it.ref, tuple)}
        found: dict[tuple[int, int], View] = {}
        for ref in self._blocks:
            rows = BlockAccessor.for_block(ray.get(ref)).to_batch_format("numpy")
            for i, (pos, sub) in enumerate(zip(rows["pos"].tolist(), rows["sub"].tolist(), strict=True)):
                if (pos, sub) in wanted and rows["kind"][i] == VOLUME:
                    found[(pos, sub)] = View(rows["view"][i], rows["view_mask"][i])
        out = []
        for it in items:
            if isinstance(it.ref, Volume):
                out.append(verifier.view(it.ref))
                continue
            view = found.get((it.ref[0], it.ref[1]))
            if view is None or view.shape != tuple(g + 2 * verifier.max_shift for g in verifier.config.grid):
                raise IntegrityError(
                    f"{it.source}: no verification view in the last read on Ray; read it again"
                )
            out.append(view)
        return out

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

            verifier = _driver_verifier([index_dir / e.name for e in manifest.shards], manifests)
            index = RayIndex(
                sha256_file(index_dir / SHARDS_FILE),
                manifest.calibration,
                manifest.domain,
                actors,
                manifests[0].verification,
                verifier,
            )
        else:
            read_manifest(index_dir)  # a clear error here before any actor starts
            actors = [cls.remote(str(index_dir), identity)]
            (m,) = _get([a.manifest.remote() for a in actors])
            verifier = _driver_verifier([index_dir], [m])
            index = RayIndex(m.index_sha256, m.calibration, m.domain, actors, m.verification, verifier)
        self._shard_actors.extend(actors)
        self._index = index
        return index

    def close(self) -> None:
        """Stop the actors; shut Ray down if this engine started it."""
        for actor in [*self._embedders, *self._shard_actors]:
            ray.kill(actor, no_restart=True)
        self._embedders, self._shard_actors, self._blocks = [], [], []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
