"""The publication check (``gate verify-bundle``): may this bundle be published.

Checks, each reported on its own (nothing stops at the first failure, so a CI log names every
reason):

1. ``manifest``: ``manifest.json`` is present and valid.
2. ``files``: every listed file exists with its sha256; no file is unlisted.
3. ``policy``: the policy given is at least as strict as the one recorded in the manifest
   (:func:`gate.policy.at_least_as_strict`, with the index's calibration).
4. ``audit``: the audit log's chain verifies, it still holds the manifest's anchor (head hash
   at its seq), and every sample's record is there: a pass of this run for these voxels.
5. one check per sample: every file of the sample (NIfTI, DICOM series) is read, re-embedded
   and re-decided under the given policy; anything but a pass fails; a NIfTI's voxels must
   hash to the recorded ``candidate_sha256``.

Exit code: 3 for an integrity failure (manifest, files, audit, voxel hash, unreadable sample),
else 2 for a policy looser than the recorded one, else 1 when a sample is not a pass, else 0.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gate import __version__, bundle_schema
from gate.audit import AuditLog, verify_log
from gate.bundle import BundleManifest, Provenance, check_files, memorization_document, read_manifest
from gate.datacard import data_card
from gate.decide import decide
from gate.digest import sha256_voxels
from gate.domain import check_in_domain
from gate.errors import ExitCode, GateError, IntegrityError
from gate.exporters.dicom import slice_problems
from gate.exporters.nifti import canonical_bytes
from gate.identity import Pseudonymizer
from gate.index import EmbeddingModel, TrainingIndex, embed_volumes
from gate.policy import LoadedPolicy, at_least_as_strict
from gate.signing import signature_problem
from gate.values import VERDICT_SEVERITY, Volume
from gate.verify import grid_search, verify_all
from gate.volume import ReadOptions, read_volumes

READ_KEY = bytes(32)
"""Samples are synthetic and carry no identity worth protecting; the reader still wants a
pseudonymisation key, and a fixed one keeps the check reproducible."""

EXACT_NOTE = ", exact copy of a training volume"
"""Appended to a sample's failure when its voxels hash equal to a training volume's."""

CHECK_NAMES = ("manifest", "signature", "files", "digests", "policy", "audit")
"""Bundle-level checks, in the order they are reported."""

INTEGRITY_CHECKS = frozenset({"manifest", "signature", "files", "digests", "audit"})
"""A failure of any of these is exit 3, whatever the samples' verdicts."""


@dataclass
class CheckResult:
    """One bundle-level check.

    Attributes:
        name: one of :data:`CHECK_NAMES`.
        ok: passed (or skipped on request).
        problems: one line per problem.
        skipped: not run (``--no-audit``).

    """

    name: str
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    skipped: bool = False


@dataclass
class SampleResult:
    """One sample re-decided.

    Attributes:
        sample_id: its name.
        ok: every file of it passed and matched its recorded voxels.
        verdict: the strictest verdict over its files (``error`` when one was unreadable).
        similarity: the highest nearest-patient similarity over its files.
        threshold: the threshold that decided the grade of that file.
        grade: its grade.
        exact_duplicate: a file hashed equal to a training volume.
        problems: one line per problem.
        integrity: a file of it is not exactly what gate's exporter writes (exit 3).

    """

    sample_id: str
    ok: bool = True
    verdict: str = "pass"
    grade: str | None = None
    similarity: float | None = None
    threshold: float | None = None
    exact_duplicate: bool = False
    problems: list[str] = field(default_factory=list)
    integrity: bool = False


@dataclass
class PublicationReport:
    """Everything :func:`verify_bundle` found; serialises to JSON and JUnit XML."""

    bundle: str
    policy_id: str
    policy_sha256: str
    index_sha256: str
    encoder_sha256: str
    recorded: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    samples: list[SampleResult] = field(default_factory=list)
    rejudged_with_other_index: bool = False

    @property
    def exit_code(self) -> ExitCode:
        """3 integrity, else 2 looser policy, else 1 a sample not passing, else 0."""
        failed = {c.name for c in self.checks if not c.ok}
        if failed & INTEGRITY_CHECKS or any(s.verdict == "error" or s.integrity for s in self.samples):
            return ExitCode.INPUT
        if any(s.problems and s.verdict == "pass" for s in self.samples):
            return ExitCode.INPUT  # a pass whose voxels do not match the record: tampering
        if "policy" in failed:
            return ExitCode.USAGE
        if any(not s.ok for s in self.samples):
            return ExitCode.VIOLATION
        return ExitCode.OK

    def reasons(self) -> list[str]:
        """Every failure as one line, bundle checks first."""
        out = [f"{c.name}: {p}" for c in self.checks for p in c.problems if not c.ok]
        out += [f"sample {s.sample_id}: {p}" for s in self.samples for p in s.problems]
        return out

    def to_json(self) -> dict[str, Any]:
        """Return the JSON report (``--json``)."""
        return {
            "gate_version": __version__,
            "bundle": self.bundle,
            "policy": {"id": self.policy_id, "sha256": self.policy_sha256},
            "index_sha256": self.index_sha256,
            "encoder_sha256": self.encoder_sha256,
            "rejudged_with_other_index": self.rejudged_with_other_index,
            "recorded": self.recorded,
            "checks": [asdict(c) for c in self.checks],
            "samples": [asdict(s) for s in self.samples],
            "reasons": self.reasons(),
            "passed": self.exit_code is ExitCode.OK,
            "exit_code": int(self.exit_code),
        }

    def to_junit(self) -> bytes:
        """JUnit XML (``--junit``): one test case per bundle check and per sample."""
        cases: list[tuple[str, str, list[str], bool]] = [
            ("gate.bundle", c.name, c.problems, c.skipped) for c in self.checks
        ] + [("gate.bundle.samples", s.sample_id, s.problems, False) for s in self.samples]
        failures = sum(1 for _, _, problems, _ in cases if problems)
        suite = ET.Element(
            "testsuite",
            name="gate verify-bundle",
            tests=str(len(cases)),
            failures=str(failures),
            errors="0",
            skipped=str(sum(1 for c in cases if c[3])),
        )
        for classname, name, problems, skipped in cases:
            case = ET.SubElement(suite, "testcase", classname=classname, name=name)
            if problems:
                failure = ET.SubElement(case, "failure", message=problems[0], type="gate")
                failure.text = "\n".join(problems)
            elif skipped:
                ET.SubElement(case, "skipped", message="not requested")
        if self.rejudged_with_other_index:
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="rejudged_with_other_index", value="true")
        suites = ET.Element("testsuites")
        suites.append(suite)
        return ET.tostring(suites, encoding="utf-8", xml_declaration=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sample_sources(bundle_dir: Path, files: Sequence[str]) -> list[Path]:
    """List the readable volumes of one sample: each NIfTI file and each DICOM series folder."""
    sources: list[Path] = []
    for rel in files:
        path = bundle_dir / rel
        if rel.endswith((".nii", ".nii.gz")):
            sources.append(path)
        elif rel.endswith(".dcm") and path.parent not in sources:
            sources.append(path.parent)
    return sources


def verify_bundle(
    bundle_dir: Path,
    policy: LoadedPolicy,
    index: TrainingIndex,
    encoder: EmbeddingModel,
    audit_log: Path | None,
    public_key: Ed25519PublicKey | None = None,
    rejudge_with_other_index: bool = False,
) -> PublicationReport:
    """Run every publication check on a bundle.

    Args:
        bundle_dir: the bundle folder.
        policy: the policy to re-decide under (at least as strict as the recorded one).
        index: the training index (loaded for ``encoder``).
        encoder: the encoder that re-embeds the samples.
        audit_log: the internal audit log the bundle anchors; None skips the audit check
            (the command line makes that an explicit ``--no-audit``).
        public_key: the site's public key: ``manifest.sig`` must be its signature of
            ``manifest.json``; None skips the signature check (reported as skipped).
        rejudge_with_other_index: accept an index / encoder whose digest differs from the
            bundle's record (written into the reports); otherwise that is an integrity failure.

    Returns:
        The report; see :attr:`PublicationReport.exit_code`.

    """
    report = PublicationReport(
        bundle=str(bundle_dir),
        policy_id=policy.id,
        policy_sha256=policy.sha256,
        index_sha256=index.sha256,
        encoder_sha256=encoder.sha256,
    )
    checks = {name: CheckResult(name) for name in CHECK_NAMES}
    report.checks = list(checks.values())
    bundle_dir = Path(bundle_dir)
    try:
        if bundle_schema.is_partial(bundle_dir):
            raise IntegrityError(
                f"{bundle_dir.name}: a partial folder left by an unfinished gate generate, never a "
                "bundle (gate generate removes stale ones)"
            )
        if (bundle_dir / bundle_schema.MANIFEST_FILE).is_symlink():
            raise IntegrityError(f"{bundle_schema.MANIFEST_FILE}: a symlink; expected a regular file")
        manifest = read_manifest(bundle_dir)
    except IntegrityError as err:
        checks["manifest"].ok = False
        checks["manifest"].problems.append(str(err))
        for name in CHECK_NAMES[1:]:
            checks[name].ok = False
            checks[name].problems.append("not checked: no valid manifest")
        return report
    if public_key is None:
        checks["signature"].skipped = True
    else:
        problem = signature_problem(
            (bundle_dir / bundle_schema.MANIFEST_FILE).read_bytes(),
            bundle_dir / bundle_schema.SIGNATURE_FILE,
            public_key,
        )
        _fail(checks["signature"], [problem] if problem else [])
    report.rejudged_with_other_index = rejudge_with_other_index
    digest_problems = [
        f"{what} digest {have} differs from the bundle's record {want}; give the bundle's {what} "
        "or --rejudge-with-other-index"
        for what, have, want in (
            ("index", index.sha256, manifest.index_sha256),
            ("encoder", encoder.sha256, manifest.encoder_sha256),
        )
        if have != want
    ]
    if not rejudge_with_other_index:
        _fail(checks["digests"], digest_problems)
    report.recorded = {
        "run_id": manifest.run_id,
        "policy": {"id": manifest.policy.id, "sha256": manifest.policy.sha256},
        "index_sha256": manifest.index_sha256,
        "encoder_sha256": manifest.encoder_sha256,
        "generator_sha256": manifest.generator_sha256,
        "audit_head": manifest.audit.head_hash,
    }
    files_problems = check_files(bundle_dir, manifest)
    if not files_problems:
        files_problems = data_card_problems(bundle_dir, manifest)
    _fail(checks["files"], files_problems)
    _check_policy(checks["policy"], policy, manifest, index)
    if audit_log is None:
        checks["audit"].skipped = True
    else:
        _fail(checks["audit"], audit_problems(audit_log, manifest, public_key))
    foreign = _check_encodings(bundle_dir, manifest)
    report.samples = _redecide(bundle_dir, manifest, policy, index, encoder, foreign)
    return report


def _check_encodings(bundle_dir: Path, manifest: BundleManifest) -> dict[str, list[str]]:
    """Every sample file must be byte for byte what gate's exporter writes (integrity, exit 3).

    Returns:
        Problems per sample id, for the samples that fail (they are not read any further).

    """
    out: dict[str, list[str]] = {}
    for sample in manifest.samples:
        problems: list[str] = []
        for rel in sample.files:
            if bundle_schema.path_problem(rel):
                continue  # reported by the files check; never read
            path = bundle_dir / rel
            if path.is_symlink() or not path.is_file():
                continue  # reported by the files check
            owner = bundle_schema.sample_file_owner(rel)
            if owner is None:
                continue
            if owner[1] == "nifti":
                problems += nifti_file_problems(path)
            else:
                problems += slice_problems(path, sample.sample_id, manifest.policy.id)
        if problems:
            out[sample.sample_id] = problems
    return out


def nifti_file_problems(path: Path) -> list[str]:
    """A gate NIfTI: one gzip member, nothing after it, and the exporter's exact bytes for its voxels."""
    body, problems = bundle_schema.gzip_body(path)
    if body is None or problems:
        return problems
    problems = bundle_schema.nifti_body_problems(path.name, body)
    if problems:
        return problems
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(body[: bundle_schema.NIFTI_HEADER_BYTES]))
    shape = tuple(int(x) for x in header.get_data_shape())
    data = np.frombuffer(body, dtype="<f4", offset=bundle_schema.NIFTI_HEADER_BYTES).reshape(shape, order="F")
    if canonical_bytes(data, header.get_best_affine(), header) != body:
        return [f"{path.name}: header differs from what gate's exporter writes for its voxels (hidden data)"]
    return []


def data_card_problems(bundle_dir: Path, manifest: BundleManifest) -> list[str]:
    """``DATA_CARD.md`` must be exactly what gate writes for this manifest."""
    try:
        provenance = Provenance(
            generator_name=manifest.generator_name,
            generator_sha256=manifest.generator_sha256,
            encoder_sha256=manifest.encoder_sha256,
            index_sha256=manifest.index_sha256,
            provider=manifest.provider,
            policy=manifest.policy.loaded(),
            formats=manifest.formats,
        )
    except IntegrityError as err:
        return [str(err)]
    expected = data_card(
        manifest.run_id, provenance, manifest.stats, len(manifest.samples), manifest.gate_version
    ).encode("utf-8")
    problems = []
    if (bundle_dir / bundle_schema.DATA_CARD_FILE).read_bytes() != expected:
        problems.append(
            f"{bundle_schema.DATA_CARD_FILE}: differs from the data card gate writes for this manifest"
        )
    problems += memorization_problems(bundle_dir, manifest)
    return problems


def memorization_problems(bundle_dir: Path, manifest: BundleManifest) -> list[str]:
    """``memorization.json`` must be :func:`gate.bundle.memorization_document` of the manifest's record.

    A manifest without a record must have no such file (:func:`check_files` has already made
    sure that every file present is listed and owned).
    """
    path = bundle_dir / bundle_schema.MEMORIZATION_FILE
    if manifest.memorization is None:
        if path.exists() or path.is_symlink():
            return [f"{bundle_schema.MEMORIZATION_FILE}: present, but the manifest records no statistics"]
        return []
    if manifest.memorization.run_id != manifest.run_id:
        return [
            f"{bundle_schema.MEMORIZATION_FILE}: statistics of run {manifest.memorization.run_id}, "
            f"the bundle is run {manifest.run_id}"
        ]
    if not path.is_file() or path.read_bytes() != memorization_document(manifest.memorization):
        return [
            f"{bundle_schema.MEMORIZATION_FILE}: differs from the statistics gate writes for this manifest"
        ]
    return []


def _fail(check: CheckResult, problems: list[str]) -> None:
    check.problems.extend(problems)
    check.ok = not check.problems


def _check_policy(
    check: CheckResult, policy: LoadedPolicy, manifest: BundleManifest, index: TrainingIndex
) -> None:
    try:
        recorded = manifest.policy.loaded()
    except IntegrityError as err:
        _fail(check, [str(err)])
        return
    if policy.sha256 == recorded.sha256:
        return
    if not at_least_as_strict(policy, recorded, index.calibration, index.verification):
        _fail(
            check,
            [
                f"policy {policy.id} is not at least as strict as the recorded policy {recorded.id} "
                f"({recorded.sha256[:12]}…); verify with {recorded.id} or a stricter policy"
            ],
        )


def audit_problems(
    audit_log: Path, manifest: BundleManifest, public_key: Ed25519PublicKey | None = None
) -> list[str]:
    """Problems of the log (chain, anchor, signed heads) and of the bundle's samples' records in it."""
    anchor = (manifest.audit.head_hash, manifest.audit.head_seq)
    log_report = verify_log(audit_log, anchors=[anchor] if anchor[1] >= 0 else [], public_key=public_key)
    if not log_report.path.is_file():
        return list(log_report.problems)
    return log_report.problems + sample_record_problems(audit_log, manifest)


def sample_record_problems(audit_log: Path, manifest: BundleManifest) -> list[str]:
    """Every sample's record must be in the log: a pass of the bundle's run for its voxels."""
    try:
        records = {r.hash: r for r in AuditLog(audit_log).records()}
    except IntegrityError as err:
        return [f"records not checked: {err}"]
    problems = []
    ids = {s.sample_id for s in manifest.samples}
    for rec in records.values():
        if rec.run_id != manifest.run_id:
            continue
        if rec.policy_sha256 not in (None, manifest.policy.sha256):
            problems.append(
                f"run {manifest.run_id} was judged under policy {rec.policy_id} "
                f"({str(rec.policy_sha256)[:12]}…), "
                f"the manifest records {manifest.policy.id} ({manifest.policy.sha256[:12]}…)"
            )
            break
    for rec in records.values():
        if (
            rec.run_id == manifest.run_id
            and rec.verdict == "pass"
            and rec.sample_id is not None
            and not bundle_schema.UNEXPORTED_ID_RE.match(rec.sample_id)
            and rec.sample_id not in ids
        ):
            problems.append(
                f"sample {rec.sample_id}: the audit log records it passed and exported in run "
                f"{manifest.run_id}, the bundle lacks it (deleted sample)"
            )
    for sample in manifest.samples:
        rec = records.get(sample.audit_hash)
        short = sample.audit_hash[:12]
        if rec is None:
            problems.append(f"sample {sample.sample_id}: its audit record {short}… is not in the log")
        elif (rec.verdict, rec.run_id, rec.candidate_sha256) != (
            "pass",
            manifest.run_id,
            sample.candidate_sha256,
        ):
            problems.append(
                f"sample {sample.sample_id}: audit record {short}… is not a pass of run "
                f"{manifest.run_id} for these voxels"
            )
    return problems


def _redecide(
    bundle_dir: Path,
    manifest: BundleManifest,
    policy: LoadedPolicy,
    index: TrainingIndex,
    encoder: EmbeddingModel,
    foreign: dict[str, list[str]],
) -> list[SampleResult]:
    options = ReadOptions(pseudonymizer=Pseudonymizer(key=READ_KEY))
    results = []
    for sample in manifest.samples:
        result = SampleResult(sample.sample_id)
        results.append(result)
        if sample.sample_id in foreign:
            result.problems += foreign[sample.sample_id]
            result.ok, result.verdict, result.integrity = False, "error", True
            continue
        volumes: list[tuple[Path, Volume]] = []
        sources = sample_sources(bundle_dir, sample.files)
        if not sources:
            result.problems.append("no readable sample file is listed")
        for source in sources:
            try:
                for vol in read_volumes(source, options):
                    volumes.append((source, vol))
            except GateError as err:
                result.problems.append(f"unreadable: {err}")
        if result.problems:
            result.ok, result.verdict = False, "error"
            continue
        for source, vol in volumes:
            try:
                check_in_domain(vol, index.domain)
            except GateError as err:
                result.problems.append(str(err).replace(str(source), source.name))
        if result.problems:
            result.ok, result.verdict = False, "error"
            continue
        for source, vol in volumes:
            nifti = source.name.endswith((".nii", ".nii.gz"))
            if nifti and sha256_voxels(vol.data) != sample.candidate_sha256:
                result.problems.append(f"{source.name}: voxels differ from the recorded candidate_sha256")
                result.integrity = True
        probes = embed_volumes([v for _, v in volumes], encoder)
        found = index.search_many(
            [p.embedding for p in probes], [p.voxel_sha256 for p in probes], k=policy.policy.k
        )
        k = policy.policy.k
        search = grid_search(encoder, index)
        found = verify_all(index.verifier, found, [v for _, v in volumes], search, k)
        decisions = [decide(n, policy, index.calibration, index.verification) for n in found]
        for (source, _), decision in zip(volumes, decisions, strict=True):
            if not decision.passed:
                result.problems.append(
                    f"{source.name}: {decision.verdict.value} under policy {policy.id} "
                    f"({decision.grade.value}, similarity {decision.similarity:.4f}, threshold "
                    f"{decision.threshold:.4f}{EXACT_NOTE if decision.exact_duplicate else ''})"
                )
        worst = max(decisions, key=lambda d: (VERDICT_SEVERITY[d.verdict], d.similarity))
        result.verdict, result.grade = worst.verdict.value, worst.grade.value
        result.similarity, result.threshold = worst.similarity, worst.threshold
        result.exact_duplicate = any(d.exact_duplicate for d in decisions)
        result.ok = not result.problems
    return results


def write_reports(report: PublicationReport, json_path: Path | None, junit_path: Path | None) -> None:
    """Write the JSON report and / or the JUnit XML, each atomically."""
    if json_path is not None:
        write_atomic(json_path, (json.dumps(report.to_json(), indent=1) + "\n").encode("utf-8"))
    if junit_path is not None:
        write_atomic(junit_path, report.to_junit())
