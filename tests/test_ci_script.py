from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from tests.bundle_helpers import build_world

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ci" / "check-bundle.sh"

# `gate` with the test encoder in place of the shipped ONNX one (the script runs $GATE).
WRAPPER = """
import sys
sys.path.insert(0, {root!r})
import gate.cli.audit
from tests.index_helpers import ProjectionEncoder
gate.cli.audit.load_encoder = lambda encoder_dir, device: ProjectionEncoder(dim=16)
from gate.cli import main
main()
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ci")
    w = build_world(root)
    wrapper = root / "gate_wrapper.py"
    wrapper.write_text(WRAPPER.format(root=str(ROOT)))
    w["gate"] = f"{sys.executable} {wrapper}"
    return w


def run_script(
    w: dict[str, Any], bundle: Path, out: Path, log: Path, key: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GATE": w["gate"], "GATE_AUDIT_LOG": str(log)}
    env.pop("GATE_PUBLIC_KEY", None)
    if key:
        env["GATE_PUBLIC_KEY"] = str(w["public_key"])
    args = [str(bundle), "--index", str(w["index"]), "--policy", str(w["release"]), "--out", str(out)]
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def reasons(out: Path) -> list[str]:
    return json.loads((out / "report.json").read_text())["reasons"]


def test_good_bundle_passes(world: dict[str, Any], tmp_path: Path) -> None:
    proc = run_script(world, world["good"], tmp_path / "out", world["log"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"check-bundle: PASS {world['good']}" in proc.stdout
    assert reasons(tmp_path / "out") == [] and (tmp_path / "out" / "junit.xml").is_file()


def test_added_file_fails_with_its_reason(world: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(world["good"], bundle)
    (bundle / "notes.txt").write_text("added after the gate ran")
    proc = run_script(world, bundle, tmp_path / "out", world["log"])
    assert proc.returncode == 3
    assert "reason: files: notes.txt: not listed in the manifest (unlisted file)" in proc.stdout
    assert f"check-bundle: FAIL {bundle} (exit 3;" in proc.stderr


def test_edited_sample_fails_with_its_reason(world: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(world["good"], bundle)
    path = bundle / "samples" / "s-000.nii.gz"
    img = nib.load(path)
    data = np.asanyarray(img.dataobj).copy()
    data[8, 8, 8] += 1.0
    path.unlink()
    nib.save(nib.Nifti1Image(data, img.affine), path)
    proc = run_script(world, bundle, tmp_path / "out", world["log"])
    assert proc.returncode == 3
    assert re.search(r"reason: files: samples/s-000\.nii\.gz: .*\(file was modified\)", proc.stdout)
    assert (
        "sample s-000: s-000.nii.gz: header differs from what gate's exporter writes for its voxels "
        "(hidden data)" in reasons(tmp_path / "out")
    )


def test_copied_training_volume_fails_with_its_reason(world: dict[str, Any], tmp_path: Path) -> None:
    proc = run_script(world, world["forged"], tmp_path / "out", world["forged_log"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (reason,) = reasons(tmp_path / "out")
    assert reason.startswith("sample s-copy: s-copy.nii.gz: reject under policy release (duplicate")
    assert reason.endswith("exact copy of a training volume)") and f"reason: {reason}" in proc.stdout
    assert "check-bundle: FAIL" in proc.stderr


def test_usage(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "Usage:" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT), "b", "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "check-bundle: unknown option --bogus" in proc.stderr


def test_missing_gate_is_one_line_not_127(world: dict[str, Any], tmp_path: Path) -> None:
    env = {**os.environ, "GATE": str(tmp_path / "no-such-gate"), "GATE_AUDIT_LOG": str(world["log"])}
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(world["good"]), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"check-bundle: FAIL {world['good']} (exit 2; '{tmp_path / 'no-such-gate'}' not found: "
        "install gate or set GATE; no report written)\n"
    )


def test_fail_line_names_only_files_it_wrote(world: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # stale, from an earlier run
    env = {**os.environ, "GATE": world["gate"], "GATE_AUDIT_LOG": str(world["log"])}
    env["GATE_PUBLIC_KEY"] = str(world["public_key"])
    args = [
        str(world["good"]),
        "--index",
        str(world["index"]),
        "--policy",
        "no-such-policy",
        "--out",
        str(out),
    ]
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == f"check-bundle: FAIL {world['good']} (exit 2; no report written)"
    assert not (out / "report.json").exists()


def test_signature_required_by_default(world: dict[str, Any], tmp_path: Path) -> None:
    proc = run_script(world, world["good"], tmp_path / "out", world["log"], key=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"check-bundle: FAIL {world['good']} (exit 2; a signature is required: give --public-key FILE "
        "or set GATE_PUBLIC_KEY, or --allow-unsigned; no report written)\n"
    )


def test_unsigned_bundle_fails_on_its_signature(world: dict[str, Any], tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(world["good"], bundle)
    (bundle / "manifest.sig").unlink()
    proc = run_script(world, bundle, tmp_path / "out", world["log"])
    assert proc.returncode == 3
    assert "reason: signature: manifest.sig: no signature (the bundle is unsigned)" in proc.stdout
