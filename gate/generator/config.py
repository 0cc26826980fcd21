"""The latent diffusion generator's configuration as data, and the manifest saved beside its weights.

:class:`LDMConfig` fixes everything that shapes the networks and their training (grid, channels,
latent shape, noise schedule, epochs, seed). It is validated once, here, one rule per error, and
is written into ``generator.json`` beside the weights together with its sha256 and the digest of
the :class:`~gate.preprocess.PreprocessConfig` the training volumes went through, so generated
volumes provably live on the encoder's grid.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gate.digest import sha256_json
from gate.errors import IntegrityError, UsageError
from gate.preprocess import PreprocessConfig

MANIFEST_NAME = "generator.json"
"""File name of the manifest (config, digests, scale factor, training summary) in a model dir."""

WEIGHTS_NAME = "weights.npz"
"""File name of the shipped weights (autoencoder + UNet, no discriminator, no optimiser)."""

DEFAULT_AE_CHANNELS: tuple[int, ...] = (16, 32, 32)
"""Autoencoder channels per level. Three levels = two 2x downsamplings: 32x48x32 -> 8x12x8.
Measured here at ~1.3 s per batch-4 step on one contended core; wider levels double that."""

DEFAULT_UNET_CHANNELS: tuple[int, ...] = (32, 64, 64)
"""UNet channels per level on the 8x12x8 latent (2.9 M parameters, ~6 MB as float16)."""

DEFAULT_TRAIN_TIMESTEPS = 1000
"""DDPM training timesteps (the standard of Ho et al. and MONAI's LDM tutorials)."""

DEFAULT_DDIM_STEPS = 25
"""DDIM sampling steps. Measured with bench/sampling.py (2 threads, batch 16, quiet machine):
10 steps 83 ms, 25 steps 124 ms, 50 steps 209 ms per volume; the decoder is a fixed ~55 ms.
25 steps keeps the 500-sample strict run at ~3 min (bench/generate_e2e.py) while 10 steps
gives visibly noisier samples; 50 steps costs 1.7x for samples that look the same by eye at
this resolution."""


class LDMConfig(BaseModel):
    """Everything that defines a latent diffusion generator and its training.

    Attributes:
        preprocess: the preprocessing of the training volumes (the encoder's grid).
        seed: seeds weight init, shuffling and noise; one seed reproduces a run on CPU.
        ae_channels: autoencoder channels per level; len - 1 = number of 2x downsamplings.
        ae_res_blocks: residual blocks per autoencoder level.
        latent_channels: channels of the latent, e.g. 3 -> latent (3, X/4, Y/4, Z/4).
        norm_num_groups: GroupNorm groups, must divide every channel count.
        disc_channels: PatchDiscriminator base channels.
        disc_layers: PatchDiscriminator strided layers.
        ae_epochs: autoencoder epochs.
        ae_batch_size: autoencoder batch size (volumes).
        ae_lr: Adam learning rate of autoencoder and discriminator.
        kl_weight: weight of the KL term (small: keeps the latent near-Gaussian, not blurry).
        adv_weight: weight of the patch adversarial term.
        adv_start_epoch: epoch (0-based) at which the adversarial term switches on.
        unet_channels: diffusion UNet channels per level.
        unet_attention: attention on/off per UNet level (same length as unet_channels).
        unet_res_blocks: residual blocks per UNet level.
        unet_head_channels: channels per attention head.
        unet_epochs: UNet epochs.
        unet_batch_size: UNet batch size (latents).
        unet_lr: Adam learning rate of the UNet.
        train_timesteps: DDPM training timesteps.
        beta_start: first beta of the scaled-linear schedule.
        beta_end: last beta of the scaled-linear schedule.
        ddim_steps: default DDIM sampling steps.
        duplicate_factor: every training volume appears this many times per epoch
            (memorization-prone mode when > 1, as in the DeepSSIM / Dar et al. setups).
        train_subset: train on only the first this-many volumes (None = all); with
            duplication it makes a generator that copies its few patients.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    seed: int = 0
    ae_channels: tuple[int, ...] = DEFAULT_AE_CHANNELS
    ae_res_blocks: int = Field(default=1, ge=1)
    latent_channels: int = Field(default=3, ge=1)
    norm_num_groups: int = Field(default=8, ge=1)
    disc_channels: int = Field(default=16, ge=1)
    disc_layers: int = Field(default=2, ge=1)
    ae_epochs: int = Field(default=12, ge=1)
    ae_batch_size: int = Field(default=4, ge=1)
    ae_lr: float = Field(default=2e-4, gt=0)
    kl_weight: float = Field(default=1e-6, ge=0)
    adv_weight: float = Field(default=0.01, ge=0)
    adv_start_epoch: int = Field(default=2, ge=0)
    unet_channels: tuple[int, ...] = DEFAULT_UNET_CHANNELS
    unet_attention: tuple[bool, ...] = (False, False, True)
    unet_res_blocks: int = Field(default=1, ge=1)
    unet_head_channels: int = Field(default=32, ge=1)
    unet_epochs: int = Field(default=200, ge=1)
    unet_batch_size: int = Field(default=16, ge=1)
    unet_lr: float = Field(default=2.5e-4, gt=0)
    train_timesteps: int = Field(default=DEFAULT_TRAIN_TIMESTEPS, ge=2)
    beta_start: float = Field(default=0.0015, gt=0)
    beta_end: float = Field(default=0.0195, lt=1)
    ddim_steps: int = Field(default=DEFAULT_DDIM_STEPS, ge=1)
    duplicate_factor: int = Field(default=1, ge=1)
    train_subset: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> LDMConfig:
        """One rule per error; the messages are tested verbatim in tests/test_generator.py."""
        if not self.ae_channels or any(c < 1 for c in self.ae_channels):
            raise ValueError(f"ae_channels must be one or more positive ints; got {self.ae_channels}")
        if not self.unet_channels or any(c < 1 for c in self.unet_channels):
            raise ValueError(f"unet_channels must be one or more positive ints; got {self.unet_channels}")
        bad = [c for c in (*self.ae_channels, *self.unet_channels) if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups {self.norm_num_groups} must divide every channel count; got {bad}"
            )
        factor = 2 ** (len(self.ae_channels) - 1)
        if any(g % factor for g in self.preprocess.grid):
            raise ValueError(
                f"preprocess.grid {self.preprocess.grid} must be divisible by {factor} "
                f"(2 ** (len(ae_channels) - 1))"
            )
        latent_factor = 2 ** (len(self.unet_channels) - 1)
        if any(g % latent_factor for g in self.latent_grid):
            raise ValueError(
                f"latent grid {self.latent_grid} must be divisible by {latent_factor} "
                f"(2 ** (len(unet_channels) - 1))"
            )
        if len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(
                f"unet_attention needs one flag per UNet level ({len(self.unet_channels)}); "
                f"got {len(self.unet_attention)}"
            )
        if not self.beta_start < self.beta_end:
            raise ValueError(f"beta_start {self.beta_start} must be < beta_end {self.beta_end}")
        if self.ddim_steps > self.train_timesteps:
            raise ValueError(
                f"ddim_steps {self.ddim_steps} must be <= train_timesteps {self.train_timesteps}"
            )
        return self

    @property
    def latent_grid(self) -> tuple[int, int, int]:
        """Spatial latent shape (X, Y, Z) = grid / 2 ** (levels - 1)."""
        factor = 2 ** (len(self.ae_channels) - 1)
        x, y, z = (g // factor for g in self.preprocess.grid)
        return x, y, z

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """Latent shape (C, X, Y, Z) without the batch axis."""
        return (self.latent_channels, *self.latent_grid)

    @cached_property
    def digest(self) -> str:
        """sha256 of the canonical JSON of this config."""
        return sha256_json(self.model_dump(mode="json"))

    @cached_property
    def autoencoder_digest(self) -> str:
        """sha256 of the fields that shape stage 1 only (see :data:`AUTOENCODER_FIELDS`).

        An autoencoder checkpoint is reused when only UNet-stage fields (UNet size, epochs,
        schedule, DDIM steps) change, so a longer or shorter UNet run needs no new autoencoder.
        """
        return sha256_json(self.model_dump(mode="json", include=set(AUTOENCODER_FIELDS)))


AUTOENCODER_FIELDS: tuple[str, ...] = (
    "preprocess",
    "seed",
    "ae_channels",
    "ae_res_blocks",
    "latent_channels",
    "norm_num_groups",
    "disc_channels",
    "disc_layers",
    "ae_epochs",
    "ae_batch_size",
    "ae_lr",
    "kl_weight",
    "adv_weight",
    "adv_start_epoch",
    "duplicate_factor",
    "train_subset",
)
"""Config fields that determine the trained autoencoder (and so its checkpoint's validity).
``norm_num_groups`` is shared with the UNet, so changing it retrains both."""


def config_from_dict(data: dict[str, object], source: str) -> LDMConfig:
    """Validate a config mapping, turning pydantic errors into one-line usage errors.

    Args:
        data: the mapping (e.g. read from a JSON file or built from CLI options).
        source: where it came from, for the message.

    Returns:
        The validated config.

    Raises:
        UsageError: the mapping violates a rule; the message names the rule.

    """
    try:
        return LDMConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        msg = str(first["msg"]).removeprefix("Value error, ")
        raise UsageError(f"{source}: invalid generator config ({where}: {msg})") from err


class StageSummary(BaseModel):
    """What one training stage did.

    Attributes:
        epochs_done: epochs completed.
        epochs_planned: epochs in the config.
        final_loss: mean training loss of the last epoch (stage-specific: L1+KL+adv or MSE).
        losses: mean loss per epoch.
        seconds: wall time spent in this stage (summed over resumed runs).

    """

    model_config = ConfigDict(extra="forbid")

    epochs_done: int
    epochs_planned: int
    final_loss: float | None = None
    losses: list[float] = Field(default_factory=list)
    seconds: float = 0.0


class GeneratorManifest(BaseModel):
    """``generator.json``: what the weights are, how they were made, and how to check them.

    Attributes:
        config: the full training config.
        config_sha256: :attr:`LDMConfig.digest`.
        preprocess_sha256: digest of ``config.preprocess`` (the grid generated volumes live on).
        weights_sha256: sha256 of ``weights.npz``.
        weights_dtype: dtype the weights are stored in (float16 halves the size; loaded as float32).
        scale_factor: 1 / std of the training latents (Rombach et al.), applied before the UNet.
        n_training_volumes: distinct training volumes.
        autoencoder: autoencoder stage summary.
        unet: UNet stage summary.
        complete: False for a snapshot taken before the UNet stage finished.
        versions: library versions that trained it.

    """

    model_config = ConfigDict(extra="forbid")

    config: LDMConfig
    config_sha256: str
    preprocess_sha256: str
    weights_sha256: str
    weights_dtype: str = "float16"
    scale_factor: float
    n_training_volumes: int
    autoencoder: StageSummary
    unet: StageSummary
    complete: bool
    versions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _digests_match(self) -> GeneratorManifest:
        if self.config.digest != self.config_sha256:
            raise ValueError(
                f"config_sha256 {self.config_sha256[:12]} does not match the config's digest "
                f"{self.config.digest[:12]}"
            )
        if self.config.preprocess.digest != self.preprocess_sha256:
            raise ValueError("preprocess_sha256 does not match config.preprocess")
        return self


def read_manifest(model_dir: Path) -> GeneratorManifest:
    """Read and validate ``generator.json`` from a model directory.

    Raises:
        IntegrityError: missing, unreadable or inconsistent manifest.

    """
    path = model_dir / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return GeneratorManifest.model_validate(raw)
    except FileNotFoundError as err:
        raise IntegrityError(
            f"{path}: generator manifest not found; expected a directory made by `gate ldm train`"
        ) from err
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}: invalid generator manifest ({str(err).splitlines()[0]})") from err
