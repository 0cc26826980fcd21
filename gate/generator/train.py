"""Two-stage training of the latent diffusion generator, resumable, seeded, CPU or CUDA.

Stage 1 trains MONAI's ``AutoencoderKL`` with L1 + KL + least-squares patch adversarial loss
(no perceptual loss: it needs downloaded weights). Stage 2 encodes every training volume once,
sets the latent scale factor to 1 / std (Rombach et al.), and trains ``DiffusionModelUNet`` to
predict the noise of the DDPM forward process on the cached scaled latents. This is what
``LatentDiffusionInferer.__call__`` computes, minus re-encoding each volume at every step;
sampling (:mod:`gate.generator.sample`) uses ``LatentDiffusionInferer.sample`` with DDIM.

Everything random draws from generators seeded by (config.seed, stage, epoch), so a resumed
run is the same as an uninterrupted one. A checkpoint (``.npz``, no pickle) is written after
every epoch; rerunning with the same out dir and config continues where it stopped. One JSON
line per epoch goes to ``train_log.jsonl``; per-step progress is reported to a callback.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.inferers import DiffusionInferer

from gate.digest import sha256_file
from gate.errors import UsageError
from gate.generator.autoencoder import (
    adversarial_loss,
    build_autoencoder,
    build_ddpm,
    build_discriminator,
    build_unet,
    kl_loss,
)
from gate.generator.config import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    GeneratorManifest,
    LDMConfig,
    StageSummary,
)
from gate.generator.state import (
    load_module,
    load_npz,
    load_optimizer,
    module_arrays,
    optimizer_arrays,
    save_npz,
)
from gate.preprocess import preprocess_batch
from gate.values import Volume

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
"""Per-epoch training log (one JSON object per line) in the out dir."""

CHECKPOINT_DIR = "checkpoints"
"""Sub-directory holding the resumable per-stage checkpoints (not shipped)."""

SHIPPED_DTYPE = np.float16
"""Weights are shipped as float16: halves the size (~6 MB for the default) and changes decoded
voxels by < 1e-3, far below the [0, 1] intensity steps the encoder resolves."""

SCALE_NOISE_SEED_OFFSET = 7919
"""Offset of the seed used to draw the latents whose std sets the scale factor."""

Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class StepReport:
    """Progress of one optimisation step, for progress bars.

    Attributes:
        stage: ``autoencoder`` or ``unet``.
        epoch: 0-based epoch.
        epochs: epochs planned for the stage.
        step: 1-based step within the epoch.
        steps: steps per epoch.
        loss: this step's loss.
        eta_s: estimated seconds left in this stage.

    """

    stage: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    eta_s: float


@dataclass(frozen=True)
class EpochReport:
    """One finished (and checkpointed) epoch."""

    stage: str
    epoch: int
    epochs: int
    loss: float
    seconds: float


def resolve_device(device: Device) -> torch.device:
    """Map ``auto``/``cpu``/``cuda`` to a torch device; never fall back silently.

    Raises:
        UsageError: ``cuda`` asked for but not available.

    """
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device visible to torch; use --device cpu or auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def training_array(volumes: list[Volume], config: LDMConfig) -> np.ndarray:
    """Preprocess training volumes onto the config's grid.

    Args:
        volumes: real volumes as read from disk.
        config: the generator config (its ``preprocess`` and ``train_subset`` are used).

    Returns:
        float32 (N, 1, X, Y, Z) in [0, 1].

    Raises:
        UsageError: no volumes.

    """
    if config.train_subset is not None:
        volumes = volumes[: config.train_subset]
    if not volumes:
        raise UsageError("no training volumes: expected at least one readable volume in --data")
    return preprocess_batch(volumes, config.preprocess)


def _rng(config: LDMConfig, stage: int, epoch: int) -> torch.Generator:
    """Seed this epoch's randomness from (seed, stage, epoch) alone, so a resumed run matches.

    The global torch RNG is reseeded too: ``AutoencoderKL`` draws its reparameterisation noise
    from it. The returned generator drives shuffling, latent sampling, noise and timesteps.
    """
    value = config.seed * 1_000_003 + stage * 10_007 + epoch
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)


def _order(n: int, config: LDMConfig, gen: torch.Generator) -> np.ndarray:
    """Return the indices of one epoch: every volume ``duplicate_factor`` times, shuffled."""
    idx = torch.arange(n).repeat(config.duplicate_factor)
    return idx[torch.randperm(len(idx), generator=gen)].numpy()


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i : i + size] for i in range(0, len(order), size)]


class _Meter:
    """Counts steps of one stage and reports them with an ETA."""

    def __init__(
        self,
        stage: str,
        epochs: int,
        epochs_done: int,
        n: int,
        config: LDMConfig,
        on_step: Callable[[StepReport], None] | None,
    ) -> None:
        batch = config.ae_batch_size if stage == "autoencoder" else config.unet_batch_size
        per_epoch = -(-n * config.duplicate_factor // batch)
        self.stage, self.epochs, self.on_step = stage, epochs, on_step
        self.total = (epochs - epochs_done) * per_epoch
        self.done = 0
        self.t0 = time.perf_counter()

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        self.done += 1
        if self.on_step is not None:
            eta = (time.perf_counter() - self.t0) / self.done * (self.total - self.done)
            self.on_step(StepReport(self.stage, epoch, self.epochs, step, steps, loss, eta))


def _after_epoch(summary: StageSummary, mean: float, seconds: float) -> StageSummary:
    return StageSummary(
        epochs_done=summary.epochs_done + 1,
        epochs_planned=summary.epochs_planned,
        final_loss=mean,
        losses=[*summary.losses, mean],
        seconds=summary.seconds + seconds,
    )


class _Log:
    """Append-only JSONL training log plus library logging."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, object]) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        log.info("%s", record)


def _check_out_dir(out_dir: Path, config: LDMConfig) -> None:
    """Refuse checkpoints of another config: the autoencoder's by its stage digest, the UNet's by all."""
    ckpt = out_dir / CHECKPOINT_DIR
    for name, key, expected in (
        ("autoencoder.npz", "ae_config_sha256", config.autoencoder_digest),
        ("unet.npz", "config_sha256", config.digest),
    ):
        path = ckpt / name
        if path.exists():
            _, meta = load_npz(path)
            if meta.get(key) != expected:
                raise UsageError(
                    f"{out_dir}: holds a run with a different config ({name}: {str(meta.get(key))[:12]} "
                    f"!= {expected[:12]}); use a new --out or the same options to resume"
                )


def train(
    data: np.ndarray,
    config: LDMConfig,
    out_dir: Path,
    device: Device = "cpu",
    on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    snapshot_every: int = 0,
) -> GeneratorManifest:
    """Train (or resume) both stages and write ``weights.npz`` + ``generator.json``.

    Args:
        data: float32 (N, 1, X, Y, Z) in [0, 1] on ``config.preprocess.grid``.
        config: the generator config.
        out_dir: created if missing; holds checkpoints, the log and the final artefacts.
        device: ``cpu``, ``cuda`` or ``auto``.
        on_step: called after every optimisation step.
        on_epoch: called after every epoch, once its checkpoint is on disk.
        snapshot_every: also write shippable weights every this-many UNet epochs (0 = only
            at the end); the manifest says ``complete: false`` for those.

    Returns:
        The manifest written to ``out_dir / generator.json``.

    Raises:
        UsageError: data off the config's grid, or an out dir holding another config's run.

    """
    expected = (1, *config.preprocess.grid)
    if data.ndim != 5 or tuple(data.shape[1:]) != expected or data.dtype != np.float32:
        raise UsageError(f"training data must be float32 (N, {expected}); got {data.dtype} {data.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out_dir, config)
    dev = resolve_device(device)
    logbook = _Log(out_dir / LOG_NAME)
    logbook.write({"event": "start", "config_sha256": config.digest, "device": str(dev), "n": len(data)})
    torch.manual_seed(config.seed)
    autoencoder = build_autoencoder(config).to(dev)
    unet = build_unet(config).to(dev)
    ae_summary = _train_autoencoder(data, config, out_dir, autoencoder, dev, logbook, on_step, on_epoch)
    mu, sigma = _encode_all(autoencoder, data, dev)
    return _train_unet(
        mu,
        sigma,
        config,
        out_dir,
        autoencoder,
        unet,
        ae_summary,
        dev,
        logbook,
        on_step,
        on_epoch,
        snapshot_every,
    )


def _train_autoencoder(
    data: np.ndarray,
    config: LDMConfig,
    out_dir: Path,
    autoencoder: torch.nn.Module,
    dev: torch.device,
    logbook: _Log,
    on_step: Callable[[StepReport], None] | None,
    on_epoch: Callable[[EpochReport], None] | None,
) -> StageSummary:
    discriminator = build_discriminator(config).to(dev)
    opt_g = torch.optim.Adam(autoencoder.parameters(), lr=config.ae_lr)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.ae_lr)
    adv = adversarial_loss()
    path = out_dir / CHECKPOINT_DIR / "autoencoder.npz"
    summary = StageSummary(epochs_done=0, epochs_planned=config.ae_epochs)
    if path.exists():
        arrays, meta = load_npz(path)
        load_module("autoencoder", autoencoder, arrays, str(path))
        load_module("discriminator", discriminator, arrays, str(path))
        load_optimizer("opt_g", opt_g, arrays, meta["opt_g"])
        load_optimizer("opt_d", opt_d, arrays, meta["opt_d"])
        summary = StageSummary.model_validate(meta["summary"])
        logbook.write({"event": "resume", "stage": "autoencoder", "epochs_done": summary.epochs_done})
    x_all = torch.from_numpy(data)
    meter = _Meter("autoencoder", config.ae_epochs, summary.epochs_done, len(data), config, on_step)
    for epoch in range(summary.epochs_done, config.ae_epochs):
        t0 = time.perf_counter()
        gen = _rng(config, 1, epoch)
        batches = _batches(_order(len(data), config, gen), config.ae_batch_size)
        autoencoder.train()
        discriminator.train()
        use_adv = epoch >= config.adv_start_epoch and config.adv_weight > 0
        total = 0.0
        for step, idx in enumerate(batches, start=1):
            images = x_all[idx].to(dev)
            opt_g.zero_grad(set_to_none=True)
            recon, z_mu, z_sigma = autoencoder(images)
            loss_g = torch.nn.functional.l1_loss(recon, images) + config.kl_weight * kl_loss(z_mu, z_sigma)
            if use_adv:
                logits_fake = discriminator(recon.contiguous().float())[-1]
                loss_g = loss_g + config.adv_weight * adv(
                    logits_fake, target_is_real=True, for_discriminator=False
                )
            loss_g.backward()
            opt_g.step()
            if use_adv:
                opt_d.zero_grad(set_to_none=True)
                fake = adv(discriminator(recon.detach())[-1], target_is_real=False, for_discriminator=True)
                real = adv(discriminator(images)[-1], target_is_real=True, for_discriminator=True)
                (config.adv_weight * 0.5 * (fake + real)).backward()
                opt_d.step()
            loss = float(loss_g.detach())
            total += loss
            meter.step(epoch, step, len(batches), loss)
        seconds = time.perf_counter() - t0
        mean = total / len(batches)
        summary = _after_epoch(summary, mean, seconds)
        g_arrays, g_groups = optimizer_arrays("opt_g", opt_g)
        d_arrays, d_groups = optimizer_arrays("opt_d", opt_d)
        save_npz(
            path,
            {
                **module_arrays("autoencoder", autoencoder),
                **module_arrays("discriminator", discriminator),
                **g_arrays,
                **d_arrays,
            },
            {
                "ae_config_sha256": config.autoencoder_digest,
                "summary": summary.model_dump(mode="json"),
                "opt_g": g_groups,
                "opt_d": d_groups,
            },
        )
        logbook.write(
            {"stage": "autoencoder", "epoch": epoch, "loss": mean, "seconds": seconds, "adv": use_adv}
        )
        if on_epoch is not None:
            on_epoch(EpochReport("autoencoder", epoch, config.ae_epochs, mean, seconds))
    autoencoder.eval()
    return summary


@torch.no_grad()
def _encode_all(
    autoencoder: torch.nn.Module, data: np.ndarray, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training volume, (N, C, x, y, z) each, on CPU."""
    autoencoder.eval()
    mus, sigmas = [], []
    for i in range(0, len(data), 16):
        z_mu, z_sigma = autoencoder.encode(torch.from_numpy(data[i : i + 16]).to(dev))
        mus.append(z_mu.cpu())
        sigmas.append(z_sigma.cpu())
    return torch.cat(mus), torch.cat(sigmas)


def _train_unet(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    config: LDMConfig,
    out_dir: Path,
    autoencoder: torch.nn.Module,
    unet: torch.nn.Module,
    ae_summary: StageSummary,
    dev: torch.device,
    logbook: _Log,
    on_step: Callable[[StepReport], None] | None,
    on_epoch: Callable[[EpochReport], None] | None,
    snapshot_every: int,
) -> GeneratorManifest:
    scheduler = build_ddpm(config)
    inferer = DiffusionInferer(scheduler)
    opt = torch.optim.Adam(unet.parameters(), lr=config.unet_lr)
    path = out_dir / CHECKPOINT_DIR / "unet.npz"
    gen0 = torch.Generator().manual_seed(config.seed + SCALE_NOISE_SEED_OFFSET)
    z0 = mu + sigma * torch.randn(mu.shape, generator=gen0)
    scale_factor = float(1.0 / torch.std(z0))
    summary = StageSummary(epochs_done=0, epochs_planned=config.unet_epochs)
    if path.exists():
        arrays, meta = load_npz(path)
        load_module("unet", unet, arrays, str(path))
        load_optimizer("opt", opt, arrays, meta["opt"])
        summary = StageSummary.model_validate(meta["summary"])
        scale_factor = float(meta["scale_factor"])
        logbook.write({"event": "resume", "stage": "unet", "epochs_done": summary.epochs_done})
    logbook.write({"event": "scale_factor", "value": scale_factor})
    n = len(mu)
    meter = _Meter("unet", config.unet_epochs, summary.epochs_done, n, config, on_step)
    manifest = None
    for epoch in range(summary.epochs_done, config.unet_epochs):
        t0 = time.perf_counter()
        gen = _rng(config, 2, epoch)
        batches = _batches(_order(n, config, gen), config.unet_batch_size)
        unet.train()
        total = 0.0
        for step, idx in enumerate(batches, start=1):
            eps_z = torch.randn(mu[idx].shape, generator=gen)
            latents = ((mu[idx] + sigma[idx] * eps_z) * scale_factor).to(dev)
            noise = torch.randn(latents.shape, generator=gen).to(dev)
            timesteps = torch.randint(0, config.train_timesteps, (len(idx),), generator=gen).to(dev)
            opt.zero_grad(set_to_none=True)
            pred = inferer(inputs=latents, diffusion_model=unet, noise=noise, timesteps=timesteps)
            loss_t = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss_t.backward()
            opt.step()
            loss = float(loss_t.detach())
            total += loss
            meter.step(epoch, step, len(batches), loss)
        seconds = time.perf_counter() - t0
        mean = total / len(batches)
        summary = _after_epoch(summary, mean, seconds)
        o_arrays, o_groups = optimizer_arrays("opt", opt)
        save_npz(
            path,
            {**module_arrays("unet", unet), **o_arrays},
            {
                "config_sha256": config.digest,
                "summary": summary.model_dump(mode="json"),
                "opt": o_groups,
                "scale_factor": scale_factor,
            },
        )
        logbook.write({"stage": "unet", "epoch": epoch, "loss": mean, "seconds": seconds})
        last = epoch + 1 == config.unet_epochs
        if last or (snapshot_every and (epoch + 1) % snapshot_every == 0):
            manifest = write_artefacts(
                out_dir, config, autoencoder, unet, scale_factor, n, ae_summary, summary
            )
        if on_epoch is not None:
            on_epoch(EpochReport("unet", epoch, config.unet_epochs, mean, seconds))
    if manifest is None:  # resumed after the last epoch: artefacts may be missing
        manifest = write_artefacts(out_dir, config, autoencoder, unet, scale_factor, n, ae_summary, summary)
    logbook.write({"event": "done", "weights_sha256": manifest.weights_sha256})
    return manifest


def write_artefacts(
    out_dir: Path,
    config: LDMConfig,
    autoencoder: torch.nn.Module,
    unet: torch.nn.Module,
    scale_factor: float,
    n_training: int,
    ae_summary: StageSummary,
    unet_summary: StageSummary,
) -> GeneratorManifest:
    """Write ``weights.npz`` (float16) and ``generator.json`` (written last, atomically)."""
    import monai

    weights = out_dir / WEIGHTS_NAME
    save_npz(
        weights,
        {
            **module_arrays("autoencoder", autoencoder, SHIPPED_DTYPE),
            **module_arrays("unet", unet, SHIPPED_DTYPE),
        },
    )
    manifest = GeneratorManifest(
        config=config,
        config_sha256=config.digest,
        preprocess_sha256=config.preprocess.digest,
        weights_sha256=sha256_file(weights),
        weights_dtype=np.dtype(SHIPPED_DTYPE).name,
        scale_factor=scale_factor,
        n_training_volumes=n_training,
        autoencoder=ae_summary,
        unet=unet_summary,
        complete=unet_summary.epochs_done >= config.unet_epochs,
        versions={"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__},
    )
    tmp = out_dir / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    tmp.replace(out_dir / MANIFEST_NAME)
    return manifest
