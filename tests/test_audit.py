from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gate.audit import GENESIS_HASH, AuditEntry, AuditLog, AuditRecord, verify_log
from gate.cli import main
from gate.errors import IntegrityError
from gate.values import Decision, Grade, Verdict

ROOT = Path(__file__).resolve().parents[1]
POLICY_SHA = "b" * 64


def entry(
    i: int, verdict: str = "pass", run_id: str = "run-a", patient: str = "p-00000000000000aa"
) -> AuditEntry:
    grade = {"pass": Grade.DIFFERENT, "flag": Grade.SIMILAR, "reject": Grade.DUPLICATE}[verdict]
    decision = Decision(Verdict(verdict), grade, patient, 0.1 * i, 0.97, "release", POLICY_SHA)
    return AuditEntry.for_decision(
        run_id, decision, f"{i:064x}", "CPUExecutionProvider", sample_id=f"s{i}", seed=i
    )


def write_log(path: Path, n: int = 4) -> list[str]:
    log = AuditLog(path)
    return [log.append(entry(i)) for i in range(n)]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_chain_and_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    assert AuditLog(path).head() == GENESIS_HASH
    hashes = write_log(path)
    records = list(AuditLog(path).records())
    assert [r.seq for r in records] == [0, 1, 2, 3]
    assert [r.prev_hash for r in records] == [GENESIS_HASH, *hashes[:3]]
    assert all(r.expected_hash() == r.hash for r in records)
    assert AuditLog(path).head_position() == (hashes[-1], 3)
    report = verify_log(path)
    assert report.ok and report.records == 4 and report.head_hash == hashes[-1]
    assert records[0].policy_sha256 == POLICY_SHA and records[0].provider == "CPUExecutionProvider"


def test_error_record(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl")
    log.append(AuditEntry.for_error("run-a", "boom\nmore", "release", POLICY_SHA, "CPUExecutionProvider"))
    (rec,) = log.records()
    assert rec.verdict == "error" and rec.error == "boom" and rec.grade is None and rec.similarity is None


def test_detects_edited_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    rows = lines(path)
    rows[1] = rows[1].replace('"similarity":0.1', '"similarity":0.01')
    path.write_text("".join(rows))
    assert verify_log(path).problems == [f"{path}:2: record hash mismatch: seq 1 was edited after writing"]


def test_detects_edited_record_with_recomputed_hash(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    rows = lines(path)
    data = json.loads(rows[1])
    data["verdict"] = "reject"
    data["hash"] = AuditRecord.model_validate(data).expected_hash()  # forger recomputes the hash
    rows[1] = json.dumps(data) + "\n"
    path.write_text("".join(rows))
    assert verify_log(path).problems == [
        f"{path}:3: chain broken: prev_hash does not match the previous record's hash "
        "(a record was deleted, inserted or reordered before this line)"
    ]


def test_detects_deleted_record(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    rows = lines(path)
    del rows[1]
    path.write_text("".join(rows))
    assert verify_log(path).problems == [
        f"{path}:2: chain broken: prev_hash does not match the previous record's hash "
        "(a record was deleted, inserted or reordered before this line)",
        f"{path}:2: seq 2 where 1 was expected (records deleted or reordered)",
    ]


def test_detects_reordered_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    rows = lines(path)
    rows[1], rows[2] = rows[2], rows[1]
    path.write_text("".join(rows))
    problems = verify_log(path).problems
    assert f"{path}:2: seq 2 where 1 was expected (records deleted or reordered)" in problems
    assert any(p.startswith(f"{path}:3: chain broken") for p in problems)


def test_detects_torn_last_record_and_refuses_to_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path)
    path.write_bytes(path.read_bytes()[:-40])
    problems = verify_log(path).problems
    assert problems[0] == f"{path}:4: last record is truncated (no final newline; a torn write or a cut file)"
    with pytest.raises(
        IntegrityError, match=re.escape(f"{path}: the last record is truncated (no final newline)")
    ):
        AuditLog(path).append(entry(9))


def test_detects_records_cut_from_the_end_through_an_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    hashes = write_log(path)
    path.write_text("".join(lines(path)[:2]))
    assert verify_log(path).ok  # a shorter chain is a valid chain ...
    report = verify_log(path, anchors=[(hashes[3], 3)])  # ... but the bundle's anchor is gone
    assert report.problems == [
        f"{path}: anchor seq 3 ({hashes[3][:12]}…) is not in the log: records were truncated from the end "
        "or rewritten after the bundle was made"
    ]
    assert verify_log(tmp_path / "nope.jsonl").problems == [f"{tmp_path / 'nope.jsonl'}: audit log not found"]


APPENDER = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from gate.audit import AuditLog
from tests.test_audit import entry
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.append(entry(i, run_id=sys.argv[2]))
"""


def test_concurrent_processes_interleave_safely(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    script = tmp_path / "appender.py"
    script.write_text(APPENDER.format(root=str(ROOT)))
    n = 60
    procs = [
        subprocess.Popen([sys.executable, str(script), str(path), run, str(n)], cwd=ROOT)
        for run in ("run-a", "run-b")
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    report = verify_log(path)
    assert report.ok, report.problems[:3]
    assert report.records == 2 * n
    runs = [r.run_id for r in AuditLog(path).records()]
    assert runs.count("run-a") == runs.count("run-b") == n


@pytest.fixture
def mixed_log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.append(entry(1, "pass", "run-a"))
    log.append(entry(2, "flag", "run-a", patient="p-00000000000000bb"))
    log.append(entry(3, "reject", "run-b", patient="p-00000000000000bb"))
    return path


def test_cli_verify(mixed_log: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", "--log", str(mixed_log)])
    assert ok.exit_code == 0, ok.output
    assert "3 records" in ok.output and "audit log verifies" in ok.output
    rows = lines(mixed_log)
    mixed_log.write_text(rows[0] + rows[2])
    bad = runner.invoke(main, ["audit", "verify", "--log", str(mixed_log)])
    assert bad.exit_code == 3
    assert f"TAMPERED {mixed_log}:2: chain broken" in bad.output


def test_cli_show_filters(mixed_log: Path) -> None:
    runner = CliRunner()

    def show(*args: str) -> list[dict[str, object]]:
        result = runner.invoke(main, ["audit", "show", "--log", str(mixed_log), "--json", *args])
        assert result.exit_code == 0, result.output
        return [json.loads(ln) for ln in result.output.splitlines()]

    assert [r["seq"] for r in show()] == [0, 1, 2]
    assert [r["seq"] for r in show("--run", "run-a")] == [0, 1]
    assert [r["seq"] for r in show("--verdict", "reject", "--verdict", "flag")] == [1, 2]
    assert [r["seq"] for r in show("--grade", "similar")] == [1]
    assert [r["seq"] for r in show("--patient", "p-00000000000000bb")] == [1, 2]
    times = [r["time"] for r in show()]
    assert [r["seq"] for r in show("--since", str(times[1]))] == [1, 2]
    assert [r["seq"] for r in show("--until", str(times[1]))] == [0]
    assert show("--since", "2999-01-01") == []
    table = runner.invoke(main, ["audit", "show", "--log", str(mixed_log), "--verdict", "reject"])
    assert table.exit_code == 0 and "1 record(s)" in table.output and "p-00000000000000bb" in table.output
    bad = runner.invoke(main, ["audit", "show", "--log", str(mixed_log), "--since", "yesterday"])
    assert bad.exit_code == 2 and "--since 'yesterday': expected an ISO 8601 time" in bad.output


def test_signed_heads_catch_a_recomputed_chain(tmp_path: Path) -> None:
    from gate.audit import record_hash, sign_head
    from gate.signing import load_or_create_signing_key

    signer = load_or_create_signing_key(tmp_path / "keys")
    log_path = tmp_path / "audit.jsonl"
    write_log(log_path, 4)
    sign_head(AuditLog(log_path), signer)
    args = [
        "audit",
        "verify",
        "--log",
        str(log_path),
        "--public-key",
        str(tmp_path / "keys" / "site.pub"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "audit log verifies" in result.output, result.output
    out, prev = [], GENESIS_HASH
    for line in lines(log_path):
        rec = json.loads(line)
        rec["seed"] = 999  # any edit
        rec.pop("hash")
        rec["prev_hash"] = prev
        rec["hash"] = prev = record_hash(rec)
        out.append(json.dumps(rec))
    log_path.write_text("\n".join(out) + "\n")
    assert verify_log(log_path).ok  # the chain alone cannot tell
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 3
    assert "is not the log's record there: the log was rewritten (chain recomputed)" in result.output
