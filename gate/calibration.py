"""Calibration: how close real, unseen patients come to the training set.

Dar et al.'s rule, made explicit: a synthetic volume is suspicious when it is closer to a
training patient than real *other* patients usually are. The reference distribution is each
real patient's nearest-training cosine similarity (patient level: max over the patient's
volumes and over the training patient's volumes), measured on holdout patients, or, without a
holdout, leave-one-patient-out within the training set. It is stored in the index manifest,
and policies may set thresholds as percentiles of it.

numpy + pydantic only: ``gate check`` and :mod:`gate.decide` import this.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gate.errors import UsageError

MIN_CALIBRATION_PATIENTS = 5
"""Below this many patients a percentile of the distribution is mostly noise; percentile
thresholds then refuse to resolve rather than pretend (absolute thresholds still work)."""

MAX_CALIBRATION_PATIENTS = 5000
"""Leave-one-patient-out samples at most this many patients (seeded): the 99th percentile is
then estimated from >= 50 tail values, and the cost stays ~5000 x N dot products."""

QUERY_CHUNK_ROWS = 256
"""Query rows per exact similarity block: 256 x 1M x float32 = 1 GiB at the largest index."""


class CalibrationMethod(StrEnum):
    """Where the reference patients came from."""

    HOLDOUT = "holdout"
    LEAVE_ONE_PATIENT_OUT = "leave_one_patient_out"
    SIMULATED_COPIES = "simulated_copies"


class Calibration(BaseModel):
    """Each reference patient's nearest-training cosine similarity.

    Attributes:
        method: holdout or leave-one-patient-out.
        n_patients: number of reference patients (= len(similarities)).
        similarities: per-patient nearest-training cosine similarity, ascending, in [-1, 1].

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: CalibrationMethod
    n_patients: int = Field(ge=1)
    similarities: tuple[float, ...]

    @field_validator("similarities")
    @classmethod
    def _sorted_finite(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        arr = np.asarray(v, dtype=np.float64)
        if arr.size == 0 or not np.all(np.isfinite(arr)):
            raise ValueError("calibration similarities must be a non-empty list of finite numbers")
        if np.any(np.diff(arr) < 0) or arr[0] < -1.0 - 1e-6 or arr[-1] > 1.0 + 1e-6:
            raise ValueError("calibration similarities must be ascending cosine similarities in [-1, 1]")
        return v

    def percentile(self, p: float) -> float:
        """Return the ``p``-th percentile (linear interpolation) as a cosine similarity.

        Raises:
            UsageError: fewer than :data:`MIN_CALIBRATION_PATIENTS` reference patients.

        """
        if self.n_patients < MIN_CALIBRATION_PATIENTS:
            raise UsageError(
                f"calibration holds {self.n_patients} patient(s); percentile thresholds need at least "
                f"{MIN_CALIBRATION_PATIENTS}; rebuild the index with more patients or a --holdout, "
                "or use absolute thresholds"
            )
        return float(np.percentile(np.asarray(self.similarities), p))

    def rank(self, similarity: float) -> float:
        """Fraction of reference patients strictly less similar than ``similarity``, in [0, 1]."""
        arr = np.asarray(self.similarities)
        return float(np.searchsorted(arr, similarity, side="left") / arr.size)


def nearest_similarities(
    queries: np.ndarray, vectors: np.ndarray, query_groups: np.ndarray, vector_groups: np.ndarray
) -> np.ndarray:
    """Exact nearest cosine similarity of each query among vectors of *other* groups.

    Args:
        queries: float32 (Q, D) unit rows.
        vectors: float32 (N, D) unit rows.
        query_groups: int (Q,) group (patient) number of each query.
        vector_groups: int (N,) group number of each vector; same-group pairs are ignored.

    Returns:
        float64 (Q,) nearest similarity; -1 when no vector of another group exists.

    """
    out = np.full(len(queries), -1.0)
    for start in range(0, len(queries), QUERY_CHUNK_ROWS):
        block = queries[start : start + QUERY_CHUNK_ROWS] @ vectors.T
        same = query_groups[start : start + QUERY_CHUNK_ROWS, None] == vector_groups[None, :]
        block[same] = -np.inf
        if block.shape[1]:
            out[start : start + len(block)] = np.maximum(block.max(axis=1), -1.0)
    return np.clip(out, -1.0, 1.0)


def per_patient_max(values: np.ndarray, patient_ids: list[str]) -> np.ndarray:
    """Max of ``values`` over each patient's rows, in first-seen patient order."""
    best: dict[str, float] = {}
    for value, pid in zip(values.tolist(), patient_ids, strict=True):
        best[pid] = max(best.get(pid, -np.inf), value)
    return np.asarray(list(best.values()), dtype=np.float64)


def leave_one_patient_out(
    vectors: np.ndarray, patient_ids: list[str], seed: int, query_rows: np.ndarray | None = None
) -> Calibration:
    """Each training patient's nearest similarity to the *other* training patients.

    Args:
        vectors: float32 (N, D) unit rows of the index.
        patient_ids: (N,) patient id of each row.
        seed: for sampling at most :data:`MAX_CALIBRATION_PATIENTS` patients.
        query_rows: rows that stand for a patient as a new scan would arrive (an index with
            poses: the as-read rows, pose 0); default all rows. Every row is searched.

    Raises:
        UsageError: fewer than two patients.

    """
    unique = sorted(set(patient_ids))
    if len(unique) < 2:
        raise UsageError(
            f"leave-one-patient-out calibration needs at least 2 patients; found {len(unique)}; "
            "add training patients or pass --holdout"
        )
    number = {pid: i for i, pid in enumerate(unique)}
    groups = np.asarray([number[p] for p in patient_ids])
    rows = np.arange(len(patient_ids)) if query_rows is None else np.asarray(query_rows, dtype=np.int64)
    if len(unique) > MAX_CALIBRATION_PATIENTS:
        chosen = np.random.default_rng(seed).choice(len(unique), MAX_CALIBRATION_PATIENTS, replace=False)
        rows = rows[np.isin(groups[rows], chosen)]
    sims = nearest_similarities(vectors[rows], vectors, groups[rows], groups)
    per_patient = per_patient_max(sims, [patient_ids[r] for r in rows])
    return _make(CalibrationMethod.LEAVE_ONE_PATIENT_OUT, per_patient)


def holdout(
    queries: np.ndarray, query_patient_ids: list[str], vectors: np.ndarray, patient_ids: list[str]
) -> Calibration:
    """Each holdout patient's nearest similarity to the training set.

    Args:
        queries: float32 (Q, D) unit rows of the holdout volumes.
        query_patient_ids: (Q,) their patient ids; must not occur in the training set.
        vectors: float32 (N, D) unit rows of the index.
        patient_ids: (N,) training patient ids.

    Raises:
        UsageError: a holdout patient is also a training patient.

    """
    overlap = set(query_patient_ids) & set(patient_ids)
    if overlap:
        raise UsageError(
            f"{len(overlap)} holdout patient(s) also occur in the training data (e.g. {sorted(overlap)[0]}); "
            "a holdout must hold other patients"
        )
    sims = nearest_similarities(
        queries, vectors, np.full(len(queries), -1), np.zeros(len(vectors), dtype=np.int64)
    )
    return _make(CalibrationMethod.HOLDOUT, per_patient_max(sims, query_patient_ids))


def _make(method: CalibrationMethod, per_patient: np.ndarray) -> Calibration:
    values = np.sort(np.clip(per_patient, -1.0, 1.0))
    return Calibration(method=method, n_patients=len(values), similarities=tuple(float(v) for v in values))
