"""The generate pipeline end to end on a freshly trained tiny generator, a real index and policy.

The encoder is tests.index_helpers.ProjectionEncoder (numpy, 8^3 grid); everything else is the
product code: Generator, embed_volumes, TrainingIndex, decide, AuditLog, BundleWriter, exporters.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gate.audit import AuditLog, verify_log
from gate.bundle import check_files, read_manifest
from gate.errors import ExitCode, IntegrityError, UsageError
from gate.generator.sample import Generator
from gate.generator.train import train, training_array
from gate.pipeline import MEMORIZATION_FILE, GenerateRequest, run_generate
from gate.policy import load_policy
from gate.values import Verdict
from tests.bundle_helpers import Training, make_training, release_policy_text, write_policy
from tests.generator_helpers import tiny_config

torch.set_num_threads(1)

GRID = (8, 8, 8)
PROVIDER = "CPUExecutionProvider"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Training, Generator]:
    root = tmp_path_factory.mktemp("pipeline")
    training = make_training(root)
    cfg = tiny_config(grid=GRID, ae_epochs=2, unet_epochs=2)
    assert cfg.preprocess.digest == training.encoder.preprocess.digest
    train(training_array(training.volumes, cfg), cfg, root / "gen")
    return training, Generator(root / "gen", device="cpu")


def _run(world: tuple[Training, Generator], tmp_path: Path, policy_text: str | None = None, **kw: object):
    training, generator = world
    policy = (
        load_policy("permissive") if policy_text is None else write_policy(tmp_path / "pol", "p", policy_text)
    )
    request = GenerateRequest(out_root=tmp_path / "out", batch_size=4, **kw)  # type: ignore[arg-type]
    return run_generate(request, generator, training.encoder, training.index, policy, PROVIDER)


def test_end_to_end_bundle(world: tuple[Training, Generator], tmp_path: Path) -> None:
    progress = []
    training, generator = world
    request = GenerateRequest(n=5, out_root=tmp_path / "out", batch_size=4, seed=7, run_id="r1")
    result = run_generate(
        request,
        generator,
        training.encoder,
        training.index,
        load_policy("permissive"),
        PROVIDER,
        progress.append,
    )
    assert result.exit_code is ExitCode.OK
    assert result.exported == 5 and result.passed == 5
    assert result.candidates == 5 + result.count(Verdict.FLAG) + result.count(Verdict.REJECT)
    assert result.bundle == tmp_path / "out" / "gate-r1"
    manifest = read_manifest(result.bundle)
    assert len(manifest.samples) == 5 and all(s.sample_id.startswith("s") for s in manifest.samples)
    # contiguous ids in export order, whatever was rejected in between; the log names the rest c...
    assert [s.sample_id for s in manifest.samples] == [f"s{i:06d}" for i in range(1, 6)]
    assert check_files(result.bundle, manifest) == []
    assert manifest.generator_sha256 == generator.sha256
    assert all(s.seed == 7 for s in manifest.samples)
    records = list(AuditLog(tmp_path / "out" / "audit.jsonl").records())
    assert len(records) == result.candidates == progress[-1].candidates
    assert [r.sample_id for r in records if r.verdict == "pass"] == [f"s{i:06d}" for i in range(1, 6)]
    assert [r.sample_id for r in records if r.verdict != "pass"] == [
        f"c{i:06d}" for i, r in enumerate(records) if r.verdict != "pass"
    ]
    assert verify_log(tmp_path / "out" / "audit.jsonl").ok
    stats = json.loads((result.bundle / MEMORIZATION_FILE).read_text())
    assert stats["candidates"] == result.candidates and stats["training_patients"] == 8
    assert set(result.times) >= {"generate", "embed", "search", "decide", "audit", "export"}
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_budget_spent_returns_violation_and_stats(world: tuple[Training, Generator], tmp_path: Path) -> None:
    # every candidate is a "duplicate" under this policy: nothing passes, the budget runs out
    result = _run(world, tmp_path, release_policy_text(similar=-1.0, duplicate=-1.0), n=3, max_candidates=6)
    assert result.candidates == 6 and result.exported == 0
    assert result.exit_code is ExitCode.VIOLATION
    assert result.bundle is None and not list((tmp_path / "out").glob("gate-*"))
    assert result.copy_share == 1.0
    assert result.verdict_grades == {"reject/duplicate": 6}
    assert 1 <= result.patients_copied <= 6
    assert result.patients_copied_share == pytest.approx(result.patients_copied / 8)


def test_rejected_candidates_are_quarantined_outside_bundles(
    world: tuple[Training, Generator], tmp_path: Path
) -> None:
    result = _run(
        world, tmp_path, release_policy_text(similar=-1.0, duplicate=-1.0), n=3, max_candidates=6, run_id="q"
    )
    assert result.quarantine == tmp_path / "out" / "quarantine" / "q"
    records = list(AuditLog(tmp_path / "out" / "audit.jsonl").records())
    kept = sorted(p.name for p in result.quarantine.iterdir())
    assert kept == sorted(f"{r.candidate_sha256}.nii.gz" for r in records) and len(kept) == 6
    assert result.times["quarantine"] > 0
    off = _run(
        world,
        tmp_path / "off",
        release_policy_text(similar=-1.0, duplicate=-1.0),
        n=3,
        max_candidates=6,
        quarantine=False,
    )
    assert off.quarantine is None and not (tmp_path / "off" / "out" / "quarantine").exists()


def test_same_seed_same_candidates(world: tuple[Training, Generator], tmp_path: Path) -> None:
    a = _run(world, tmp_path / "a", n=2, seed=3, run_id="a")
    b = _run(world, tmp_path / "b", n=2, seed=3, run_id="b")
    ma, mb = read_manifest(a.bundle), read_manifest(b.bundle)
    assert [s.candidate_sha256 for s in ma.samples] == [s.candidate_sha256 for s in mb.samples]


def test_failure_midway_leaves_no_bundle(world: tuple[Training, Generator], tmp_path: Path) -> None:
    training, generator = world

    class BrokenAfterFirstBatch(type(training.encoder)):  # a real encoder that starts emitting NaN
        calls = 0

        def embed_array(self, batch: np.ndarray) -> np.ndarray:
            BrokenAfterFirstBatch.calls += 1
            out = super().embed_array(batch)
            return out if BrokenAfterFirstBatch.calls == 1 else out * np.nan

    encoder = BrokenAfterFirstBatch(dim=16)
    request = GenerateRequest(n=8, out_root=tmp_path / "out", batch_size=4)
    with pytest.raises(IntegrityError, match="non-finite values or a wrong shape"):
        run_generate(request, generator, encoder, training.index, load_policy("permissive"), PROVIDER)
    assert not list((tmp_path / "out").glob("gate-*")) and not list((tmp_path / "out").glob(".gate-*"))
    # every candidate has its record: the first batch decided, the second an error each
    records = list(AuditLog(tmp_path / "out" / "audit.jsonl").records())
    assert [r.verdict for r in records[4:]] == ["error"] * 4 and len(records) == 8
    assert all(r.verdict != "error" for r in records[:4])
    assert all("IntegrityError: encoder returned" in (r.error or "") for r in records[4:])
    assert [r.sample_id for r in records[4:]] == ["c000004", "c000005", "c000006", "c000007"]
    assert all(r.candidate_sha256 for r in records[4:])
    assert verify_log(tmp_path / "out" / "audit.jsonl").ok


def test_generator_on_other_grid_refused(world: tuple[Training, Generator], tmp_path: Path) -> None:
    training, _ = world
    gen16 = tmp_path / "gen16"
    cfg = tiny_config()
    train(np.zeros((2, 1, 16, 16, 16), np.float32), cfg, gen16)
    request = GenerateRequest(n=1, out_root=tmp_path / "out")
    with pytest.raises(
        IntegrityError, match=r"generator preprocessing \w{12} \(grid \(16, 16, 16\)\) differs"
    ):
        run_generate(
            request, Generator(gen16, "cpu"), training.encoder, training.index, load_policy("strict"), "x"
        )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"n": 0}, r"^--n must be >= 1; got 0$"),
        ({"n": 5, "max_candidates": 4}, r"^--max-candidates \(4\) must be >= --n \(5\)$"),
        ({"n": 1, "batch_size": 0}, r"^--batch-size must be >= 1; got 0$"),
    ],
)
def test_request_rules(kw: dict[str, int], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        GenerateRequest(**kw)


def test_default_budget_is_four_n() -> None:
    assert GenerateRequest(n=500).budget == 2000


def test_candidates_outside_the_index_domain_are_refused(
    world: tuple[Training, Generator], tmp_path: Path
) -> None:
    from gate.domain import measure_domain
    from gate.errors import DomainError
    from gate.values import Volume as Vol

    training, generator = world
    tiny = Vol(np.zeros((4, 4, 4), np.float32), np.eye(4), (1.0, 1.0, 1.0), "mem", "p-0000000000000000")
    index = type(training.index)(
        training.index.manifest.model_copy(update={"domain": measure_domain([tiny])}),
        training.index._graph,
        training.index.vectors,
    )
    request = GenerateRequest(n=2, out_root=tmp_path / "out", batch_size=2)
    with pytest.raises(
        DomainError, match="outside the index's domain: it covers field of view 4-4 x 4-4 x 4-4 mm"
    ):
        run_generate(request, generator, training.encoder, index, load_policy("permissive"), PROVIDER)
    assert not list((tmp_path / "out").glob("gate-*"))
    records = list(AuditLog(tmp_path / "out" / "audit.jsonl").records())
    assert len(records) == 2 and all("DomainError" in (r.error or "") for r in records)
