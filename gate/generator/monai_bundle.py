"""A MONAI bundle as a gate generator: ``configs/inference.json`` + ``models/*.pt``, loaded safely.

Layout (MONAI's bundle layout; written from a gate LDM by :func:`export_bundle`, i.e.
``gate ldm export-bundle``)::

    BUNDLE/configs/metadata.json    MONAI metadata (version, monai / pytorch versions, ...)
    BUNDLE/configs/inference.json   autoencoder_def, network_def, scheduler (MONAI components),
                                    scale_factor, latent_shape, ddim_steps, preprocess
    BUNDLE/models/autoencoder.pt    state dict of autoencoder_def
    BUNDLE/models/model.pt          state dict of network_def (the diffusion UNet)

Trust model. A MONAI config can run code: ``$`` strings are Python expressions, ``_target_`` names
any importable callable, ``%`` pulls in other files. gate refuses all of that before MONAI's
``ConfigParser`` sees the file: the only components allowed are classes under
:data:`ALLOWED_TARGET_PREFIXES` (MONAI's networks and schedulers), ``@`` references between the
config's own entries are allowed, and any ``$`` or ``%`` string, ``_mode_`` or ``_requires_`` key is
an :class:`~gate.errors.IntegrityError`. Weights are read with ``torch.load(weights_only=True)``
(tensors only, no pickled objects) and must match the networks exactly (``strict=True``). What
gate cannot check is whether the weights are any good: the gate itself judges every sample.
The generator's digest (recorded in bundles and the audit log) covers both configs and every
``models/*.pt`` file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from gate.digest import sha256_file
from gate.errors import IntegrityError, UsageError
from gate.preprocess import PreprocessConfig
from gate.values import Volume

log = logging.getLogger(__name__)

INFERENCE_CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
AUTOENCODER_WEIGHTS = Path("models") / "autoencoder.pt"
UNET_WEIGHTS = Path("models") / "model.pt"

ALLOWED_TARGET_PREFIXES = ("monai.networks.nets.", "monai.networks.schedulers.")
"""``_target_`` values a bundle may name: MONAI network and scheduler classes, nothing else."""

REFUSED_KEYS = ("_mode_", "_requires_")
"""Config keys that make MONAI call things beyond building the component (refused)."""

GENERATOR_NAME = "MONAI bundle latent diffusion (via gate.generator.monai_bundle)"


def check_config_safe(node: Any, where: str = "") -> None:
    """Refuse any part of a bundle config that could run code beyond MONAI's component classes.

    Raises:
        IntegrityError: a ``$`` expression, a ``%`` macro, a refused key, or a ``_target_`` outside
            :data:`ALLOWED_TARGET_PREFIXES`.

    """
    if isinstance(node, str):
        if node.startswith(("$", "%")):
            raise IntegrityError(
                f"{INFERENCE_CONFIG}{where}: {node[:40]!r} is an expression or macro; gate runs no code "
                "from a bundle config"
            )
    elif isinstance(node, list):
        for i, item in enumerate(node):
            check_config_safe(item, f"{where}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in REFUSED_KEYS:
                raise IntegrityError(f"{INFERENCE_CONFIG}{where}: key {key} is not allowed")
            if key == "_target_" and not (
                isinstance(value, str) and value.startswith(ALLOWED_TARGET_PREFIXES)
            ):
                raise IntegrityError(
                    f"{INFERENCE_CONFIG}{where}: _target_ {value!r} is not a MONAI network or scheduler "
                    f"(allowed: {', '.join(p + '*' for p in ALLOWED_TARGET_PREFIXES)})"
                )
            check_config_safe(value, f"{where}.{key}")


def bundle_digest(path: Path) -> str:
    """sha256 over the bundle's configs and weights (file names and their sha256, sorted)."""
    files = [INFERENCE_CONFIG, METADATA, *sorted(p.relative_to(path) for p in (path / "models").glob("*.pt"))]
    listing = "".join(f"{f.as_posix()} {sha256_file(path / f)}\n" for f in files if (path / f).is_file())
    return hashlib.sha256(listing.encode()).hexdigest()


class MonaiBundleGenerator:
    """A latent diffusion model in a MONAI bundle folder, verified and ready to sample.

    Attributes:
        name: recorded in the bundle's provenance.
        sha256: :func:`bundle_digest`.
        preprocess: the grid / intensity convention of the samples (from ``inference.json``).
        scale_factor: latent scale applied before the UNet.
        latent_shape: (C, x, y, z) of the latent noise.
        ddim_steps: default DDIM steps.

    """

    name = GENERATOR_NAME

    @classmethod
    def accepts(cls, path: Path) -> bool:
        """A folder with ``configs/inference.json`` and ``models/model.pt``."""
        return (path / INFERENCE_CONFIG).is_file() and (path / UNET_WEIGHTS).is_file()

    def __init__(self, path: Path, device: str = "auto") -> None:
        """Check the config, build MONAI's components, load the weights.

        Raises:
            IntegrityError: an unsafe or malformed config, missing or mismatched weights.
            UsageError: ``cuda`` requested without a CUDA device.

        """
        import torch
        from monai.bundle import ConfigParser

        from gate.generator.train import resolve_device

        self.model_dir = Path(path)
        config_path = self.model_dir / INFERENCE_CONFIG
        try:
            raw = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise IntegrityError(f"{config_path}: not a JSON bundle config ({err})") from err
        check_config_safe(raw)
        missing = [k for k in ("autoencoder_def", "network_def", "scheduler", "latent_shape") if k not in raw]
        if missing:
            raise IntegrityError(f"{config_path}: missing {', '.join(missing)}")
        try:
            self.preprocess = PreprocessConfig.model_validate(raw.get("preprocess", {}))
            self.scale_factor = float(raw.get("scale_factor", 1.0))
            self.latent_shape = tuple(int(s) for s in raw["latent_shape"])
            self.ddim_steps = int(raw.get("ddim_steps", 50))
        except (ValueError, TypeError) as err:
            raise IntegrityError(f"{config_path}: {err}") from err
        self.sha256 = bundle_digest(self.model_dir)
        self.device = resolve_device(device)  # type: ignore[arg-type]
        parser = ConfigParser(raw)
        try:
            self.autoencoder = parser.get_parsed_content("autoencoder_def")
            self.unet = parser.get_parsed_content("network_def")
            self._scheduler_config = raw["scheduler"]
        except Exception as err:
            raise IntegrityError(f"{config_path}: cannot build the bundle's networks ({err})") from err
        for module, rel in ((self.autoencoder, AUTOENCODER_WEIGHTS), (self.unet, UNET_WEIGHTS)):
            weights = self.model_dir / rel
            if not weights.is_file():
                raise IntegrityError(f"{weights}: bundle weights not found")
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
                module.load_state_dict(state, strict=True)
            except Exception as err:
                raise IntegrityError(f"{weights}: weights do not fit the bundle's network ({err})") from err
            module.to(self.device).eval()
        log.info("MONAI bundle generator %s loaded on %s", self.sha256[:12], self.device)

    def sample(self, seed: int, start: int, count: int, ddim_steps: int | None = None) -> np.ndarray:
        """Draw ``count`` volumes, samples ``start ..`` of the stream for ``seed``.

        The noise of sample ``i`` is seeded as in :class:`gate.generator.sample.Generator`, so a
        bundle exported from a gate LDM draws the same samples.

        Returns:
            float32 (count, 1, X, Y, Z) clipped to [0, 1].

        Raises:
            UsageError: a bad step count or count.

        """
        from monai.bundle import ConfigParser

        from gate.generator.sample import decode_latent_diffusion, seeded_noise

        steps = self.ddim_steps if ddim_steps is None else ddim_steps
        if steps < 1 or count < 1:
            raise UsageError(f"--ddim-steps and the batch size must be >= 1; got {steps}, {count}")
        scheduler = ConfigParser({"s": self._scheduler_config}).get_parsed_content("s")
        if steps > scheduler.num_train_timesteps:
            raise UsageError(f"--ddim-steps must be in [1, {scheduler.num_train_timesteps}]; got {steps}")
        scheduler.set_timesteps(num_inference_steps=steps)
        noise = seeded_noise(self.latent_shape, seed, start, count)
        return decode_latent_diffusion(
            noise, self.autoencoder, self.unet, scheduler, self.scale_factor, self.device
        )

    def volumes(self, array: np.ndarray, seed: int, start: int) -> list[Volume]:
        """Wrap sampled voxels as :class:`Volume` objects (the preprocess grid's spacing)."""
        from gate.generator.sample import generated_volumes

        return generated_volumes(array, self.preprocess, self.sha256, seed, start)


def export_bundle(generator_dir: Path, out: Path) -> Path:
    """Write a gate LDM (``generator.json`` + ``weights.npz``) as a MONAI bundle folder.

    Written to a temporary folder beside ``out`` and renamed into place; never overwrites.

    Args:
        generator_dir: a gate LDM folder (verified on load).
        out: the bundle folder to create.

    Returns:
        ``out``.

    Raises:
        UsageError: ``out`` exists.
        IntegrityError: the LDM does not verify.

    """
    import monai
    import torch

    from gate.generator.autoencoder import SCHEDULE
    from gate.generator.sample import Generator

    if out.exists():
        raise UsageError(f"{out} exists; choose a new folder for the bundle")
    gen = Generator(generator_dir, device="cpu")
    cfg = gen.config
    ae_levels, unet_levels = len(cfg.ae_channels), len(cfg.unet_channels)
    inference = {
        "autoencoder_def": {
            "_target_": "monai.networks.nets.AutoencoderKL",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": list(cfg.ae_channels),
            "latent_channels": cfg.latent_channels,
            "num_res_blocks": [cfg.ae_res_blocks] * ae_levels,
            "attention_levels": [False] * ae_levels,
            "norm_num_groups": cfg.norm_num_groups,
            "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False,
        },
        "network_def": {
            "_target_": "monai.networks.nets.DiffusionModelUNet",
            "spatial_dims": 3,
            "in_channels": cfg.latent_channels,
            "out_channels": cfg.latent_channels,
            "channels": list(cfg.unet_channels),
            "attention_levels": list(cfg.unet_attention),
            "num_res_blocks": [cfg.unet_res_blocks] * unet_levels,
            "norm_num_groups": cfg.norm_num_groups,
            "num_head_channels": cfg.unet_head_channels,
        },
        "scheduler": {
            "_target_": "monai.networks.schedulers.DDIMScheduler",
            "num_train_timesteps": cfg.train_timesteps,
            "schedule": SCHEDULE,
            "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end,
            "clip_sample": False,
        },
        "scale_factor": gen.manifest.scale_factor,
        "latent_shape": list(cfg.latent_shape),
        "ddim_steps": cfg.ddim_steps,
        "preprocess": json.loads(gen.preprocess.model_dump_json()),
    }
    metadata = {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by gate from LDM weights {gen.sha256}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "name": "gate hippocampus latent diffusion",
        "task": "unconditional 3D MRI synthesis (latent diffusion)",
        "description": "A gate LDM in MONAI bundle layout; sampled by gate.generator.monai_bundle.",
        "gate_ldm_weights_sha256": gen.sha256,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / INFERENCE_CONFIG).write_text(json.dumps(inference, indent=1) + "\n")
        (tmp / METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
        torch.save(gen.autoencoder.state_dict(), tmp / AUTOENCODER_WEIGHTS)
        torch.save(gen.unet.state_dict(), tmp / UNET_WEIGHTS)
        tmp.chmod(0o755)  # mkdtemp makes it 0700; a bundle is meant to be shared
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
