"""``gate encoder train/export`` end to end on tiny .npy volumes (padded to the default grid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from gate.cli import main
from gate.embed import Encoder


def _npy_folder(data: Path, n: int, seed: int) -> Path:
    """``n`` random 16^3 .npy volumes in a new folder ``data``."""
    data.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(data / f"vol{i}.npy", rng.random((16, 16, 16)).astype(np.float32))
    return data


def test_train_resume_export_embed(tmp_path: Path) -> None:
    data = _npy_folder(tmp_path / "data", 4, seed=0)
    key = ["--id-key-file", str(tmp_path / "key")]
    runner = CliRunner()
    ck = tmp_path / "ck"
    args = [
        "encoder",
        "train",
        "--data",
        str(data),
        "--out",
        str(ck),
        "--batch-size",
        "2",
        *key,
    ]
    r = runner.invoke(main, [*args, "--epochs", "1"])
    assert r.exit_code == 0, r.output
    assert "epoch 1/1 loss=" in r.output
    r = runner.invoke(main, [*args, "--epochs", "1", "--no-resume"])
    assert r.exit_code == 2 and "already holds a checkpoint and --no-resume was given" in r.output
    r = runner.invoke(main, [*args, "--epochs", "2"])  # another run's config: refused, not mixed
    assert r.exit_code == 2 and "holds a checkpoint of another run" in r.output
    out = tmp_path / "model"
    r = runner.invoke(
        main, ["encoder", "export", "--checkpoint", str(ck), "--data", str(data), "--out", str(out), *key]
    )
    assert r.exit_code == 0, r.output
    assert "parity max abs diff" in r.output
    enc = Encoder(out, device="cpu")
    assert r.output.strip().splitlines()[-1].startswith(enc.sha256)
    assert enc.manifest.training["n_volumes"] == 4 and enc.manifest.training["epochs"] == 1
    r = runner.invoke(
        main, ["encoder", "export", "--checkpoint", str(ck), "--data", str(data), "--out", str(out), *key]
    )
    assert r.exit_code == 2 and "exists; pass --force to replace it" in r.output


def test_eval_help_lists_options() -> None:
    r = CliRunner().invoke(main, ["eval", "--help"])
    assert r.exit_code == 0 and "--encoder NAME=DIR" in r.output and "--write-split" in r.output


def test_train_augment_overrides(tmp_path: Path) -> None:
    """--augment FIELD=VALUE reaches the checkpoint's config; a bad field or value is one clear line."""
    from gate.encoder.train import load_checkpoint

    data = _npy_folder(tmp_path / "data", 3, seed=1)
    base = ["encoder", "train", "--data", str(data), "--epochs", "1", "--batch-size", "2"]
    base += ["--id-key-file", str(tmp_path / "key")]
    runner = CliRunner()
    ck = tmp_path / "ck"
    args = [*base, "--out", str(ck), "--augment", "rotate_deg=5", "--augment", "gamma=[0.8, 1.2]"]
    r = runner.invoke(main, [*args, "--augment", "window_shift_vox=0"])
    assert r.exit_code == 0, r.output
    aug = load_checkpoint(ck).config.augment
    assert aug.rotate_deg == 5.0 and aug.gamma == (0.8, 1.2) and aug.window_shift_vox == 0
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "b"), "--augment", "spin=3"])
    assert r.exit_code == 2 and "--augment spin: Extra inputs are not permitted" in r.output
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "c"), "--augment", "window_shift_vox=-1"])
    assert (
        r.exit_code == 2
        and "--augment window_shift_vox: Input should be greater than or equal to 0" in r.output
    )
    r = runner.invoke(main, [*base, "--out", str(tmp_path / "d"), "--augment", "rotate_deg"])
    assert r.exit_code == 2 and "--augment expects FIELD=VALUE; got 'rotate_deg'" in r.output


def test_chosen_preprocessing_travels_with_encoder_and_index(tmp_path: Path) -> None:
    from gate.index_manifest import read_manifest
    from gate.preprocess import PreprocessConfig

    data = _npy_folder(tmp_path / "data", 4, seed=1)
    key = ["--id-key-file", str(tmp_path / "key")]
    runner = CliRunner()
    chosen = ["--grid", "16", "16", "16", "--fov", "fit", "--percentile-region", "foreground"]
    ck, out, idx = tmp_path / "ck", tmp_path / "model", tmp_path / "idx"
    r = runner.invoke(
        main,
        [
            "encoder",
            "train",
            "--data",
            str(data),
            "--out",
            str(ck),
            "--batch-size",
            "2",
            "--epochs",
            "1",
            *chosen,
            *key,
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        main, ["encoder", "export", "--checkpoint", str(ck), "--data", str(data), "--out", str(out), *key]
    )
    assert r.exit_code == 0, r.output
    expected = PreprocessConfig(grid=(16, 16, 16), fov="fit", percentile_region="foreground")
    enc = Encoder(out, device="cpu")
    assert enc.preprocess == expected and enc.manifest.preprocess_digest == expected.digest
    assert expected.digest != PreprocessConfig(grid=(16, 16, 16)).digest
    r = runner.invoke(
        main,
        [
            "index",
            "build",
            "--data",
            str(data),
            "--encoder",
            str(out),
            "--out",
            str(idx),
            "--poses",
            "none",
            *key,
        ],
    )
    assert r.exit_code == 0, r.output
    manifest = read_manifest(idx)
    assert manifest.preprocess_digest == expected.digest and manifest.domain is not None
    assert manifest.domain.grid == (16, 16, 16) and manifest.domain.fov_mm_max == (16.0, 16.0, 16.0)
