"""``gate ldm train`` and ``gate generate`` through the real command line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gate.cli import main
from gate.generator.sample import DEFAULT_GENERATOR_DIR
from gate.index import DEFAULT_INDEX_DIR
from tests.generator_helpers import tiny_fields
from tests.volumes import make_blob, write_nifti

ENCODER_DIR = DEFAULT_GENERATOR_DIR.parent / "encoder"


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.delenv("GATE_AUDIT_LOG", raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def _tiny_data(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        write_nifti(data / f"case_{i}.nii.gz", make_blob((18, 16, 17), seed=i))
    cfg = tmp_path / "cfg.json"
    fields = tiny_fields()
    fields["preprocess"] = {"grid": [16, 16, 16]}
    cfg.write_text(json.dumps(fields))
    return data, cfg


def test_ldm_train_writes_model_and_resumes(runner: CliRunner, tmp_path: Path) -> None:
    data, cfg = _tiny_data(tmp_path)
    args = ["ldm", "train", "--data", str(data), "--out", "m", "--config", str(cfg), "--threads", "1"]
    first = runner.invoke(main, [*args, "--device", "cpu"])
    assert first.exit_code == 0, first.output + first.stderr
    assert "autoencoder epoch 1/1 loss" in first.stderr and "unet epoch 1/1 loss" in first.stderr
    assert "done in" in first.stdout
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "weights.npz",
        "generator.json",
        "train_log.jsonl",
    }
    again = runner.invoke(main, [*args, "--unet-epochs", "2"])  # another config: refused
    assert again.exit_code == 2
    assert "holds a run with a different config" in again.stderr


def test_ldm_train_bad_config_is_usage_error(runner: CliRunner, tmp_path: Path) -> None:
    data, cfg = _tiny_data(tmp_path)
    cfg.write_text(json.dumps({"beta_start": 0.5, "beta_end": 0.1}))
    result = runner.invoke(main, ["ldm", "train", "--data", str(data), "--out", "m", "--config", str(cfg)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"gate: error: {cfg}: invalid generator config (config: beta_start 0.5 must be < beta_end 0.1)"
    )


def test_generate_unknown_format_is_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(main, ["generate", "--n", "1", "--formats", "nifti,tiff"])
    assert result.exit_code == 2
    assert "--formats 'nifti,tiff': expected some of nifti, dicom" in result.stderr


def _shipped() -> None:
    missing = [p for p in (DEFAULT_GENERATOR_DIR, ENCODER_DIR, DEFAULT_INDEX_DIR) if not p.is_dir()]
    if missing:
        pytest.skip(f"shipped models missing: {', '.join(str(p) for p in missing)}")


def test_generate_with_shipped_models(runner: CliRunner, tmp_path: Path) -> None:
    _shipped()
    args = ["generate", "--n", "2", "--policy", "permissive", "--batch-size", "2", "--ddim-steps", "2"]
    result = runner.invoke(main, [*args, "--json", "summary.json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    bundle = Path(summary["bundle"])
    assert bundle.parent == Path("gate-out") and bundle.name == f"gate-{summary['run_id']}"
    assert summary["exported"] == 2 and (tmp_path / bundle / "manifest.json").is_file()
    assert "time per stage: load" in result.stdout and "memorization:" in result.stdout
    verify = runner.invoke(
        main, ["verify-bundle", str(bundle), "--policy", "permissive", "--audit-log", "gate-out/audit.jsonl"]
    )
    assert verify.exit_code == 0, verify.output + verify.stderr


def test_generate_tampered_generator_fails_closed(runner: CliRunner, tmp_path: Path) -> None:
    _shipped()
    copy = tmp_path / "gen"
    shutil.copytree(DEFAULT_GENERATOR_DIR, copy)
    (copy / "weights.npz").write_bytes((copy / "weights.npz").read_bytes()[:-10] + b"0123456789")
    result = runner.invoke(main, ["generate", "--n", "1", "--generator", str(copy)])
    assert result.exit_code == 3
    assert "does not match generator.json" in result.stderr
    assert not (tmp_path / "gate-out").exists()
