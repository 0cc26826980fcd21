from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner, Result

import gate.cli.audit
from gate.cli import main
from tests.bundle_helpers import Training, build_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return build_world(tmp_path_factory.mktemp("verify"))


@pytest.fixture
def runner(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    training: Training = world["training"]
    monkeypatch.setattr(gate.cli.audit, "load_encoder", lambda encoder_dir, device: training.encoder)
    monkeypatch.delenv("GATE_AUDIT_LOG", raising=False)
    return CliRunner()


def verify(
    runner: CliRunner, w: dict[str, Any], bundle: Path, tmp_path: Path, *extra: str, log: Path | None = None
) -> tuple[Result, dict, ET.Element]:
    args = ["verify-bundle", str(bundle), "--index", str(w["index"]), "--policy", str(w["release"])]
    args += ["--audit-log", str(log or w["log"]), "--json", str(tmp_path / "r.json")]
    args += ["--junit", str(tmp_path / "j.xml"), *extra]
    result = runner.invoke(main, args)
    return result, json.loads((tmp_path / "r.json").read_text()), ET.parse(tmp_path / "j.xml").getroot()


def copy_bundle(w: dict[str, Any], tmp_path: Path, name: str = "good") -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(w[name], dst)
    return dst


def test_good_bundle_passes(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    result, report, junit = verify(runner, world, world["good"], tmp_path)
    assert result.exit_code == 0, result.output
    assert "publishable: 2 sample(s) pass under policy release" in result.output
    assert report["passed"] and report["exit_code"] == 0 and report["reasons"] == []
    assert [s["sample_id"] for s in report["samples"]] == ["s-000", "s-001"]
    assert all(s["verdict"] == "pass" for s in report["samples"])
    suite = junit.find("testsuite")
    assert suite is not None and suite.get("tests") == "8" and suite.get("failures") == "0"
    names = [c.get("name") for c in suite.iter("testcase")]
    assert names == ["manifest", "signature", "files", "digests", "policy", "audit", "s-000", "s-001"]


def test_stricter_shipped_policy_is_accepted(
    runner: CliRunner, world: dict[str, Any], tmp_path: Path
) -> None:
    args = ["verify-bundle", str(world["good"]), "--index", str(world["index"]), "--policy", "strict"]
    strict = runner.invoke(main, [*args, "--audit-log", str(world["log"])])
    assert "ok   policy" in strict.output, strict.output  # strict is at least as strict as release


def test_added_file_fails(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    bundle = copy_bundle(world, tmp_path)
    (bundle / "samples" / "extra.nii.gz").write_bytes(b"smuggled")
    result, report, junit = verify(runner, world, bundle, tmp_path)
    assert result.exit_code == 3
    assert report["reasons"] == ["files: samples/extra.nii.gz: not listed in the manifest (unlisted file)"]
    failure = junit.find("testsuite/testcase[@name='files']/failure")
    assert failure is not None and "unlisted file" in (failure.get("message") or "")


def test_edited_sample_fails(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    bundle = copy_bundle(world, tmp_path)
    training: Training = world["training"]
    path = bundle / "samples" / "s-001.nii.gz"
    path.unlink()
    nib.save(nib.Nifti1Image(training.volumes[3].data, np.eye(4)), path)  # swapped for a training scan
    result, report, _ = verify(runner, world, bundle, tmp_path)
    assert result.exit_code == 3
    assert any(
        r.startswith("files: samples/s-001.nii.gz: ") and r.endswith("(file was modified)")
        for r in report["reasons"]
    )
    assert (
        "sample s-001: s-001.nii.gz: header differs from what gate's exporter writes for its voxels "
        "(hidden data)" in report["reasons"]
    )


def test_copy_of_training_volume_fails(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    result, report, junit = verify(runner, world, world["forged"], tmp_path, log=world["forged_log"])
    assert result.exit_code == 1, result.output
    (reason,) = report["reasons"]
    assert reason.startswith(
        "sample s-copy: s-copy.nii.gz: reject under policy release (duplicate, similarity 1.0000"
    )
    assert reason.endswith(", exact copy of a training volume)")
    failure = junit.find("testsuite/testcase[@name='s-copy']/failure")
    assert failure is not None and "exact copy" in (failure.get("message") or "")


def test_looser_policy_is_refused(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    args = [
        "verify-bundle",
        str(world["good"]),
        "--index",
        str(world["index"]),
        "--policy",
        str(world["loose"]),
    ]
    result = runner.invoke(
        main, [*args, "--audit-log", str(world["log"]), "--json", str(tmp_path / "r.json")]
    )
    assert result.exit_code == 2, result.output
    reasons = json.loads((tmp_path / "r.json").read_text())["reasons"]
    assert reasons == [
        "policy: policy loose is not at least as strict as the recorded policy release "
        f"({reasons[0].split('(')[1].split(')')[0]}); verify with release or a stricter policy"
    ]


def test_audit_anchor_checked(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    rows = world["log"].read_text().splitlines(keepends=True)
    log.write_text("".join(rows[:-1]))  # the last record cut off: the anchor is gone
    result, report, _ = verify(runner, world, world["good"], tmp_path, log=log)
    assert result.exit_code == 3
    assert any("anchor seq 1" in r and "truncated from the end" in r for r in report["reasons"])
    assert any("sample s-001: its audit record" in r for r in report["reasons"])
    other = verify(runner, world, world["good"], tmp_path, log=world["forged_log"])[1]
    assert any("sample s-000: its audit record" in r for r in other["reasons"])


def test_audit_log_required_unless_skipped(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    args = [
        "verify-bundle",
        str(world["good"]),
        "--index",
        str(world["index"]),
        "--policy",
        str(world["release"]),
    ]
    missing = runner.invoke(main, args)
    assert missing.exit_code == 2
    assert (
        "give --audit-log FILE (or $GATE_AUDIT_LOG) to check the audit anchors, or --no-audit"
        in missing.output
    )
    skipped = runner.invoke(main, [*args, "--no-audit"])
    assert skipped.exit_code == 0 and "SKIP audit" in skipped.output


def test_missing_manifest_fails(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    bundle = copy_bundle(world, tmp_path)
    (bundle / "manifest.json").unlink()
    result, report, _ = verify(runner, world, bundle, tmp_path)
    assert result.exit_code == 3
    assert (
        report["reasons"][0]
        == f"manifest: {bundle / 'manifest.json'}: not found; expected a bundle written by gate"
    )


def test_audit_verify_with_bundle(runner: CliRunner, world: dict[str, Any], tmp_path: Path) -> None:
    ok = runner.invoke(main, ["audit", "verify", "--log", str(world["log"]), "--bundle", str(world["good"])])
    assert ok.exit_code == 0, ok.output
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(world["log"].read_text().splitlines(keepends=True)[:-1]))
    bad = runner.invoke(main, ["audit", "verify", "--log", str(log), "--bundle", str(world["good"])])
    assert bad.exit_code == 3 and "truncated from the end" in bad.output
