from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from gate.calibration import Calibration, CalibrationMethod
from gate.errors import PolicyError
from gate.policy import Policy, at_least_as_strict, load_policy, policy_names, policy_path

SHIPPED = ("deepssim", "permissive", "standard", "strict")


def write_policy(tmp_path: Path, name: str = "custom", **changes: object) -> Path:
    """A copy of the shipped strict policy with nested changes ("actions.similar": "flag")."""
    data = yaml.safe_load(policy_path("strict").read_text())
    for key, value in changes.items():
        *outer, last = key.split(".")
        node = data
        for part in outer:
            node = node[part]
        if value is None:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_policies_load_with_id_and_digest() -> None:
    assert policy_names() == list(SHIPPED)
    for name in SHIPPED:
        loaded = load_policy(name)
        assert loaded.id == name and re.fullmatch(r"[0-9a-f]{64}", loaded.sha256)
        assert loaded.policy.actions.duplicate.value == "reject"


def test_every_field_is_documented_in_each_file() -> None:
    for name in SHIPPED:
        text = policy_path(name).read_text()
        for field in Policy.model_fields:
            assert f"# {field}:" in text, f"{name}.yaml does not document {field}"
        for sub in ("kind", "value", "different", "similar", "duplicate"):
            assert re.search(rf"#.*\b{sub}\b", text), f"{name}.yaml does not document {sub}"


def test_strictness_chain() -> None:
    strict, standard, permissive = (load_policy(n) for n in ("strict", "standard", "permissive"))
    assert at_least_as_strict(strict, standard) and at_least_as_strict(standard, permissive)
    assert at_least_as_strict(strict, permissive)
    assert not at_least_as_strict(permissive, strict) and not at_least_as_strict(standard, strict)


def test_strictness_chain_holds_for_the_verified_score_of_the_shipped_index() -> None:
    from gate.index import DEFAULT_INDEX_DIR
    from gate.index_manifest import read_manifest

    m = read_manifest(DEFAULT_INDEX_DIR)
    assert m.verification is not None
    strict, standard, permissive = (load_policy(n) for n in ("strict", "standard", "permissive"))
    for a, b in ((strict, standard), (standard, permissive), (strict, permissive)):
        assert at_least_as_strict(a, b, m.calibration, m.verification)
    assert not at_least_as_strict(permissive, strict, m.calibration, m.verification)


def test_mixed_kinds_need_calibration(tmp_path: Path) -> None:
    strict = load_policy("strict")
    absolute = load_policy(
        str(write_policy(tmp_path, **{"thresholds.similar": {"kind": "absolute", "value": 0.9}}))
    )
    assert not at_least_as_strict(absolute, strict)
    cal = Calibration(
        method=CalibrationMethod.HOLDOUT, n_patients=5, similarities=(0.1, 0.2, 0.95, 0.96, 0.97)
    )
    assert at_least_as_strict(strict, absolute, cal) is False  # p50 = 0.95 > 0.9
    assert at_least_as_strict(absolute, strict, cal) is True


def test_unknown_policy_name_lists_available() -> None:
    with pytest.raises(
        PolicyError,
        match=r"^unknown policy 'lax': expected one of deepssim, permissive, standard, strict "
        r"or a path to a .yaml file$",
    ):
        load_policy("lax")


def test_bad_enum_value_names_path_value_and_allowed(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "bad", **{"actions.similar": "maybe"})
    with pytest.raises(
        PolicyError,
        match=r"^policy bad.yaml: actions.similar: 'maybe' is not allowed; "
        r"allowed values: 'pass', 'flag' or 'reject'$",
    ):
        load_policy(str(path))
    path = write_policy(tmp_path, "bad2", **{"thresholds.similar.kind": "relative"})
    with pytest.raises(
        PolicyError,
        match=r"thresholds.similar.kind: 'relative' is not allowed; "
        r"allowed values: 'absolute', 'percentile' or 'copies'$",
    ):
        load_policy(str(path))
    path = write_policy(tmp_path, "bad3", aggregation="mean")
    with pytest.raises(PolicyError, match=r"aggregation: 'mean' is not allowed; allowed values: 'max'$"):
        load_policy(str(path))


def test_unknown_field_lists_allowed_fields(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "bad", **{"thresholds.similar.margin": 0.1})
    with pytest.raises(
        PolicyError,
        match=r"^policy bad.yaml: thresholds.similar.margin: unknown field; "
        r"allowed fields: kind, value$",
    ):
        load_policy(str(path))
    path = write_policy(tmp_path, "bad2", k_nearest=3)
    with pytest.raises(
        PolicyError,
        match=r"k_nearest: unknown field; allowed fields: schema_version, description, "
        r"thresholds, actions, k, aggregation, exact_duplicate_check, verified, identity$",
    ):
        load_policy(str(path))


def test_missing_field(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^policy bad.yaml: k: required field is missing$"):
        load_policy(str(write_policy(tmp_path, "bad", k=None)))


def test_out_of_range_values(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"k: 0 is out of range; allowed values: 1 <= k <= 100$"):
        load_policy(str(write_policy(tmp_path, "a", k=0)))
    with pytest.raises(
        PolicyError,
        match=r"thresholds.duplicate: an absolute threshold is a cosine "
        r"similarity; found 1.5; allowed values: -1 <= value <= 1$",
    ):
        load_policy(
            str(write_policy(tmp_path, "b", **{"thresholds.duplicate": {"kind": "absolute", "value": 1.5}}))
        )
    with pytest.raises(
        PolicyError,
        match=r"thresholds.similar: a percentile threshold .* found 101.0; "
        r"allowed values: 0 <= value <= 100$",
    ):
        load_policy(str(write_policy(tmp_path, "c", **{"thresholds.similar.value": 101})))
    with pytest.raises(PolicyError, match=r"schema_version: 2 is out of range; allowed values: 1$"):
        load_policy(str(write_policy(tmp_path, "d", schema_version=2)))


def test_duplicates_must_be_rejected(tmp_path: Path) -> None:
    with pytest.raises(
        PolicyError,
        match=r"^policy a.yaml: actions.duplicate: every policy rejects duplicates; found 'flag'; "
        r"allowed values: 'reject'$",
    ):
        load_policy(str(write_policy(tmp_path, "a", **{"actions.duplicate": "flag"})))


def test_actions_monotone_and_thresholds_ordered(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "a", **{"actions.different": "reject", "actions.similar": "flag"})
    with pytest.raises(
        PolicyError,
        match=r"actions must not get milder as similarity grows; found "
        r"different=reject but similar=flag$",
    ):
        load_policy(str(path))
    path = write_policy(tmp_path, "b", **{"thresholds.similar.value": 99})
    with pytest.raises(
        PolicyError,
        match=r"thresholds: similar.value \(99\) must not exceed duplicate.value \(95\) "
        r"when both are percentile$",
    ):
        load_policy(str(path))


def test_yaml_syntax_and_shape_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("k: [1, 2\n")
    with pytest.raises(PolicyError, match=r"^policy a.yaml: not valid YAML \("):
        load_policy(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PolicyError, match=r"^policy b.yaml: expected a YAML mapping of fields; found list$"):
        load_policy(str(tmp_path / "b.yaml"))


def test_digest_changes_with_content(tmp_path: Path) -> None:
    a = load_policy(str(write_policy(tmp_path, "a")))
    b = load_policy(str(write_policy(tmp_path, "b", k=7)))
    assert a.sha256 != b.sha256 and a.id == "a"
