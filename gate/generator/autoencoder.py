"""The networks of the latent diffusion generator, built from an :class:`LDMConfig`.

MONAI's ``AutoencoderKL`` compresses a (1, X, Y, Z) volume to a (C, X/4, Y/4, Z/4) latent; a
``PatchDiscriminator`` supplies the adversarial term while training it; ``DiffusionModelUNet``
denoises scaled latents. Non-local attention in the autoencoder is off: at 32x48x32 it costs
more than the rest of the network and the crops are small enough for convolutions alone.
"""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from gate.generator.config import LDMConfig

SCHEDULE = "scaled_linear_beta"
"""Noise schedule of Rombach et al.'s latent diffusion (and MONAI's 3D LDM tutorial)."""


def build_autoencoder(config: LDMConfig) -> AutoencoderKL:
    """Build the KL autoencoder: (N, 1, X, Y, Z) in [0, 1] <-> latent (N, C, X/4, Y/4, Z/4)."""
    levels = len(config.ae_channels)
    return AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=config.ae_channels,
        latent_channels=config.latent_channels,
        num_res_blocks=(config.ae_res_blocks,) * levels,
        attention_levels=(False,) * levels,
        norm_num_groups=config.norm_num_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def build_discriminator(config: LDMConfig) -> PatchDiscriminator:
    """Patch discriminator for the autoencoder's adversarial term (training only)."""
    return PatchDiscriminator(
        spatial_dims=3, channels=config.disc_channels, in_channels=1, num_layers_d=config.disc_layers
    )


def build_unet(config: LDMConfig) -> DiffusionModelUNet:
    """Build the diffusion UNet predicting the noise added to a scaled latent."""
    levels = len(config.unet_channels)
    return DiffusionModelUNet(
        spatial_dims=3,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        channels=config.unet_channels,
        attention_levels=config.unet_attention,
        num_res_blocks=(config.unet_res_blocks,) * levels,
        norm_num_groups=config.norm_num_groups,
        num_head_channels=config.unet_head_channels,
    )


def build_ddpm(config: LDMConfig) -> DDPMScheduler:
    """Build the training-time noise scheduler."""
    return DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        schedule=SCHEDULE,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        clip_sample=False,
    )


def build_ddim(config: LDMConfig, steps: int) -> DDIMScheduler:
    """Build a DDIM sampler over the training schedule with ``steps`` denoising steps.

    ``clip_sample`` is off: scaled latents have unit variance and are not bounded by [-1, 1].
    """
    scheduler = DDIMScheduler(
        num_train_timesteps=config.train_timesteps,
        schedule=SCHEDULE,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        clip_sample=False,
    )
    scheduler.set_timesteps(num_inference_steps=steps)
    return scheduler


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent voxels, averaged over the batch."""
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1, dim=dims)
    return kl.mean()


def adversarial_loss() -> PatchAdversarialLoss:
    """Least-squares patch adversarial loss (MONAI's LDM tutorial choice)."""
    return PatchAdversarialLoss(criterion="least_squares")
