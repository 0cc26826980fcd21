"""Write the shipped generator's model card and sample montage from its manifest and a run summary.

    .venv/bin/python bench/generator_card.py [--model gate/models/generator]
        [--summary runs/generate_e2e_summary.json] [--sampling runs/sampling_bench.jsonl]

Draws 16 samples (seed 0, the model's default DDIM steps), writes ``samples.png`` (a 4x4 grid
of mid-axial and mid-coronal slices, 3x nearest-neighbour zoom; synthetic images only) and
``model_card.md`` (data and licence, architecture, epochs and losses, size, sampling cost and
the memorization statistics of a ``gate generate`` run given by ``--summary``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from gate.generator.config import WEIGHTS_NAME
from gate.generator.sample import DEFAULT_GENERATOR_DIR, Generator
from gate.report import write_png

ZOOM = 3


def tile(volume: np.ndarray) -> np.ndarray:
    """Mid-axial (X, Y) beside mid-coronal (X, Z) slices, uint8, rotated for display."""
    _, y, z = volume.shape
    axial = np.rot90(volume[:, :, z // 2])
    coronal = np.rot90(volume[:, y // 2, :])
    gap = np.zeros((axial.shape[0] - coronal.shape[0], coronal.shape[1]))
    pair = np.concatenate(
        [axial, np.concatenate([coronal, gap], axis=0), np.zeros((axial.shape[0], 2))], axis=1
    )
    img = np.clip(pair * 255.0, 0, 255).astype(np.uint8)
    return np.kron(img, np.ones((ZOOM, ZOOM), dtype=np.uint8))


def montage(samples: np.ndarray, cols: int = 4) -> np.ndarray:
    tiles = [tile(s[0]) for s in samples]
    h, w = tiles[0].shape
    rows = -(-len(tiles) // cols)
    out = np.zeros((rows * (h + 4), cols * w), dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + 4) : r * (h + 4) + h, c * w : (c + 1) * w] = t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_GENERATOR_DIR)
    parser.add_argument("--summary", type=Path, default=None)
    parser.add_argument("--sampling", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = Generator(args.model, device="cpu")
    m, cfg = gen.manifest, gen.config
    samples = gen.sample(seed=0, start=0, count=16)
    write_png(montage(samples), args.model / "samples.png")
    size_mb = (args.model / WEIGHTS_NAME).stat().st_size / 1e6
    n_params_ae = sum(p.numel() for p in gen.autoencoder.parameters())
    n_params_unet = sum(p.numel() for p in gen.unet.parameters())
    mem = "Not measured yet."
    if args.summary is not None and args.summary.is_file():
        s = json.loads(args.summary.read_text())
        mm = s["memorization"]
        grades = ", ".join(f"{k} {v}" for k, v in sorted(s["verdict_grades"].items()))
        mem = (
            f"From `gate generate --n {s['wanted']} --policy {s['policy']}` (run {s['run_id']}, "
            f"shipped encoder and index): {s['candidates']} candidates, {s['passed']} passed; "
            f"by verdict/grade: {grades}.\n\n"
            f"- Share of candidates rejected as copies (grade duplicate): **{mm['copy_share']:.2%}**\n"
            "- Share of training patients copied by at least one candidate: "
            f"**{mm['patients_copied_share']:.2%}** "
            f"({mm['patients_copied']} of {mm['training_patients']})\n"
        )
    speed = ""
    if args.sampling is not None and args.sampling.is_file():
        rows = [json.loads(x) for x in args.sampling.read_text().splitlines() if x.strip()]
        rows = [r for r in rows if r["model"] == gen.sha256[:12]] or rows
        speed = "\n".join(
            f"| {r['steps']} | {r['batch_size']} | {r['threads']} | {r['s_per_volume'] * 1000:.0f} |"
            for r in rows
        )
        speed = "| DDIM steps | batch | threads | ms / volume |\n| --- | --- | --- | --- |\n" + speed
    ae_losses = ", ".join(f"{x:.4f}" for x in m.autoencoder.losses)
    unet_every = max(1, len(m.unet.losses) // 10)
    unet_losses = ", ".join(
        f"{i + 1}: {x:.4f}" for i, x in enumerate(m.unet.losses) if (i + 1) % unet_every == 0 or i == 0
    )
    card = f"""# gate default generator: MONAI 3D latent diffusion, MSD Hippocampus

**What it is.** The generator `gate generate` uses by default: a KL autoencoder (MONAI
`AutoencoderKL`, channels {cfg.ae_channels}, latent {cfg.latent_shape}) trained with L1 + KL
(weight {cfg.kl_weight:g}) + least-squares patch adversarial loss (weight {cfg.adv_weight:g}, from
epoch {cfg.adv_start_epoch + 1}), and a diffusion UNet (MONAI `DiffusionModelUNet`, channels
{cfg.unet_channels}, attention {cfg.unet_attention}) on latents scaled by {m.scale_factor:.4f};
sampled with DDIM ({cfg.ddim_steps} steps by default) through `LatentDiffusionInferer`.
Volumes are {cfg.preprocess.grid[0]}x{cfg.preprocess.grid[1]}x{cfg.preprocess.grid[2]} voxels at 1 mm,
intensities in [0, 1]: the encoder's preprocessing grid (preprocess digest
`{m.preprocess_sha256[:16]}…`).

**Not for clinical use.** A research default for exercising the privacy gate. Samples are
small, blurry hippocampus-region crops; they are not anatomically validated.

## Files

| file | what |
| --- | --- |
| `weights.npz` | autoencoder + UNet state, {m.weights_dtype}, {size_mb:.1f} MB, sha256 `{m.weights_sha256}` |
| `generator.json` | config (sha256 `{m.config_sha256[:16]}…`), digests, scale factor, training summary |
| `samples.png` | 16 samples (seed 0): mid-axial and mid-coronal slice of each |

Parameters: autoencoder {n_params_ae / 1e6:.2f} M, UNet {n_params_unet / 1e6:.2f} M. No pickle:
`numpy.load(allow_pickle=False)`; `gate.generator.Generator` checks the sha256 before loading.

## Training data and licence

{m.n_training_volumes} volumes of the Medical Segmentation Decathlon Task04 Hippocampus training
set (`imagesTr`, 3D MRI crops, Vanderbilt University Medical Center), CC-BY-SA 4.0. Credit:
Simpson et al. 2019, arXiv:1902.09063; Antonelli et al. 2022, Nature Communications 13:4128.
These weights are derived from that data and shared alike under CC-BY-SA 4.0.

## Training

Reproduce (2 CPU cores, torch threads 1, seed {cfg.seed}):

    gate ldm train --data ../shared/data/msd_hippocampus/imagesTr --out runs/ldm_default \\
        --ae-epochs {cfg.ae_epochs} --unet-epochs {cfg.unet_epochs} --threads 1

- Autoencoder: {m.autoencoder.epochs_done}/{m.autoencoder.epochs_planned} epochs, batch
  {cfg.ae_batch_size}, Adam {cfg.ae_lr:g}, {m.autoencoder.seconds / 60:.1f} min. Loss per epoch
  (L1 + KL + adversarial): {ae_losses}.
- UNet: {m.unet.epochs_done}/{m.unet.epochs_planned} epochs, batch {cfg.unet_batch_size}, Adam
  {cfg.unet_lr:g}, {m.unet.seconds / 60:.1f} min; DDPM {cfg.train_timesteps} steps, scaled-linear
  betas {cfg.beta_start:g}..{cfg.beta_end:g}. Noise-prediction MSE (epoch: loss): {unet_losses}.
- Library versions: {", ".join(f"{k} {v}" for k, v in m.versions.items())}.

## Sampling cost (this machine; torch threads as listed, the other core busy with another benchmark)

{speed or "See bench/sampling.py."}

## Memorization statistics

{mem}
A copy is judged by the gate encoder's cosine similarity to the nearest training patient under
the policy's thresholds; a low share is evidence against copying under this encoder, not a proof
of privacy.

![samples](samples.png)
"""
    (args.model / "model_card.md").write_text(card)
    print(f"wrote {args.model / 'model_card.md'} and samples.png")


if __name__ == "__main__":
    main()
