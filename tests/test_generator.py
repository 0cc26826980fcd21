"""Generator slice: config rules, two-stage training, resume, integrity, sampling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gate.errors import IntegrityError, UsageError
from gate.generator.config import LDMConfig, config_from_dict, read_manifest
from gate.generator.sample import Generator
from gate.generator.state import load_npz
from gate.generator.train import EpochReport, StepReport, train
from gate.preprocess import PreprocessConfig
from tests.generator_helpers import blob_data, tiny_config, tiny_fields

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ldm") / "model"
    train(blob_data(6), tiny_config(), out, device="cpu")
    return out


# --- config rules: one test per rule, exact message -------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ae_channels": ()}, "ae_channels must be one or more positive ints; got ()"),
        ({"unet_channels": (8, 0)}, "unet_channels must be one or more positive ints; got (8, 0)"),
        ({"norm_num_groups": 3}, "norm_num_groups 3 must divide every channel count; got [8, 8, 8, 8]"),
        (
            {"ae_channels": (8, 8, 8), "preprocess": PreprocessConfig(grid=(16, 16, 10))},
            "preprocess.grid (16, 16, 10) must be divisible by 4 (2 ** (len(ae_channels) - 1))",
        ),
        (
            {"unet_channels": (8,) * 5, "unet_attention": (False,) * 5},
            "latent grid (8, 8, 8) must be divisible by 16 (2 ** (len(unet_channels) - 1))",
        ),
        ({"unet_attention": (False,)}, "unet_attention needs one flag per UNet level (2); got 1"),
        ({"beta_start": 0.02, "beta_end": 0.01}, "beta_start 0.02 must be < beta_end 0.01"),
        ({"ddim_steps": 21}, "ddim_steps 21 must be <= train_timesteps 20"),
    ],
)
def test_config_rule(fields: dict[str, object], message: str) -> None:
    with pytest.raises(
        UsageError, match=f"^cfg: invalid generator config \\(config: {re.escape(message)}\\)$"
    ):
        config_from_dict(tiny_fields(**fields), "cfg")


def test_config_from_dict_is_one_usage_line() -> None:
    with pytest.raises(
        UsageError,
        match=r"^cfg.json: invalid generator config \(config: beta_start 0.02 must be < beta_end 0.01\)$",
    ):
        config_from_dict({"beta_start": 0.02, "beta_end": 0.01}, "cfg.json")


def test_config_unknown_field_refused() -> None:
    with pytest.raises(
        UsageError, match=r"invalid generator config \(epochs: Extra inputs are not permitted\)"
    ):
        config_from_dict({"epochs": 3}, "options")


def test_default_config_shapes_and_digest() -> None:
    cfg = LDMConfig()
    assert cfg.preprocess == PreprocessConfig()
    assert cfg.latent_shape == (3, 8, 12, 8)
    assert cfg.digest == LDMConfig.model_validate(json.loads(cfg.model_dump_json())).digest
    assert cfg.digest != LDMConfig(seed=1).digest


# --- training ----------------------------------------------------------------------------------


def test_training_writes_manifest_weights_and_log(tiny_model: Path) -> None:
    manifest = read_manifest(tiny_model)
    cfg = tiny_config()
    assert manifest.config_sha256 == cfg.digest
    assert manifest.preprocess_sha256 == cfg.preprocess.digest
    assert manifest.complete and manifest.n_training_volumes == 6
    assert manifest.autoencoder.epochs_done == 1 and manifest.unet.epochs_done == 1
    assert np.isfinite(manifest.autoencoder.final_loss) and np.isfinite(manifest.unet.final_loss)
    assert manifest.scale_factor > 0
    lines = [json.loads(x) for x in (tiny_model / "train_log.jsonl").read_text().splitlines()]
    assert [x.get("stage") for x in lines if "loss" in x] == ["autoencoder", "unet"]
    arrays, _ = load_npz(tiny_model / "weights.npz")
    assert all(a.dtype == np.float16 for a in arrays.values() if a.dtype.kind == "f")
    assert not any(k.startswith(("discriminator", "opt")) for k in arrays)


def test_duplicate_factor_repeats_every_volume(tmp_path: Path) -> None:
    steps: list[StepReport] = []
    cfg = tiny_config(duplicate_factor=3, ae_batch_size=2, unet_batch_size=2)
    train(blob_data(4), cfg, tmp_path / "m", on_step=steps.append)
    assert {s.steps for s in steps if s.stage == "autoencoder"} == {6}  # 4 * 3 / 2


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg = tiny_config(ae_epochs=2, unet_epochs=2)
    data = blob_data(4)
    train(data, cfg, tmp_path / "full")

    def stop_after_first(report: EpochReport) -> None:
        if report.epoch == 0:
            raise KeyboardInterrupt

    for _ in range(2):  # interrupted once in each stage
        with pytest.raises(KeyboardInterrupt):
            train(data, cfg, tmp_path / "resumed", on_epoch=stop_after_first)
        stop_after_first = _stop_in_unet  # type: ignore[assignment]
    manifest = train(data, cfg, tmp_path / "resumed")
    assert manifest.autoencoder.epochs_done == 2 and manifest.unet.epochs_done == 2
    full, _ = load_npz(tmp_path / "full" / "weights.npz")
    resumed, _ = load_npz(tmp_path / "resumed" / "weights.npz")
    assert full.keys() == resumed.keys()
    for key in full:
        np.testing.assert_array_equal(full[key], resumed[key], err_msg=key)
    events = [
        json.loads(x).get("event")
        for x in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()
    ]
    assert events.count("resume") >= 2


def _stop_in_unet(report: EpochReport) -> None:
    if report.stage == "unet" and report.epoch == 0:
        raise KeyboardInterrupt


def test_out_dir_with_other_config_refused(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    train(blob_data(2), tiny_config(), out)
    with pytest.raises(UsageError, match=r"holds a run with a different config .*; use a new --out"):
        train(blob_data(2), tiny_config(seed=5), out)


def test_training_data_off_grid_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"training data must be float32 \(N, \(1, 16, 16, 16\)\)"):
        train(blob_data(2, grid=(8, 8, 8)), tiny_config(), tmp_path / "m")


# --- sampling ----------------------------------------------------------------------------------


def test_samples_on_grid_in_unit_range_and_reproducible(tiny_model: Path) -> None:
    gen = Generator(tiny_model, device="cpu")
    a = gen.sample(seed=3, start=0, count=3)
    assert a.shape == (3, 1, 16, 16, 16) and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    b = gen.sample(seed=3, start=1, count=1)  # sample 1 alone, in another batch
    np.testing.assert_allclose(a[1:2], b, atol=1e-5)
    c = gen.sample(seed=4, start=0, count=1)
    assert not np.allclose(a[:1], c)


def test_batches_yield_volumes(tiny_model: Path) -> None:
    gen = Generator(tiny_model, device="cpu")
    batches = list(gen.batches(5, batch_size=2, seed=1))
    assert [len(b) for b in batches] == [2, 2, 1]
    vol = batches[2][0]
    assert vol.shape == (16, 16, 16) and vol.source.endswith(":seed1:4")
    assert vol.patient_id == "synthetic"


def test_ddim_steps_checked(tiny_model: Path) -> None:
    gen = Generator(tiny_model, device="cpu")
    with pytest.raises(UsageError, match=r"^--ddim-steps must be in \[1, 20\]; got 21$"):
        gen.sample(0, 0, 1, ddim_steps=21)


def test_tampered_weights_refused(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("generator.json", "weights.npz"):
        (copy / name).write_bytes((tiny_model / name).read_bytes())
    with (copy / "weights.npz").open("r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(IntegrityError, match=r"weights.npz: sha256 \w{12} does not match generator.json"):
        Generator(copy, device="cpu")


def test_missing_model_dir_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match=r"generator.json: generator manifest not found"):
        Generator(tmp_path, device="cpu")


def test_cuda_refused_when_unavailable(tiny_model: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(UsageError, match=r"^--device cuda: no CUDA device visible to torch"):
        Generator(tiny_model, device="cuda")


def test_autoencoder_checkpoint_reused_when_only_unet_fields_change(tmp_path: Path) -> None:
    data = blob_data(4)
    first = tiny_config()
    train(data, first, tmp_path / "a")
    second = tiny_config(unet_epochs=2, ddim_steps=1)
    assert second.autoencoder_digest == first.autoencoder_digest and second.digest != first.digest
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    ckpt = "checkpoints/autoencoder.npz"
    (tmp_path / "b" / ckpt).write_bytes((tmp_path / "a" / ckpt).read_bytes())
    steps: list[StepReport] = []
    manifest = train(data, second, tmp_path / "b", on_step=steps.append)
    assert {s.stage for s in steps} == {"unet"} and manifest.unet.epochs_done == 2
    a, _ = load_npz(tmp_path / "a" / "weights.npz")
    b, _ = load_npz(tmp_path / "b" / "weights.npz")
    for key in (k for k in a if k.startswith("autoencoder/")):
        np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(UsageError, match=r"holds a run with a different config \(autoencoder.npz: "):
        train(data, tiny_config(ae_lr=1e-3), tmp_path / "b")
