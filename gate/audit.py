"""The tamper-evident audit log: append-only JSON Lines, one hash-chained record per candidate.

Every candidate a run judges (pass, flag, reject) or fails to judge (error) gets one record.
Each record carries ``seq`` (0, 1, 2, ... over the whole file), ``prev_hash`` (the previous
record's ``hash``; :data:`GENESIS_HASH` for the first) and its own ``hash`` = sha256 of the
canonical JSON of every other field. So an edited record fails its own hash; a deleted,
inserted or reordered record breaks the chain at the next one; a torn last line is not JSON.
Dropping whole records from the end leaves a valid shorter chain: that is what anchors catch
(a bundle manifest stores ``head_hash`` and ``head_seq`` at the end of its run, and
:func:`verify_log` checks the log still holds that record).

Appends take an exclusive ``fcntl.flock`` on the log file, read the current head under the
lock, write one line, flush and ``fsync`` before unlocking: concurrent runs interleave whole
records and the chain stays linear. The caller renames a sample into its bundle only after
:meth:`AuditLog.append` has returned (the record is on disk first).

The log is internal: records hold pseudonymous training patient ids and must never be
published (bundles store only the head hash).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gate.digest import canonical_json, sha256_json
from gate.errors import IntegrityError
from gate.signing import SigningKey
from gate.values import Decision, Grade

AUDIT_SCHEMA_VERSION = 3
"""Version of the record layout; a reader refuses records of another version (2: the verified
score, its patient and thresholds; 3: the identity score and its duplicate threshold)."""

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first record of a log."""

TAIL_CHUNK_BYTES = 1 << 16
"""Bytes read from the end of the log to find the last record: records are ~1 KiB."""

Outcome = Literal["pass", "flag", "reject", "error"]
"""What happened to a candidate: the policy's verdict, or ``error`` (could not decide)."""


def new_run_id() -> str:
    """UTC timestamp plus 6 random hex digits, e.g. ``20261125T031500Z-3fa2c1``."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


class AuditEntry(BaseModel):
    """The content of one record, as the caller gives it (the log adds seq and hashes).

    Attributes:
        schema_version: :data:`AUDIT_SCHEMA_VERSION`.
        run_id: the run that judged the candidate.
        time: UTC time of the decision, ISO 8601.
        sample_id: the candidate's name in the run: an exported pass carries its bundle sample
            id (``s000001``, ``s000002``, ... in export order), any other candidate of a
            ``gate generate`` run ``c`` + its 0-based index in the run (``c000004``).
        seed: the generator seed that produced it, if any.
        candidate_sha256: :func:`gate.digest.sha256_voxels` of the candidate's voxels.
        verdict: pass / flag / reject / error.
        grade: different / similar / duplicate (None on error).
        nearest_patient_id: pseudonymous id of the closest training patient (None on error).
        similarity: cosine similarity to that patient, in [-1, 1].
        threshold: the threshold that decided the grade.
        similar_threshold: the resolved ``similar`` threshold (for histograms).
        duplicate_threshold: the resolved ``duplicate`` threshold.
        exact_duplicate: the voxel-hash check matched a training volume.
        verified: on a verifying index, the verified score (best masked NCC after alignment,
            :mod:`gate.verify`) over the reported patients.
        verified_patient_id: the patient it was reached with.
        verified_similar_threshold: the resolved ``similar`` threshold of the verified score.
        verified_duplicate_threshold: the resolved ``duplicate`` threshold of the verified score.
        identity: on a verifying index, the identity score (masked NCC of the training grid as
            stored, no turn, no mirror, :mod:`gate.verify`) over the reported patients.
        identity_duplicate_threshold: the resolved ``duplicate`` bound of the identity score when
            the policy grades by it (``identity`` in the policy).
        policy_id: policy name.
        policy_sha256: sha256 of the policy file.
        provider: the onnxruntime execution provider that embedded the candidate.
        encoder_sha256: the encoder's digest.
        index_sha256: the index file's digest.
        error: one line saying why no decision was made (verdict ``error`` only).

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(
        default=AUDIT_SCHEMA_VERSION, ge=AUDIT_SCHEMA_VERSION, le=AUDIT_SCHEMA_VERSION
    )
    run_id: str = Field(min_length=1)
    time: str = Field(min_length=1)
    sample_id: str | None = None
    seed: int | None = None
    candidate_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    verdict: Outcome
    grade: Grade | None = None
    nearest_patient_id: str | None = None
    similarity: float | None = Field(default=None, allow_inf_nan=False)
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    similar_threshold: float | None = Field(default=None, allow_inf_nan=False)
    duplicate_threshold: float | None = Field(default=None, allow_inf_nan=False)
    exact_duplicate: bool = False
    verified: float | None = Field(default=None, allow_inf_nan=False, ge=-1.0, le=1.0)
    verified_patient_id: str | None = None
    verified_similar_threshold: float | None = Field(default=None, allow_inf_nan=False)
    verified_duplicate_threshold: float | None = Field(default=None, allow_inf_nan=False)
    identity: float | None = Field(default=None, allow_inf_nan=False, ge=-1.0, le=1.0)
    identity_duplicate_threshold: float | None = Field(default=None, allow_inf_nan=False)
    policy_id: str
    policy_sha256: str
    provider: str
    encoder_sha256: str | None = None
    index_sha256: str | None = None
    error: str | None = None

    @classmethod
    def for_decision(
        cls,
        run_id: str,
        decision: Decision,
        candidate_sha256: str,
        provider: str,
        *,
        sample_id: str | None = None,
        seed: int | None = None,
        encoder_sha256: str | None = None,
        index_sha256: str | None = None,
    ) -> AuditEntry:
        """Build the entry of a decided candidate (time = now, UTC)."""
        return cls(
            run_id=run_id,
            time=utc_now(),
            sample_id=sample_id,
            seed=seed,
            candidate_sha256=candidate_sha256,
            verdict=decision.verdict.value,
            grade=decision.grade,
            nearest_patient_id=decision.nearest_patient_id,
            similarity=decision.similarity,
            threshold=decision.threshold,
            similar_threshold=decision.details.get("similar_threshold"),
            duplicate_threshold=decision.details.get("duplicate_threshold"),
            exact_duplicate=decision.exact_duplicate,
            verified=decision.details.get("verified"),
            verified_patient_id=decision.verified_patient_id,
            verified_similar_threshold=decision.details.get("verified_similar_threshold"),
            verified_duplicate_threshold=decision.details.get("verified_duplicate_threshold"),
            identity=decision.details.get("identity"),
            identity_duplicate_threshold=decision.details.get("identity_duplicate_threshold"),
            policy_id=decision.policy_id,
            policy_sha256=decision.policy_sha256,
            provider=provider,
            encoder_sha256=encoder_sha256,
            index_sha256=index_sha256,
        )

    @classmethod
    def for_error(
        cls,
        run_id: str,
        error: str,
        policy_id: str,
        policy_sha256: str,
        provider: str,
        *,
        candidate_sha256: str | None = None,
        sample_id: str | None = None,
        seed: int | None = None,
    ) -> AuditEntry:
        """Build the entry of a candidate that could not be decided (nothing is exported)."""
        return cls(
            run_id=run_id,
            time=utc_now(),
            sample_id=sample_id,
            seed=seed,
            candidate_sha256=candidate_sha256,
            verdict="error",
            policy_id=policy_id,
            policy_sha256=policy_sha256,
            provider=provider,
            error=error.splitlines()[0] if error else "unknown error",
        )


def undecided_entries(
    run_id: str,
    err: BaseException,
    policy_id: str,
    policy_sha256: str,
    provider: str,
    candidate_sha256s: Sequence[str | None],
    sample_ids: Sequence[str | None] | None = None,
    seed: int | None = None,
) -> list[AuditEntry]:
    """One ``error`` entry per candidate of a batch that could not be decided (fail closed).

    Args:
        run_id: the run.
        err: what stopped the decision; recorded as ``<type>: <message>``.
        policy_id: id of the policy in force.
        policy_sha256: its sha256.
        provider: onnxruntime provider in use.
        candidate_sha256s: voxel hash per candidate (None where no voxels exist yet).
        sample_ids: sample id per candidate (None: none).
        seed: the run seed, if any.

    """
    message = f"{type(err).__name__}: {err}"
    ids = list(sample_ids) if sample_ids is not None else [None] * len(candidate_sha256s)
    return [
        AuditEntry.for_error(
            run_id,
            message,
            policy_id,
            policy_sha256,
            provider,
            candidate_sha256=sha,
            sample_id=sid,
            seed=seed,
        )
        for sha, sid in zip(candidate_sha256s, ids, strict=True)
    ]


class AuditRecord(AuditEntry):
    """An entry as stored: with its position and hash chain.

    Attributes:
        seq: 0-based position in the log.
        prev_hash: the previous record's ``hash`` (:data:`GENESIS_HASH` for seq 0).
        hash: sha256 of the canonical JSON of every other field.

    """

    seq: int = Field(ge=0)
    prev_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")

    def expected_hash(self) -> str:
        """Recompute ``hash`` from the other fields."""
        return record_hash(self.model_dump(mode="json", exclude={"hash"}))


def utc_now() -> str:
    """Return the current UTC time, ISO 8601 with microseconds and ``+00:00``."""
    return dt.datetime.now(dt.UTC).isoformat()


def record_hash(fields: dict[str, object]) -> str:
    """sha256 of the canonical JSON of a record's fields (everything but ``hash``)."""
    return sha256_json(fields)


def _seal(entry: AuditEntry, seq: int, prev_hash: str) -> AuditRecord:
    fields = entry.model_dump(mode="json") | {"seq": seq, "prev_hash": prev_hash}
    return AuditRecord.model_validate(fields | {"hash": record_hash(fields)})


def _last_line(f: int, size: int, path: Path) -> bytes | None:
    """Return the last complete line of the open file (None when empty); refuses a torn tail."""
    if size == 0:
        return None
    start = max(0, size - TAIL_CHUNK_BYTES)
    tail = os.pread(f, size - start, start)
    if not tail.endswith(b"\n"):
        raise IntegrityError(
            f"{path}: the last record is truncated (no final newline); run `gate audit verify --log {path}` "
            "and restore the log before appending"
        )
    body = tail[:-1]
    cut = body.rfind(b"\n")
    if cut < 0 and start > 0:
        raise IntegrityError(f"{path}: last record longer than {TAIL_CHUNK_BYTES} bytes; the log is corrupt")
    return body[cut + 1 :]


def read_locked(path: Path) -> bytes:
    """Read the whole log under a shared lock, so a concurrent append is never seen half-done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        chunks = []
        while chunk := os.read(fd, TAIL_CHUNK_BYTES):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def _parse(line: bytes, where: str) -> AuditRecord:
    try:
        return AuditRecord.model_validate_json(line)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "record"
        raise IntegrityError(f"{where}: not a valid audit record ({loc}: {first['msg']})") from err


class AuditLog:
    """One audit log file. Appends are locked and durable; reading never locks.

    Attributes:
        path: the ``.jsonl`` file (created with its folder on first append).
        appended: hashes of the records this object appended (and fsync'd), in order.

    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.appended: list[str] = []

    def append(self, entry: AuditEntry) -> str:
        """Append one record under an exclusive lock and fsync it before returning.

        Args:
            entry: the record's content.

        Returns:
            The new record's hash, which is now the log's head.

        Raises:
            IntegrityError: the current last record is torn or invalid (nothing is appended).

        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            last = _last_line(fd, size, self.path)
            if last is None:
                seq, prev = 0, GENESIS_HASH
            else:
                head = _parse(last, f"{self.path} (last record)")
                seq, prev = head.seq + 1, head.hash
            record = _seal(entry, seq, prev)
            os.write(fd, (canonical_json(record.model_dump(mode="json")) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)  # closing releases the lock
        self.appended.append(record.hash)
        return record.hash

    def head(self) -> str:
        """Return the last record's hash (:data:`GENESIS_HASH` for an empty or missing log).

        Raises:
            IntegrityError: the last record is torn or invalid.

        """
        return self.head_position()[0]

    def head_position(self) -> tuple[str, int]:
        """Return the last record's hash and seq; ``(GENESIS_HASH, -1)`` for an empty or missing log.

        Raises:
            IntegrityError: the last record is torn or invalid.

        """
        if not self.path.exists():
            return GENESIS_HASH, -1
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # no half-written record from a concurrent append
            last = _last_line(fd, os.fstat(fd).st_size, self.path)
        finally:
            os.close(fd)
        if last is None:
            return GENESIS_HASH, -1
        record = _parse(last, f"{self.path} (last record)")
        return record.hash, record.seq

    def records(self) -> Iterator[AuditRecord]:
        """Every record, in order, parsed but not chain-checked (see :func:`verify_log`).

        Raises:
            IntegrityError: a line that is not a valid record.

        """
        if not self.path.exists():
            return
        for n, line in enumerate(read_locked(self.path).splitlines(), start=1):
            yield _parse(line, f"{self.path}:{n}")


@dataclass
class LogReport:
    """What :func:`verify_log` found.

    Attributes:
        path: the log.
        records: records read (valid JSON records, chained or not).
        head_hash: hash of the last valid record (:data:`GENESIS_HASH` when none).
        head_seq: its seq (-1 when none).
        problems: one line per problem, ``<path>:<line>: <what>``; empty when the log verifies.

    """

    path: Path
    records: int = 0
    head_hash: str = GENESIS_HASH
    head_seq: int = -1
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


HEADS_SUFFIX = ".heads"
"""Signed heads live beside the log: ``audit.jsonl.heads`` (JSON Lines, one per finished run)."""


def heads_path(log_path: Path) -> Path:
    """Where the signed heads of ``log_path`` are kept."""
    log_path = Path(log_path)
    return log_path.with_name(log_path.name + HEADS_SUFFIX)


def _head_message(seq: int, head_hash: str) -> bytes:
    return f"gate-audit-head:v1:{seq}:{head_hash}".encode("ascii")


def sign_head(log: AuditLog, signer: SigningKey) -> tuple[str, int]:
    """Sign the log's current head (like a Certificate Transparency signed tree head).

    Appends ``{"seq", "head_hash", "time", "key_id", "signature"}`` to :func:`heads_path`, fsynced.
    A chain recomputed after an edit no longer holds the signed hash at that seq.

    Returns:
        The head signed, ``(head_hash, head_seq)``.

    """
    head_hash, head_seq = log.head_position()
    doc = json.loads(signer.sign(_head_message(head_seq, head_hash)))
    line = {"seq": head_seq, "head_hash": head_hash, "time": utc_now(), **doc}
    path = heads_path(log.path)
    with open(path, "a", encoding="ascii") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return head_hash, head_seq


def signed_head_problems(log_path: Path, by_seq: dict[int, str], public: Ed25519PublicKey) -> list[str]:
    """Every signed head must verify under ``public`` and still be the log's record at its seq."""
    from gate.signing import key_id

    path = heads_path(log_path)
    if not path.is_file() or path.is_symlink():
        return [f"{path}: no signed head (gate generate signs one at the end of each run)"]
    problems = []
    kid = key_id(public)
    lines = path.read_bytes().splitlines()
    if not lines:
        return [f"{path}: no signed head"]
    for n, raw in enumerate(lines, start=1):
        where = f"{path}:{n}"
        try:
            head = json.loads(raw)
            seq, head_hash, sig = int(head["seq"]), str(head["head_hash"]), bytes.fromhex(head["signature"])
        except (ValueError, KeyError, TypeError):
            problems.append(f"{where}: unreadable signed head")
            continue
        if head.get("key_id") != kid:
            problems.append(f"{where}: signed by another key than the one given")
            continue
        try:
            public.verify(sig, _head_message(seq, head_hash))
        except InvalidSignature:
            problems.append(f"{where}: signature of head seq {seq} does not verify (head was edited)")
            continue
        if by_seq.get(seq) != head_hash:
            problems.append(
                f"{where}: signed head seq {seq} ({head_hash[:12]}…) is not the log's record there: the "
                "log was rewritten (chain recomputed) or truncated after it was signed"
            )
    return problems


def verify_log(
    path: Path, anchors: list[tuple[str, int]] | None = None, public_key: Ed25519PublicKey | None = None
) -> LogReport:
    """Check every record's hash, the chain, the sequence, and optional anchors.

    Args:
        path: the log file.
        anchors: ``(head_hash, head_seq)`` pairs recorded elsewhere (bundle manifests); each
            must be the hash of the record at that seq, or records were truncated or rewritten.
        public_key: the site's public key: every signed head (:func:`sign_head`) must verify
            and still be in the log; None skips that check.

    Returns:
        The report; ``problems`` names every line that is edited (hash mismatch), out of
        chain (deleted, inserted or reordered), out of sequence, torn or unparsable, and
        every anchor the log no longer holds.

    """
    report = LogReport(path=Path(path))
    if not report.path.is_file():
        report.problems.append(f"{path}: audit log not found")
        return report
    raw = read_locked(report.path)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        report.problems.append(
            f"{path}:{len(lines)}: last record is truncated (no final newline; a torn write or a cut file)"
        )
    by_seq: dict[int, str] = {}
    prev_hash, expected_seq = GENESIS_HASH, 0
    for n, line in enumerate(lines, start=1):
        where = f"{path}:{n}"
        try:
            data = json.loads(line)
            record = AuditRecord.model_validate(data)
        except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as err:
            report.problems.append(
                f"{where}: not a valid audit record ({type(err).__name__}); edited or torn"
            )
            continue
        report.records += 1
        if record.expected_hash() != record.hash:
            report.problems.append(
                f"{where}: record hash mismatch: seq {record.seq} was edited after writing"
            )
        if record.prev_hash != prev_hash:
            report.problems.append(
                f"{where}: chain broken: prev_hash does not match the previous record's hash "
                "(a record was deleted, inserted or reordered before this line)"
            )
        if record.seq != expected_seq:
            report.problems.append(
                f"{where}: seq {record.seq} where {expected_seq} was expected (records deleted or reordered)"
            )
        by_seq[record.seq] = record.hash
        prev_hash, expected_seq = record.hash, record.seq + 1
        report.head_hash, report.head_seq = record.hash, record.seq
    for anchor_hash, anchor_seq in anchors or []:
        if by_seq.get(anchor_seq) != anchor_hash:
            report.problems.append(
                f"{path}: anchor seq {anchor_seq} ({anchor_hash[:12]}…) is not in the log: records were "
                "truncated from the end or rewritten after the bundle was made"
            )
    if public_key is not None:
        report.problems += signed_head_problems(report.path, by_seq, public_key)
    return report
