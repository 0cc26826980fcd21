"""Gate policies: YAML files validated into pydantic models, found by name or path.

A policy maps the nearest training patient's cosine similarity to one of DeepSSIM's three
grades and each grade to an action::

    similarity >= duplicate threshold               -> duplicate  -> reject (always)
    similar threshold <= similarity < duplicate     -> similar    -> actions.similar
    similarity < similar threshold                  -> different  -> actions.different

Thresholds are absolute cosine similarities or percentiles of the index's calibration
distribution (each real patient's nearest-training similarity, see :mod:`gate.calibration`).
Invariants enforced on load, so that every valid policy is safe to use:

- ``actions.duplicate`` is ``reject`` (every policy rejects an exact copy);
- actions never get milder as similarity grows (different <= similar <= duplicate);
- when both thresholds are of the same kind, similar <= duplicate.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gate.calibration import Calibration
from gate.digest import sha256_bytes
from gate.errors import PolicyError, UsageError
from gate.values import VERDICT_SEVERITY, Grade, Verdict

if TYPE_CHECKING:
    from gate.index_manifest import Verification

POLICY_SCHEMA_VERSION = 1
"""The one schema version this code reads; a policy must state it so old files fail loudly."""

MAX_POLICY_BYTES = 64 * 1024
"""Refuse policy files above 64 KiB: the shipped policies, fully commented, are under 4 KiB."""

MAX_K = 100
"""Upper bound on reported neighbours: more is noise in a report, and costs search time."""


class ThresholdKind(StrEnum):
    """How a threshold's ``value`` is read."""

    ABSOLUTE = "absolute"
    PERCENTILE = "percentile"
    COPIES = "copies"


class Aggregation(StrEnum):
    """How a patient's several training volumes combine into one patient similarity."""

    MAX = "max"


class Threshold(BaseModel):
    """One grade's lower similarity bound.

    Attributes:
        kind: ``absolute`` (value is a cosine similarity in [-1, 1]) or ``percentile``
            (value in [0, 100] is a percentile of the calibration distribution).
        value: the number, read according to ``kind``.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ThresholdKind
    value: float = Field(allow_inf_nan=False)

    @model_validator(mode="after")
    def _in_range(self) -> Threshold:
        if self.kind is ThresholdKind.ABSOLUTE and not -1.0 <= self.value <= 1.0:
            raise ValueError(
                f"an absolute threshold is a cosine similarity; found {self.value}; "
                "allowed values: -1 <= value <= 1"
            )
        if self.kind is ThresholdKind.PERCENTILE and not 0.0 <= self.value <= 100.0:
            raise ValueError(
                f"a percentile threshold is a percentile of the calibration distribution; found "
                f"{self.value}; allowed values: 0 <= value <= 100"
            )
        if self.kind is ThresholdKind.COPIES and not 0.0 <= self.value <= 100.0:
            raise ValueError(
                f"a copies threshold is a percentile of the index's simulated copies; found "
                f"{self.value}; allowed values: 0 <= value <= 100"
            )
        return self

    def resolve(
        self, calibration: Calibration | None, where: str, copies: Calibration | None = None
    ) -> float:
        """Return the threshold as a similarity (cosine, or the verified score for ``verified``).

        Args:
            calibration: the index's calibration of real new patients; needed for percentiles.
            where: the field path, for error messages (e.g. ``thresholds.similar``).
            copies: the index's simulated copies' scores (:mod:`gate.copies`); needed for
                ``copies`` thresholds: value ``p`` resolves to their ``p``-th percentile, so a
                grade starting there holds ``100 - p`` % of the copies.

        Raises:
            PolicyError: a percentile threshold without calibration, a copies threshold without
                simulated copies.

        """
        if self.kind is ThresholdKind.ABSOLUTE:
            return self.value
        if self.kind is ThresholdKind.COPIES:
            if copies is None:
                raise PolicyError(
                    f"{where} is percentile {self.value:g} of the index's simulated copies, but the index "
                    "holds none; rebuild it with `gate index build --verify`"
                )
            return copies.percentile(self.value)
        if calibration is None:
            raise PolicyError(
                f"{where} is percentile {self.value:g} of the calibration distribution, but no "
                "calibration was given; use an index built by `gate index build` or an absolute threshold"
            )
        return calibration.percentile(self.value)


class Thresholds(BaseModel):
    """Lower similarity bounds of the ``similar`` and ``duplicate`` grades (``different`` is below)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    similar: Threshold
    duplicate: Threshold

    @model_validator(mode="after")
    def _ordered(self) -> Thresholds:
        if self.similar.kind == self.duplicate.kind and self.similar.value > self.duplicate.value:
            raise ValueError(
                f"similar.value ({self.similar.value:g}) must not exceed duplicate.value "
                f"({self.duplicate.value:g}) when both are {self.similar.kind.value}"
            )
        return self


class IdentityBound(BaseModel):
    """Where the identity score (:mod:`gate.verify`) makes a candidate a duplicate.

    Attributes:
        duplicate: the identity score's lower bound of the ``duplicate`` grade; ``percentile``
            reads the real patients' identity scores, ``copies`` the simulated copies'.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    duplicate: Threshold


class Actions(BaseModel):
    """What to do with a candidate of each grade."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    different: Verdict
    similar: Verdict
    duplicate: Verdict

    @field_validator("duplicate")
    @classmethod
    def _duplicates_rejected(cls, v: Verdict) -> Verdict:
        if v is not Verdict.REJECT:
            raise ValueError(f"every policy rejects duplicates; found {v.value!r}; allowed values: 'reject'")
        return v

    @model_validator(mode="after")
    def _monotone(self) -> Actions:
        sev = [VERDICT_SEVERITY[self.different], VERDICT_SEVERITY[self.similar]]
        if sev[0] > sev[1]:
            raise ValueError(
                f"actions must not get milder as similarity grows; found different={self.different.value}"
                f" but similar={self.similar.value}"
            )
        return self

    def for_grade(self, grade: Grade) -> Verdict:
        """Return the action of one grade."""
        return {
            Grade.DIFFERENT: self.different,
            Grade.SIMILAR: self.similar,
            Grade.DUPLICATE: self.duplicate,
        }[grade]


class Policy(BaseModel):
    """A gate policy as written in YAML (see ``policies/*.yaml`` for every field, documented).

    Attributes:
        schema_version: must be 1.
        description: one human sentence.
        thresholds: lower bounds of the similar and duplicate grades.
        actions: verdict per grade.
        k: number of nearest training patients to report (the verdict uses the nearest).
        aggregation: how a patient's volumes combine (``max``: the closest volume counts).
        exact_duplicate_check: reject any candidate whose preprocessed voxels hash equal to a
            training volume's, whatever the embedding says.
        verified: thresholds of the verified score (:mod:`gate.verify`) on an index that
            verifies; None: ``thresholds`` serve both scores, each percentile read from the
            score's own calibration.
        identity: the identity score's duplicate bound. Set, the verified score grades at most
            ``similar`` (different against the rest) and the identity score alone (beside the
            cosine and the exact-copy check) grades ``duplicate``; ``actions.similar`` may then
            not be ``pass``. None: the verified score grades all three.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(ge=POLICY_SCHEMA_VERSION, le=POLICY_SCHEMA_VERSION)
    description: str = ""
    thresholds: Thresholds
    actions: Actions
    k: int = Field(ge=1, le=MAX_K)
    aggregation: Aggregation
    exact_duplicate_check: bool
    verified: Thresholds | None = None
    identity: IdentityBound | None = None

    @model_validator(mode="after")
    def _identity_keeps_similar_blocked(self) -> Policy:
        if self.identity is not None and self.actions.similar is Verdict.PASS:
            raise ValueError(
                "identity grades duplicate against similar, so a verified score in the duplicate band "
                "is graded similar; actions.similar must then be flag or reject, found 'pass'"
            )
        return self

    @property
    def verified_thresholds(self) -> Thresholds:
        """The thresholds the verified score is graded by."""
        return self.verified if self.verified is not None else self.thresholds


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy and what identifies it.

    Attributes:
        policy: the validated model.
        id: the policy's name (file stem, e.g. ``strict``).
        sha256: sha256 of the policy file's bytes.

    """

    policy: Policy
    id: str
    sha256: str


def policy_names() -> list[str]:
    """Names of the policies shipped in ``gate.policies`` (file stems), sorted."""
    root = resources.files("gate.policies")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def policy_path(name_or_path: str) -> Path:
    """Resolve ``strict`` (a shipped policy) or ``path/to/policy.yaml`` to a file.

    Raises:
        PolicyError: neither a shipped policy name nor an existing file; lists the names.

    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    if name_or_path in policy_names():
        return Path(str(resources.files("gate.policies") / f"{name_or_path}.yaml"))
    raise PolicyError(
        f"unknown policy {name_or_path!r}: expected one of {', '.join(policy_names())} "
        "or a path to a .yaml file"
    )


def load_policy(name_or_path: str) -> LoadedPolicy:
    """Read and validate a shipped policy (by name) or a policy file (by path).

    Args:
        name_or_path: ``strict`` / ``standard`` / ``permissive`` or a ``.yaml`` path.

    Returns:
        The validated policy with its id (file stem) and sha256 (of the file's bytes).

    Raises:
        PolicyError: unknown name (lists the available ones), YAML syntax error, or invalid
            content (field path, bad value and allowed values, in one message).

    """
    path = policy_path(name_or_path)
    raw = _read_capped(path)
    try:
        data = yaml.load(raw, Loader=_NoAliasLoader)
    except yaml.YAMLError as err:
        raise PolicyError(f"policy {path.name}: not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(data, dict):
        raise PolicyError(
            f"policy {path.name}: expected a YAML mapping of fields; found {type(data).__name__}"
        )
    try:
        policy = Policy.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(_describe(e) for e in err.errors())
        raise PolicyError(f"policy {path.name}: {problems}") from err
    return LoadedPolicy(policy=policy, id=path.stem, sha256=sha256_bytes(raw))


def _read_capped(path: Path) -> bytes:
    """The file's bytes, refusing OS errors and files above :data:`MAX_POLICY_BYTES` in one line."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as err:
        raise PolicyError(f"policy {path.name}: cannot read ({err.strerror or type(err).__name__})") from err
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy {path.name}: larger than the limit of {MAX_POLICY_BYTES} bytes")
    return raw


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases before composing them.

    A policy is a handful of scalars; anchors buy nothing there, and nested aliases expand
    exponentially (a 627-byte "billion laughs" file took 76 s and 6.5 GB with ``safe_load``).
    """

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise yaml.YAMLError(
                f"anchors and aliases (&name, *name) are not allowed in a policy (line {mark.line + 1})"
            )
        return super().compose_node(parent, index)


def _describe(error: Any) -> str:
    """One pydantic error as ``field.path: problem (bad value); allowed values: ...``."""
    loc = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = ", ".join(_fields_at(error["loc"][:-1]))
        return f"{loc}: unknown field; allowed fields: {allowed}"
    if kind == "missing":
        return f"{loc}: required field is missing"
    if kind == "enum":
        return f"{loc}: {value!r} is not allowed; allowed values: {error['ctx']['expected']}"
    if kind == "value_error":
        return f"{loc}: {error['ctx']['error']}"
    if kind in ("greater_than_equal", "less_than_equal"):
        bounds = _bounds(error["loc"])
        return f"{loc}: {value!r} is out of range; allowed values: {bounds}"
    return f"{loc}: {error['msg'].lower()}; found {value!r}"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model reached by ``loc`` from :class:`Policy`."""
    model: Any = Policy
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = annotation
    return list(model.model_fields)


def _bounds(loc: tuple[Any, ...]) -> str:
    """``lo <= value <= hi`` for a constrained integer field of :class:`Policy`."""
    if loc == ("k",):
        return f"1 <= k <= {MAX_K}"
    if loc == ("schema_version",):
        return str(POLICY_SCHEMA_VERSION)
    return "see the policy file's comments"


def at_least_as_strict(
    a: LoadedPolicy,
    b: LoadedPolicy,
    calibration: Calibration | None = None,
    verification: Verification | None = None,
) -> bool:
    """Whether ``a`` provably rejects (and flags) everything ``b`` does.

    Sufficient condition, checked grade by grade: ``a``'s thresholds are no higher than
    ``b``'s, ``a``'s actions no milder, and ``a`` checks exact duplicates if ``b`` does.
    Since actions are monotone in similarity (enforced on load), this implies
    ``severity(a(s)) >= severity(b(s))`` for every similarity ``s``. Thresholds of different
    kinds are comparable only through the distributions they are read from; without them the
    answer is False (not provable). On a verifying index (``verification`` given) the verified
    score's thresholds are compared the same way.

    Args:
        a: the supposedly stricter policy.
        b: the supposedly looser policy.
        calibration: optional, to compare cosine thresholds of different kinds.
        verification: the index's verification record, when it verifies.

    Returns:
        True when proven.

    """
    pa, pb = a.policy, b.policy
    if pb.exact_duplicate_check and not pa.exact_duplicate_check:
        return False
    for grade in (Grade.DIFFERENT, Grade.SIMILAR, Grade.DUPLICATE):
        if VERDICT_SEVERITY[pa.actions.for_grade(grade)] < VERDICT_SEVERITY[pb.actions.for_grade(grade)]:
            return False
    if not _identity_at_least_as_strict(pa, pb, verification):
        return False
    copies_cos = verification.copies_cosine if verification is not None else None
    pairs = [(pa.thresholds, pb.thresholds, calibration, copies_cos)]
    if verification is not None:
        pairs.append(
            (pa.verified_thresholds, pb.verified_thresholds, verification.calibration, verification.copies)
        )
    for ths_a, ths_b, cal, copies in pairs:
        for name in ("similar", "duplicate"):
            ta: Threshold = getattr(ths_a, name)
            tb: Threshold = getattr(ths_b, name)
            if ta.kind == tb.kind:
                if ta.value > tb.value:
                    return False
                continue
            try:
                if ta.resolve(cal, name, copies) > tb.resolve(cal, name, copies):
                    return False
            except (PolicyError, UsageError):
                return False
    return True


def _identity_at_least_as_strict(pa: Policy, pb: Policy, verification: Verification | None) -> bool:
    """Whether ``pa``'s identity rule can never make a candidate milder than ``pb`` grades it.

    With ``identity`` set a policy grades a verified duplicate ``similar`` unless the identity
    score reaches its bound, so where ``pa`` sets it and ``pb`` does not, or sets a lower bound
    (``pa`` may then miss duplicates ``pb`` finds), ``pa`` is provably as strict only when its
    ``similar`` action is already ``reject`` (the verdict of both grades). Both with a bound:
    ``pa``'s must be no higher than ``pb``'s.
    """
    if pa.identity is None and pb.identity is None:
        return True
    similar_rejects = pa.actions.similar is Verdict.REJECT
    if pa.identity is None or pb.identity is None:
        return similar_rejects
    ta, tb = pa.identity.duplicate, pb.identity.duplicate
    if ta.kind == tb.kind:
        return ta.value <= tb.value or similar_rejects
    if verification is None:
        return similar_rejects
    try:
        a_bound = ta.resolve(verification.identity, "identity.duplicate", verification.copies_identity)
        b_bound = tb.resolve(verification.identity, "identity.duplicate", verification.copies_identity)
    except (PolicyError, UsageError):
        return similar_rejects
    return a_bound <= b_bound or similar_rejects
