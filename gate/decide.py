"""The decision rule: Neighbours x policy (x calibration) -> Decision. Pure, no I/O.

Percentile thresholds are turned into cosine similarities with the index's
:class:`~gate.calibration.Calibration` (``TrainingIndex.manifest.calibration``), then capped at
:data:`DUPLICATE_CEILING` so that an exact copy is a duplicate under every policy whatever the
calibration looks like.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gate.calibration import Calibration
from gate.errors import IntegrityError, PolicyError
from gate.index_manifest import Verification
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


def resolve_thresholds(
    policy: LoadedPolicy, calibration: Calibration | None, copies: Calibration | None = None
) -> ResolvedThresholds:
    """Absolute cosine thresholds of ``policy`` under ``calibration``, capped at the ceiling.

    Args:
        policy: the policy.
        calibration: real new patients' nearest cosine similarities (percentile thresholds).
        copies: simulated copies' nearest cosine similarities (``copies`` thresholds).

    Raises:
        PolicyError: a percentile threshold and no calibration (or a copies one and no copies).
        UsageError: the calibration is too small for percentiles.

    """
    th = policy.policy.thresholds
    similar = min(th.similar.resolve(calibration, "thresholds.similar", copies), DUPLICATE_CEILING)
    duplicate = min(th.duplicate.resolve(calibration, "thresholds.duplicate", copies), DUPLICATE_CEILING)
    return ResolvedThresholds(similar=similar, duplicate=duplicate)


def resolve_verified(policy: LoadedPolicy, verification: Verification) -> ResolvedThresholds:
    """Thresholds of the verified score, capped at the ceiling.

    ``policy.verified`` (or ``thresholds``) resolved under the index's verified calibration and
    simulated copies.
    """
    th = policy.policy.verified_thresholds
    where = "verified" if policy.policy.verified is not None else "thresholds"
    cal, copies = verification.calibration, verification.copies
    similar = min(th.similar.resolve(cal, f"{where}.similar", copies), DUPLICATE_CEILING)
    duplicate = min(th.duplicate.resolve(cal, f"{where}.duplicate", copies), DUPLICATE_CEILING)
    return ResolvedThresholds(similar=similar, duplicate=duplicate)


def resolve_identity(policy: LoadedPolicy, verification: Verification) -> float | None:
    """The identity score's duplicate bound (None when the policy sets none), capped at the ceiling.

    Raises:
        PolicyError: the policy sets one and the index holds no identity calibration (built
            before the identity score: rebuild it).

    """
    bound = policy.policy.identity
    if bound is None:
        return None
    if verification.identity is None or verification.copies_identity is None:
        raise PolicyError(
            f"policy {policy.id} grades duplicates by the identity score, but the index records no identity "
            "calibration; rebuild it with `gate index build`"
        )
    value = bound.duplicate.resolve(verification.identity, "identity.duplicate", verification.copies_identity)
    return min(value, DUPLICATE_CEILING)


GRADE_ORDER: dict[Grade, int] = {Grade.DIFFERENT: 0, Grade.SIMILAR: 1, Grade.DUPLICATE: 2}
"""Grades from least to most similar: the decision takes the higher of the two scores' grades."""


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


def decide(
    neighbours: Neighbours,
    policy: LoadedPolicy,
    calibration: Calibration | None,
    verification: Verification | None = None,
) -> Decision:
    """Judge one candidate.

    On an index that verifies, the verified score (:mod:`gate.verify`) is graded beside the
    cosine and the higher grade decides: verification can only make a decision stricter. A
    policy with ``identity`` grades the verified score at most ``similar`` and makes a candidate
    a duplicate where its identity score reaches the bound (the policy then keeps ``similar``
    from passing, :class:`gate.policy.Policy`).

    Args:
        neighbours: the candidate's nearest training patients (patient-level max, closest first).
        policy: the loaded policy.
        calibration: the index's calibration, to resolve percentile thresholds (may be None
            for policies with absolute thresholds only).
        verification: the index's verification record (None: the index does not verify).

    Returns:
        The decision; ``details`` holds the resolved thresholds and, with a calibration, the
        fraction of calibration patients less similar than this candidate; on a verifying
        index also the verified score and its thresholds, the identity score and, under a
        policy that grades by it, its duplicate bound.

    Raises:
        IntegrityError: a non-finite similarity (never a pass); an index that verifies and
            neighbours that were not verified, or verified neighbours from an index that does not.
        PolicyError: percentile thresholds without calibration.

    """
    similarity = neighbours.nearest_similarity
    if not math.isfinite(similarity):
        raise IntegrityError(f"nearest similarity is {similarity}; expected a finite cosine; check the index")
    if (verification is None) != (neighbours.verified is None):
        raise IntegrityError(
            "the index verifies but the candidate was not verified"
            if verification is not None
            else "verified scores from an index that records no verification"
        )
    copies_cos = verification.copies_cosine if verification is not None else None
    thresholds = resolve_thresholds(policy, calibration, copies_cos)
    exact = policy.policy.exact_duplicate_check and neighbours.exact_duplicate
    if exact:
        grade, threshold = Grade.DUPLICATE, thresholds.duplicate
    else:
        grade, threshold = grade_of(similarity, thresholds)
    details = {"similar_threshold": thresholds.similar, "duplicate_threshold": thresholds.duplicate}
    if calibration is not None:
        details["calibration_rank"] = calibration.rank(similarity)
    verified = neighbours.nearest_verified
    verified_pid = neighbours.verified_patient_id
    if verification is not None and verified is not None:
        vth = resolve_verified(policy, verification)
        vgrade, vthreshold = grade_of(verified, vth)
        details |= {
            "verified": verified,
            "verified_similar_threshold": vth.similar,
            "verified_duplicate_threshold": vth.duplicate,
        }
        identity = neighbours.nearest_identity
        if identity is not None:
            details["identity"] = identity
        bound = resolve_identity(policy, verification)
        if bound is not None:
            if identity is None:
                raise IntegrityError(
                    f"policy {policy.id} grades duplicates by the identity score, but the candidate has none"
                )
            details["identity_duplicate_threshold"] = bound
            if vgrade is Grade.DUPLICATE:  # the verified score tells copies from novel ones only
                vgrade, vthreshold = Grade.SIMILAR, vth.similar
            if identity >= bound and GRADE_ORDER[grade] < GRADE_ORDER[Grade.DUPLICATE]:
                grade, threshold = Grade.DUPLICATE, bound
        if GRADE_ORDER[vgrade] > GRADE_ORDER[grade]:
            grade, threshold = vgrade, vthreshold
    verdict: Verdict = policy.policy.actions.for_grade(grade)
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
        verified_patient_id=verified_pid,
    )


def pass_rate(
    pairs: np.ndarray, policy: LoadedPolicy, calibration: Calibration, verification: Verification | None
) -> float:
    """Fraction of (cosine, verified, identity) score triples ``policy`` passes, by :func:`decide` itself.

    Args:
        pairs: float (n, 3) nearest cosine, verified and identity score per query (columns 1
            and 2 ignored without ``verification``).
        policy: the policy.
        calibration: the index's cosine calibration.
        verification: the index's verification record, or None.

    """
    if len(pairs) == 0:
        return float("nan")
    passed = 0
    if pairs.ndim != 2 or pairs.shape[1] != 3:
        raise ValueError(f"pass_rate needs (n, 3) score triples; got shape {pairs.shape}")
    for cos, ver, idn in pairs.tolist():
        nb = Neighbours(
            patient_ids=("p-0000000000000000",),
            similarities=np.asarray([min(max(cos, -1.0), 1.0)]),
            verified=None if verification is None else np.asarray([min(max(ver, -1.0), 1.0)]),
            identity=None if verification is None else np.asarray([min(max(idn, -1.0), 1.0)]),
        )
        passed += decide(nb, policy, calibration, verification).passed
    return passed / len(pairs)
