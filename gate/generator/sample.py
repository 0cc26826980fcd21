"""Load a trained latent diffusion generator and sample volumes from it with DDIM.

:class:`Generator` checks ``weights.npz`` against the sha256 in ``generator.json`` before
building anything (an edited or swapped file is an :class:`~gate.errors.IntegrityError`),
then samples with MONAI's ``LatentDiffusionInferer`` and a ``DDIMScheduler``. The noise of
sample ``i`` is drawn from a generator seeded by ``(seed, i)`` alone, so a sample does not
depend on the batch it was drawn in: ``--batch-size`` changes speed, not content (up to
float round-off of batched convolutions).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import LatentDiffusionInferer

from gate.digest import sha256_file
from gate.errors import IntegrityError, UsageError
from gate.generator.autoencoder import build_autoencoder, build_ddim, build_unet
from gate.generator.config import WEIGHTS_NAME, GeneratorManifest, LDMConfig, read_manifest
from gate.generator.state import load_module, load_npz
from gate.generator.train import Device, resolve_device
from gate.preprocess import PreprocessConfig
from gate.values import Volume

log = logging.getLogger(__name__)

DEFAULT_GENERATOR_DIR = Path(__file__).resolve().parents[1] / "models" / "generator"
"""The bundled default generator (trained on MSD Task04 Hippocampus, see its model_card.md)."""

SYNTHETIC_PATIENT_ID = "synthetic"
"""patient_id of every generated volume: it belongs to no patient."""

SAMPLE_SEED_STRIDE = 1_000_003
"""Per-sample noise seed = seed * stride + index; a prime stride keeps (seed, index) pairs apart."""


class Generator:
    """A trained latent diffusion generator, verified and ready to sample.

    Attributes:
        model_dir: the model directory.
        manifest: the parsed ``generator.json``.
        config: its :class:`LDMConfig`.
        preprocess: the grid / intensity convention of the generated volumes.
        sha256: sha256 of ``weights.npz`` (verified).
        device: the torch device sampling runs on.

    """

    name = "MONAI 3D latent diffusion (AutoencoderKL + DiffusionModelUNet, DDIM)"
    """Recorded in bundles (the ``ldm`` plug-in)."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """A gate LDM folder: ``generator.json`` beside ``weights.npz`` (the ``ldm`` plug-in)."""
        return (path / "generator.json").is_file() and (path / WEIGHTS_NAME).is_file()

    def __init__(self, model_dir: Path = DEFAULT_GENERATOR_DIR, device: Device = "auto") -> None:
        """Verify and load a model directory.

        Args:
            model_dir: folder with ``generator.json`` and ``weights.npz``.
            device: ``cpu``, ``cuda`` (refused when unavailable) or ``auto``.

        Raises:
            IntegrityError: missing files, digest mismatch, or weights that do not fit.
            UsageError: ``cuda`` requested without a CUDA device.

        """
        self.model_dir = Path(model_dir)
        self.manifest: GeneratorManifest = read_manifest(self.model_dir)
        self.config: LDMConfig = self.manifest.config
        self.preprocess: PreprocessConfig = self.config.preprocess
        weights = self.model_dir / WEIGHTS_NAME
        if not weights.is_file():
            raise IntegrityError(f"{weights}: generator weights not found")
        self.sha256 = sha256_file(weights)
        if self.sha256 != self.manifest.weights_sha256:
            raise IntegrityError(
                f"{weights}: sha256 {self.sha256[:12]} does not match generator.json "
                f"({self.manifest.weights_sha256[:12]}); the weights were changed or replaced"
            )
        self.device = resolve_device(device)
        arrays, _ = load_npz(weights)
        self.autoencoder = build_autoencoder(self.config)
        self.unet = build_unet(self.config)
        load_module("autoencoder", self.autoencoder, arrays, str(weights))
        load_module("unet", self.unet, arrays, str(weights))
        self.autoencoder.to(self.device).eval()
        self.unet.to(self.device).eval()
        log.info("generator %s loaded on %s", self.sha256[:12], self.device)

    def noise(self, seed: int, start: int, count: int) -> torch.Tensor:
        """Draw the initial latent noise of samples ``start .. start + count - 1``.

        Returns:
            float32 (count, C, x, y, z) on CPU.

        """
        return seeded_noise(self.config.latent_shape, seed, start, count)

    @torch.no_grad()
    def sample(self, seed: int, start: int, count: int, ddim_steps: int | None = None) -> np.ndarray:
        """Draw ``count`` volumes, samples ``start ..`` of the stream for ``seed``.

        Args:
            seed: run seed.
            start: index of the first sample in the run's stream.
            count: how many (one batch).
            ddim_steps: DDIM steps (default: ``config.ddim_steps``).

        Returns:
            float32 (count, 1, X, Y, Z) clipped to [0, 1], on ``preprocess.grid``.

        Raises:
            UsageError: invalid step count or count.

        """
        steps = self.config.ddim_steps if ddim_steps is None else ddim_steps
        if not 1 <= steps <= self.config.train_timesteps:
            raise UsageError(f"--ddim-steps must be in [1, {self.config.train_timesteps}]; got {steps}")
        if count < 1:
            raise UsageError(f"batch size must be >= 1; got {count}")
        scheduler = build_ddim(self.config, steps)
        noise = self.noise(seed, start, count)
        return decode_latent_diffusion(
            noise, self.autoencoder, self.unet, scheduler, self.manifest.scale_factor, self.device
        )

    def volumes(self, array: np.ndarray, seed: int, start: int) -> list[Volume]:
        """Wrap sampled voxels as :class:`Volume` objects (1 mm grid, identity orientation).

        Args:
            array: float32 (N, 1, X, Y, Z) from :meth:`sample`.
            seed: the run seed (recorded in ``source``).
            start: index of the first sample.

        """
        return generated_volumes(array, self.preprocess, self.sha256, seed, start)

    def batches(
        self, n: int, batch_size: int, seed: int = 0, ddim_steps: int | None = None, start: int = 0
    ) -> Iterator[list[Volume]]:
        """Yield ``n`` generated volumes in batches of at most ``batch_size``.

        Args:
            n: total volumes.
            batch_size: volumes per batch (>= 1).
            seed: run seed.
            ddim_steps: DDIM steps (default from the config).
            start: index of the first sample in the stream (to continue a stream).

        """
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1; got {batch_size}")
        done = 0
        while done < n:
            count = min(batch_size, n - done)
            arr = self.sample(seed, start + done, count, ddim_steps)
            yield self.volumes(arr, seed, start + done)
            done += count


def generated_volumes(
    array: np.ndarray, preprocess: PreprocessConfig, generator_sha256: str, seed: int, start: int
) -> list[Volume]:
    """Wrap a generator's sampled voxels as :class:`Volume` objects on its preprocessing grid.

    Shared by every generator plug-in so candidates look the same to the gate whatever made them.

    Args:
        array: float32 (N, 1, X, Y, Z) voxels in [0, 1].
        preprocess: the grid the generator samples on (its spacing, identity orientation).
        generator_sha256: the generator's digest (its first 12 hex go into ``source``).
        seed: the run seed (recorded in ``source``).
        start: index of the first sample.

    """
    spacing = tuple(float(s) for s in preprocess.spacing_mm)
    affine = np.diag([*spacing, 1.0])
    return [
        Volume(
            data=array[j, 0],
            affine=affine.copy(),
            spacing=spacing,  # type: ignore[arg-type]
            source=f"generated:{generator_sha256[:12]}:seed{seed}:{start + j}",
            patient_id=SYNTHETIC_PATIENT_ID,
        )
        for j in range(len(array))
    ]


def seeded_noise(latent_shape: tuple[int, ...], seed: int, start: int, count: int) -> torch.Tensor:
    """The initial latent noise of samples ``start .. start + count - 1`` of the stream for ``seed``.

    Sample ``i`` is seeded ``seed * SAMPLE_SEED_STRIDE + i``, whatever the batch, so every
    generator plug-in that uses this draws the same stream.

    Returns:
        float32 (count, *latent_shape) on CPU.

    """
    out = torch.empty((count, *latent_shape))
    for j in range(count):
        gen = torch.Generator().manual_seed(seed * SAMPLE_SEED_STRIDE + start + j)
        out[j] = torch.randn(latent_shape, generator=gen)
    return out


@torch.no_grad()
def decode_latent_diffusion(
    noise: torch.Tensor,
    autoencoder: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler: Any,
    scale_factor: float,
    device: torch.device | str,
) -> np.ndarray:
    """Denoise ``noise`` with MONAI's LatentDiffusionInferer and decode it to images.

    Returns:
        float32 (N, 1, X, Y, Z) clipped to [0, 1].

    """
    inferer = LatentDiffusionInferer(scheduler, scale_factor=scale_factor)
    images = inferer.sample(
        input_noise=noise.to(device),
        autoencoder_model=autoencoder,
        diffusion_model=unet,
        scheduler=scheduler,
        verbose=False,
    )
    out = images.float().clamp_(0.0, 1.0).cpu().numpy()  # type: ignore[union-attr]
    return np.ascontiguousarray(out, dtype=np.float32)
