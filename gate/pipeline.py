"""``gate generate``: sample candidates, gate each one, audit every one, export the passes.

The stages run in order on one batch at a time::

    Generator.sample --> embed (preprocess + encoder) --> index search --> decide(policy)
        --> audit (one fsync'd record per candidate) --> [after the loop] export passes

until ``n`` candidates have passed or ``max_candidates`` have been drawn. Passed candidates are
kept in memory (0.2 MB each at 32x48x32) and exported at the end through
:class:`gate.bundle.BundleWriter`, which builds the bundle under a temporary name and renames it
into place only when every file is written. Any exception anywhere (a model that fails its
digest check, an encoder error, a full disk) propagates after the temporary folder is
removed: fail closed, no bundle. A rejection is a value and never stops the run.

Memorization statistics follow Dar et al. (2024): the share of candidates rejected as copies
(grade ``duplicate``) and the share of training patients that at least one candidate copied.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gate import bundle_schema
from gate.audit import AuditEntry, AuditLog, new_run_id, sign_head, undecided_entries
from gate.bundle import BundleWriter, MemorizationRecord, PassedSample, Provenance, memorization_document
from gate.decide import decide
from gate.digest import sha256_voxels
from gate.domain import check_in_domain
from gate.errors import ExitCode, IntegrityError, UsageError
from gate.index import TrainingIndex, embed_volumes
from gate.policy import LoadedPolicy
from gate.report import quarantine_candidate
from gate.signing import SigningKey
from gate.values import Decision, Grade, Verdict, Volume
from gate.verify import grid_search, verify_all

if TYPE_CHECKING:
    from gate.generator.plugins import CandidateGenerator as Generator
    from gate.index import EmbeddingModel

log = logging.getLogger(__name__)

MAX_CANDIDATES_FACTOR = 4
"""Default candidate budget = 4 x n. Measured: the shipped generator passes the strict policy
for 60% of candidates (500 of 832, bench/generate_e2e.py); 4x leaves room for a generator that
passes only 1 in 4 before the run stops short (exit 1) instead of sampling forever."""

DEFAULT_BATCH_SIZE = 16
"""Candidates per batch. bench/sampling.py (1 thread, 25 DDIM steps): 720 / 301 / 303 / 305 ms
per volume at batch 1 / 4 / 16 / 32: flat beyond 4 on this CPU; 16 amortises the per-batch
embed / search / audit calls and still updates progress every few seconds (the 500-sample run,
2 threads: 163 ms per volume at batch 16)."""

DEFAULT_OUT_ROOT = Path("gate-out")
"""Bundles go to ``./gate-out/gate-<run id>/``; the audit log to ``./gate-out/audit.jsonl``."""

AUDIT_LOG_NAME = "audit.jsonl"
"""File name of the default audit log under the out root (outside every bundle)."""

GENERATOR_NAME = "MONAI 3D latent diffusion (AutoencoderKL + DiffusionModelUNet, DDIM)"
"""Name recorded in the bundle manifest and data card."""

MEMORIZATION_FILE = bundle_schema.MEMORIZATION_FILE
"""Per-run Dar et al. statistics written into the bundle (shares only, no ids)."""

QUARANTINE_DIR_NAME = "quarantine"
"""Candidates that were not exported go to ``<out root>/quarantine/<run id>/`` (internal, outside
every bundle), one ``<candidate sha256>.nii.gz`` each, for ``gate audit report``."""

STAGES = ("load", "generate", "embed", "search", "verify", "decide", "audit", "quarantine", "export")
"""Timed stages, in order, as reported in the summary."""


@dataclass(frozen=True)
class GenerateRequest:
    """What ``gate generate`` was asked for.

    Attributes:
        n: samples wanted in the bundle (>= 1).
        max_candidates: candidate budget (default ``MAX_CANDIDATES_FACTOR * n``).
        seed: run seed; candidate ``i`` is reproducible from (seed, i).
        batch_size: candidates per batch.
        ddim_steps: DDIM steps (None = the generator's default).
        formats: exporter names.
        out_root: folder receiving the bundle ``gate-<run id>``.
        audit_log: audit log path (None = ``out_root / audit.jsonl``).
        run_id: None = :func:`new_run_id`.
        quarantine: keep every candidate that is not exported (flagged or rejected) under
            ``quarantine_root / <run id>`` for the privacy reviewer's report.
        quarantine_root: None = ``out_root / quarantine``.
        signer: the site key (:mod:`gate.signing`): signs the manifest and the audit head at
            the run's end; None: unsigned.

    """

    n: int
    max_candidates: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    ddim_steps: int | None = None
    formats: tuple[str, ...] = ("nifti",)
    out_root: Path = DEFAULT_OUT_ROOT
    audit_log: Path | None = None
    run_id: str | None = None
    quarantine: bool = True
    quarantine_root: Path | None = None
    signer: SigningKey | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UsageError(f"--n must be >= 1; got {self.n}")
        if self.max_candidates is not None and self.max_candidates < self.n:
            raise UsageError(f"--max-candidates ({self.max_candidates}) must be >= --n ({self.n})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1; got {self.batch_size}")

    @property
    def budget(self) -> int:
        """The candidate budget actually used."""
        return self.max_candidates if self.max_candidates is not None else MAX_CANDIDATES_FACTOR * self.n


@dataclass(frozen=True)
class Progress:
    """Reported after every batch."""

    candidates: int
    passed: int
    wanted: int
    budget: int
    elapsed_s: float


@dataclass
class GenerateResult:
    """What a run did.

    Attributes:
        run_id: the run id (in the audit records and the bundle name).
        bundle: the published bundle, or None when nothing passed.
        wanted: n.
        candidates: candidates generated and judged.
        passed: candidates that passed; batches shrink to the number still wanted, so never
            more than n.
        exported: samples in the bundle (min(n, passed)).
        verdict_grades: counts per (verdict, grade), e.g. ``{"reject/duplicate": 3}``.
        times: seconds per stage (see :data:`STAGES`).
        copy_share: share of candidates rejected as copies (grade duplicate, verdict reject).
        patients_copied_share: share of training patients nearest to at least one
            duplicate-grade candidate.
        patients_copied: how many such patients.
        training_patients: distinct patients in the index.
        audit_log: the audit log written to.
        seed: the run seed.
        quarantine: folder holding the candidates that were not exported (None: not kept).

    """

    run_id: str
    bundle: Path | None
    wanted: int
    candidates: int = 0
    passed: int = 0
    exported: int = 0
    verdict_grades: dict[str, int] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    copy_share: float = 0.0
    patients_copied_share: float = 0.0
    patients_copied: int = 0
    training_patients: int = 0
    audit_log: Path | None = None
    seed: int = 0
    quarantine: Path | None = None

    @property
    def exit_code(self) -> ExitCode:
        """0 when n samples were exported, 1 when the budget ran out first."""
        return ExitCode.OK if self.exported >= self.wanted else ExitCode.VIOLATION

    def count(self, verdict: Verdict, grade: Grade | None = None) -> int:
        """Candidates with this verdict (and grade)."""
        return sum(
            c
            for key, c in self.verdict_grades.items()
            if key.startswith(verdict.value + "/") and (grade is None or key.endswith("/" + grade.value))
        )

    def memorization_record(self) -> MemorizationRecord:
        """The Dar et al. statistics as the bundle records them (no ids)."""
        return MemorizationRecord(
            run_id=self.run_id,
            candidates=self.candidates,
            copy_share=self.copy_share,
            patients_copied=self.patients_copied,
            training_patients=self.training_patients,
            patients_copied_share=self.patients_copied_share,
            verdict_grades=dict(sorted(self.verdict_grades.items())),
        )

    def memorization(self) -> dict[str, object]:
        """The Dar et al. statistics as a JSON-able mapping (no ids): ``memorization.json``."""
        return json.loads(memorization_document(self.memorization_record()))


class _Clock:
    def __init__(self, times: dict[str, float]) -> None:
        self.times = times

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.times[stage] += now - since
        return now


def check_compatible(generator: Generator, encoder: EmbeddingModel, index: TrainingIndex) -> None:
    """Check that the generator produces volumes on the encoder's (= the index's) preprocessing grid.

    Raises:
        IntegrityError: the preprocess digests differ.

    """
    gen_digest = generator.preprocess.digest
    if gen_digest != encoder.preprocess.digest or gen_digest != index.manifest.preprocess_digest:
        raise IntegrityError(
            f"generator preprocessing {gen_digest[:12]} (grid {generator.preprocess.grid}) differs from the "
            f"encoder's {encoder.preprocess.digest[:12]} (grid {encoder.preprocess.grid}); "
            "train the generator with the encoder's preprocess config"
        )


def run_generate(
    request: GenerateRequest,
    generator: Generator,
    encoder: EmbeddingModel,
    index: TrainingIndex,
    policy: LoadedPolicy,
    provider: str,
    on_progress: Callable[[Progress], None] | None = None,
    load_seconds: float = 0.0,
) -> GenerateResult:
    """Generate, gate, audit and export until ``request.n`` pass or the budget is spent.

    Args:
        request: the run's parameters.
        generator: a loaded generator.
        encoder: the index's encoder.
        index: the training index.
        policy: the policy every exported sample passes.
        provider: the onnxruntime execution provider the encoder runs on (for the records).
        on_progress: called after every batch.
        load_seconds: time already spent loading the components (reported as ``load``).

    Returns:
        The result; ``result.bundle`` is None when no candidate passed.

    Raises:
        GateError: any failure to decide or export; nothing is left published.

    """
    check_compatible(generator, encoder, index)
    run_id = request.run_id or new_run_id()
    audit = AuditLog(request.audit_log or request.out_root / AUDIT_LOG_NAME)
    bundle_dir = request.out_root / f"gate-{run_id}"
    if bundle_dir.exists():
        raise UsageError(f"{bundle_dir}: already exists; bundles are never overwritten")
    result = GenerateResult(
        run_id=run_id, bundle=None, wanted=request.n, audit_log=audit.path, seed=request.seed
    )
    result.times["load"] = load_seconds
    if request.quarantine:
        result.quarantine = (request.quarantine_root or request.out_root / QUARANTINE_DIR_NAME) / run_id
    result.training_patients = len({row.patient_id for row in index.manifest.rows})
    clock = _Clock(result.times)
    passed: list[PassedSample] = []
    copied: set[str] = set()
    t_start = time.perf_counter()
    budget = request.budget
    while result.exported < request.n and result.candidates < budget:
        start = result.candidates
        count = min(request.batch_size, budget - start, request.n - result.exported)
        t = time.perf_counter()
        volumes: list[Volume] = []
        try:
            volumes = generator.volumes(
                generator.sample(request.seed, start, count, request.ddim_steps), request.seed, start
            )
            t = clock.add("generate", t)
            for vol in volumes:
                check_in_domain(vol, index.manifest.domain)
            probes = embed_volumes(volumes, encoder)
            t = clock.add("embed", t)
            neighbours = index.search_many(
                [p.embedding for p in probes], [p.voxel_sha256 for p in probes], k=policy.policy.k
            )
            t = clock.add("search", t)
            k = policy.policy.k
            neighbours = verify_all(index.verifier, neighbours, volumes, grid_search(encoder, index), k)
            t = clock.add("verify", t)
            decisions: list[Decision] = [
                decide(nb, policy, index.calibration, index.verification) for nb in neighbours
            ]
            t = clock.add("decide", t)
        except Exception as err:
            shas = [sha256_voxels(volumes[j].data) if j < len(volumes) else None for j in range(count)]
            sample_ids = [candidate_id(start + j) for j in range(count)]
            for entry in undecided_entries(
                run_id, err, policy.id, policy.sha256, provider, shas, sample_ids, request.seed
            ):
                audit.append(entry)
            raise
        for j, (volume, decision) in enumerate(zip(volumes, decisions, strict=True)):
            exported = decision.passed and result.exported < request.n
            sample_id = bundle_sample_id(result.exported + 1) if exported else candidate_id(start + j)
            audit_hash = audit.append(
                AuditEntry.for_decision(
                    run_id,
                    decision,
                    sha256_voxels(volume.data),
                    provider,
                    sample_id=sample_id,
                    seed=request.seed,
                    encoder_sha256=encoder.sha256,
                    index_sha256=index.sha256,
                )
            )
            key = f"{decision.verdict.value}/{decision.grade.value}"
            result.verdict_grades[key] = result.verdict_grades.get(key, 0) + 1
            if decision.grade is Grade.DUPLICATE:
                copied.add(decision.nearest_patient_id)
            if decision.passed:
                result.passed += 1
                if exported:
                    passed.append(PassedSample(volume, decision, sample_id, request.seed, audit_hash))
                    result.exported += 1
            elif result.quarantine is not None:
                t = clock.add("audit", t)
                quarantine_candidate(volume, result.quarantine)
                t = clock.add("quarantine", t)
        result.candidates += count
        clock.add("audit", t)
        if on_progress is not None:
            on_progress(
                Progress(result.candidates, result.exported, request.n, budget, time.perf_counter() - t_start)
            )
    result.copy_share = result.count(Verdict.REJECT, Grade.DUPLICATE) / max(result.candidates, 1)
    result.patients_copied = len(copied)
    result.patients_copied_share = len(copied) / max(result.training_patients, 1)
    if passed:
        t = time.perf_counter()
        provenance = Provenance(
            generator_name=getattr(generator, "name", GENERATOR_NAME),
            generator_sha256=generator.sha256,
            encoder_sha256=encoder.sha256,
            index_sha256=index.sha256,
            provider=provider,
            policy=policy,
            formats=request.formats,
            signer=request.signer,
        )
        with BundleWriter(bundle_dir, run_id, provenance, audit) as writer:
            for item in passed:
                writer.add(item.volume, item.decision, item.sample_id, item.seed, item.audit_hash)
            result.bundle = writer.finish(result.memorization_record())
        clock.add("export", t)
    elif request.signer is not None:
        sign_head(audit, request.signer)  # no bundle: the run's end is still signed
    log.info("run %s: %d/%d candidates passed", run_id, result.passed, result.candidates)
    return result


def bundle_sample_id(position: int) -> str:
    """The public id of the ``position``-th exported sample (1-based): ``s000001``, ``s000002``, ...

    Contiguous in export order, so a bundle's ids do not show where candidates were rejected.
    """
    return f"s{position:06d}"


def candidate_id(index: int) -> str:
    """The internal id (audit log only) of a candidate that was not exported: ``c000004``.

    ``index`` is 0-based in the run; with the run's seed it names the candidate that was generated.
    """
    return f"c{index:06d}"
