from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gate.cli.check
import gate.cli.index
from gate.audit import AuditLog, verify_log
from gate.cli import main
from gate.poses import DEFAULT_POSES, POSE_SETS
from tests.index_helpers import ProjectionEncoder
from tests.volumes import make_blob, write_nifti

N_TRAIN = 8


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    enc = ProjectionEncoder(dim=16)
    monkeypatch.setattr(gate.cli.index, "load_encoder", lambda encoder_dir, device: enc)
    monkeypatch.setattr(gate.cli.check, "load_encoder", lambda encoder_dir, device: enc)
    return CliRunner()


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    d = tmp_path / "train"
    d.mkdir()
    for i in range(N_TRAIN):
        write_nifti(d / f"case_{i:03d}.nii.gz", make_blob((16, 16, 16), seed=i))
    return d


@pytest.fixture
def index_dir(runner: CliRunner, train_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "index"
    result = runner.invoke(main, ["index", "build", "--data", str(train_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    compact = POSE_SETS["compact"]  # a verifying index (the default) takes the compact poses unless told
    assert f"volumes {N_TRAIN}, rows {N_TRAIN * len(compact)}, patients {N_TRAIN}, dim 16" in result.output
    assert f"poses {len(compact)}," in result.output
    assert "self-test recall@1 1.0000" in result.output
    assert "calibration (leave_one_patient_out, 8 patients)" in result.output
    return out


def write_policy(tmp_path: Path, similar: float, duplicate: float) -> Path:
    path = tmp_path / "loose.yaml"
    path.write_text(
        "schema_version: 1\n"
        "thresholds:\n"
        f"  similar: {{kind: absolute, value: {similar}}}\n"
        f"  duplicate: {{kind: absolute, value: {duplicate}}}\n"
        "actions: {different: pass, similar: flag, duplicate: reject}\n"
        "k: 2\naggregation: max\nexact_duplicate_check: true\n"
    )
    return path


@pytest.mark.parametrize("policy", ["strict", "standard", "permissive"])
def test_exact_copies_rejected_under_every_policy(
    runner: CliRunner, index_dir: Path, train_dir: Path, tmp_path: Path, policy: str
) -> None:
    cand = tmp_path / "cand"
    shutil.copytree(train_dir, cand)
    report = tmp_path / "r.json"
    result = runner.invoke(
        main, ["check", str(cand), "--policy", policy, "--index", str(index_dir), "--json", str(report)]
    )
    assert result.exit_code == 1, result.output
    assert f"checked {N_TRAIN}: 0 pass, 0 flag, {N_TRAIN} reject; 0 unreadable" in result.output
    data = json.loads(report.read_text())
    assert data["exit_code"] == 1 and data["policy"]["id"] == policy
    assert all(r["verdict"] == "reject" and r["exact_duplicate"] for r in data["results"])
    assert all(r["similarity"] == pytest.approx(1.0, abs=1e-5) for r in data["results"])


def test_new_volume_passes_and_near_copy_is_caught(
    runner: CliRunner, index_dir: Path, tmp_path: Path
) -> None:
    cand = tmp_path / "cand"
    cand.mkdir()
    write_nifti(cand / "new.nii.gz", make_blob((16, 16, 16), seed=100))
    rng = np.random.default_rng(0)
    near = make_blob((16, 16, 16), seed=3) + rng.normal(0, 1.0, (16, 16, 16)).astype(np.float32)
    write_nifti(cand / "near.nii.gz", near)
    report = tmp_path / "r.json"
    result = runner.invoke(
        main,
        [
            "check",
            str(cand),
            "--policy",
            str(write_policy(tmp_path, 0.97, 0.99)),
            "--index",
            str(index_dir),
            "--json",
            str(report),
        ],
    )
    data = {Path(r["source"]).name: r for r in json.loads(report.read_text())["results"]}
    assert data["near.nii.gz"]["verdict"] == "reject" and not data["near.nii.gz"]["exact_duplicate"]
    assert data["near.nii.gz"]["similarity"] >= 0.99
    assert data["new.nii.gz"]["verdict"] == "pass", data["new.nii.gz"]
    assert result.exit_code == 1 and len(data["near.nii.gz"]["neighbours"]) == 2


def test_flag_fails_with_its_own_code_unless_allowed(
    runner: CliRunner, index_dir: Path, tmp_path: Path
) -> None:
    cand = tmp_path / "cand"
    cand.mkdir()
    write_nifti(cand / "new.nii.gz", make_blob((16, 16, 16), seed=100))
    policy = str(write_policy(tmp_path, -1.0, 0.99))  # everything at least "similar" -> flag
    args = ["check", str(cand), "--policy", policy, "--index", str(index_dir)]
    result = runner.invoke(main, args)
    assert result.exit_code == 5, result.output
    assert "checked 1: 0 pass, 1 flag, 0 reject" in result.output and "\nflag    similar" in result.output
    assert "gate: 1 candidate(s) flagged for review (exit 5)" in result.output
    allowed = runner.invoke(main, [*args, "--allow-flag"])
    assert allowed.exit_code == 0, allowed.output
    assert "flagged for review" not in allowed.output
    assert runner.invoke(main, [*args, "--fail-on-flag"]).exit_code == 5  # old scripts: the default now
    both = runner.invoke(main, [*args, "--allow-flag", "--fail-on-flag"])
    assert both.exit_code == 2
    assert both.output == "gate: error: --allow-flag and --fail-on-flag exclude each other\n"


def test_unreadable_input_fails_closed(
    runner: CliRunner, index_dir: Path, train_dir: Path, tmp_path: Path
) -> None:
    cand = tmp_path / "cand"
    cand.mkdir()
    write_nifti(cand / "new.nii.gz", make_blob((16, 16, 16), seed=100))
    (cand / "broken.nii.gz").write_bytes(b"not a nifti")
    report = tmp_path / "r.json"
    result = runner.invoke(main, ["check", str(cand), "--index", str(index_dir), "--json", str(report)])
    assert result.exit_code == 3, result.output
    assert "broken.nii.gz: cannot read NIfTI: truncated or corrupt file" in result.output
    assert "1 unreadable" in result.output
    data = json.loads(report.read_text())
    assert data["exit_code"] == 3 and data["summary"]["unreadable"] == 1
    assert data["errors"][0]["source"].endswith("broken.nii.gz")
    # both candidates are audited: the decision and the error (which names no file)
    records = list(AuditLog(tmp_path / "audit.jsonl").records())
    assert len(records) == 2 and sorted(r.verdict for r in records)[0] == "error"
    assert {r.verdict for r in records} - {"error"} <= {"pass", "flag", "reject"}
    (error,) = [r for r in records if r.verdict == "error"]
    assert error.error.startswith("unreadable input: cannot read NIfTI: truncated or corrupt file")
    assert "broken" not in (tmp_path / "audit.jsonl").read_text()
    assert f"audit: run {records[0].run_id}, 2 record(s) in {tmp_path / 'audit.jsonl'}" in result.output
    assert verify_log(tmp_path / "audit.jsonl").ok
    missing = runner.invoke(main, ["check", str(tmp_path / "nope.nii.gz"), "--index", str(index_dir)])
    assert missing.exit_code == 3 and "nope.nii.gz: no such file or folder" in missing.output


def test_integrity_and_policy_errors(runner: CliRunner, index_dir: Path, train_dir: Path) -> None:
    bad_policy = runner.invoke(main, ["check", str(train_dir), "--policy", "lax", "--index", str(index_dir)])
    assert bad_policy.exit_code == 2
    assert "unknown policy 'lax': expected one of deepssim, permissive, standard, strict" in bad_policy.output
    (index_dir / "vectors.npy").write_bytes(b"x")
    broken = runner.invoke(main, ["check", str(train_dir), "--index", str(index_dir)])
    assert broken.exit_code == 3
    assert "vectors.npy: sha256" in broken.output and "does not match the manifest's" in broken.output


def test_index_build_refuses_overwrite_and_bad_input(
    runner: CliRunner, index_dir: Path, train_dir: Path, tmp_path: Path
) -> None:
    again = runner.invoke(main, ["index", "build", "--data", str(train_dir), "--out", str(index_dir)])
    assert again.exit_code == 2 and "already exists; choose a new --out folder" in again.output
    (train_dir / "broken.nii.gz").write_bytes(b"junk")
    bad = runner.invoke(main, ["index", "build", "--data", str(train_dir), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 3 and "broken.nii.gz: cannot read NIfTI" in bad.output
    assert "no index written" in bad.output and not (tmp_path / "x").exists()


def test_index_build_pose_default_follows_verification(
    runner: CliRunner, train_dir: Path, tmp_path: Path
) -> None:
    plain = runner.invoke(
        main, ["index", "build", "--data", str(train_dir), "--out", str(tmp_path / "plain"), "--no-verify"]
    )
    assert plain.exit_code == 0, plain.output
    assert f"poses {len(DEFAULT_POSES)}," in plain.output  # no alignment: the 86 rows carry the invariance
    told = runner.invoke(
        main,
        ["index", "build", "--data", str(train_dir), "--out", str(tmp_path / "told"), "--poses", "default"],
    )
    assert told.exit_code == 0, told.output
    assert f"poses {len(DEFAULT_POSES)}," in told.output
    manifest = json.loads((tmp_path / "told" / "manifest.json").read_text())
    assert manifest["verification"] is not None and len(manifest["poses"]["poses"]) == len(DEFAULT_POSES)


def test_index_build_with_holdout(runner: CliRunner, train_dir: Path, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.mkdir()
    for i in range(5):
        write_nifti(hold / f"h_{i}.nii.gz", make_blob((16, 16, 16), seed=50 + i))
    out = tmp_path / "idx"
    result = runner.invoke(
        main, ["index", "build", "--data", str(train_dir), "--holdout", str(hold), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["method"] == "holdout" and manifest["calibration"]["n_patients"] == 5
    assert str(tmp_path) not in (out / "manifest.json").read_text()
    assert "case_000" not in (out / "manifest.json").read_text()


def export_tiny_onnx_encoder(out: Path, seed: int) -> Path:
    """A real (untrained) ONNX encoder on an 8^3 grid, with the manifest gate.embed reads."""
    torch = pytest.importorskip("torch")
    from gate.digest import sha256_file
    from gate.embed import EncoderManifest
    from gate.preprocess import PreprocessConfig

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4 * 4, 16),
    ).eval()
    out.mkdir(parents=True)
    onnx_path = out / "encoder.onnx"
    torch.onnx.export(
        net, (torch.rand(2, 1, 8, 8, 8),), str(onnx_path), input_names=["volume"], output_names=["embedding"],
        dynamic_axes={"volume": {0: "n"}, "embedding": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    cfg = PreprocessConfig(grid=(8, 8, 8))
    manifest = EncoderManifest(
        onnx_sha256=sha256_file(onnx_path),
        dim=16,
        objective="untrained",
        preprocess=cfg,
        preprocess_digest=cfg.digest,
    )
    (out / "encoder.json").write_text(manifest.model_dump_json())
    return out


@pytest.fixture(scope="module")
def onnx_encoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return export_tiny_onnx_encoder(root / "a", 0), export_tiny_onnx_encoder(root / "b", 1)


def test_real_onnx_encoder_end_to_end(
    onnx_encoders: tuple[Path, Path], train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    runner = CliRunner()
    enc, other = onnx_encoders
    out = tmp_path / "idx"
    built = runner.invoke(
        main, ["index", "build", "--data", str(train_dir), "--encoder", str(enc), "--out", str(out)]
    )
    assert built.exit_code == 0, built.output
    args = ["check", str(train_dir / "case_002.nii.gz"), "--index", str(out), "--policy", "permissive"]
    result = runner.invoke(main, [*args, "--encoder", str(enc)])
    assert result.exit_code == 1, result.output
    assert "\nreject  duplicate     1.0000" in result.output and " yes " in result.output
    wrong = runner.invoke(main, [*args, "--encoder", str(other)])
    assert wrong.exit_code == 3 and "idx: built with encoder" in wrong.output
    assert "pass the matching --encoder or rebuild with `gate index build`" in wrong.output
    tampered = tmp_path / "tampered"
    shutil.copytree(enc, tampered)
    (tampered / "encoder.onnx").write_bytes((enc / "encoder.onnx").read_bytes() + b"\0")
    broken = runner.invoke(main, [*args, "--encoder", str(tampered)])
    assert broken.exit_code == 3 and "encoder.onnx: sha256" in broken.output

    # the index keeps its own encoder: --encoder is needed only when that copy is gone
    assert (out / "encoder" / "encoder.json").read_bytes() == (enc / "encoder.json").read_bytes()
    found = runner.invoke(main, args)
    assert found.exit_code == 1 and "\nreject  duplicate     1.0000" in found.output, found.output
    shutil.rmtree(out / "encoder")
    moved = runner.invoke(main, args)
    assert moved.exit_code == 3 and "idx: built with encoder" in moved.output
    assert runner.invoke(main, [*args, "--encoder", str(enc)]).exit_code == 1


@pytest.mark.realdata
def test_shipped_index_rejects_real_training_copies(
    hippocampus_dir: Path, tmp_path: Path, shipped_models: None
) -> None:
    cand = tmp_path / "cand"
    cand.mkdir()
    for name in ("hippocampus_001.nii.gz", "hippocampus_150.nii.gz"):
        shutil.copy(hippocampus_dir / name, cand / f"copy_of_{name}")
    for policy in ("strict", "standard", "permissive"):
        result = CliRunner().invoke(main, ["check", str(cand), "--policy", policy, "--device", "cpu"])
        assert result.exit_code == 1, result.output
        assert "checked 2: 0 pass, 0 flag, 2 reject; 0 unreadable" in result.output


def test_undecidable_candidates_are_audited_as_errors(
    runner: CliRunner, index_dir: Path, train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class NaNEncoder(ProjectionEncoder):
        def embed_array(self, batch: np.ndarray) -> np.ndarray:
            return super().embed_array(batch) * np.nan

    broken = NaNEncoder(dim=16)
    monkeypatch.setattr(gate.cli.check, "load_encoder", lambda encoder_dir, device: broken)
    result = runner.invoke(main, ["check", str(train_dir), "--index", str(index_dir)])
    assert result.exit_code == 3, result.output
    records = list(AuditLog(tmp_path / "audit.jsonl").records())
    assert len(records) == N_TRAIN and {r.verdict for r in records} == {"error"}
    assert all(r.error.startswith("IntegrityError: encoder returned") for r in records)
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_chunked_judging_gives_the_same_report_and_one_record_each(
    runner: CliRunner, index_dir: Path, train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gate.engine

    cand = tmp_path / "cand"
    shutil.copytree(train_dir, cand)
    (cand / "broken.nii.gz").write_bytes(b"not a volume")
    reports = {}
    for chunk in (512, 3):  # one pass, then 3 sources at a time (4 chunks of the 9 sources)
        monkeypatch.setattr(gate.engine, "JUDGE_CHUNK", chunk)
        report = tmp_path / f"r{chunk}.json"
        result = runner.invoke(
            main, ["check", str(cand), "--policy", "strict", "--index", str(index_dir), "--json", str(report)]
        )
        assert result.exit_code == 3, result.output
        reports[chunk] = json.loads(report.read_text())
    assert reports[3]["results"] == reports[512]["results"]
    assert (
        reports[3]["summary"]
        == reports[512]["summary"]
        == {"pass": 0, "flag": 0, "reject": N_TRAIN, "unreadable": 1}
    )
    log = AuditLog(tmp_path / "audit.jsonl")
    assert verify_log(log.path).ok
    assert len(list(log.records())) == 2 * (N_TRAIN + 1)


def test_a_failing_chunk_leaves_every_source_with_exactly_one_record(
    runner: CliRunner, index_dir: Path, train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gate.engine
    from gate.engine.local import LocalEngine

    monkeypatch.setattr(gate.engine, "JUDGE_CHUNK", 3)
    calls = {"n": 0}
    real_embed = LocalEngine.embed

    def embed_then_fail(self: LocalEngine, items: list) -> list:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("encoder crashed")
        return real_embed(self, items)

    monkeypatch.setattr(LocalEngine, "embed", embed_then_fail)
    result = runner.invoke(main, ["check", str(train_dir), "--policy", "strict", "--index", str(index_dir)])
    assert result.exit_code == 4, result.output
    records = list(AuditLog(tmp_path / "audit.jsonl").records())
    assert len(records) == N_TRAIN  # 3 decided, 3 of the failed chunk, 2 never read
    assert [r.verdict for r in records] == ["reject"] * 3 + ["error"] * 5
    assert all(r.error == "RuntimeError: encoder crashed" for r in records[3:])


def test_chunks_stop_at_the_voxel_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large candidates are read a few at a time (header estimates), small ones JUDGE_CHUNK at a time."""
    import nibabel as nib
    import numpy as np

    import gate.engine
    from gate.volume import estimate_voxels

    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), small)
    big = tmp_path / "big.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((100, 100, 50), np.float32), np.eye(4)), big)
    assert estimate_voxels(small) == 1000 and estimate_voxels(big) == 500_000
    assert estimate_voxels(tmp_path / "missing.nii.gz") == 0
    monkeypatch.setattr(gate.engine, "JUDGE_VOXELS", 1_200_000)
    monkeypatch.setattr(gate.engine, "JUDGE_CHUNK", 4)
    sources = [big, big, big, small, small, small, small, small, big]
    assert gate.engine.chunk_bounds(sources) == [(0, 2), (2, 6), (6, 9)]
    assert gate.engine.chunk_bounds([]) == [(0, 0)]
    monkeypatch.setattr(gate.engine, "JUDGE_VOXELS", 10)
    assert gate.engine.chunk_bounds([big, big]) == [(0, 1), (1, 2)]  # one source even over budget
