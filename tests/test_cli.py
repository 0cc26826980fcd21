from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from gate import __version__
from gate.audit import AuditEntry, AuditLog
from gate.cli import main
from gate.values import Decision, Grade, Verdict
from tests.volumes import make_blob, write_nifti


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    return CliRunner()


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_info_lists_versions_providers_policies(runner: CliRunner) -> None:
    result = runner.invoke(main, ["info"])
    assert result.exit_code == 0, result.output
    assert "onnxruntime providers: " in result.output and "CPUExecutionProvider" in result.output
    assert "hnswlib" in result.output and "pydicom" in result.output
    assert "policies: " in result.output


def test_inspect_good_and_bad(runner: CliRunner, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    write_nifti(data_dir / "a.nii.gz", make_blob((16, 16, 16)))
    write_nifti(data_dir / "b.nii.gz", make_blob((12, 16, 20), seed=1))
    result = runner.invoke(main, ["inspect", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "volumes: 2 from 2 source(s)" in result.output
    assert "shape:   min (12, 16, 16)  max (16, 16, 20)" in result.output
    assert "patients: 2" in result.output and "unreadable: 0" in result.output

    np.save(data_dir / "nan.npy", np.full((4, 4, 4), np.nan, dtype=np.float32))
    result = runner.invoke(main, ["inspect", str(data_dir)])
    assert result.exit_code == 3
    assert f"  {data_dir / 'nan.npy'}: voxels contain NaN or Inf (64 of 64)" in result.output


def test_unsupported_file_is_one_line_exit_3(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "x.txt"
    bad.write_text("x")
    result = runner.invoke(main, ["inspect", str(bad)])
    assert result.exit_code == 3
    assert result.output.strip().splitlines() == [
        "volumes: 0 from 1 source(s)",
        "unreadable: 1",
        f"  {bad}: unsupported extension '.txt' "
        "(expected .nii, .nii.gz, .npy, .npz or a DICOM series folder)",
    ]


def test_missing_path_is_input_error(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 3
    assert result.output == f"gate: error: {tmp_path / 'nope'}: no such file or folder\n"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["inspect"], "gate: error: Missing argument 'PATHS...'. (see `gate inspect -h`)"),
        (["no-such-command"], "gate: error: No such command 'no-such-command'. (see `gate -h`)"),
        (
            ["audit", "show", "--log", "x.jsonl", "--verdict", "nope"],
            "gate: error: Invalid value for '--verdict': 'nope' is not one of 'pass', 'flag', 'reject', "
            "'error'. (see `gate audit show -h`)",
        ),
        (["check", "x.nii", "--bogus"], "gate: error: No such option '--bogus'. (see `gate check -h`)"),
    ],
)
def test_usage_errors_are_one_line_exit_2(runner: CliRunner, args: list[str], line: str) -> None:
    result = runner.invoke(main, args)
    assert result.exit_code == 2
    assert result.output == line + "\n"


def test_help_and_version_still_exit_0(runner: CliRunner) -> None:
    assert runner.invoke(main, ["-h"]).exit_code == 0
    assert runner.invoke(main, ["check", "-h"]).exit_code == 0


@pytest.mark.realdata
def test_inspect_real_hippocampus(runner: CliRunner, hippocampus_dir: Path) -> None:
    result = runner.invoke(main, ["inspect", str(hippocampus_dir)])
    assert result.exit_code == 0, result.output
    assert "volumes: 261 from 261 source(s)" in result.output
    assert "shape:   min (31, 40, 24)  max (43, 59, 47)" in result.output
    assert "unreadable: 0" in result.output


def test_entry_point_in_fresh_interpreter(tmp_path: Path) -> None:
    """A real process, not CliRunner: catches imports that only work by accident."""
    proc = subprocess.run(
        [sys.executable, "-m", "gate", "info"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "policies: deepssim, permissive, standard, strict" in proc.stdout


def _closed_pipe(args: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run gate with its stdout a pipe whose reader reads 10 bytes and closes it (``| head -c 10``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gate", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, head, err)


def test_closed_pipe_ends_quietly_with_141(tmp_path: Path) -> None:
    """`gate audit show | head` and `gate info | head`: no internal error (4), no traceback."""
    log = AuditLog(tmp_path / "audit.jsonl")
    decision = Decision(Verdict.PASS, Grade.DIFFERENT, "p-00000000000000aa", 0.1, 0.97, "strict", "b" * 64)
    for i in range(600):  # ~450 KB of JSON Lines: far more than a pipe buffer holds
        log.append(AuditEntry.for_decision("run-a", decision, f"{i:064x}", "CPUExecutionProvider"))
    for args in (["audit", "show", "--log", str(log.path), "--json"], ["info"]):
        done = _closed_pipe(args, tmp_path)
        assert len(done.stdout) == 10
        assert done.returncode == 141, done.stderr
        assert done.stderr == b"", done.stderr


def test_audit_show_prints_full_run_ids_and_matches_prefixes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    decision = Decision(Verdict.PASS, Grade.DIFFERENT, "p-00000000000000aa", 0.1, 0.97, "strict", "b" * 64)
    runs = ["20261125T031500Z-3fa2c1", "20261125T031500Z-3fa2c2"]  # the same first 14+ characters
    for i, run in enumerate(runs):
        log.append(AuditEntry.for_decision(run, decision, f"{i:064x}", "CPUExecutionProvider"))
    runner = CliRunner()
    table = runner.invoke(main, ["audit", "show", "--log", str(log.path)])
    assert table.exit_code == 0, table.output
    rows = table.output.splitlines()[1:-1]
    assert [row.split()[2] for row in rows] == runs  # seq, time, then the full run id
    copied = runner.invoke(main, ["audit", "show", "--log", str(log.path), "--run", rows[1].split()[2]])
    assert copied.output.splitlines()[-1] == "1 record(s)"
    prefix = runner.invoke(main, ["audit", "show", "--log", str(log.path), "--run", "20261125T031500Z-3fa"])
    assert prefix.output.splitlines()[-1] == "2 record(s)"
    none = runner.invoke(main, ["audit", "show", "--log", str(log.path), "--run", "2099"])
    assert none.output.splitlines()[-1] == "0 record(s)"
