"""Tiny generator configs and a trained-once tiny generator for the generator / pipeline tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gate.generator.config import LDMConfig
from gate.generator.train import train
from gate.preprocess import PreprocessConfig
from tests.volumes import make_blob


def tiny_fields(grid: tuple[int, int, int] = (16, 16, 16), **overrides: object) -> dict[str, object]:
    """Two-level 8-channel nets, 1 epoch each, 20 timesteps, 2 DDIM steps: a second to train."""
    fields: dict[str, object] = {
        "preprocess": PreprocessConfig(grid=grid),
        "ae_channels": (8, 8),
        "norm_num_groups": 4,
        "disc_channels": 8,
        "disc_layers": 1,
        "ae_epochs": 1,
        "ae_batch_size": 2,
        "adv_start_epoch": 0,
        "unet_channels": (8, 8),
        "unet_attention": (False, False),
        "unet_head_channels": 8,
        "unet_epochs": 1,
        "unet_batch_size": 4,
        "train_timesteps": 20,
        "ddim_steps": 2,
    }
    fields.update(overrides)
    return fields


def tiny_config(grid: tuple[int, int, int] = (16, 16, 16), **overrides: object) -> LDMConfig:
    return LDMConfig.model_validate(tiny_fields(grid, **overrides))


def blob_data(n: int, grid: tuple[int, int, int] = (16, 16, 16)) -> np.ndarray:
    """(n, 1, *grid) float32 blobs in [0, 1]."""
    out = np.stack([make_blob(grid, seed=i) for i in range(n)])[:, None].astype(np.float32)
    out -= out.min(axis=(1, 2, 3, 4), keepdims=True)
    out /= out.max(axis=(1, 2, 3, 4), keepdims=True)
    return out


def train_tiny(out_dir: Path, data: np.ndarray, config: LDMConfig) -> Path:
    train(data, config, out_dir, device="cpu")
    return out_dir
