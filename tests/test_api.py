"""gate.api: the README example runs; the API decides as ``gate check`` does; arrays fail closed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gate.api import CheckResult, Gate
from gate.cli import main
from gate.errors import UsageError
from gate.identity import Pseudonymizer
from gate.volume import ReadOptions
from tests.conftest import HIPPOCAMPUS_DIR, TEST_KEY
from tests.volumes import make_blob

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.fixture
def key_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    key = tmp_path / "key"
    key.write_text(TEST_KEY.hex())
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(key))
    monkeypatch.delenv("GATE_AUDIT_LOG", raising=False)
    return key


@pytest.fixture(scope="module")
def shipped_gate(tmp_path_factory: pytest.TempPathFactory) -> Gate:
    opts = ReadOptions(pseudonymizer=Pseudonymizer(key=TEST_KEY))
    return Gate(policy="strict", audit_log=tmp_path_factory.mktemp("api") / "audit.jsonl", read_options=opts)


@pytest.mark.realdata
def test_readme_example_runs(tmp_path: Path, key_env: Path, hippocampus_dir: Path) -> None:
    # the example's relative path (../shared/data/...) as from a clone beside shared/
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(HIPPOCAMPUS_DIR.parent)
    (tmp_path / "repo").mkdir()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=tmp_path / "repo",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "reject duplicate"
    assert lines[1] == "array[0] reject 1.000"
    assert lines[2].startswith("array[1] reject ")
    assert lines[3] == "2 True False"
    assert (tmp_path / "repo" / "gate-out" / "audit.jsonl").read_text().count("\n") == 3


@pytest.mark.realdata
def test_api_decides_as_gate_check(
    shipped_gate: Gate, tmp_path: Path, key_env: Path, hippocampus_dir: Path
) -> None:
    files = [hippocampus_dir / "hippocampus_001.nii.gz", hippocampus_dir / "hippocampus_003.nii.gz"]
    result = shipped_gate.check(files)
    report = tmp_path / "r.json"
    cli = CliRunner().invoke(
        main, ["check", *map(str, files), "--json", str(report), "--audit-log", str(tmp_path / "a.jsonl")]
    )
    assert cli.exit_code == 1, cli.output
    rows = json.loads(report.read_text())["results"]
    assert [r["source"] for r in rows] == result.sources
    for row, dec in zip(rows, result.decisions, strict=True):
        assert row["verdict"] == dec.verdict.value and row["similarity"] == dec.similarity
        assert row["nearest_patient_id"] == dec.nearest_patient_id
    assert [r.verdict for r in result.records] == ["reject", "reject"]
    assert {r.run_id for r in result.records} == {result.run_id}
    assert not result.passed


def test_bad_arrays_fail_closed(shipped_gate: Gate) -> None:
    good = make_blob((35, 51, 35), seed=3)
    result = shipped_gate.check_arrays([np.full((35, 51, 35), 2.0), good[..., :1, 0]], spacing=(1, 1, 1))
    assert isinstance(result, CheckResult) and result.decisions == [] and not result.passed
    assert [str(e) for e in result.errors] == [
        "array[0]: constant volume (every voxel is 2)",
        "array[1]: expected a 3D volume, found shape (35, 1)",
    ]
    assert [r.verdict for r in result.records] == ["error", "error"]
    assert [r.error for r in result.records] == [
        "unreadable input: constant volume (every voxel is 2)",
        "unreadable input: expected a 3D volume, found shape (35, 1)",
    ]


def test_array_geometry_is_required_once(shipped_gate: Gate) -> None:
    vol = make_blob((8, 8, 8), seed=0)
    with pytest.raises(UsageError, match=r"give exactly one of spacing \(mm per voxel\) or affine \(4x4\)"):
        shipped_gate.check_arrays([vol])
    with pytest.raises(UsageError, match=r"give exactly one of spacing"):
        shipped_gate.check_arrays([vol], spacing=(1, 1, 1), affine=np.eye(4))
    with pytest.raises(UsageError, match=r"voxel spacing must be positive and finite; got \(1.0, 0.0, 1.0\)"):
        shipped_gate.check_arrays([vol], spacing=(1, 0, 1))
    with pytest.raises(UsageError, match=r"affine must be a finite 4x4 matrix; got shape \(3, 3\)"):
        shipped_gate.check_arrays([vol], affine=np.eye(3))


def test_gate_exports_the_api_lazily() -> None:
    import gate

    assert gate.Gate is Gate and gate.CheckResult is CheckResult
    with pytest.raises(AttributeError, match="module 'gate' has no attribute 'Nope'"):
        _ = gate.Nope  # type: ignore[attr-defined]
