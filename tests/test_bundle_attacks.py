"""The publication check against an attacker who edits a good bundle to carry training data out.

Every case starts from a fresh copy of one good, signed bundle (NIfTI + DICOM, 2 samples) and
its audit log, applies one attack, and keeps manifest.json consistent afterwards (sha256 and
byte counts recomputed, as the attacker would). Each must fail with its named reason and exit 3;
the untouched bundle passes. Reasons are checked with the signature check off (``public_key``
None) so each defence is shown on its own; one case shows the signature catches every edit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gate.errors import ExitCode
from gate.exporters.nifti import canonical_image
from gate.publication import PublicationReport, verify_bundle
from gate.signing import PUBLIC_KEY_FILE, load_or_create_signing_key, load_public_key
from tests.bundle_helpers import (
    Training,
    candidate,
    make_training,
    release_policy_text,
    run_pipeline,
    write_policy,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("attacks")
    training = make_training(root)
    policy = write_policy(root / "pol", "release", release_policy_text())
    loose = write_policy(
        root / "pol", "loose", release_policy_text(similar=0.99, duplicate=0.995, similar_action="flag")
    )
    signer = load_or_create_signing_key(root / "keys")
    cands = [(f"s-{i:03d}", 100 + i, candidate(100 + i)) for i in range(2)]
    good, _ = run_pipeline(
        training, policy, root / "good", root / "audit.jsonl", cands, ("nifti", "dicom"), signer=signer
    )
    return {
        "training": training,
        "good": good,
        "log": root / "audit.jsonl",
        "policy": policy,
        "loose": loose,
        "public": load_public_key(root / "keys" / PUBLIC_KEY_FILE),
    }


@pytest.fixture
def bundle(world: dict[str, Any], tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(world["good"], dst, symlinks=True)
    shutil.copy(world["log"], tmp_path / "audit.jsonl")
    shutil.copy(world["log"].with_name("audit.jsonl.heads"), tmp_path / "audit.jsonl.heads")
    return dst


def check(
    world: dict[str, Any], bundle: Path, public: Ed25519PublicKey | None = None, **kw: Any
) -> PublicationReport:
    training: Training = world["training"]
    return verify_bundle(
        bundle, world["policy"], training.index, training.encoder, bundle.parent / "audit.jsonl", public, **kw
    )


def manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def reseal(bundle: Path, data: dict[str, Any] | None = None, add: tuple[str, ...] = ()) -> None:
    """Recompute every file entry's sha256 and bytes (and list ``add``), as an attacker would."""
    data = manifest(bundle) if data is None else data
    paths = [f["path"] for f in data["files"]] + list(add)
    files = []
    for rel in paths:
        path = bundle / rel
        if path.is_file() and not os.path.isabs(rel) and ".." not in rel:
            blob = path.read_bytes()
            files.append({"path": rel, "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)})
        else:
            files.append({"path": rel, "sha256": "0" * 64, "bytes": 0})
    data["files"] = files
    (bundle / "manifest.json").write_text(json.dumps(data, indent=1) + "\n")


def reasons(report: PublicationReport) -> str:
    return "\n".join(report.reasons())


def assert_refused(report: PublicationReport, reason: str) -> None:
    assert report.exit_code is ExitCode.INPUT, reasons(report)
    assert reason in reasons(report), reasons(report)


def training_file(world: dict[str, Any]) -> Path:
    return world["training"].data_dir / "case_004.nii.gz"


def test_untouched_bundle_passes_signed(world: dict[str, Any], bundle: Path) -> None:
    report = check(world, bundle, world["public"])
    assert report.reasons() == [] and report.exit_code is ExitCode.OK


def test_any_edit_breaks_the_signature(world: dict[str, Any], bundle: Path) -> None:
    reseal(bundle)  # same content, other bytes (attacker re-wrote the manifest)
    data = manifest(bundle)
    data["samples"] = data["samples"][:1]
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert_refused(check(world, bundle, world["public"]), "signature does not match")


def test_unsigned_bundle_refused_when_a_key_is_given(world: dict[str, Any], bundle: Path) -> None:
    (bundle / "manifest.sig").unlink()
    assert_refused(check(world, bundle, world["public"]), "no signature (the bundle is unsigned)")


def test_foreign_training_nifti_listed_but_owned_by_no_sample(world: dict[str, Any], bundle: Path) -> None:
    shutil.copy(training_file(world), bundle / "samples" / "extra.nii.gz")
    reseal(bundle, add=("samples/extra.nii.gz",))
    assert_refused(check(world, bundle), "samples/extra.nii.gz: owned by no sample and not a bundle document")


def test_npy_attached_to_a_sample(world: dict[str, Any], bundle: Path) -> None:
    np.save(bundle / "samples" / "s-000.npy", world["training"].volumes[4].data)
    data = manifest(bundle)
    data["samples"][0]["files"].append("samples/s-000.npy")
    reseal(bundle, data, add=("samples/s-000.npy",))
    assert_refused(check(world, bundle), "samples/s-000.npy: not a file name gate's exporters write")


def test_training_file_appended_after_the_gzip_stream(world: dict[str, Any], bundle: Path) -> None:
    with open(bundle / "samples" / "s-000.nii.gz", "ab") as f:
        f.write(training_file(world).read_bytes())
    reseal(bundle)
    assert_refused(check(world, bundle), "after the gzip stream (trailing data)")


def test_training_file_in_a_nifti_header_extension(world: dict[str, Any], bundle: Path) -> None:
    path = bundle / "samples" / "s-000.nii.gz"
    img = nib.load(path)
    data, affine, header = np.asanyarray(img.dataobj), img.affine, img.header.copy()
    header.extensions.append(nib.nifti1.Nifti1Extension(40, training_file(world).read_bytes()))
    path.unlink()
    nib.save(nib.Nifti1Image(data, affine, header), path)
    assert np.array_equal(np.asanyarray(nib.load(path).dataobj), data)  # voxels unchanged
    reseal(bundle)
    assert_refused(check(world, bundle), "header extension or moved voxel offset")


def test_nifti_header_field_carries_data(world: dict[str, Any], bundle: Path) -> None:
    path = bundle / "samples" / "s-001.nii.gz"
    img = nib.load(path)
    data, header = np.asanyarray(img.dataobj).copy(), img.header.copy()
    header["aux_file"] = b"case_004 p-1234"
    path.unlink()
    nib.save(nib.Nifti1Image(data, img.affine, header), path)
    reseal(bundle)
    assert_refused(check(world, bundle), "header differs from what gate's exporter writes")


def dicom_slice(bundle: Path) -> Path:
    return bundle / "samples" / "s-000_dicom" / "slice_0003.dcm"


def test_dicom_real_identity(world: dict[str, Any], bundle: Path) -> None:
    path = dicom_slice(bundle)
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID = "Doe^Jane", "MRN-0042"
    ds.save_as(path, enforce_file_format=True)
    reseal(bundle)
    assert_refused(check(world, bundle), "slice_0003.dcm: PatientName is 'Doe^Jane'")


def test_dicom_private_tag_holding_a_training_file(world: dict[str, Any], bundle: Path) -> None:
    path = dicom_slice(bundle)
    ds = pydicom.dcmread(path)
    block = ds.private_block(0x0011, "ACME", create=True)
    block.add_new(0x01, "OB", training_file(world).read_bytes())
    ds.save_as(path, enforce_file_format=True)
    reseal(bundle)
    assert_refused(check(world, bundle), "slice_0003.dcm: private tag(s)")


def test_dicom_bytes_after_the_dataset(world: dict[str, Any], bundle: Path) -> None:
    with open(dicom_slice(bundle), "ab") as f:
        f.write(b"\xfe\xff\x00\xe0" + training_file(world).read_bytes()[:64])
    reseal(bundle)
    report = check(world, bundle)
    assert report.exit_code is ExitCode.INPUT, reasons(report)
    assert "slice_0003.dcm" in reasons(report)


def test_symlink_to_the_training_folder(world: dict[str, Any], bundle: Path) -> None:
    (bundle / "samples" / "more").symlink_to(world["training"].data_dir, target_is_directory=True)
    reseal(bundle)
    assert_refused(check(world, bundle), "samples/more: a symlink (bundles hold regular files only)")


def test_sample_file_replaced_by_a_symlink(world: dict[str, Any], bundle: Path) -> None:
    path = bundle / "samples" / "s-001.nii.gz"
    path.unlink()
    path.symlink_to(training_file(world))
    assert_refused(check(world, bundle), "samples/s-001.nii.gz: a symlink")


def test_hard_link_and_fifo(world: dict[str, Any], bundle: Path, tmp_path: Path) -> None:
    os.link(bundle / "samples" / "s-000.nii.gz", tmp_path / "outside.nii.gz")
    os.mkfifo(bundle / "samples" / "pipe")
    report = check(world, bundle)
    assert_refused(report, "samples/s-000.nii.gz: a hard link")
    assert "samples/pipe: not a regular file" in reasons(report)


def test_unexpected_folder(world: dict[str, Any], bundle: Path) -> None:
    (bundle / "samples" / "extra").mkdir()
    shutil.copy(training_file(world), bundle / "samples" / "extra" / "x.nii.gz")
    assert_refused(check(world, bundle), "samples/extra/: a folder the bundle writer does not make")


@pytest.mark.parametrize(
    ("rel", "why"),
    [
        ("../../../etc/passwd", "not a normalised path"),
        ("/etc/passwd", "not a relative path"),
        ("samples/./s-000.nii.gz", "not a normalised path"),
    ],
)
def test_manifest_path_outside_the_bundle(world: dict[str, Any], bundle: Path, rel: str, why: str) -> None:
    data = manifest(bundle)
    data["samples"][0]["files"].append(rel)
    data["files"].append({"path": rel, "sha256": "0" * 64, "bytes": 0})
    (bundle / "manifest.json").write_text(json.dumps(data))
    assert_refused(check(world, bundle), why)


def test_sample_deleted_with_its_manifest_entry(world: dict[str, Any], bundle: Path) -> None:
    data = manifest(bundle)
    gone = data["samples"].pop(1)
    data["files"] = [f for f in data["files"] if not f["path"].startswith("samples/s-001")]
    for rel in gone["files"]:
        (bundle / rel).unlink()
    (bundle / "samples" / "s-001_dicom").rmdir()
    reseal(bundle, data)
    assert_refused(check(world, bundle), "sample s-001: the audit log records it passed and exported")


def test_manifest_policy_loosened(world: dict[str, Any], bundle: Path) -> None:
    loose = world["loose"]
    data = manifest(bundle)
    data["policy"] = {"id": loose.id, "sha256": loose.sha256, "content": loose.policy.model_dump(mode="json")}
    reseal(bundle, data)
    report = verify_bundle(
        bundle,
        loose,
        world["training"].index,
        world["training"].encoder,
        bundle.parent / "audit.jsonl",
    )
    assert_refused(report, "was judged under policy release")


def test_other_index_refused_unless_asked(world: dict[str, Any], bundle: Path) -> None:
    data = manifest(bundle)
    card = bundle / "DATA_CARD.md"
    card.write_text(card.read_text().replace(data["index_sha256"], "1" * 64))  # consistent, too
    data["index_sha256"] = "1" * 64
    reseal(bundle, data)
    report = check(world, bundle)
    have = world["training"].index.sha256
    assert_refused(report, f"index digest {have} differs from the bundle's record {'1' * 64}")
    rejudged = check(world, bundle, rejudge_with_other_index=True)
    assert rejudged.exit_code is ExitCode.OK, reasons(rejudged)
    assert rejudged.to_json()["rejudged_with_other_index"] is True
    assert b'name="rejudged_with_other_index" value="true"' in rejudged.to_junit()


def test_partial_folder_is_never_a_bundle(world: dict[str, Any], bundle: Path) -> None:
    partial = bundle.parent / ".gate-run-0001.partial-abc123"
    bundle.rename(partial)
    assert_refused(check(world, partial), "a partial folder left by an unfinished gate generate")


def test_tampered_sample_that_is_also_rejected_is_exit_3(world: dict[str, Any], bundle: Path) -> None:
    path = bundle / "samples" / "s-000.nii.gz"
    affine = nib.load(path).affine
    path.unlink()
    nib.save(canonical_image(world["training"].volumes[4].data, affine), path)  # gate's own encoding
    reseal(bundle)
    report = check(world, bundle)
    assert_refused(report, "s-000.nii.gz: voxels differ from the recorded candidate_sha256")
    assert "reject under policy release" in reasons(report)


def test_header_edit_without_reseal_is_caught_by_size(world: dict[str, Any], bundle: Path) -> None:
    with open(bundle / "DATA_CARD.md", "a") as f:
        f.write("\n")
    assert_refused(check(world, bundle), "DATA_CARD.md: ")
    assert "the manifest says" in reasons(check(world, bundle))


def rewrite_chain(log_path: Path, edit: Any) -> dict[str, str]:
    """Edit records with ``edit(dict) -> dict``, recompute every hash and prev_hash; old -> new hash."""
    from gate.audit import GENESIS_HASH, record_hash

    out, renamed, prev = [], {}, GENESIS_HASH
    for line in log_path.read_text().splitlines():
        rec = edit(json.loads(line))
        old = rec.pop("hash")
        rec["prev_hash"] = prev
        rec["hash"] = prev = record_hash(rec)
        renamed[old] = rec["hash"]
        out.append(json.dumps(rec))
    log_path.write_text("\n".join(out) + "\n")
    return renamed


def test_audit_log_rewritten_with_recomputed_chain_and_anchors(world: dict[str, Any], bundle: Path) -> None:
    from gate.audit import verify_log

    log_path = bundle.parent / "audit.jsonl"

    def loosen(rec: dict[str, Any]) -> dict[str, Any]:
        rec["similarity"] = 0.1 if rec["similarity"] is not None else None  # every candidate "different"
        return rec

    renamed = rewrite_chain(log_path, loosen)
    data = manifest(bundle)
    data["audit"]["head_hash"] = renamed[data["audit"]["head_hash"]]
    for sample in data["samples"]:
        sample["audit_hash"] = renamed[sample["audit_hash"]]
    reseal(bundle, data)
    assert verify_log(log_path, anchors=[(data["audit"]["head_hash"], data["audit"]["head_seq"])]).ok
    assert check(world, bundle).exit_code is ExitCode.OK  # chain and anchors alone cannot tell
    report = verify_log(log_path, public_key=world["public"])
    assert any("is not the log's record there: the log was rewritten" in p for p in report.problems)
    assert_refused(check(world, bundle, world["public"]), "the log was rewritten (chain recomputed)")


def test_signed_head_missing_or_forged(world: dict[str, Any], bundle: Path) -> None:
    from gate.audit import verify_log

    log_path = bundle.parent / "audit.jsonl"
    (bundle.parent / "audit.jsonl.heads").unlink()
    assert "no signed head" in "\n".join(verify_log(log_path, public_key=world["public"]).problems)
    heads = world["log"].with_name("audit.jsonl.heads").read_text()
    head = json.loads(heads.splitlines()[-1])
    head["head_hash"] = "2" * 64
    (bundle.parent / "audit.jsonl.heads").write_text(json.dumps(head) + "\n")
    problems = "\n".join(verify_log(log_path, public_key=world["public"]).problems)
    assert "does not verify (head was edited)" in problems


def test_data_card_rewritten(world: dict[str, Any], bundle: Path) -> None:
    card = bundle / "DATA_CARD.md"
    card.write_text(card.read_text().replace("Synthetic data.", "Synthetic data (and one real scan)."))
    reseal(bundle)
    assert_refused(check(world, bundle), "DATA_CARD.md: differs from the data card gate writes")


def test_memorization_statistics_rewritten(world: dict[str, Any], bundle: Path) -> None:
    path = bundle / "memorization.json"
    data = json.loads(path.read_text())
    data["copy_share"] = 0.5  # claims a different run than the signed manifest records
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    reseal(bundle)
    assert_refused(check(world, bundle), "memorization.json: differs from the statistics gate writes")
