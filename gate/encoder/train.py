"""Self-supervised training of the 3D encoder (``contrastive`` or ``ssim`` objective).

* ``contrastive`` (default): NT-Xent / SimCLR (Chen et al. 2020), as used for memorisation
  detection by Dar et al.: two augmented views of one volume are positives, every other view
  in the batch is a negative.
* ``ssim``: DeepSSIM carried to 3D: the cosine similarity of the embeddings of two
  independently augmented views regresses (MSE) onto the 3D SSIM of their *clean* source
  volumes (1 for two views of one volume), so embedding similarity tracks image similarity
  while ignoring acquisition-like changes.

All training volumes are preprocessed once and held in memory (261 x 32x48x32 float32 is
50 MB); augmentation runs batched in torch. Checkpoints are ``.npz`` (no pickle) + JSON and
hold model and optimiser state plus the RNG states, so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from gate.encoder.augment import AugmentConfig, augment, centre_window, random_window
from gate.encoder.model import Encoder3D, EncoderSpec, build_encoder
from gate.encoder.ssim import ssim_matrix
from gate.errors import IntegrityError, UsageError
from gate.preprocess import PreprocessConfig

log = logging.getLogger(__name__)

Objective = Literal["contrastive", "ssim"]
OBJECTIVES: tuple[str, ...] = ("contrastive", "ssim")

TEMPERATURE = 0.1
"""NT-Xent temperature. SimCLR's best values are 0.1-0.5; the low end sharpens the contrast
between a view's twin and the other (anatomically similar) hippocampus crops."""

CHECKPOINT_NPZ = "checkpoint.npz"
CHECKPOINT_JSON = "checkpoint.json"


class TrainConfig(BaseModel):
    """Everything that determines a training run (stored in the checkpoint and the model card).

    Attributes:
        objective: ``contrastive`` or ``ssim``.
        epochs: passes over the training volumes.
        batch_size: volumes per step (2 views each).
        lr: Adam learning rate (cosine-decayed to 5% over the run).
        weight_decay: Adam weight decay.
        seed: seeds initialisation, batch order and augmentation.
        augment: augmentation ranges.
        spec: architecture.
        preprocess: preprocessing of the inputs.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: Objective = "contrastive"
    epochs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=32, ge=2)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-5, ge=0)
    seed: int = 0
    augment: AugmentConfig = AugmentConfig()
    spec: EncoderSpec
    preprocess: PreprocessConfig

    @property
    def training_grid(self) -> tuple[int, int, int]:
        """Shape the training volumes are preprocessed to: the grid plus the window-shift margin."""
        m = self.augment.window_shift_vox
        x, y, z = self.spec.grid
        return (x + 2 * m, y + 2 * m, z + 2 * m)


@dataclass(frozen=True)
class EpochReport:
    """Progress after one epoch.

    Attributes:
        epoch: 1-based epoch just finished.
        epochs: total epochs.
        loss: mean training loss of the epoch.
        seconds: wall time of the epoch.
        holdout: optional validation metrics (see :func:`validation_metrics`).

    """

    epoch: int
    epochs: int
    loss: float
    seconds: float
    holdout: dict[str, float] | None


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """NT-Xent loss of two batches of unit embeddings, row i of each a positive pair.

    Args:
        z1: (B, D) unit rows.
        z2: (B, D) unit rows.
        temperature: softmax temperature.

    Returns:
        Scalar loss; ~log(2B - 1) for random embeddings, -> 0 as positives separate.

    """
    b = z1.shape[0]
    z = torch.cat([z1, z2], 0)
    logits = (z @ z.T) / temperature
    logits = logits.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, target)


def ssim_regression(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE between pairwise cosine similarities and target SSIM, over distinct pairs.

    Args:
        z: (M, D) unit rows.
        target: (M, M) SSIM of the clean sources of each pair (1 on same-source pairs).

    Returns:
        Scalar loss, 0 when cosine equals SSIM everywhere.

    """
    m = z.shape[0]
    cos = z @ z.T
    iu = torch.triu_indices(m, m, offset=1, device=z.device)
    return F.mse_loss(cos[iu[0], iu[1]], target[iu[0], iu[1]])


def validation_metrics(
    model: Encoder3D, train: torch.Tensor, holdout: torch.Tensor, aug: AugmentConfig, seed: int
) -> dict[str, float]:
    """How well augmented training copies stand out from unseen volumes.

    Args:
        model: encoder (eval mode is set here).
        train: (N, 1, X, Y, Z) training grids.
        holdout: (H, 1, X, Y, Z) grids of other patients.
        aug: augmentation for the copies.
        seed: fixes the copies.

    Returns:
        ``copy_top1`` (fraction of augmented copies whose nearest training volume is their
        source), ``copy_sim_p5`` (5th percentile of their nearest similarity), ``holdout_sim_p95``
        (95th percentile of holdout nearest similarity) and their ``margin`` (p5 - p95).

    """
    model.eval()
    gen = torch.Generator(device=train.device).manual_seed(seed)
    with torch.no_grad():
        e_train = _embed(model, train)
        copies = torch.cat([augment(train[i : i + 64], aug, gen) for i in range(0, len(train), 64)])
        e_copy = _embed(model, copies)
        e_hold = _embed(model, holdout)
    s_copy = e_copy @ e_train.T
    top1 = float((s_copy.argmax(1) == torch.arange(len(train), device=train.device)).float().mean())
    copy_p5 = float(torch.quantile(s_copy.max(1).values, 0.05))
    hold_p95 = float(torch.quantile((e_hold @ e_train.T).max(1).values, 0.95))
    return {
        "copy_top1": top1,
        "copy_sim_p5": copy_p5,
        "holdout_sim_p95": hold_p95,
        "margin": copy_p5 - hold_p95,
    }


def training_views(
    x: torch.Tensor, aug: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of one training batch.

    Each view is an augmented random window (:func:`random_window`, :func:`augment`); with
    ``aug.clean_pair_prob = p`` the first view of each pair is, with probability p, the clean
    grid itself (:func:`centre_window`), the volume exactly as the index stores it.

    Args:
        x: (B, 1, X + 2m, Y + 2m, Z + 2m) training grids with the window-shift margin m.
        aug: augmentation ranges and the clean-pair probability.
        gen: seeded generator on ``x.device`` (no extra draws when p = 0).

    Returns:
        Two (B, 1, X, Y, Z) batches, row i of each a positive pair.

    """
    margin = aug.window_shift_vox
    v1 = augment(random_window(x, margin, gen), aug, gen)
    v2 = augment(random_window(x, margin, gen), aug, gen)
    if aug.clean_pair_prob > 0:
        clean = torch.rand(len(x), generator=gen, device=x.device) < aug.clean_pair_prob
        v1 = torch.where(clean.view(-1, 1, 1, 1, 1), centre_window(x, margin), v1)
    return v1, v2


def _embed(model: Encoder3D, x: torch.Tensor, batch: int = 64) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def _lr_at(config: TrainConfig, step: int, total: int) -> float:
    """Cosine decay from lr to 5% of lr."""
    frac = min(1.0, step / max(1, total))
    return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def save_checkpoint(
    out_dir: Path,
    model: Encoder3D,
    opt: torch.optim.Optimizer,
    config: TrainConfig,
    epoch: int,
    gen: torch.Generator,
    history: list[dict],
    data_digest: str,
) -> Path:
    """Write model + optimiser + RNG state (npz) and metadata (JSON), atomically.

    Returns:
        Path of the npz file.

    """
    arrays: dict[str, np.ndarray] = {
        f"model/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()
    }
    state = opt.state_dict()
    for idx, pstate in state["state"].items():
        for key, val in pstate.items():
            arrays[f"opt/{idx}/{key}"] = np.asarray(val.detach().cpu().numpy())
    arrays["rng/torch"] = torch.random.get_rng_state().numpy()
    arrays["rng/gen"] = gen.get_state().cpu().numpy()
    meta = {
        "epoch": epoch,
        "config": config.model_dump(mode="json"),
        "param_groups": state["param_groups"],
        "history": history,
        "data_digest": data_digest,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_npz = out_dir / (CHECKPOINT_NPZ + ".tmp.npz")
    np.savez(tmp_npz, **arrays)
    tmp_json = out_dir / (CHECKPOINT_JSON + ".tmp")
    tmp_json.write_text(json.dumps(meta, indent=1))
    tmp_npz.replace(out_dir / CHECKPOINT_NPZ)
    tmp_json.replace(out_dir / CHECKPOINT_JSON)
    return out_dir / CHECKPOINT_NPZ


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (CPU, eval mode) and its metadata."""

    model: Encoder3D
    config: TrainConfig
    epoch: int
    history: list[dict]
    data_digest: str
    arrays: dict[str, np.ndarray]
    param_groups: list[dict]


def load_checkpoint(ckpt_dir: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint`.

    Raises:
        IntegrityError: missing files or tensors that do not fit the stored architecture.

    """
    npz_path, json_path = ckpt_dir / CHECKPOINT_NPZ, ckpt_dir / CHECKPOINT_JSON
    if not npz_path.is_file() or not json_path.is_file():
        raise IntegrityError(
            f"{ckpt_dir}: expected {CHECKPOINT_NPZ} and {CHECKPOINT_JSON}; found "
            f"{sorted(p.name for p in ckpt_dir.iterdir()) if ckpt_dir.is_dir() else 'no folder'}; "
            "train first with `gate encoder train`"
        )
    meta = json.loads(json_path.read_text())
    config = TrainConfig.model_validate(meta["config"])
    with np.load(npz_path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    model = Encoder3D(config.spec)
    weights = {k[len("model/") :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("model/")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise IntegrityError(f"{npz_path}: weights do not fit the stored architecture: {err}") from err
    return Checkpoint(
        model=model.eval(),
        config=config,
        epoch=int(meta["epoch"]),
        history=list(meta["history"]),
        data_digest=str(meta["data_digest"]),
        arrays=arrays,
        param_groups=meta["param_groups"],
    )


def train(
    data: np.ndarray,
    config: TrainConfig,
    out_dir: Path,
    data_digest: str,
    holdout: np.ndarray | None = None,
    device: str = "cpu",
    resume: bool = True,
    on_epoch: Callable[[EpochReport], None] | None = None,
    max_epochs_this_run: int | None = None,
) -> Checkpoint:
    """Train (or resume training) and checkpoint after every epoch.

    Args:
        data: (N, 1, X + 2m, Y + 2m, Z + 2m) float32 preprocessed training grids with the
            window-shift margin ``m = config.augment.window_shift_vox`` on every side
            (:func:`gate.preprocess.preprocess_batch` with ``margin=m``), N >= 2.
        config: run configuration.
        out_dir: checkpoint folder; an existing checkpoint there is resumed when ``resume``.
        data_digest: digest identifying the training data (stored with the model).
        holdout: optional (H, 1, X, Y, Z) grids of other patients for validation metrics.
        device: ``cpu`` or ``cuda``.
        resume: continue from ``out_dir``'s checkpoint if present (it must match config and data).
        on_epoch: progress callback.
        max_epochs_this_run: stop after this many epochs of this call (tests; pausing).

    Returns:
        The final checkpoint (model on CPU, eval mode).

    Raises:
        UsageError: bad data shape, CUDA unavailable, or a checkpoint from another run.

    """
    margin = config.augment.window_shift_vox
    shape = config.training_grid
    if data.ndim != 5 or data.shape[1] != 1 or tuple(data.shape[2:]) != shape:
        raise UsageError(
            f"training data must be (N, 1, {', '.join(map(str, shape))}) (the grid plus a "
            f"{margin}-voxel window-shift margin per side); got {data.shape}"
        )
    if len(data) < 2:
        raise UsageError(f"need at least 2 training volumes for contrastive pairs; got {len(data)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    dev = torch.device(device)
    x_all = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(dev)
    x_hold = (
        torch.from_numpy(np.ascontiguousarray(holdout, dtype=np.float32)).to(dev)
        if holdout is not None
        else None
    )
    model = build_encoder(config.spec, config.seed).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator(device=dev).manual_seed(config.seed)
    start_epoch, history = 0, []
    if resume and (out_dir / CHECKPOINT_JSON).is_file():
        ck = load_checkpoint(out_dir)
        if ck.config != config or ck.data_digest != data_digest:
            raise UsageError(
                f"{out_dir} holds a checkpoint of another run (config or data differ); "
                "use a new --out folder or pass --no-resume"
            )
        model.load_state_dict(ck.model.state_dict())
        opt_state = {"state": {}, "param_groups": ck.param_groups}
        for key, val in ck.arrays.items():
            if key.startswith("opt/"):
                _, idx, name = key.split("/")
                opt_state["state"].setdefault(int(idx), {})[name] = torch.from_numpy(val).to(dev)
        opt.load_state_dict(opt_state)
        torch.random.set_rng_state(torch.from_numpy(ck.arrays["rng/torch"]))
        gen.set_state(torch.from_numpy(ck.arrays["rng/gen"]))
        start_epoch, history = ck.epoch, ck.history
        log.info("resumed from %s at epoch %d", out_dir, start_epoch)
    x_grid = centre_window(x_all, margin)
    target = ssim_matrix(x_grid.cpu()).to(dev) if config.objective == "ssim" else None
    n = len(x_all)
    steps_per_epoch = max(1, n // config.batch_size)
    total = steps_per_epoch * config.epochs
    last = (
        config.epochs
        if max_epochs_this_run is None
        else min(config.epochs, start_epoch + max_epochs_this_run)
    )
    for epoch in range(start_epoch, last):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen, device=dev)
        losses = []
        for s in range(steps_per_epoch):
            idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
            if len(idx) < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = _lr_at(config, epoch * steps_per_epoch + s, total)
            v1, v2 = training_views(x_all[idx], config.augment, gen)
            z = model(torch.cat([v1, v2]))
            if config.objective == "contrastive":
                loss = nt_xent(z[: len(idx)], z[len(idx) :])
            else:
                src = torch.cat([idx, idx])
                loss = ssim_regression(z, target[src][:, src])  # type: ignore[index]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        metrics = None
        if x_hold is not None:
            metrics = validation_metrics(model, x_grid, x_hold, config.augment, seed=config.seed + 1)
        report = EpochReport(
            epoch + 1, config.epochs, float(np.mean(losses)), time.perf_counter() - t0, metrics
        )
        history.append(
            {"epoch": report.epoch, "loss": report.loss, "seconds": report.seconds, "holdout": metrics}
        )
        save_checkpoint(out_dir, model.cpu(), opt, config, epoch + 1, gen, history, data_digest)
        model.to(dev)
        if on_epoch is not None:
            on_epoch(report)
    return load_checkpoint(out_dir)
