"""Helpers for the export / audit / bundle / publication tests: a tiny training set, its index,
and a miniature generate pipeline that gates candidates into a bundle.

The encoder is :class:`tests.index_helpers.ProjectionEncoder` (numpy, 16-d, 8^3 grid), so
nothing here needs the ONNX encoder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from gate.audit import AuditEntry, AuditLog
from gate.bundle import BundleWriter, MemorizationRecord, Provenance
from gate.calibration import leave_one_patient_out
from gate.decide import decide
from gate.digest import sha256_source, sha256_voxels
from gate.domain import measure_domain
from gate.identity import Pseudonymizer
from gate.index import TrainingIndex, build_index, embed_volumes
from gate.policy import LoadedPolicy, load_policy
from gate.signing import PUBLIC_KEY_FILE, SigningKey, load_or_create_signing_key
from gate.values import Verdict, Volume
from gate.verify import grid_search, verify_all
from gate.volume import ReadOptions, read_volumes
from tests.conftest import TEST_KEY
from tests.index_helpers import ProjectionEncoder
from tests.volumes import make_blob, write_nifti

N_TRAIN = 8
SHAPE = (16, 16, 16)
RUN_ID = "run-0001"
PROVIDER = "CPUExecutionProvider"
GENERATOR_SHA = "9" * 64


def release_policy_text(
    similar: float = 0.97,
    duplicate: float = 0.99,
    similar_action: str = "reject",
    verified: tuple[float, float] | None = None,
) -> str:
    text = (
        "schema_version: 1\n"
        "thresholds:\n"
        f"  similar: {{kind: absolute, value: {similar}}}\n"
        f"  duplicate: {{kind: absolute, value: {duplicate}}}\n"
        f"actions: {{different: pass, similar: {similar_action}, duplicate: reject}}\n"
        "k: 2\naggregation: max\nexact_duplicate_check: true\n"
    )
    if verified is not None:
        text += (
            "verified:\n"
            f"  similar: {{kind: absolute, value: {verified[0]}}}\n"
            f"  duplicate: {{kind: absolute, value: {verified[1]}}}\n"
        )
    return text


def write_policy(folder: Path, name: str, text: str) -> LoadedPolicy:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return load_policy(str(path))


@dataclasses.dataclass
class Training:
    data_dir: Path
    index_dir: Path
    encoder: ProjectionEncoder
    index: TrainingIndex
    volumes: list[Volume]
    file_sha256s: list[str]


def read_opts() -> ReadOptions:
    return ReadOptions(pseudonymizer=Pseudonymizer(key=TEST_KEY))


def make_training(root: Path) -> Training:
    data = root / "train"
    data.mkdir(parents=True)
    paths = [write_nifti(data / f"case_{i:03d}.nii.gz", make_blob(SHAPE, seed=i)) for i in range(N_TRAIN)]
    volumes = [read_volumes(p, read_opts())[0] for p in paths]
    shas = [sha256_source(p) for p in paths]
    encoder = ProjectionEncoder(dim=16)
    probes = embed_volumes(volumes, encoder)
    ids = [v.patient_id for v in volumes]
    vectors = np.stack([p.embedding.vector for p in probes])
    out = root / "index"
    domain = measure_domain(volumes, encoder.preprocess)
    build_index(probes, ids, shas, encoder, out, leave_one_patient_out(vectors, ids, 0), domain=domain)
    return Training(data, out, encoder, TrainingIndex.load(out, encoder), volumes, shas)


def candidate(seed: int) -> Volume:
    return Volume(
        data=make_blob(SHAPE, seed=seed),
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
        source=f"generated:seed={seed}",
        patient_id="p-ffffffffffffffff",
    )


def run_pipeline(
    training: Training,
    policy: LoadedPolicy,
    out_dir: Path,
    log_path: Path,
    candidates: list[tuple[str, int, Volume]],
    formats: tuple[str, ...] = ("nifti",),
    forge_pass: bool = False,
    run_id: str = RUN_ID,
    signer: SigningKey | None = None,
) -> tuple[Path, dict[str, Verdict]]:
    """Gate candidates into a bundle like the generate pipeline: audit first, then export.

    ``forge_pass`` simulates a broken pipeline that exports whatever it decided (its audit
    record says pass): the publication check must still catch a copy.
    """
    audit = AuditLog(log_path)
    provenance = Provenance(
        generator_name="test generator",
        generator_sha256=GENERATOR_SHA,
        encoder_sha256=training.encoder.sha256,
        index_sha256=training.index.sha256,
        provider=PROVIDER,
        policy=policy,
        formats=formats,
        signer=signer,
    )
    verdicts = {}
    with BundleWriter(out_dir, run_id, provenance, audit) as bundle:
        volumes = [v for _, _, v in candidates]
        probes = embed_volumes(volumes, training.encoder)
        k = policy.policy.k
        found = training.index.search_many(
            [p.embedding for p in probes], [p.voxel_sha256 for p in probes], k=k
        )
        index = training.index
        found = verify_all(index.verifier, found, volumes, grid_search(training.encoder, index), k)
        for (sample_id, seed, vol), neighbours in zip(candidates, found, strict=True):
            decision = decide(neighbours, policy, index.calibration, index.verification)
            if forge_pass:
                decision = dataclasses.replace(decision, verdict=Verdict.PASS)
            verdicts[sample_id] = decision.verdict
            h = audit.append(
                AuditEntry.for_decision(
                    run_id,
                    decision,
                    sha256_voxels(vol.data),
                    PROVIDER,
                    sample_id=sample_id,
                    seed=seed,
                    encoder_sha256=training.encoder.sha256,
                    index_sha256=training.index.sha256,
                )
            )
            if decision.passed:
                bundle.add(vol, decision, sample_id, seed, h)
        passed = sum(v is Verdict.PASS for v in verdicts.values())
        memorization = MemorizationRecord(
            run_id=run_id,
            candidates=len(candidates),
            copy_share=0.0,
            patients_copied=0,
            training_patients=training.index.manifest.n_patients,
            patients_copied_share=0.0,
            verdict_grades={"pass/different": passed},
        )
        path = bundle.finish(memorization)
    return path, verdicts


def build_world(root: Path) -> dict[str, Any]:
    """A training set and index, a good bundle with its log, and a forged bundle holding a copy.

    The forged bundle comes from a pipeline that exports whatever it decides (its audit records
    say pass): sample ``s-copy`` is training volume 4, which only re-deciding can catch.
    """
    training = make_training(root)
    signer = load_or_create_signing_key(root / "keys")
    policy = write_policy(root / "pol", "release", release_policy_text())
    write_policy(
        root / "pol", "loose", release_policy_text(similar=0.99, duplicate=0.995, similar_action="flag")
    )
    cands = [(f"s-{i:03d}", 100 + i, candidate(100 + i)) for i in range(2)]
    good, _ = run_pipeline(
        training, policy, root / "good", root / "audit.jsonl", cands, ("nifti", "dicom"), signer=signer
    )
    copy = [*cands, ("s-copy", 5, training.volumes[4])]
    forged, verdicts = run_pipeline(
        training, policy, root / "forged", root / "forged.jsonl", copy, forge_pass=True, signer=signer
    )
    assert all(v == "pass" for v in verdicts.values())
    return {
        "training": training,
        "root": root,
        "good": good,
        "log": root / "audit.jsonl",
        "forged": forged,
        "forged_log": root / "forged.jsonl",
        "index": training.index_dir,
        "release": root / "pol" / "release.yaml",
        "loose": root / "pol" / "loose.yaml",
        "train": training.data_dir,
        "public_key": root / "keys" / PUBLIC_KEY_FILE,
    }
