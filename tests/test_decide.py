from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gate.calibration import Calibration, CalibrationMethod
from gate.decide import DUPLICATE_CEILING, decide, resolve_thresholds
from gate.digest import sha256_bytes
from gate.errors import PolicyError
from gate.policy import LoadedPolicy, Policy, at_least_as_strict, load_policy
from gate.values import VERDICT_SEVERITY, Grade, Neighbours, Verdict

SHIPPED = [load_policy(n) for n in ("strict", "standard", "permissive", "deepssim")]


def calibration(values: list[float]) -> Calibration:
    return Calibration(
        method=CalibrationMethod.HOLDOUT, n_patients=len(values), similarities=tuple(sorted(values))
    )


def absolute_policy(
    similar: float, duplicate: float, similar_action: str = "reject", exact: bool = True
) -> LoadedPolicy:
    policy = Policy.model_validate(
        {
            "schema_version": 1,
            "thresholds": {
                "similar": {"kind": "absolute", "value": similar},
                "duplicate": {"kind": "absolute", "value": duplicate},
            },
            "actions": {"different": "pass", "similar": similar_action, "duplicate": "reject"},
            "k": 3,
            "aggregation": "max",
            "exact_duplicate_check": exact,
        }
    )
    return LoadedPolicy(policy=policy, id="test", sha256=sha256_bytes(b"test"))


def neighbours(sim: float, exact: bool = False) -> Neighbours:
    return Neighbours(
        patient_ids=("p-0000000000000001",), similarities=np.array([sim]), exact_duplicate=exact
    )


CAL = calibration([0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94])


@pytest.mark.parametrize(
    ("sim", "grade", "verdict", "threshold"),
    [
        (0.5, Grade.DIFFERENT, Verdict.PASS, 0.8),
        (0.8, Grade.SIMILAR, Verdict.FLAG, 0.8),
        (0.9499, Grade.SIMILAR, Verdict.FLAG, 0.8),
        (0.95, Grade.DUPLICATE, Verdict.REJECT, 0.95),
        (1.0, Grade.DUPLICATE, Verdict.REJECT, 0.95),
    ],
)
def test_grades_at_boundaries(sim: float, grade: Grade, verdict: Verdict, threshold: float) -> None:
    d = decide(neighbours(sim), absolute_policy(0.8, 0.95, "flag"), None)
    assert (d.grade, d.verdict, d.threshold, d.similarity) == (grade, verdict, threshold, sim)
    assert d.policy_id == "test" and d.policy_sha256 == sha256_bytes(b"test")
    assert d.nearest_patient_id == "p-0000000000000001" and d.passed is (verdict is Verdict.PASS)


def test_percentile_thresholds_use_calibration() -> None:
    strict = SHIPPED[0]
    t = resolve_thresholds(strict, CAL)
    assert t.similar == pytest.approx(np.percentile(CAL.similarities, strict.policy.thresholds.similar.value))
    d = decide(neighbours(t.similar + 1e-9), strict, CAL)
    assert d.grade is Grade.SIMILAR and d.details["similar_threshold"] == t.similar
    assert d.details["calibration_rank"] == pytest.approx(
        np.mean(np.array(CAL.similarities) < t.similar + 1e-9)
    )


def test_percentile_without_calibration_is_an_error() -> None:
    with pytest.raises(
        PolicyError,
        match=r"^thresholds.similar is percentile \d+ of the calibration distribution, "
        r"but no calibration was given",
    ):
        decide(neighbours(0.5), SHIPPED[0], None)


def test_exact_duplicate_rejected_whatever_the_similarity() -> None:
    d = decide(neighbours(-0.5, exact=True), absolute_policy(0.8, 0.95, "flag"), None)
    assert d.verdict is Verdict.REJECT and d.grade is Grade.DUPLICATE and d.exact_duplicate
    d = decide(neighbours(-0.5, exact=True), absolute_policy(0.8, 0.95, "flag", exact=False), None)
    assert d.verdict is Verdict.PASS and not d.exact_duplicate


def test_ceiling_keeps_copies_duplicates() -> None:
    cal = calibration([0.3, 0.5, 0.9, 1.0, 1.0])  # calibration set with duplicated scans
    loose = absolute_policy(0.3, 1.0)
    assert resolve_thresholds(loose, cal).duplicate == DUPLICATE_CEILING
    assert decide(neighbours(1.0 - 1e-7), loose, cal).grade is Grade.DUPLICATE


def test_non_finite_similarity_never_reaches_a_pass() -> None:
    with pytest.raises(ValueError, match=r"Neighbours.similarities has non-finite values"):
        neighbours(float("nan"))


calibrations = st.lists(st.floats(-1.0, 1.0), min_size=5, max_size=40).map(calibration)
similarities = st.floats(-1.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(sim=similarities, cal=calibrations, exact=st.booleans())
def test_shipped_policies_are_nested(sim: float, cal: Calibration, exact: bool) -> None:
    sev = [VERDICT_SEVERITY[decide(neighbours(sim, exact), p, cal).verdict] for p in SHIPPED]
    assert sev[0] >= sev[1] >= sev[2]


@settings(max_examples=200, deadline=None)
@given(sim=st.floats(1.0 - 1e-6, 1.0), cal=calibrations, exact=st.booleans())
def test_every_policy_rejects_an_exact_copy(sim: float, cal: Calibration, exact: bool) -> None:
    for p in SHIPPED:
        assert decide(neighbours(sim, exact), p, cal).verdict is Verdict.REJECT


@settings(max_examples=200, deadline=None)
@given(cal=calibrations, exact=st.booleans())
def test_every_policy_rejects_a_hash_match(cal: Calibration, exact: bool) -> None:
    for p in SHIPPED:
        assert decide(neighbours(-1.0, exact=True), p, cal).verdict is Verdict.REJECT


def random_policy(draw: st.DrawFn) -> LoadedPolicy:
    kinds = [draw(st.sampled_from(["absolute", "percentile"])) for _ in range(2)]
    values = [draw(st.floats(-1, 1)) if k == "absolute" else draw(st.floats(0, 100)) for k in kinds]
    if kinds[0] == kinds[1]:
        values.sort()
    actions = sorted(
        draw(st.lists(st.sampled_from(list(Verdict)), min_size=2, max_size=2)), key=VERDICT_SEVERITY.get
    )
    policy = Policy.model_validate(
        {
            "schema_version": 1,
            "thresholds": {
                "similar": {"kind": kinds[0], "value": values[0]},
                "duplicate": {"kind": kinds[1], "value": values[1]},
            },
            "actions": {"different": actions[0], "similar": actions[1], "duplicate": "reject"},
            "k": 1,
            "aggregation": "max",
            "exact_duplicate_check": draw(st.booleans()),
        }
    )
    return LoadedPolicy(policy=policy, id="random", sha256="0" * 64)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), sim=similarities, cal=calibrations, exact=st.booleans())
def test_at_least_as_strict_is_sound(data: st.DataObject, sim: float, cal: Calibration, exact: bool) -> None:
    a, b = data.draw(st.composite(random_policy)()), data.draw(st.composite(random_policy)())
    if at_least_as_strict(a, b, cal):
        va, vb = (
            decide(neighbours(sim, exact), a, cal).verdict,
            decide(neighbours(sim, exact), b, cal).verdict,
        )
        assert VERDICT_SEVERITY[va] >= VERDICT_SEVERITY[vb]


def test_decide_is_pure(tmp_path: Path) -> None:
    n, p = neighbours(0.85), SHIPPED[1]
    assert decide(n, p, CAL) == decide(n, p, CAL)
    assert n.similarities.tolist() == [0.85]


def _thresholds(draw: st.DrawFn) -> dict[str, dict[str, object]]:
    kinds = [draw(st.sampled_from(["absolute", "percentile", "copies"])) for _ in range(2)]
    values = [draw(st.floats(-1, 1)) if k == "absolute" else draw(st.floats(0, 100)) for k in kinds]
    if kinds[0] == kinds[1]:
        values.sort()
    return {
        "similar": {"kind": kinds[0], "value": values[0]},
        "duplicate": {"kind": kinds[1], "value": values[1]},
    }


def verifying_policy(draw: st.DrawFn) -> LoadedPolicy:
    """A random policy whose cosine and verified thresholds may each be of any kind, copies included."""
    actions = sorted(
        draw(st.lists(st.sampled_from(list(Verdict)), min_size=2, max_size=2)), key=VERDICT_SEVERITY.get
    )
    fields: dict[str, object] = {
        "schema_version": 1,
        "thresholds": _thresholds(draw),
        "actions": {"different": actions[0], "similar": actions[1], "duplicate": "reject"},
        "k": 1,
        "aggregation": "max",
        "exact_duplicate_check": draw(st.booleans()),
    }
    if draw(st.booleans()):
        fields["verified"] = _thresholds(draw)
    if actions[1] is not Verdict.PASS and draw(st.booleans()):
        kind = draw(st.sampled_from(["absolute", "percentile", "copies"]))
        value = draw(st.floats(-1, 1)) if kind == "absolute" else draw(st.floats(0, 100))
        fields["identity"] = {"duplicate": {"kind": kind, "value": value}}
    return LoadedPolicy(policy=Policy.model_validate(fields), id="random", sha256="0" * 64)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    sim=similarities,
    ver=similarities,
    idn=similarities,
    cal=calibrations,
    vcal=calibrations,
    copies=calibrations,
    copies_cos=calibrations,
    ical=calibrations,
    icopies=calibrations,
    exact=st.booleans(),
)
def test_at_least_as_strict_is_sound_with_verification(
    data: st.DataObject,
    sim: float,
    ver: float,
    idn: float,
    cal: Calibration,
    vcal: Calibration,
    copies: Calibration,
    copies_cos: Calibration,
    ical: Calibration,
    icopies: Calibration,
    exact: bool,
) -> None:
    """On a verifying index, a policy proven stricter is never milder, whatever the three scores are."""
    from gate.index_manifest import Verification

    record = Verification(
        max_shift_vox=8,
        grids_sha256="0" * 64,
        calibration=vcal,
        copies=copies,
        copies_cosine=copies_cos,
        identity=ical,
        copies_identity=icopies,
    )
    a, b = (data.draw(st.composite(verifying_policy)()) for _ in range(2))
    if at_least_as_strict(a, b, cal, record):
        nb = Neighbours(
            patient_ids=("p-0000000000000001",),
            similarities=np.array([sim]),
            exact_duplicate=exact,
            verified=np.array([ver]),
            identity=np.array([idn]),
        )
        va, vb = decide(nb, a, cal, record).verdict, decide(nb, b, cal, record).verdict
        assert VERDICT_SEVERITY[va] >= VERDICT_SEVERITY[vb]


@settings(max_examples=200, deadline=None)
@given(sim=st.floats(1.0 - 1e-6, 1.0), ver=similarities, cal=calibrations, vcal=calibrations)
def test_every_policy_rejects_an_exact_copy_on_a_verifying_index(
    sim: float, ver: float, cal: Calibration, vcal: Calibration
) -> None:
    from gate.index_manifest import Verification

    record = Verification(
        max_shift_vox=8,
        grids_sha256="0" * 64,
        calibration=vcal,
        copies=vcal,
        copies_cosine=cal,
        identity=vcal,
        copies_identity=vcal,
    )
    nb = Neighbours(
        patient_ids=("p-0000000000000001",),
        similarities=np.array([sim]),
        verified=np.array([ver]),
        identity=np.array([ver]),
    )
    for p in SHIPPED:
        assert decide(nb, p, cal, record).verdict is Verdict.REJECT
