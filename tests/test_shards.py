"""gate.shards: a sharded index answers and decides exactly as the unsharded one; every
integrity check holds per shard and for the set."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gate.cli.check
import gate.cli.index
from gate.calibration import leave_one_patient_out
from gate.cli import main
from gate.decide import decide
from gate.errors import IntegrityError, UsageError
from gate.index import Probe, TrainingIndex, build_index
from gate.policy import load_policy
from gate.shards import SHARDS_FILE, ShardedIndex, assign_shards, build_sharded, load_index
from gate.values import Embedding
from tests.index_helpers import ProjectionEncoder, pid, unit_rows
from tests.volumes import make_blob, write_nifti

ROWS, PER_PATIENT, DIM = 120, 3, 16


def _probes(enc: ProjectionEncoder) -> tuple[list[Probe], list[str], np.ndarray]:
    vectors = unit_rows(ROWS, DIM, seed=3)
    probes = [Probe(Embedding(v, enc.sha256, f"r{i}"), f"{i:064x}") for i, v in enumerate(vectors)]
    return probes, [pid(i // PER_PATIENT) for i in range(ROWS)], vectors


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ProjectionEncoder, np.ndarray]:
    """One unsharded and one 3-shard index over the same rows (3 rows per patient)."""
    enc = ProjectionEncoder(dim=DIM)
    probes, row_ids, vectors = _probes(enc)
    cal = leave_one_patient_out(vectors, row_ids, 0)
    root = tmp_path_factory.mktemp("shards")
    # one "volume" per row: patients own PER_PATIENT consecutive volumes
    build_index(probes, row_ids, ["ab" * 32] * ROWS, enc, root / "single", cal)
    build_sharded(probes, row_ids, ["ab" * 32] * ROWS, enc, root / "sharded", cal, 3)
    return root / "single", root / "sharded", enc, vectors


def _queries(vectors: np.ndarray, enc: ProjectionEncoder) -> list[Embedding]:
    rng = np.random.default_rng(9)
    near = vectors[::7] + 0.05 * rng.standard_normal(vectors[::7].shape)
    fresh = rng.standard_normal((10, DIM))
    out = np.concatenate([near, fresh]).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return [Embedding(v, enc.sha256, f"q{i}") for i, v in enumerate(out)]


def test_patients_never_straddle_shards() -> None:
    ids = [pid(i % 7) for i in range(40)]
    owner = assign_shards(ids, [2] * 40, 3)
    for p in set(ids):
        assert len({o for o, q in zip(owner, ids, strict=True) if q == p}) == 1
    assert set(owner) == {0, 1, 2}
    with pytest.raises(UsageError, match="need 1 <= shards <= number of patients"):
        assign_shards(ids, [2] * 40, 8)


def test_sharded_search_and_decisions_equal_unsharded(
    built: tuple[Path, Path, ProjectionEncoder, np.ndarray],
) -> None:
    single_dir, sharded_dir, enc, vectors = built
    single, sharded = TrainingIndex.load(single_dir, enc), load_index(sharded_dir, enc)
    assert isinstance(sharded, ShardedIndex) and len(sharded.shards) == 3
    shard_ids = [{r.patient_id for r in s.manifest.rows} for s in sharded.shards]
    assert sum(len(s) for s in shard_ids) == len(set().union(*shard_ids)) == ROWS // PER_PATIENT
    queries = _queries(vectors, enc)
    voxels = [f"{5:064x}"] + [None] * (len(queries) - 1)  # the first is an exact duplicate of row 5
    a = single.search_many(queries, voxels, k=5)
    b = sharded.search_many(queries, voxels, k=5)
    policy = load_policy("strict")
    for x, y in zip(a, b, strict=True):
        assert x.patient_ids == y.patient_ids
        np.testing.assert_allclose(x.similarities, y.similarities, atol=1e-12)
        assert x.exact_duplicate == y.exact_duplicate
        assert decide(x, policy, single.calibration) == decide(y, policy, sharded.calibration)
    assert a[0].exact_duplicate


def _broken(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: shutil.rmtree(d / "shard-001"), "shard-001/manifest.json: missing"),
        (
            lambda d: (
                (d / "shard-000").rename(d / "tmp"),
                (d / "shard-001").rename(d / "shard-000"),
                (d / "tmp").rename(d / "shard-001"),
            ),
            "does not match shards.json's",
        ),
        (lambda d: (d / "shard-002" / "vectors.npy").write_bytes(b"x"), "shard-002/vectors.npy: sha256"),
        (lambda d: shutil.copytree(d / "shard-000", d / "shard-003"), "unlisted shard folder"),
        (
            lambda d: (d / SHARDS_FILE).write_text(
                json.dumps(json.loads((d / SHARDS_FILE).read_text()) | {"seed": 5})
            ),
            "does not belong to this shard set",
        ),
        (lambda d: (d / SHARDS_FILE).write_text("{"), "shards.json: unreadable"),
    ],
    ids=["missing", "swapped", "edited", "unlisted", "set-edited", "torn"],
)
def test_damaged_shard_set_is_refused(
    built: tuple[Path, Path, ProjectionEncoder, np.ndarray], tmp_path: Path, damage: object, message: str
) -> None:
    _, sharded_dir, enc, _ = built
    broken = _broken(sharded_dir, tmp_path)
    damage(broken)  # type: ignore[operator]
    with pytest.raises(IntegrityError, match=message):
        load_index(broken, enc)


def test_cli_sharded_build_check_and_exit_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    enc = ProjectionEncoder(dim=16)
    monkeypatch.setattr(gate.cli.index, "load_encoder", lambda encoder_dir, device: enc)
    monkeypatch.setattr(gate.cli.check, "load_encoder", lambda encoder_dir, device: enc)
    train = tmp_path / "train"
    train.mkdir()
    for i in range(6):
        write_nifti(train / f"case_{i}.nii.gz", make_blob((16, 16, 16), seed=i))
    runner = CliRunner()
    reports = {}
    for name, extra in (("single", []), ("sharded", ["--shards", "2"])):
        out = tmp_path / name
        args = ["index", "build", "--data", str(train), "--out", str(out), "--poses", "none", *extra]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            main, ["check", str(train), "--index", str(out), "--json", str(tmp_path / f"{name}.json")]
        )
        assert result.exit_code == 1, result.output  # every training copy is rejected
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert (
        "shard-001: rows 3, patients 3, self-test passed"
        in runner.invoke(
            main,
            [
                "index",
                "build",
                "--data",
                str(train),
                "--out",
                str(tmp_path / "again"),
                "--poses",
                "none",
                "--shards",
                "2",
            ],
        ).output
    )
    for key in ("results", "errors", "summary", "exit_code"):
        assert reports["single"][key] == reports["sharded"][key]
    shutil.rmtree(tmp_path / "sharded" / "shard-000")
    result = runner.invoke(main, ["check", str(train), "--index", str(tmp_path / "sharded")])
    assert result.exit_code == 3
    assert "shard-000/manifest.json: missing" in result.output


def test_sharded_build_keeps_and_finds_its_encoder_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As an unsharded index, a shard set keeps INDEX/encoder/ and is found by shards.json's digest."""
    from gate.cli.index import encoder_for_index
    from gate.embed import DEFAULT_ENCODER_DIR

    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    enc = shutil.copytree(DEFAULT_ENCODER_DIR, tmp_path / "enc")  # the real ONNX encoder, moved
    train = tmp_path / "train"
    train.mkdir()
    for i in range(6):
        write_nifti(train / f"case_{i}.nii.gz", make_blob((16, 16, 16), seed=i))
    out = tmp_path / "sharded"
    args = ["index", "build", "--data", str(train), "--out", str(out), "--poses", "none", "--shards", "2"]
    result = CliRunner().invoke(main, [*args, "--encoder", str(enc)])
    assert result.exit_code == 0, result.output
    for name in ("encoder.json", "encoder.onnx"):
        assert (out / "encoder" / name).read_bytes() == (enc / name).read_bytes()
    assert encoder_for_index(None, out) == out / "encoder"  # shards.json's digest names the copy
    shutil.rmtree(enc)
    check = ["check", str(train / "case_1.nii.gz"), "--index", str(out), "--json", str(tmp_path / "r.json")]
    result = CliRunner().invoke(main, check)
    assert result.exit_code == 1, result.output  # the set (with encoder/ inside) loads and rejects the copy
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["reject"] == 1


def test_included_patients_come_back_with_their_exact_cosine_sharded_or_not(
    built: tuple[Path, Path, ProjectionEncoder, np.ndarray],
) -> None:
    """``include`` (the voxel channel's patients) adds patients beyond the top k, exact, on every shard."""
    single_dir, sharded_dir, enc, vectors = built
    single, sharded = TrainingIndex.load(single_dir, enc), load_index(sharded_dir, enc)
    queries = _queries(vectors, enc)[:5]
    ids = [pid(i // PER_PATIENT) for i in range(ROWS)]
    include = []
    for q in queries:  # the patient farthest from each query: never in its top 5
        sims = vectors.astype(np.float64) @ q.vector.astype(np.float64)
        include.append((ids[int(np.argmin(sims))], "p-ffffffffffffffff"))  # the second is in no shard
    a = single.search_many(queries, [None] * 5, 5, include)
    b = sharded.search_many(queries, [None] * 5, 5, include)
    for q, x, y, (far, _) in zip(queries, a, b, include, strict=True):
        assert x.patient_ids == y.patient_ids and len(x.patient_ids) == 6
        assert far in x.patient_ids and "p-ffffffffffffffff" not in x.patient_ids
        rows = [i for i, p in enumerate(ids) if p == far]
        want = float((vectors[rows].astype(np.float64) @ q.vector.astype(np.float64)).max())
        assert x.similarities[x.patient_ids.index(far)] == pytest.approx(want, abs=1e-6)
        np.testing.assert_allclose(x.similarities, y.similarities, atol=1e-12)
        assert x.patient_ids[:5] == single.search_many([q], [None], 5)[0].patient_ids
