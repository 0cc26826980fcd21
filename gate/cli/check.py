"""``gate check``: judge candidate volumes against the training index under a policy."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click

from gate import __version__
from gate.audit import AuditLog, new_run_id
from gate.cli.index import encoder_for_index, encoder_options, load_encoder
from gate.cli.options import input_options, read_options
from gate.engine import EngineConfig, engine_options, judge, open_engine
from gate.errors import ExitCode, InputError, UsageError
from gate.index import DEFAULT_INDEX_DIR
from gate.policy import load_policy
from gate.values import Decision, Neighbours, Verdict

DEFAULT_POLICY = "strict"
"""Fail closed: without --policy, the strictest shipped policy applies."""

DEFAULT_AUDIT_LOG = Path("gate-out") / "audit.jsonl"
"""Where ``gate check`` records its decisions without --audit-log / $GATE_AUDIT_LOG: the same log
``gate generate`` writes by default, so every decision of the gate lands in one log."""


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--policy",
    "policy_name",
    default=DEFAULT_POLICY,
    show_default=True,
    help="Shipped policy name (strict, standard, permissive) or a .yaml file.",
)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_INDEX_DIR,
    show_default="the shipped index",
    help="Index folder.",
)
@encoder_options
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every decision (and every unreadable input) to this JSON file.",
)
@click.option(
    "--allow-flag",
    is_flag=True,
    help="Exit 0 when candidates are flagged but none rejected (default: exit 5, flagged needs review).",
)
@click.option("--fail-on-flag", is_flag=True, hidden=True, help="Kept for old scripts: now the default.")
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="GATE_AUDIT_LOG",
    default=DEFAULT_AUDIT_LOG,
    show_default=True,
    help="Append one record per candidate (decision or error) to this audit log; default: "
    "$GATE_AUDIT_LOG, else ./gate-out/audit.jsonl.",
)
@input_options
@engine_options
def check(
    paths: tuple[Path, ...],
    policy_name: str,
    index_dir: Path,
    encoder_dir: Path | None,
    json_path: Path | None,
    allow_flag: bool,
    fail_on_flag: bool,
    audit_log: Path,
    device: str,
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
    engine: str,
    ray_address: str | None,
    workers: int,
    batch_size: int,
    num_gpus: float,
) -> None:
    """Check candidate volumes (files or folders) against the training index.

    Verdicts: pass; flag (needs review, never exported; exit 5 unless --allow-flag); reject.

    Every candidate gets an audit record (run id printed): its decision, or the error that kept
    it from being decided (the record names no file, only the problem and the voxel hash).

    Exit codes: 0 all pass (or flagged, with --allow-flag); 1 any rejected; 2 bad policy; 3 any
    unreadable input or integrity error (fail closed: then nothing counts as passed); 5 none
    rejected but some flagged.
    """
    if allow_flag and fail_on_flag:
        raise UsageError("--allow-flag and --fail-on-flag exclude each other")
    policy = load_policy(policy_name)
    options = read_options(id_key_file, patient_map, patient_pattern, max_voxels)
    encoder_dir = encoder_for_index(encoder_dir, index_dir)
    encoder = load_encoder(encoder_dir, device)
    audit, run_id = AuditLog(audit_log), new_run_id()
    config = EngineConfig(engine, ray_address, workers, batch_size, num_gpus, encoder_dir, device)
    with open_engine(config, encoder) as eng:
        index = eng.open_index(index_dir)
        judged = judge(eng, index, list(paths), options, policy, audit, run_id, _problem)
    volumes, errors = judged.items, judged.errors
    neighbours, decisions = judged.neighbours, judged.decisions
    counts = {v: sum(d.verdict is v for d in decisions) for v in Verdict}
    click.echo(
        f"policy {policy.id} ({policy.sha256[:12]}…), index {index.sha256[:12]}…, "
        f"encoder {encoder.sha256[:12]}…"
    )
    click.echo(
        f"{'verdict':<7} {'grade':<9} {'similarity':>10} {'threshold':>9} {'verified':>8} {'identity':>8} "
        f"{'exact':<5} {'nearest patient':<18} source"
    )
    for vol, dec in zip(volumes, decisions, strict=True):
        verified = dec.details.get("verified")
        shown = f"{verified:>8.4f}" if verified is not None else f"{'-':>8}"
        identity = dec.details.get("identity")
        shown_id = f"{identity:>8.4f}" if identity is not None else f"{'-':>8}"
        click.echo(
            f"{dec.verdict.value:<7} {dec.grade.value:<9} {dec.similarity:>10.4f} {dec.threshold:>9.4f} "
            f"{shown} {shown_id} {'yes' if dec.exact_duplicate else 'no':<5} {dec.nearest_patient_id:<18} "
            f"{vol.source}"
        )
    for err in errors:
        click.echo(f"{'ERROR':<7} {'-':<9} {'-':>10} {'-':>9} {'-':>8} {'-':>8} {'-':<5} {'-':<18} {err}")
    click.echo(
        f"checked {len(decisions)}: {counts[Verdict.PASS]} pass, {counts[Verdict.FLAG]} flag, "
        f"{counts[Verdict.REJECT]} reject; {len(errors)} unreadable"
    )
    if errors:
        code = ExitCode.INPUT
    elif counts[Verdict.REJECT]:
        code = ExitCode.VIOLATION
    elif counts[Verdict.FLAG] and not allow_flag:
        code = ExitCode.FLAGGED
    else:
        code = ExitCode.OK
    if json_path is not None:
        report = {
            "gate_version": __version__,
            "policy": {"id": policy.id, "sha256": policy.sha256},
            "index_sha256": index.sha256,
            "encoder_sha256": encoder.sha256,
            "results": [
                _result(v.source, d, n) for v, d, n in zip(volumes, decisions, neighbours, strict=True)
            ],
            "errors": [{"source": e.path, "problem": e.problem} for e in errors],
            "summary": {v.value: counts[v] for v in Verdict} | {"unreadable": len(errors)},
            "exit_code": int(code),
        }
        _write_json(json_path, report)
    click.echo(f"audit: run {run_id}, {len(decisions) + len(errors)} record(s) in {audit.path}")
    if errors:
        click.echo(
            f"gate: {len(errors)} input(s) refused (unreadable, or outside what the index can judge); "
            "nothing counts as passed",
            err=True,
        )
    elif code is ExitCode.FLAGGED:
        click.echo(
            f"gate: {counts[Verdict.FLAG]} candidate(s) flagged for review (exit 5); a flagged sample "
            "is never exported; pass --allow-flag to accept flags",
            err=True,
        )
    raise SystemExit(int(code))


def _problem(err: InputError) -> str:
    """The problem of an unreadable input without its path (a file name may carry an identity)."""
    problem = err.problem
    # realpath, not Path.resolve: it never raises (a symlink loop is just another unreadable input)
    names = {err.path, os.path.realpath(err.path), os.path.abspath(err.path), Path(err.path).name}
    for name in sorted(names, key=len, reverse=True):
        if name:
            problem = problem.replace(name, "<input>")
    return f"unreadable input: {problem}"


def _result(source: str, dec: Decision, neighbours: Neighbours) -> dict[str, Any]:
    return {
        "source": source,
        "verdict": dec.verdict.value,
        "grade": dec.grade.value,
        "similarity": dec.similarity,
        "threshold": dec.threshold,
        "nearest_patient_id": dec.nearest_patient_id,
        "exact_duplicate": dec.exact_duplicate,
        "details": dec.details,
        "verified_patient_id": dec.verified_patient_id,
        "neighbours": [
            {"patient_id": pid, "similarity": float(s)}
            | ({} if neighbours.verified is None else {"verified": float(neighbours.verified[i])})
            | ({} if neighbours.identity is None else {"identity": float(neighbours.identity[i])})
            for i, (pid, s) in enumerate(zip(neighbours.patient_ids, neighbours.similarities, strict=True))
        ],
    }


def _write_json(path: Path, report: dict[str, Any]) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
