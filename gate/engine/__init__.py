"""Where the stages run: this process (``local``, the default) or a Ray cluster (``ray``).

An engine is not a second product: both run the same stage functions (:mod:`gate.volume`,
:mod:`gate.embed`, :mod:`gate.index` / :mod:`gate.shards`, :mod:`gate.decide`) and only decide
where. The driver always decides and writes the audit log, one record per candidate, in input
order, through :class:`gate.audit.AuditLog` (flock, fsync, hash chain): one ordered writer.

The local engine imports no Ray; ``gate.engine.ray_engine`` is imported only for ``--engine ray``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click
import numpy as np

from gate.audit import AuditEntry, AuditLog, undecided_entries
from gate.decide import decide
from gate.errors import InputError, UsageError
from gate.index import Probe
from gate.index_manifest import EmbeddingModel
from gate.policy import LoadedPolicy
from gate.poses import PoseSet
from gate.shards import Mapper, Searcher
from gate.values import Decision, Neighbours, Volume
from gate.verify import VERIFY_K, Verifier, View, grid_search, reported, retrieve_and_verify
from gate.volume import ReadOptions

ENGINES = ("local", "ray")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Item:
    """One candidate read and ready to embed.

    Attributes:
        source: where it came from (shown to the user, never written to the audit log).
        candidate_sha256: :func:`gate.digest.sha256_voxels` of its voxels as read.
        ref: the engine's handle on its data (a Volume locally; a chunk and row on Ray).

    """

    source: str
    candidate_sha256: str
    ref: Any


@dataclass(frozen=True)
class EngineConfig:
    """What ``--engine`` and its options asked for.

    Attributes:
        name: ``local`` or ``ray``.
        ray_address: a running cluster (``auto``, ``ray://host:10001``, ``host:6379``); None
            starts a local Ray for the run and shuts it down after.
        workers: embedding actors (Ray).
        batch_size: volumes per embedding call (Ray; explicit, also on GPU).
        num_gpus: GPUs per embedding actor (Ray; > 0 requires ``--device cuda``).
        encoder_dir: the encoder folder the actors load (None: the shipped one).
        device: onnxruntime device of the actors.

    """

    name: str = "local"
    ray_address: str | None = None
    workers: int = 2
    batch_size: int = 64
    num_gpus: float = 0.0
    encoder_dir: Path | None = None
    device: str = "auto"


class Engine(Protocol):
    """What the commands need of an engine."""

    encoder: EmbeddingModel
    provider: str
    mapper: Mapper

    def read(self, paths: Sequence[Path], options: ReadOptions) -> tuple[list[Item], list[InputError]]:
        """Discover and read every source (errors collected, never skipped)."""
        ...

    def embed(self, items: Sequence[Item]) -> list[Probe]:
        """One identity-pose probe per item, in order."""
        ...

    def embed_volumes(self, volumes: Sequence[Volume], poses: PoseSet) -> list[Probe]:
        """As :func:`gate.index.embed_volumes` (index build)."""
        ...

    def open_index(self, index_dir: Path) -> Searcher:
        """Load and verify an index (sharded or not) for searching."""
        ...

    def views(self, items: Sequence[Item], verifier: Verifier) -> list[View]:
        """Each item's grid with the verifier's margin of context (:mod:`gate.verify`), in order."""
        ...

    def close(self) -> None:
        """Release workers."""
        ...


def engine_options(func: F) -> F:
    """Add ``--engine``, ``--ray-address``, ``--workers``, ``--batch-size``, ``--num-gpus``."""
    for opt in reversed(
        [
            click.option(
                "--engine",
                type=click.Choice(ENGINES),
                default="local",
                show_default=True,
                help="Run in this process (local) or on Ray (read/preprocess tasks, embedding "
                "actors, index-shard actors; needs gate[ray]).",
            ),
            click.option(
                "--ray-address",
                default=None,
                help="Ray cluster to join (e.g. auto, or HEAD:6379); default: start a local Ray for "
                "the run and stop it after.",
            ),
            click.option(
                "--workers",
                type=click.IntRange(1),
                default=2,
                show_default=True,
                help="Ray embedding actors.",
            ),
            click.option(
                "--batch-size",
                type=click.IntRange(1),
                default=64,
                show_default=True,
                help="Volumes per embedding call on Ray.",
            ),
            click.option(
                "--num-gpus",
                type=click.FloatRange(0),
                default=0.0,
                show_default=True,
                help="GPUs per Ray embedding actor (> 0 needs --device cuda; CUDA is checked).",
            ),
        ]
    ):
        func = opt(func)
    return func


def open_engine(config: EngineConfig, encoder: EmbeddingModel) -> Engine:
    """Start the engine ``config.name`` around the driver's verified ``encoder``.

    Raises:
        UsageError: ``ray`` asked for but not installed, or inconsistent GPU options.

    """
    if config.name == "local":
        from gate.engine.local import LocalEngine

        return LocalEngine(encoder)
    if config.name != "ray":
        raise UsageError(f"--engine {config.name!r}: choose one of {', '.join(ENGINES)}")
    try:
        import ray  # noqa: F401
    except ImportError as err:
        raise UsageError("--engine ray needs Ray: pip install 'gate[ray]'") from err
    from gate.engine.ray_engine import RayEngine

    return RayEngine(config, encoder)


@dataclass(frozen=True)
class Judged:
    """Everything one check decided, in input order.

    Attributes:
        items: the candidates read.
        errors: the inputs that could not be read.
        neighbours: per item.
        decisions: per item.
        provider: the execution provider that embedded them.

    """

    items: list[Item]
    errors: list[InputError]
    neighbours: list[Neighbours]
    decisions: list[Decision]
    provider: str


def split_in_domain(
    items: Sequence[Item], index: Searcher
) -> tuple[list[Item], list[bool], list[InputError]]:
    """Keep the items the index can judge and say which are judged by windows; refuse the rest.

    Checked before anything is preprocessed or embedded (:func:`gate.domain.check_in_domain`).
    Items whose ``ref`` is not a :class:`~gate.values.Volume` (Ray chunks) are kept here: the
    Ray engine checks them in its read tasks (refusing any that would need windows) and returns
    the refusals after the read errors.

    Returns:
        The kept items, per kept item whether it is judged by windows (:mod:`gate.windows`),
        and one :class:`DomainError` per refused item.

    """
    from gate.domain import check_in_domain

    domain = index.domain
    kept: list[Item] = []
    windowed: list[bool] = []
    refused: list[InputError] = []
    for item in items:
        mode = "whole"
        if isinstance(item.ref, Volume):
            try:
                mode = check_in_domain(item.ref, domain, windows=True)
            except InputError as err:
                refused.append(err)
                continue
        kept.append(item)
        windowed.append(mode == "windows")
    return kept, windowed, refused


def search_items(
    engine: Engine, index: Searcher, items: Sequence[Item], windowed: Sequence[bool], k: int
) -> list[Neighbours]:
    """Neighbours of every item, in order: whole items embedded together, the others by windows."""
    from gate.index import embed_grids
    from gate.windows import judge_windows

    whole = [it for it, w in zip(items, windowed, strict=True) if not w]
    probes = engine.embed(whole)
    verifier = index.verifier
    searched = index.search_many([p.embedding for p in probes], [p.voxel_sha256 for p in probes], k=k)
    if verifier is not None and whole:
        views = engine.views(whole, verifier)
        searched = retrieve_and_verify(verifier, searched, views, grid_search(engine.encoder, index), k)
    found = iter(searched)

    def views_judge(source: str, depth: int) -> Callable[[list[np.ndarray]], list[Neighbours]]:
        def judge_views(views: list[np.ndarray], include: Sequence[Sequence[str]]) -> list[Neighbours]:
            view_probes = []
            for i in range(0, len(views), WINDOW_BATCH):
                part = views[i : i + WINDOW_BATCH]
                view_probes.extend(embed_grids(part, engine.encoder, [source] * len(part)))
            return index.search_many(
                [p.embedding for p in view_probes], [p.voxel_sha256 for p in view_probes], depth, include
            )

        return judge_views

    out: list[Neighbours] = []
    for item, w in zip(items, windowed, strict=True):
        if w:
            depth = k if verifier is None else max(k, VERIFY_K)  # windows verify as deep as whole ones
            result = judge_windows(
                item.ref, engine.encoder.preprocess, views_judge(item.source, depth), depth, verifier
            )
            out.append(result.neighbours if verifier is None else reported(result.neighbours, k))
        else:
            out.append(next(found))
    return out


WINDOW_BATCH = 64
"""Windows per encoder call (64 x 32x48x32 float32 = 12.6 MB)."""


JUDGE_CHUNK = 512
"""Sources read, embedded, searched, decided and audited at a time by :func:`judge`.

Reading every candidate before embedding held all of them (and their grids) at once: 10,000
hippocampus-sized candidates took ``gate check`` to 21.5 GB resident and the kernel killed it (no
audit record for any of them), and on Ray a worker ran out of memory. 512 keeps a chunk of
such candidates near half a GB and is far above any batch the encoder or search needs; tests
with fewer sources see exactly the old single pass."""


JUDGE_VOXELS = 128 * 1024 * 1024
"""Voxels (estimated from headers, :func:`gate.volume.estimate_voxels`) read per chunk at most:
512 sources of 256x256x160 would hold ~38 GB (measured 75 MiB per such candidate,
bench/large_volumes.py), so a chunk of large candidates stops at ~12 of them (~1 GB of
candidates); 512 hippocampus crops (~60k voxels each, 31M in all) never reach it."""


def chunk_bounds(sources: Sequence[Path]) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of ``sources``, in order.

    A chunk holds at most :data:`JUDGE_CHUNK` sources and :data:`JUDGE_VOXELS` estimated voxels,
    and at least one source; no sources give one empty chunk.
    """
    from gate.volume import estimate_voxels

    if not sources:
        return [(0, 0)]
    bounds: list[tuple[int, int]] = []
    start, voxels = 0, 0
    for i, source in enumerate(sources):
        v = estimate_voxels(source)
        if i > start and (i - start >= JUDGE_CHUNK or voxels + v > JUDGE_VOXELS):
            bounds.append((start, i))
            start, voxels = i, 0
        voxels += v
    bounds.append((start, len(sources)))
    return bounds


def judge(
    engine: Engine,
    index: Searcher,
    paths: Sequence[Path],
    options: ReadOptions,
    policy: LoadedPolicy,
    audit: AuditLog,
    run_id: str,
    problem: Callable[[InputError], str],
) -> Judged:
    """Read, embed, search, decide, and audit every candidate (the body of ``gate check``).

    Sources are discovered first, then judged in chunks (:func:`chunk_bounds`) so memory stays
    bounded. Records, per chunk: one error record per unreadable input (discovery errors with
    the first chunk), then one decision record per candidate in input order. If embedding,
    search or a worker fails, every candidate of the chunk gets an error record, every source
    not yet read gets one too, and the error propagates (fail closed: exactly one record each).

    Args:
        engine: where to run.
        index: from ``engine.open_index``.
        paths: files or folders.
        options: how to read them.
        policy: the policy in force.
        audit: the log (written by this process only).
        run_id: the run.
        problem: the audit text of an unreadable input (names no file).

    """
    from gate.volume import discover

    sources: list[Path] = []
    first_errors: list[InputError] = []
    for path in paths:
        try:
            sources.extend(discover([path]))
        except InputError as err:
            first_errors.append(err)
    parts: list[Judged] = []

    def undecided(err: BaseException, count: int) -> None:
        for entry in undecided_entries(
            run_id, err, policy.id, policy.sha256, engine.provider, [None] * count
        ):
            audit.append(entry)

    for n, (start, stop) in enumerate(chunk_bounds(sources)):
        chunk = sources[start:stop]
        before = first_errors if n == 0 else []
        try:
            items, errors = engine.read(chunk, options) if chunk else ([], [])
        except Exception as err:
            for e in before:
                audit.append(
                    AuditEntry.for_error(run_id, problem(e), policy.id, policy.sha256, engine.provider)
                )
            undecided(err, len(sources) - start)  # this chunk and every later one
            raise
        try:
            part = judge_items(engine, index, items, [*before, *errors], policy, audit, run_id, problem)
        except Exception as err:
            undecided(err, len(sources) - start - len(chunk))  # judge_items recorded this chunk
            raise
        # keep what the caller prints, drop the voxels (the reason for chunking)
        parts.append(
            dataclasses.replace(part, items=[dataclasses.replace(it, ref=None) for it in part.items])
        )
    return Judged(
        items=[it for p in parts for it in p.items],
        errors=[e for p in parts for e in p.errors],
        neighbours=[nb for p in parts for nb in p.neighbours],
        decisions=[d for p in parts for d in p.decisions],
        provider=engine.provider,
    )


def judge_items(
    engine: Engine,
    index: Searcher,
    items: Sequence[Item],
    errors: Sequence[InputError],
    policy: LoadedPolicy,
    audit: AuditLog,
    run_id: str,
    problem: Callable[[InputError], str],
) -> Judged:
    """:func:`judge` after reading: the same records, for items already read (:mod:`gate.api`'s arrays).

    Args:
        engine: where to run.
        index: from ``engine.open_index``.
        items: the candidates read, in order.
        errors: the inputs that could not be read (one error record each).
        policy: the policy in force.
        audit: the log (written by this process only).
        run_id: the run.
        problem: the audit text of an unreadable input (names no file).

    """
    items, windowed, refused = split_in_domain(items, index)
    errors = [*errors, *refused]
    provider = engine.provider
    for err in errors:
        audit.append(AuditEntry.for_error(run_id, problem(err), policy.id, policy.sha256, provider))
    try:
        neighbours = search_items(engine, index, items, windowed, policy.policy.k)
        decisions = [decide(n, policy, index.calibration, index.verification) for n in neighbours]
    except Exception as err:
        shas = [it.candidate_sha256 for it in items]
        for entry in undecided_entries(run_id, err, policy.id, policy.sha256, provider, shas):
            audit.append(entry)
        raise
    for item, dec in zip(items, decisions, strict=True):
        audit.append(
            AuditEntry.for_decision(
                run_id,
                dec,
                item.candidate_sha256,
                provider,
                encoder_sha256=engine.encoder.sha256,
                index_sha256=index.sha256,
            )
        )
    return Judged(items, errors, neighbours, decisions, provider)
