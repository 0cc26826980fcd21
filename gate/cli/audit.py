"""``gate audit verify|show|report`` and ``gate verify-bundle`` (the publication check)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import click

from gate.audit import AuditLog, AuditRecord, verify_log
from gate.bundle import read_manifest
from gate.cli.index import encoder_for_index, encoder_options, load_encoder, read_all
from gate.cli.options import input_options, read_options
from gate.digest import sha256_voxels
from gate.engine import EngineConfig, engine_options, open_engine
from gate.errors import ExitCode, IntegrityError, UsageError
from gate.index import DEFAULT_INDEX_DIR
from gate.policy import load_policy
from gate.publication import sample_record_problems, write_reports
from gate.publication import verify_bundle as run_publication_check
from gate.values import Volume

DEFAULT_POLICY = "strict"
"""Fail closed: without --policy the publication check uses the strictest shipped policy."""

log_option = click.option(
    "--log",
    "log_path",
    required=True,
    envvar="GATE_AUDIT_LOG",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Audit log (.jsonl); default: $GATE_AUDIT_LOG.",
)


@click.group()
def audit() -> None:
    """Verify, search and review the tamper-evident audit log (internal: holds patient ids)."""


@audit.command("verify")
@log_option
@click.option(
    "--bundle",
    "bundles",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A bundle whose anchor (log head at its run's end) must be in the log (repeatable).",
)
@click.option(
    "--public-key",
    "public_key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The site's public key: every signed head (one per run) must verify and still be in the log.",
)
def verify(log_path: Path, bundles: tuple[Path, ...], public_key_path: Path | None) -> None:
    """Check every record's hash, the chain and the sequence, and each bundle's anchor.

    Detects an edited, deleted, inserted, reordered or torn record; records cut from the end are
    detected through a bundle's anchor. Exit 0 intact, 3 tampered or unreadable.
    """
    manifests = [(bundle, read_manifest(bundle)) for bundle in bundles]
    anchors = [(m.audit.head_hash, m.audit.head_seq) for _, m in manifests if m.audit.head_seq >= 0]
    from gate.signing import load_public_key

    public_key = load_public_key(public_key_path) if public_key_path is not None else None
    report = verify_log(log_path, anchors=anchors, public_key=public_key)
    problems = list(report.problems)
    if report.path.is_file():
        for bundle, m in manifests:
            problems.extend(f"{bundle}: {p}" for p in sample_record_problems(log_path, m))
    click.echo(
        f"audit log {log_path}: {report.records} records, "
        f"head {report.head_hash[:16]}… (seq {report.head_seq})"
    )
    for bundle in bundles:
        click.echo(f"anchor of {bundle} checked")
    for p in problems:
        click.echo(f"TAMPERED {p}")
    if problems:
        click.echo(f"gate: audit log does not verify ({len(problems)} problem(s))", err=True)
        raise SystemExit(int(ExitCode.INPUT))
    click.echo("audit log verifies")


def _parse_time(value: str | None, name: str) -> dt.datetime | None:
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError as err:
        raise UsageError(
            f"{name} {value!r}: expected an ISO 8601 time, e.g. 2026-11-25T10:00:00+00:00"
        ) from err
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@audit.command("show")
@log_option
@click.option(
    "--run", "run_id", default=None, help="Only runs whose id starts with this (a full id or a prefix)."
)
@click.option(
    "--verdict",
    "verdicts",
    multiple=True,
    type=click.Choice(["pass", "flag", "reject", "error"]),
    help="Only these verdicts (repeatable).",
)
@click.option(
    "--grade",
    "grades",
    multiple=True,
    type=click.Choice(["different", "similar", "duplicate"]),
    help="Only these grades (repeatable).",
)
@click.option("--patient", default=None, help="Only records whose nearest patient is this pseudonymous id.")
@click.option("--since", default=None, help="Only records at or after this ISO 8601 time (UTC if no zone).")
@click.option("--until", default=None, help="Only records before this ISO 8601 time (UTC if no zone).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON Lines (the records as stored) instead of a table."
)
def show(
    log_path: Path,
    run_id: str | None,
    verdicts: tuple[str, ...],
    grades: tuple[str, ...],
    patient: str | None,
    since: str | None,
    until: str | None,
    as_json: bool,
) -> None:
    """List audit records, filtered. Does not verify the chain (use `gate audit verify`)."""
    start, end = _parse_time(since, "--since"), _parse_time(until, "--until")
    if not log_path.is_file():
        raise UsageError(f"{log_path}: audit log not found")
    selected: list[AuditRecord] = []
    for rec in AuditLog(log_path).records():
        when = dt.datetime.fromisoformat(rec.time)
        if (
            (run_id is None or rec.run_id.startswith(run_id))
            and (not verdicts or rec.verdict in verdicts)
            and (not grades or (rec.grade is not None and rec.grade.value in grades))
            and (patient is None or rec.nearest_patient_id == patient)
            and (start is None or when >= start)
            and (end is None or when < end)
        ):
            selected.append(rec)
    if as_json:
        for rec in selected:
            click.echo(json.dumps(rec.model_dump(mode="json"), sort_keys=True))
        return
    run_w = max([3, *(len(r.run_id) for r in selected)])  # full ids: a copied id must match
    sample_w = max([6, *(len(r.sample_id or "-") for r in selected)])
    click.echo(
        f"{'seq':>5} {'time':<26} {'run':<{run_w}} {'sample':<{sample_w}} {'verdict':<7} {'grade':<9} "
        f"{'similarity':>10} {'threshold':>9} nearest patient"
    )
    for rec in selected:
        click.echo(
            f"{rec.seq:>5} {rec.time[:26]:<26} {rec.run_id:<{run_w}} {rec.sample_id or '-':<{sample_w}} "
            f"{rec.verdict:<7} {rec.grade.value if rec.grade else '-':<9} {_num(rec.similarity):>10} "
            f"{_num(rec.threshold):>9} {rec.nearest_patient_id or (rec.error or '-')}"
        )
    click.echo(f"{len(selected)} record(s)")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


@audit.command("report")
@click.argument("run_id")
@log_option
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="New folder (never inside a bundle).",
)
@click.option(
    "--candidates",
    "candidates_dirs",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="The run's quarantine folder (candidates not exported) and/or its bundle's samples/ "
    "folder (what went out); repeatable.",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="The training volumes (repeatable), read with the index's pseudonymisation key.",
)
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_INDEX_DIR,
    show_default="the shipped index",
    help="The index the run was judged against (its calibration and patients).",
)
@click.option(
    "--no-training-views",
    is_flag=True,
    help="Show candidates and pseudonymous ids only: no --data, no key needed.",
)
@input_options
def report(
    run_id: str,
    log_path: Path,
    out_dir: Path,
    candidates_dirs: tuple[Path, ...],
    data: tuple[Path, ...],
    index_dir: Path,
    no_training_views: bool,
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
) -> None:
    """Write an INTERNAL HTML report of run RUN_ID (a full id or a unique prefix) for a reviewer.

    Riskiest first: the released samples closest to the threshold, duplicates, similar
    candidates, then per training patient how often and how closely it was approached; above
    them a similarity histogram against the thresholds with the index's calibration. Candidates
    are matched by voxel hash in --candidates; training volumes by pseudonymous id, re-derived
    from --data with the index's key (--id-key-file / $GATE_ID_KEY_FILE): a missing key is a
    usage error (2), a key that maps no --data volume to the index's patients an integrity error
    (3), unless --no-training-views.
    """
    from gate.identity import Pseudonymizer, default_key_path
    from gate.index_manifest import read_manifest as read_index_manifest
    from gate.publication import READ_KEY
    from gate.report import DEMO_KEY_FILE, build_report
    from gate.volume import ReadOptions

    if no_training_views and data:
        raise UsageError("--data and --no-training-views exclude each other")
    if not no_training_views and not data:
        raise UsageError("give --data TRAINING_DIR (read with the index's key) or --no-training-views")
    if not log_path.is_file():
        raise UsageError(f"{log_path}: audit log not found")
    all_records = list(AuditLog(log_path).records())
    run_id = _resolve_run(run_id, {r.run_id for r in all_records})
    records = [r for r in all_records if r.run_id == run_id]
    manifest = read_index_manifest(index_dir)
    judged = {r.index_sha256 for r in records if r.index_sha256}
    if judged and judged != {manifest.index_sha256}:
        raise UsageError(
            f"run {run_id} was judged against index {sorted(judged)[0][:12]}…, but {index_dir} holds "
            f"{manifest.index_sha256[:12]}…; give that run's --index"
        )
    cand_options = ReadOptions(pseudonymizer=Pseudonymizer(key=READ_KEY), max_voxels=max_voxels)
    cand_vols, _, cand_errors = read_all(list(candidates_dirs), cand_options)
    for err in cand_errors:
        click.echo(f"gate: warning: {err} (not shown in the report)", err=True)
    candidates = {sha256_voxels(v.data): v for v in cand_vols}
    training: dict[str, Volume] | None = None
    if not no_training_views:
        key_path = id_key_file or default_key_path()
        if not key_path.is_file():
            raise UsageError(
                f"{key_path}: no pseudonymisation key; the report maps nearest patients back to --data "
                "with the key the index was built with: give --id-key-file KEY (or $GATE_ID_KEY_FILE; "
                f"the shipped index's is {DEMO_KEY_FILE}), or --no-training-views"
            )
        options = read_options(key_path, patient_map, patient_pattern, max_voxels)
        train_vols, _, train_errors = read_all(list(data), options)
        for err in train_errors:
            click.echo(f"gate: warning: {err} (not shown in the report)", err=True)
        indexed = {row.patient_id for row in manifest.rows}
        training = {}
        for vol in train_vols:
            if vol.patient_id in indexed:
                training.setdefault(vol.patient_id, vol)
        if not training:
            raise IntegrityError(
                f"{key_path}: none of the {len(train_vols)} volume(s) in --data maps to a patient of "
                f"index {index_dir} with this key: wrong key or not the index's training data; give "
                "the index's --id-key-file, or --no-training-views"
            )
        nearest = {r.nearest_patient_id for r in records if r.nearest_patient_id}
        missing = nearest - training.keys()
        if missing:
            click.echo(
                f"gate: warning: {len(missing)} of {len(nearest)} nearest patient(s) not in --data "
                "(their rows say so)",
                err=True,
            )
    path = build_report(
        run_id, records, candidates, training, out_dir, list(manifest.calibration.similarities)
    )
    click.echo(f"wrote {path} (INTERNAL: shows training images; do not publish)")


def _resolve_run(prefix: str, runs: set[str]) -> str:
    """The one run id equal to or starting with ``prefix``."""
    if prefix in runs:
        return prefix
    matches = sorted(r for r in runs if r.startswith(prefix))
    if not matches:
        raise UsageError(f"run {prefix!r} has no records in the audit log; see `gate audit show`")
    if len(matches) > 1:
        raise UsageError(
            f"run id prefix {prefix!r} matches {len(matches)} runs ({', '.join(matches[:5])}); "
            "give more characters"
        )
    return matches[0]


@click.command("verify-bundle")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--index",
    "index_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_INDEX_DIR,
    show_default="the shipped index",
    help="Index folder of the training patients.",
)
@click.option(
    "--policy",
    "policy_name",
    default=DEFAULT_POLICY,
    show_default=True,
    help="Policy to re-decide under; must be at least as strict as the bundle's.",
)
@encoder_options
@click.option(
    "--audit-log",
    "audit_log",
    envvar="GATE_AUDIT_LOG",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The internal audit log the bundle anchors; default: $GATE_AUDIT_LOG.",
)
@click.option("--no-audit", is_flag=True, help="Skip the audit-anchor check (say so explicitly).")
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a JSON report."
)
@click.option(
    "--junit", "junit_path", type=click.Path(dir_okay=False, path_type=Path), help="Write JUnit XML."
)
@click.option(
    "--public-key",
    "public_key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The site's public key (gate keys init; site.pub): manifest.sig must be its signature.",
)
@click.option(
    "--rejudge-with-other-index",
    is_flag=True,
    help="Accept an index / encoder whose digest differs from the bundle's record (noted in the reports).",
)
@engine_options
def verify_bundle(
    bundle_dir: Path,
    index_dir: Path,
    policy_name: str,
    encoder_dir: Path | None,
    device: str,
    audit_log: Path | None,
    no_audit: bool,
    json_path: Path | None,
    junit_path: Path | None,
    public_key_path: Path | None,
    rejudge_with_other_index: bool,
    engine: str,
    ray_address: str | None,
    workers: int,
    batch_size: int,
    num_gpus: float,
) -> None:
    """Publication check of a bundle: checksums, no unlisted file, re-decision, audit anchors.

    Every sample is re-embedded and re-decided under --policy. Writes --json and --junit (one
    test case per check and per sample) whatever the outcome.

    Exit codes: 0 publishable; 1 a sample does not pass; 2 usage (e.g. a policy looser than the
    bundle's); 3 integrity (checksum, unlisted file, manifest, audit log, unreadable sample).
    """
    if audit_log is None and not no_audit:
        raise UsageError(
            "give --audit-log FILE (or $GATE_AUDIT_LOG) to check the audit anchors, or --no-audit"
        )
    if audit_log is not None and no_audit:
        raise UsageError("--audit-log and --no-audit exclude each other")
    from gate.signing import load_public_key

    public_key = load_public_key(public_key_path) if public_key_path is not None else None
    policy = load_policy(policy_name)
    encoder_dir = encoder_for_index(encoder_dir, index_dir)
    encoder = load_encoder(encoder_dir, device)
    config = EngineConfig(engine, ray_address, workers, batch_size, num_gpus, encoder_dir, device)
    with open_engine(config, encoder) as eng:
        index = eng.open_index(index_dir)
        result = run_publication_check(
            bundle_dir,
            policy,
            index,
            eng.encoder,  # type: ignore[arg-type]
            audit_log,
            public_key=public_key,
            rejudge_with_other_index=rejudge_with_other_index,
        )
    write_reports(result, json_path, junit_path)
    click.echo(
        f"bundle {bundle_dir}: policy {policy.id}, index {index.sha256[:12]}…, encoder {encoder.sha256[:12]}…"
    )
    for check in result.checks:
        state = "SKIP" if check.skipped else ("ok" if check.ok else "FAIL")
        click.echo(f"{state:<4} {check.name}")
    for sample in result.samples:
        sim = "-" if sample.similarity is None else f"{sample.similarity:.4f}"
        click.echo(
            f"{'ok' if sample.ok else 'FAIL':<4} sample {sample.sample_id}: {sample.verdict} "
            f"(similarity {sim})"
        )
    for reason in result.reasons():
        click.echo(f"reason: {reason}")
    code = result.exit_code
    if code is ExitCode.OK:
        click.echo(f"publishable: {len(result.samples)} sample(s) pass under policy {policy.id}")
    else:
        click.echo(f"gate: bundle is not publishable ({len(result.reasons())} reason(s))", err=True)
    raise SystemExit(int(code))
