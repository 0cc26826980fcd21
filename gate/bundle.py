"""The export bundle: passed samples, a manifest of every file's sha256, and a data card.

Layout of a finished bundle (the folder name is the caller's)::

    <bundle>/
      manifest.json            BundleManifest: files, samples, provenance, audit anchor, stats
      DATA_CARD.md             how it was made, the policy, memorization statistics, licence
      samples/<id>.nii.gz      one per sample and format (NIfTI)
      samples/<id>_dicom/...   (DICOM series, one file per slice)

A bundle is built in a hidden temporary folder beside its final path and renamed into place by
:meth:`BundleWriter.finish`, so an interrupted run leaves no partial bundle where a finished one
is expected; an existing path is never overwritten. It never holds training images, the
index, embeddings, neighbour ids or patient ids: only the samples, their own digests and
decision summaries (verdict, grade, similarity, threshold), and the audit log's head hash.

How the generate pipeline uses it (one run)::

    audit = AuditLog(log_path)
    with BundleWriter(out_dir, run_id, provenance, audit) as bundle:
        for each candidate:
            decision = decide(...)                   # or an error
            h = audit.append(AuditEntry.for_decision(run_id, decision, sha256_voxels(vol.data),
                                                     provider, sample_id=sid, seed=seed, ...))
            if decision.passed:
                bundle.add(vol, decision, sid, seed, audit_hash=h)   # after the fsync'd append
        bundle.finish()        # manifest + data card, then rename into place; returns the path

or, with the passed items collected, :func:`write_bundle`. Leaving the ``with`` block by an
exception (or without ``finish``) removes the temporary folder: nothing is published.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gate import __version__, bundle_schema
from gate.audit import AuditLog, AuditRecord, sign_head
from gate.datacard import TRAINING_DATA_NOTICE, data_card
from gate.digest import sha256_file, sha256_voxels
from gate.errors import IntegrityError, UsageError
from gate.exporters import EXPORTERS
from gate.exporters.base import PUBLISHED_DIR_MODE, ExportRefusedError
from gate.policy import LoadedPolicy, Policy
from gate.signing import SigningKey
from gate.values import Decision, Grade, Verdict, Volume

log = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 2
"""The manifest layout this code writes and reads."""

MANIFEST_FILE = bundle_schema.MANIFEST_FILE
DATA_CARD_FILE = bundle_schema.DATA_CARD_FILE
SAMPLES_DIR = bundle_schema.SAMPLES_DIR

LIBRARIES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "hnswlib",
    "pydicom",
    "nibabel",
    "pydantic",
    "torch",
    "monai",
)
"""Distributions whose versions a manifest records (read from metadata; nothing is imported)."""


class FileEntry(BaseModel):
    """One file of the bundle (every file but ``manifest.json`` is listed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class DecisionSummary(BaseModel):
    """A sample's decision without the neighbour's identity."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    verdict: Verdict
    grade: Grade
    similarity: float
    threshold: float
    exact_duplicate: bool


class SampleEntry(BaseModel):
    """One published sample.

    Attributes:
        sample_id: its public name.
        seed: the generator seed.
        candidate_sha256: :func:`gate.digest.sha256_voxels` of its float32 voxels.
        audit_hash: hash of its audit record (in the internal log).
        files: its paths (relative to the bundle, ``/``-separated), every format.
        decision: verdict, grade, similarity, threshold.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_id: str
    seed: int | None
    candidate_sha256: str
    audit_hash: str
    files: tuple[str, ...]
    decision: DecisionSummary


class PolicyRecord(BaseModel):
    """The policy a bundle was gated with: id, file sha256 and its validated content."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    sha256: str
    content: dict[str, Any]

    def loaded(self) -> LoadedPolicy:
        """Rebuild the policy for comparison (``at_least_as_strict``).

        Raises:
            IntegrityError: the recorded content is not a valid policy.

        """
        try:
            return LoadedPolicy(policy=Policy.model_validate(self.content), id=self.id, sha256=self.sha256)
        except ValidationError as err:
            raise IntegrityError(f"manifest policy {self.id}: recorded content is not a policy") from err


class AuditAnchor(BaseModel):
    """The audit log's head when the bundle was finished: the bundle anchors the log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    head_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    head_seq: int = Field(ge=-1)
    run_records: int = Field(ge=0)


class MemorizationStats(BaseModel):
    """What the gate saw in this run (from its audit records): counts and similarities."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    candidates: int
    verdicts: dict[str, int]
    exact_duplicates: int
    similarity_min: float | None
    similarity_median: float | None
    similarity_p95: float | None
    similarity_max: float | None
    passed_similarity_max: float | None


class MemorizationRecord(BaseModel):
    """Dar et al.'s memorization statistics of the run (shares and counts, no ids).

    Recorded in the (signed) manifest; ``memorization.json`` is :func:`memorization_document` of
    it, so the verifier regenerates the file from the manifest and compares bytes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    candidates: int = Field(ge=0)
    copy_share: float = Field(ge=0.0, le=1.0)
    patients_copied: int = Field(ge=0)
    training_patients: int = Field(ge=0)
    patients_copied_share: float = Field(ge=0.0, le=1.0)
    verdict_grades: dict[str, int]


MEMORIZATION_DEFINITIONS = {
    "copy_share": "candidates rejected with grade duplicate / candidates",
    "patients_copied_share": "distinct nearest training patients of duplicate-grade "
    "candidates / distinct patients in the index",
}
"""What the two shares in ``memorization.json`` mean (written into the file)."""


def memorization_document(record: MemorizationRecord) -> bytes:
    """The exact bytes of ``memorization.json`` for ``record`` (writer and verifier both use this)."""
    data = record.model_dump(mode="json") | {"definitions": MEMORIZATION_DEFINITIONS}
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8")


class BundleManifest(BaseModel):
    """``manifest.json``: everything that identifies and reproduces a bundle. No ids, no paths."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gate-bundle"] = "gate-bundle"
    format_version: int
    run_id: str
    created: str
    gate_version: str
    generator_name: str
    generator_sha256: str
    encoder_sha256: str
    index_sha256: str
    provider: str
    policy: PolicyRecord
    formats: tuple[str, ...]
    library_versions: dict[str, str]
    audit: AuditAnchor
    stats: MemorizationStats
    memorization: MemorizationRecord | None = None
    samples: tuple[SampleEntry, ...]
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class Provenance:
    """What produced a run's samples; recorded in the manifest and data card.

    Attributes:
        generator_name: e.g. ``MONAI 3D latent diffusion``.
        generator_sha256: digest of the generator's weights.
        encoder_sha256: the gate encoder's digest.
        index_sha256: the training index file's digest.
        provider: the onnxruntime execution provider that embedded the candidates.
        policy: the policy every sample passed.
        formats: exporter names (keys of ``gate.exporters.EXPORTERS``).
        training_data: licence and credit of the training data.
        signer: the site key that signs ``manifest.json`` (``manifest.sig``); None: unsigned.

    """

    generator_name: str
    generator_sha256: str
    encoder_sha256: str
    index_sha256: str
    provider: str
    policy: LoadedPolicy
    formats: tuple[str, ...] = ("nifti",)
    training_data: str = TRAINING_DATA_NOTICE
    signer: SigningKey | None = None


@dataclass(frozen=True)
class PassedSample:
    """One item for :func:`write_bundle`: a passed candidate and its flushed audit record's hash."""

    volume: Volume
    decision: Decision
    sample_id: str
    seed: int | None
    audit_hash: str


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`LIBRARIES` (``not installed`` when absent)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(Path(dirpath) / name, "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_files(root: Path) -> list[str]:
    """Every file under ``root`` (hidden ones included) as sorted ``/``-separated relative paths."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            out.append((Path(dirpath) / name).relative_to(root).as_posix())
    return sorted(out)


class BundleWriter:
    """Builds one bundle in a temporary folder; :meth:`finish` renames it into place.

    Args:
        out_dir: the bundle's final path; must not exist (bundles are never overwritten).
        run_id: the run whose audit records the bundle anchors.
        provenance: generator, encoder, index, provider, policy, formats, licence.
        audit: the run's audit log; every sample's record must be in it before :meth:`add`.

    Raises:
        UsageError: ``out_dir`` exists, or an unknown format.

    """

    def __init__(self, out_dir: Path, run_id: str, provenance: Provenance, audit: AuditLog) -> None:
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise UsageError(
                f"{self.out_dir}: already exists; bundles are never overwritten; choose a new --out"
            )
        unknown = [f for f in provenance.formats if f not in EXPORTERS]
        if unknown or not provenance.formats:
            raise UsageError(
                f"unknown export format(s) {unknown or '(none)'}; expected some of {', '.join(EXPORTERS)}"
            )
        if _inside_audit_dir(self.out_dir, audit.path):
            raise UsageError(f"{self.out_dir}: a bundle must not contain the audit log {audit.path}")
        self.run_id = run_id
        self.provenance = provenance
        self.audit = audit
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-{os.getpid()}-", dir=self.out_dir.parent)
        )
        os.chmod(self.tmp, PUBLISHED_DIR_MODE)
        (self.tmp / SAMPLES_DIR).mkdir()
        self.samples: list[SampleEntry] = []
        self._records: dict[str, AuditRecord] = {}
        self._done = False

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.abort()

    def _record(self, audit_hash: str) -> AuditRecord | None:
        if audit_hash not in self._records:
            self._records = {r.hash: r for r in self.audit.records() if r.run_id == self.run_id}
        return self._records.get(audit_hash)

    def add(
        self, volume: Volume, decision: Decision, sample_id: str, seed: int | None, audit_hash: str
    ) -> list[Path]:
        """Export one passed sample in every format, after checking its audit record.

        Args:
            volume: the sample's voxels.
            decision: its decision (must be a pass under the bundle's policy).
            sample_id: its public name (see :data:`gate.exporters.base.SAMPLE_ID_PATTERN`).
            seed: the generator seed, recorded in the manifest.
            audit_hash: what :meth:`AuditLog.append` returned for this candidate's record.

        Returns:
            The written paths (inside the temporary folder until :meth:`finish`).

        Raises:
            ExportRefusedError: not a pass, another policy, or no matching flushed audit record.
            UsageError: duplicate sample id, bad id.

        """
        if self._done:
            raise UsageError("bundle already finished or aborted; start a new BundleWriter")
        if not decision.passed:
            raise ExportRefusedError(
                f"sample {sample_id}: decision is {decision.verdict.value}; only a pass may be exported"
            )
        policy = self.provenance.policy
        if (decision.policy_id, decision.policy_sha256) != (policy.id, policy.sha256):
            raise ExportRefusedError(
                f"sample {sample_id}: decided under policy {decision.policy_id} "
                f"({decision.policy_sha256[:12]}…), "
                f"but the bundle is gated by {policy.id} ({policy.sha256[:12]}…)"
            )
        if any(s.sample_id == sample_id for s in self.samples):
            raise UsageError(f"sample id {sample_id!r} is already in the bundle; sample ids must be unique")
        voxel_sha = sha256_voxels(volume.data)
        record = self._record(audit_hash)
        if record is None or record.verdict != "pass" or record.candidate_sha256 != voxel_sha:
            raise ExportRefusedError(
                f"sample {sample_id}: no flushed pass record {audit_hash[:12]}… of run {self.run_id} "
                "for these voxels in the audit log; append the record before exporting"
            )
        written: list[Path] = []
        for fmt in self.provenance.formats:
            written.extend(EXPORTERS[fmt]().write(volume, decision, sample_id, self.tmp / SAMPLES_DIR))
        self.samples.append(
            SampleEntry(
                sample_id=sample_id,
                seed=seed,
                candidate_sha256=voxel_sha,
                audit_hash=audit_hash,
                files=tuple(p.relative_to(self.tmp).as_posix() for p in written),
                decision=DecisionSummary(
                    verdict=decision.verdict,
                    grade=decision.grade,
                    similarity=decision.similarity,
                    threshold=decision.threshold,
                    exact_duplicate=decision.exact_duplicate,
                ),
            )
        )
        return written

    def finish(self, memorization: MemorizationRecord | None = None) -> Path:
        """Write the data card and manifest, fsync everything, rename into place.

        Args:
            memorization: the run's memorization statistics; written as ``memorization.json``
                and recorded in the manifest (None: neither).

        Returns:
            The final bundle path.

        Raises:
            UsageError: the final path appeared meanwhile (the temporary folder is removed).

        """
        if self._done:
            raise UsageError("bundle already finished or aborted")
        try:
            head_hash, head_seq = self.audit.head_position()
            records = [r for r in self.audit.records() if r.run_id == self.run_id]
            stats = memorization_stats(records)
            p = self.provenance
            (self.tmp / DATA_CARD_FILE).write_bytes(
                data_card(self.run_id, p, stats, len(self.samples)).encode("utf-8")
            )
            if memorization is not None:
                (self.tmp / bundle_schema.MEMORIZATION_FILE).write_bytes(memorization_document(memorization))
            files = tuple(
                FileEntry(path=rel, sha256=sha256_file(self.tmp / rel), bytes=(self.tmp / rel).stat().st_size)
                for rel in list_files(self.tmp)
            )
            manifest = BundleManifest(
                format_version=BUNDLE_FORMAT_VERSION,
                run_id=self.run_id,
                created=_now(),
                gate_version=__version__,
                generator_name=p.generator_name,
                generator_sha256=p.generator_sha256,
                encoder_sha256=p.encoder_sha256,
                index_sha256=p.index_sha256,
                provider=p.provider,
                policy=PolicyRecord(
                    id=p.policy.id, sha256=p.policy.sha256, content=p.policy.policy.model_dump(mode="json")
                ),
                formats=p.formats,
                library_versions=library_versions(),
                audit=AuditAnchor(head_hash=head_hash, head_seq=head_seq, run_records=len(records)),
                stats=stats,
                memorization=memorization,
                samples=tuple(self.samples),
                files=files,
            )
            text = json.dumps(manifest.model_dump(mode="json"), indent=1) + "\n"
            (self.tmp / MANIFEST_FILE).write_text(text)
            if p.signer is not None:
                (self.tmp / bundle_schema.SIGNATURE_FILE).write_bytes(p.signer.sign(text.encode("utf-8")))
                sign_head(self.audit, p.signer)  # the run's end: the head the manifest anchors
            _fsync_tree(self.tmp)
            if self.out_dir.exists():
                raise UsageError(f"{self.out_dir}: appeared while the bundle was built; not overwritten")
            os.rename(self.tmp, self.out_dir)
            _fsync_dir(self.out_dir.parent)
        except BaseException:
            self.abort()
            raise
        self._done = True
        log.info("bundle %s: %d samples", self.out_dir, len(self.samples))
        return self.out_dir

    def abort(self) -> None:
        """Remove the temporary folder; nothing is published."""
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)


def write_bundle(
    out_dir: Path, run_id: str, provenance: Provenance, audit: AuditLog, items: Iterable[PassedSample]
) -> Path:
    """Export passed samples whose audit records are already flushed, as one finished bundle.

    Args:
        out_dir: the bundle's final path (must not exist).
        run_id: the run.
        provenance: see :class:`Provenance`.
        audit: the log holding every item's record (``item.audit_hash``).
        items: passed samples.

    Returns:
        The bundle path.

    Raises:
        ExportRefusedError: an item that is not a pass or lacks its audit record (nothing is
            published: the temporary folder is removed).

    """
    with BundleWriter(out_dir, run_id, provenance, audit) as writer:
        for item in items:
            writer.add(item.volume, item.decision, item.sample_id, item.seed, item.audit_hash)
        return writer.finish()


def _now() -> str:
    from gate.audit import utc_now

    return utc_now()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _inside_audit_dir(out_dir: Path, log_path: Path) -> bool:
    """Return True when the audit log would end up inside the bundle."""
    try:
        log_path.resolve().relative_to(out_dir.resolve())
    except ValueError:
        return False
    return True


def memorization_stats(records: Sequence[AuditRecord]) -> MemorizationStats:
    """Count verdicts and take similarity quantiles and similarity quantiles of one run's audit records."""
    sims = np.asarray([r.similarity for r in records if r.similarity is not None], dtype=np.float64)
    passed = [r.similarity for r in records if r.verdict == "pass" and r.similarity is not None]

    def q(p: float) -> float | None:
        return round(float(np.percentile(sims, p)), 6) if sims.size else None

    return MemorizationStats(
        candidates=len(records),
        verdicts={v: sum(r.verdict == v for r in records) for v in ("pass", "flag", "reject", "error")},
        exact_duplicates=sum(r.exact_duplicate for r in records),
        similarity_min=q(0),
        similarity_median=q(50),
        similarity_p95=q(95),
        similarity_max=q(100),
        passed_similarity_max=round(max(passed), 6) if passed else None,
    )


def read_manifest(bundle_dir: Path) -> BundleManifest:
    """Read and validate ``<bundle_dir>/manifest.json``.

    Raises:
        IntegrityError: missing, unreadable, of another format, or invalid.

    """
    path = Path(bundle_dir) / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(f"{path}: not found; expected a bundle written by gate")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path}: unreadable JSON ({err})") from err
    if not isinstance(data, dict) or data.get("format_version") != BUNDLE_FORMAT_VERSION:
        found = data.get("format_version") if isinstance(data, dict) else None
        raise IntegrityError(f"{path}: format_version {found!r}; this gate reads {BUNDLE_FORMAT_VERSION}")
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise IntegrityError(f"{path}: invalid manifest at {where}: {first['msg']}") from err


def check_files(bundle_dir: Path, manifest: BundleManifest) -> list[str]:
    """Compare the bundle's files with the manifest and with :mod:`gate.bundle_schema`.

    Sizes are compared (``lstat``) before anything is hashed; only regular files at the
    schema's paths, each owned by a manifest sample or a bundle document, are accepted.

    Returns:
        One line per problem. Empty when everything matches.

    """
    root = Path(bundle_dir)
    problems = []
    if bundle_schema.is_partial(root):
        problems.append(f"{root.name}: a partial folder left by gate generate, never a bundle")
    on_disk, walk_problems = bundle_schema.walk(root)
    problems += walk_problems
    listed: dict[str, FileEntry] = {}
    for f in manifest.files:
        why = bundle_schema.path_problem(f.path)
        if why:
            problems.append(f"{f.path!r}: manifest path {why}; refused")
        elif f.path in listed:
            problems.append(f"{f.path}: listed twice in the manifest")
        else:
            listed[f.path] = f
    owned: dict[str, str] = {}
    for sample in manifest.samples:
        for rel in sample.files:
            why = bundle_schema.path_problem(rel)
            if why:
                problems.append(f"{rel!r}: sample {sample.sample_id} path {why}; refused")
                continue
            owner = bundle_schema.sample_file_owner(rel)
            if owner is None or owner[0] != sample.sample_id:
                problems.append(
                    f"{rel}: not a file name gate's exporters write for sample {sample.sample_id}"
                )
            owned[rel] = sample.sample_id
            if rel not in listed:
                problems.append(f"{rel}: sample {sample.sample_id} file not in the manifest's file list")
    for rel, entry in listed.items():
        st = on_disk.get(rel)
        if rel not in owned and rel not in bundle_schema.DOCUMENTS:
            problems.append(f"{rel}: owned by no sample and not a bundle document (foreign file)")
        if st is None:
            if rel not in {p.split(":")[0] for p in walk_problems}:
                problems.append(f"{rel}: listed in the manifest but missing")
        elif st.st_size != entry.bytes:
            problems.append(f"{rel}: {st.st_size} bytes, the manifest says {entry.bytes} (file was modified)")
        elif sha256_file(root / rel) != entry.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest (file was modified)")
    for rel in on_disk:
        if rel not in bundle_schema.UNLISTED and rel not in listed:
            problems.append(f"{rel}: not listed in the manifest (unlisted file)")
    return problems


def remove_stale_partials(out_root: Path) -> list[Path]:
    """Remove the partial folders (``.<name>.partial-<pid>-*``) of writers that are gone.

    A folder whose pid is alive on this machine (a running ``gate generate``) is kept, and so is
    one whose name carries no pid (an older gate's: removed by hand).

    Returns:
        The folders removed.

    """
    removed: list[Path] = []
    root = Path(out_root)
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if not bundle_schema.is_partial(entry) or entry.is_symlink() or not entry.is_dir():
            continue
        pid = bundle_schema.partial_pid(entry)
        if pid is None or _alive(pid):
            continue
        shutil.rmtree(entry)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_bundle_root(path: Path) -> Path | None:
    """Return the bundle (a folder with a gate ``manifest.json``) containing ``path``, if any."""
    here = Path(path).resolve()
    for folder in (here, *here.parents):
        manifest = folder / MANIFEST_FILE
        if manifest.is_file():
            try:
                if json.loads(manifest.read_text()).get("kind") == "gate-bundle":
                    return folder
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
    return None
