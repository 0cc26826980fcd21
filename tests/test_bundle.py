from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
from pathlib import Path

import pytest

from gate.audit import AuditEntry, AuditLog, verify_log
from gate.bundle import (
    DATA_CARD_FILE,
    MANIFEST_FILE,
    BundleWriter,
    PassedSample,
    Provenance,
    check_files,
    list_files,
    read_manifest,
    write_bundle,
)
from gate.digest import sha256_voxels
from gate.errors import IntegrityError, UsageError
from gate.exporters import ExportRefusedError
from gate.index import embed_volumes
from gate.values import Decision, Grade, Verdict
from tests.bundle_helpers import (
    GENERATOR_SHA,
    PROVIDER,
    RUN_ID,
    Training,
    candidate,
    make_training,
    release_policy_text,
    run_pipeline,
    write_policy,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Training, Path, Path, dict[str, Verdict]]:
    root = tmp_path_factory.mktemp("bundle")
    training = make_training(root)
    policy = write_policy(root / "pol", "release", release_policy_text())
    cands = [(f"s-{i:03d}", 100 + i, candidate(100 + i)) for i in range(3)]
    cands.append(("s-copy", 7, training.volumes[1]))  # an exact copy: rejected, never exported
    log_path = root / "audit.jsonl"
    bundle, verdicts = run_pipeline(
        training, policy, root / "out" / "bundle", log_path, cands, ("nifti", "dicom")
    )
    return training, bundle, log_path, verdicts


def test_layout_manifest_and_anchor(world: tuple[Training, Path, Path, dict[str, Verdict]]) -> None:
    training, bundle, log_path, verdicts = world
    assert verdicts == {"s-000": "pass", "s-001": "pass", "s-002": "pass", "s-copy": "reject"}
    files = list_files(bundle)
    assert MANIFEST_FILE in files and DATA_CARD_FILE in files
    assert "samples/s-000.nii.gz" in files and "samples/s-000_dicom/slice_0000.dcm" in files
    assert not any("s-copy" in f for f in files)
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no partial bundle left
    manifest = read_manifest(bundle)
    assert check_files(bundle, manifest) == []
    assert [s.sample_id for s in manifest.samples] == ["s-000", "s-001", "s-002"]
    assert [s.seed for s in manifest.samples] == [100, 101, 102]
    assert manifest.samples[0].candidate_sha256 == sha256_voxels(candidate(100).data)
    assert manifest.samples[0].decision.verdict is Verdict.PASS
    assert manifest.policy.id == "release" and manifest.policy.loaded().policy.k == 2
    assert (manifest.encoder_sha256, manifest.index_sha256) == (
        training.encoder.sha256,
        training.index.sha256,
    )
    assert manifest.generator_sha256 == GENERATOR_SHA and manifest.provider == PROVIDER
    assert "numpy" in manifest.library_versions and "pydicom" in manifest.library_versions
    assert manifest.stats.candidates == 4 and manifest.stats.verdicts == {
        "pass": 3,
        "flag": 0,
        "reject": 1,
        "error": 0,
    }
    assert manifest.stats.exact_duplicates == 1 and manifest.stats.similarity_max == pytest.approx(
        1.0, abs=1e-5
    )
    head = AuditLog(log_path).head_position()
    assert (manifest.audit.head_hash, manifest.audit.head_seq) == head and manifest.audit.run_records == 4
    assert verify_log(log_path, anchors=[head]).ok


def test_data_card(world: tuple[Training, Path, Path, dict[str, Verdict]]) -> None:
    card = (world[1] / DATA_CARD_FILE).read_text()
    for needle in (
        "CC-BY-SA 4.0",
        "Task04 Hippocampus",
        "shared alike under CC-BY-SA 4.0",
        "Policy `release`",
        "| 4 | 3 | 0 | 1 | 0 | 1 |",
        "Synthetic data.",
        f"sha256 `{GENERATOR_SHA}`",
    ):
        assert needle in card, needle


def all_bytes(bundle: Path) -> bytes:
    """Every file's bytes, gzip members also decompressed."""
    out = []
    for rel in list_files(bundle):
        raw = (bundle / rel).read_bytes()
        out.append(raw)
        if rel.endswith(".gz"):
            out.append(gzip.decompress(raw))
    return b"\n".join(out)


def test_bundle_holds_no_training_data_ids_or_embeddings(
    world: tuple[Training, Path, Path, dict[str, Verdict]],
) -> None:
    training, bundle, log_path, _ = world
    blob = all_bytes(bundle)
    needles: dict[str, bytes] = {}
    for row in training.index.manifest.rows:
        needles[f"patient id {row.patient_id}"] = row.patient_id.encode()
        needles[f"training file sha {row.file_sha256[:12]}"] = row.file_sha256.encode()
        needles[f"training voxel sha {row.voxel_sha256[:12]}"] = row.voxel_sha256.encode()
    for i, vol in enumerate(training.volumes):
        needles[f"training voxels {i}"] = vol.data.tobytes()[4096:4160]
        needles[f"training voxels {i} (NIfTI order)"] = vol.data.tobytes(order="F")[4096:4160]
        needles[f"training path {i}"] = Path(vol.source).name.encode()
    for i, vec in enumerate(training.index.vectors):
        needles[f"index vector {i}"] = vec.tobytes()
    probes = embed_volumes([candidate(100 + i) for i in range(3)], training.encoder)
    for i, p in enumerate(probes):
        needles[f"candidate embedding {i}"] = p.embedding.vector.tobytes()
    needles["index vectors file"] = (training.index_dir / "vectors.npy").read_bytes()[-64:]
    needles["index sha is fine, but not the index manifest"] = b'"rows"'
    for rec in AuditLog(log_path).records():
        needles[f"audit record hash of {rec.sample_id} is fine, but not its nearest id"] = (
            rec.nearest_patient_id or ""
        ).encode()
    found = [name for name, needle in needles.items() if needle and needle in blob]
    assert found == []
    # the scan can fail: it does find the exported samples' own voxels (inside the .nii.gz)
    assert candidate(100).data.tobytes(order="F")[4096:4160] in blob


def test_refuses_to_overwrite(world: tuple[Training, Path, Path, dict[str, Verdict]], tmp_path: Path) -> None:
    _, bundle, log_path, _ = world
    before = (bundle / MANIFEST_FILE).read_bytes()
    provenance = Provenance(
        "g", GENERATOR_SHA, "e" * 64, "i" * 64, PROVIDER, read_manifest(bundle).policy.loaded()
    )
    with pytest.raises(
        UsageError, match=re.escape(f"{bundle}: already exists; bundles are never overwritten")
    ):
        BundleWriter(bundle, RUN_ID, provenance, AuditLog(log_path))
    assert (bundle / MANIFEST_FILE).read_bytes() == before


@pytest.fixture
def small(tmp_path: Path) -> tuple[Training, Provenance, AuditLog]:
    training = make_training(tmp_path)
    policy = write_policy(tmp_path / "pol", "release", release_policy_text())
    prov = Provenance("g", GENERATOR_SHA, training.encoder.sha256, training.index.sha256, PROVIDER, policy)
    return training, prov, AuditLog(tmp_path / "audit.jsonl")


def passed(prov: Provenance, seed: int = 100) -> Decision:
    return Decision(
        Verdict.PASS, Grade.DIFFERENT, "p-00000000000000aa", 0.2, 0.97, prov.policy.id, prov.policy.sha256
    )


def test_interrupted_build_leaves_nothing(
    small: tuple[Training, Provenance, AuditLog], tmp_path: Path
) -> None:
    _, prov, audit = small
    vol, dec = candidate(100), passed(prov)
    h = audit.append(AuditEntry.for_decision(RUN_ID, dec, sha256_voxels(vol.data), PROVIDER))
    out = tmp_path / "out" / "b"
    with pytest.raises(KeyboardInterrupt), BundleWriter(out, RUN_ID, prov, audit) as writer:
        writer.add(vol, dec, "s-000", 100, h)
        raise KeyboardInterrupt
    assert list((tmp_path / "out").iterdir()) == []


def test_write_bundle_function(small: tuple[Training, Provenance, AuditLog], tmp_path: Path) -> None:
    _, prov, audit = small
    items = []
    for i in range(2):
        vol, dec = candidate(100 + i), passed(prov)
        h = audit.append(AuditEntry.for_decision(RUN_ID, dec, sha256_voxels(vol.data), PROVIDER))
        items.append(PassedSample(vol, dec, f"s-{i}", 100 + i, h))
    path = write_bundle(tmp_path / "b", RUN_ID, prov, audit, items)
    assert [s.sample_id for s in read_manifest(path).samples] == ["s-0", "s-1"]


def test_add_refusals(small: tuple[Training, Provenance, AuditLog], tmp_path: Path) -> None:
    _, prov, audit = small
    vol, dec = candidate(100), passed(prov)
    rejected = dataclasses.replace(dec, verdict=Verdict.REJECT, grade=Grade.DUPLICATE)
    other_policy = dataclasses.replace(dec, policy_id="loose", policy_sha256="c" * 64)
    out = tmp_path / "b"
    with BundleWriter(out, RUN_ID, prov, audit) as writer:
        with pytest.raises(
            ExportRefusedError, match="sample s-0: decision is reject; only a pass may be exported"
        ):
            writer.add(vol, rejected, "s-0", 1, "0" * 64)
        with pytest.raises(
            ExportRefusedError, match=re.escape("sample s-0: decided under policy loose (cccccccccccc…)")
        ):
            writer.add(vol, other_policy, "s-0", 1, "0" * 64)
        with pytest.raises(
            ExportRefusedError,
            match=re.escape(
                f"sample s-0: no flushed pass record 000000000000… of run {RUN_ID} for these voxels"
            ),
        ):
            writer.add(vol, dec, "s-0", 1, "0" * 64)  # the audit record was never appended
        h_reject = audit.append(AuditEntry.for_decision(RUN_ID, rejected, sha256_voxels(vol.data), PROVIDER))
        with pytest.raises(ExportRefusedError, match="no flushed pass record"):
            writer.add(vol, dec, "s-0", 1, h_reject)  # a record exists, but it is not a pass
        h = audit.append(AuditEntry.for_decision(RUN_ID, dec, sha256_voxels(vol.data), PROVIDER))
        with pytest.raises(ExportRefusedError, match="no flushed pass record"):
            writer.add(candidate(999), dec, "s-0", 1, h)  # a pass record, but for other voxels
        writer.add(vol, dec, "s-0", 1, h)
        with pytest.raises(UsageError, match="sample id 's-0' is already in the bundle"):
            writer.add(vol, dec, "s-0", 1, h)
        writer.finish()
    assert len(read_manifest(out).samples) == 1


def test_unknown_format_and_bad_manifest(
    small: tuple[Training, Provenance, AuditLog], tmp_path: Path
) -> None:
    _, prov, audit = small
    with pytest.raises(
        UsageError, match=re.escape("unknown export format(s) ['png']; expected some of nifti, dicom")
    ):
        BundleWriter(tmp_path / "b", RUN_ID, dataclasses.replace(prov, formats=("png",)), audit)
    fake = tmp_path / "fake"
    fake.mkdir()
    with pytest.raises(
        IntegrityError, match=re.escape(f"{fake / MANIFEST_FILE}: not found; expected a bundle")
    ):
        read_manifest(fake)
    (fake / MANIFEST_FILE).write_text(json.dumps({"format_version": 2, "kind": "gate-bundle"}))
    with pytest.raises(IntegrityError, match="invalid manifest at run_id: Field required"):
        read_manifest(fake)
    (fake / MANIFEST_FILE).write_text(json.dumps({"format_version": 7}))
    with pytest.raises(IntegrityError, match="format_version 7; this gate reads 2"):
        read_manifest(fake)


def test_stale_partials_of_dead_writers_are_removed(tmp_path: Path) -> None:
    import subprocess

    from gate.bundle import remove_stale_partials

    proc = subprocess.Popen(["sleep", "0"])  # a finished process: its pid is free
    proc.wait()
    stale = tmp_path / f".gate-r1.partial-{proc.pid}-abc"
    live = tmp_path / f".gate-r2.partial-{os.getpid()}-def"
    old = tmp_path / ".gate-r3.partial-xyz"  # no pid: an older gate's, kept
    for d in (stale, live, old):
        (d / "samples").mkdir(parents=True)
    (stale / "manifest.json").write_text("{}")
    assert remove_stale_partials(tmp_path) == [stale]
    assert not stale.exists() and live.is_dir() and old.is_dir()


def test_keys_init_private_key_mode_and_place(tmp_path: Path) -> None:
    import stat

    from click.testing import CliRunner

    from gate.cli import main
    from gate.signing import init_keys, load_public_key

    folder = tmp_path / "keys"
    result = CliRunner().invoke(main, ["keys", "init", "--dir", str(folder)])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((folder / "site.key").stat().st_mode) == 0o600
    load_public_key(folder / "site.pub")
    result = CliRunner().invoke(main, ["keys", "init", "--dir", str(folder)])
    assert result.exit_code == 2 and "a site key exists; give --force to replace it" in result.output
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    with pytest.raises(UsageError, match="inside a git repository; keep the site key outside"):
        init_keys(tmp_path / "repo" / "keys")
