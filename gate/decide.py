"""The decision rule: Neighbours x policy (x calibration) -> Decision. Pure, no I/O.

Percentile thresholds are turned into cosine similarities with the index's
:class:`~gate.calibration.Calibration` (``TrainingIndex.manifest.calibration``), then capped at
:data:`DUPLICATE_CEILING` so that an exact copy is a duplicate under every policy whatever the
calibration looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gate.calibration import Calibration
from gate.errors import IntegrityError
from gate.policy import LoadedPolicy
from gate.values import Decision, Grade, Neighbours, Verdict

DUPLICATE_CEILING = 0.999
"""No resolved threshold exceeds this cosine similarity. The embedding of an exact copy equals
its source up to float32 round-off (cosine >= 1 - 1e-6); a percentile threshold computed from a
calibration set that itself contains duplicated scans can reach 1.0 and would let such a copy
through. 0.999 is far above any distinct patient pair seen in calibration of real data."""


@dataclass(frozen=True)
class ResolvedThresholds:
    """A policy's thresholds as cosine similarities.

    Attributes:
        similar: lower bound of the ``similar`` grade.
        duplicate: lower bound of the ``duplicate`` grade.

    """

    similar: float
    duplicate: float


def resolve_thresholds(policy: LoadedPolicy, calibration: Calibration | None) -> ResolvedThresholds:
    """Absolute cosine thresholds of ``policy`` under ``calibration``, capped at the ceiling.

    Raises:
        PolicyError: a percentile threshold and no calibration.
        UsageError: the calibration is too small for percentiles.

    """
    th = policy.policy.thresholds
    similar = min(th.similar.resolve(calibration, "thresholds.similar"), DUPLICATE_CEILING)
    duplicate = min(th.duplicate.resolve(calibration, "thresholds.duplicate"), DUPLICATE_CEILING)
    return ResolvedThresholds(similar=similar, duplicate=duplicate)


def grade_of(similarity: float, thresholds: ResolvedThresholds) -> tuple[Grade, float]:
    """Grade a similarity; return the grade and the threshold that decided it.

    ``duplicate`` when ``similarity >= duplicate``; else ``similar`` when ``>= similar``; else
    ``different``, reported with the ``similar`` threshold it did not reach. When a percentile
    ``similar`` resolves above an absolute ``duplicate``, the ``similar`` band is empty.
    """
    if similarity >= thresholds.duplicate:
        return Grade.DUPLICATE, thresholds.duplicate
    if similarity >= thresholds.similar:
        return Grade.SIMILAR, thresholds.similar
    return Grade.DIFFERENT, thresholds.similar


def decide(neighbours: Neighbours, policy: LoadedPolicy, calibration: Calibration | None) -> Decision:
    """Judge one candidate.

    Args:
        neighbours: the candidate's nearest training patients (patient-level max, closest first).
        policy: the loaded policy.
        calibration: the index's calibration, to resolve percentile thresholds (may be None
            for policies with absolute thresholds only).

    Returns:
        The decision; ``details`` holds the resolved thresholds and, with a calibration, the
        fraction of calibration patients less similar than this candidate.

    Raises:
        IntegrityError: a non-finite similarity (never a pass).
        PolicyError: percentile thresholds without calibration.

    """
    similarity = neighbours.nearest_similarity
    if not math.isfinite(similarity):
        raise IntegrityError(f"nearest similarity is {similarity}; expected a finite cosine; check the index")
    thresholds = resolve_thresholds(policy, calibration)
    exact = policy.policy.exact_duplicate_check and neighbours.exact_duplicate
    if exact:
        grade, threshold = Grade.DUPLICATE, thresholds.duplicate
    else:
        grade, threshold = grade_of(similarity, thresholds)
    verdict: Verdict = policy.policy.actions.for_grade(grade)
    details = {"similar_threshold": thresholds.similar, "duplicate_threshold": thresholds.duplicate}
    if calibration is not None:
        details["calibration_rank"] = calibration.rank(similarity)
    return Decision(
        verdict=verdict,
        grade=grade,
        nearest_patient_id=neighbours.nearest_id,
        similarity=similarity,
        threshold=threshold,
        policy_id=policy.id,
        policy_sha256=policy.sha256,
        exact_duplicate=exact,
        details=details,
    )
