"""The typed values that travel along the gate's flow, one at every arrow.

::

    files --read--> Volume --preprocess--> Volume(grid) --embed--> Embedding
          --search--> Neighbours --decide(policy)--> Decision --export--> ExportedFile
          --audit--> AuditRecord

They live in one module (rather than one per stage) so that every stage can import the
values it consumes without importing the stage that produces them: ``gate check`` must not
pull in torch because the encoder package defines a dataclass. All are frozen dataclasses and
validate themselves in ``__post_init__``; what goes to disk is a pydantic model in the stage
that writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

UNIT_NORM_TOLERANCE = 1e-3
"""Maximum allowed | ||e|| - 1 | for an :class:`Embedding`. float32 normalisation of a
512-d vector is exact to ~1e-6; 1e-3 catches un-normalised vectors without tripping on
round-off."""


@dataclass(frozen=True, eq=False)
class Volume:
    """One 3D scalar image with its geometry and pseudonymous identity.

    Attributes:
        data: float32 voxels, shape (X, Y, Z), finite.
        affine: float64 (4, 4) voxel-to-world (RAS+, mm) matrix.
        spacing: voxel size along X, Y, Z in mm, all > 0.
        source: where the voxels came from (a path, ``file.npz#key[i]``, or ``generated:...``).
        patient_id: pseudonymous patient id (never a clear identifier).

    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    source: str
    patient_id: str

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise ValueError(f"Volume.data must be 3D (X, Y, Z); got shape {self.data.shape}")
        if self.data.dtype != np.float32:
            raise ValueError(f"Volume.data must be float32; got {self.data.dtype}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine must be (4, 4); got {self.affine.shape}")
        if len(self.spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in self.spacing):
            raise ValueError(f"Volume.spacing must be 3 positive finite mm; got {self.spacing}")
        if not self.patient_id:
            raise ValueError("Volume.patient_id must be a non-empty pseudonymous id")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape (X, Y, Z)."""
        x, y, z = self.data.shape
        return int(x), int(y), int(z)


@dataclass(frozen=True, eq=False)
class Embedding:
    """A unit-norm descriptor of one preprocessed volume.

    Attributes:
        vector: float32, shape (D,), L2 norm 1.
        encoder_sha256: sha256 of the ONNX encoder file that produced it.
        source: the :attr:`Volume.source` it was computed from.

    """

    vector: np.ndarray
    encoder_sha256: str
    source: str = ""

    def __post_init__(self) -> None:
        if self.vector.ndim != 1 or self.vector.dtype != np.float32:
            raise ValueError(
                f"Embedding.vector must be float32 (D,); got {self.vector.dtype} {self.vector.shape}"
            )
        if not np.all(np.isfinite(self.vector)):
            raise ValueError("Embedding.vector has non-finite values")
        norm = float(np.linalg.norm(self.vector))
        if abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            raise ValueError(f"Embedding.vector must be unit norm; got norm {norm:.6f}")

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return int(self.vector.shape[0])


@dataclass(frozen=True, eq=False)
class Neighbours:
    """The nearest training patients of one candidate, closest first.

    Attributes:
        patient_ids: pseudonymous training patient ids, shape (k,), one per distinct patient.
        similarities: cosine similarity in [-1, 1] (higher = closer), float64 (k,),
            non-increasing. Converted from hnswlib's ``1 - cos`` once, at the index boundary.
        exact_duplicate: True when the candidate's voxel hash equals a training volume's.
        matched: per patient, (the patient's volume number in index row order, pose number) of
            its closest index row: what :mod:`gate.verify` aligns the candidate to. Empty when
            not known (the Ray shard fan-out fills it too).
        verified: per patient, the verified score (:mod:`gate.verify`: best masked NCC over
            integer shifts, in [-1, 1]) in ``patient_ids`` order; None when not verified.
        identity: per patient, the identity score (:mod:`gate.verify`: the masked NCC of the
            patient's training grid as stored, no turn and no mirror, best over integer shifts,
            in [-1, 1]; -1 for a patient verification did not refine), in ``patient_ids``
            order; None when not verified. Only with ``verified``.

    """

    patient_ids: tuple[str, ...]
    similarities: np.ndarray
    exact_duplicate: bool = False
    matched: tuple[tuple[int, int], ...] = ()
    verified: np.ndarray | None = None
    identity: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.patient_ids) == 0:
            raise ValueError("Neighbours must hold at least one neighbour")
        if self.similarities.shape != (len(self.patient_ids),):
            raise ValueError(
                f"Neighbours.similarities shape {self.similarities.shape} does not match "
                f"{len(self.patient_ids)} patient ids"
            )
        if not np.all(np.isfinite(self.similarities)):
            raise ValueError("Neighbours.similarities has non-finite values")
        if np.any(self.similarities > 1.0 + 1e-4) or np.any(self.similarities < -1.0 - 1e-4):
            raise ValueError("Neighbours.similarities must be cosine similarities in [-1, 1]")
        if np.any(np.diff(self.similarities) > 1e-9):
            raise ValueError("Neighbours.similarities must be sorted closest first")
        if self.matched and len(self.matched) != len(self.patient_ids):
            raise ValueError(
                f"Neighbours.matched holds {len(self.matched)} entries for {len(self.patient_ids)} patients"
            )
        if self.verified is not None:
            if self.verified.shape != (len(self.patient_ids),) or not np.all(np.isfinite(self.verified)):
                raise ValueError("Neighbours.verified must be one finite score per patient")
            if np.any(np.abs(self.verified) > 1.0 + 1e-6):
                raise ValueError("Neighbours.verified must be correlations in [-1, 1]")
        if self.identity is not None:
            if self.verified is None:
                raise ValueError("Neighbours.identity is scored only beside Neighbours.verified")
            if self.identity.shape != (len(self.patient_ids),) or not np.all(np.isfinite(self.identity)):
                raise ValueError("Neighbours.identity must be one finite score per patient")
            if np.any(np.abs(self.identity) > 1.0 + 1e-6):
                raise ValueError("Neighbours.identity must be correlations in [-1, 1]")

    @property
    def nearest_identity(self) -> float | None:
        """The highest identity score over the reported patients (None when not scored)."""
        return None if self.identity is None else float(self.identity.max())

    @property
    def nearest_verified(self) -> float | None:
        """The highest verified score over the reported patients (None when not verified)."""
        return None if self.verified is None else float(self.verified.max())

    @property
    def verified_patient_id(self) -> str | None:
        """The patient with the highest verified score (None when not verified)."""
        return None if self.verified is None else self.patient_ids[int(self.verified.argmax())]

    @property
    def nearest_id(self) -> str:
        """Pseudonymous id of the closest training patient."""
        return self.patient_ids[0]

    @property
    def nearest_similarity(self) -> float:
        """Cosine similarity to the closest training patient."""
        return float(self.similarities[0])


def merge_neighbours(parts: Sequence[Neighbours], k: int, keep: Sequence[str] = ()) -> Neighbours:
    """Patient-level maximum over several answers for one candidate, top ``k`` patients.

    The one merge of gate: over index shards (patients disjoint, so each maximum is exact) and
    over the windows of one candidate (:mod:`gate.windows`; a patient may answer several).

    Args:
        parts: the answers.
        k: patients kept by cosine.
        keep: patients kept after those ``k`` whatever their cosine, when some part holds them
            (the voxel channel's patients, :meth:`gate.verify.Verifier.voxel_patients`).

    """
    best: dict[str, float] = {}
    matched: dict[str, tuple[int, int]] = {}
    verified: dict[str, float] = {}
    identity: dict[str, float] = {}
    for n in parts:
        for i, (pid, sim) in enumerate(zip(n.patient_ids, n.similarities, strict=True)):
            if float(sim) > best.get(pid, -2.0):
                best[pid] = float(sim)
                if n.matched:
                    matched[pid] = n.matched[i]
            if n.verified is not None:
                verified[pid] = max(verified.get(pid, -1.0), float(n.verified[i]))
            if n.identity is not None:
                identity[pid] = max(identity.get(pid, -1.0), float(n.identity[i]))
    ranked = sorted(best.items(), key=lambda kv: kv[1], reverse=True)
    top = {pid for pid, _ in ranked[:k]} | {pid for pid in keep if pid in best}
    ranked = [(pid, sim) for pid, sim in ranked if pid in top]
    ids = tuple(pid for pid, _ in ranked)
    all_verified = all(n.verified is not None for n in parts)
    all_identity = all_verified and all(n.identity is not None for n in parts)
    return Neighbours(
        patient_ids=ids,
        similarities=np.asarray([sim for _, sim in ranked], dtype=np.float64),
        exact_duplicate=any(n.exact_duplicate for n in parts),
        matched=tuple(matched[p] for p in ids) if all(p in matched for p in ids) else (),
        verified=np.asarray([verified.get(p, -1.0) for p in ids]) if all_verified else None,
        identity=np.asarray([identity.get(p, -1.0) for p in ids]) if all_identity else None,
    )


class Verdict(StrEnum):
    """What the gate does with a candidate."""

    PASS = "pass"
    FLAG = "flag"
    REJECT = "reject"


class Grade(StrEnum):
    """DeepSSIM's three similarity grades of a candidate against its nearest patient."""

    DIFFERENT = "different"
    SIMILAR = "similar"
    DUPLICATE = "duplicate"


VERDICT_SEVERITY: dict[Verdict, int] = {Verdict.PASS: 0, Verdict.FLAG: 1, Verdict.REJECT: 2}
"""Order of verdicts from most to least permissive, for "at least as strict" comparisons."""


@dataclass(frozen=True)
class Decision:
    """The policy's judgement of one candidate.

    Attributes:
        verdict: pass / flag / reject.
        grade: different / similar / duplicate.
        nearest_patient_id: pseudonymous id of the closest training patient.
        similarity: cosine similarity to that patient, in [-1, 1].
        threshold: the similarity threshold that produced ``grade`` (the lower bound of the
            grade's band; for ``different``, the ``similar`` threshold that was not reached).
        policy_id: the policy's name, e.g. ``strict``.
        policy_sha256: sha256 of the policy file's bytes.
        exact_duplicate: True when the voxel-hash check matched a training volume.
        details: resolved thresholds and, on a verifying index, ``verified`` (the verified
            score) and its ``verified_similar_threshold`` / ``verified_duplicate_threshold``.
        verified_patient_id: on a verifying index, the patient with the highest verified score.

    """

    verdict: Verdict
    grade: Grade
    nearest_patient_id: str
    similarity: float
    threshold: float
    policy_id: str
    policy_sha256: str
    exact_duplicate: bool = False
    details: dict[str, float] = field(default_factory=dict)
    verified_patient_id: str | None = None

    @property
    def passed(self) -> bool:
        """True only for a ``pass`` verdict: the only verdict that may be exported."""
        return self.verdict is Verdict.PASS
