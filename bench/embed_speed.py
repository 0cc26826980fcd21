"""Embedding speed: onnxruntime (gate.embed.Encoder) vs torch eager, same weights, same volumes.

Volumes per second at batch 1 and batch 32, measured interleaved in one run (best of several
repeats, so a noisy shared CPU hurts both sides alike); the ratio is what to read.

    .venv/bin/python bench/embed_speed.py [--threads 1] [--out runs/embed_speed.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gate.embed import Encoder
from gate.encoder.export import export_encoder
from gate.encoder.model import EncoderSpec, build_encoder
from gate.identity import Pseudonymizer
from gate.preprocess import PreprocessConfig, preprocess_batch
from gate.volume import ReadOptions, read_volumes

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus" / "imagesTr"


def rate(fn, x: np.ndarray, min_seconds: float) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn(x)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = PreprocessConfig()
    files = sorted(DATA.glob("*.nii.gz"))[:32]
    opts = ReadOptions(pseudonymizer=Pseudonymizer(key=bytes(32)))
    grids = preprocess_batch([v for f in files for v in read_volumes(f, opts)], cfg)
    model = build_encoder(EncoderSpec(grid=cfg.grid), seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        export_encoder(
            model,
            cfg.grid,
            Path(tmp) / "m",
            grids[:4],
            preprocess=cfg,
            objective="speed",
            dim=model.spec.dim,
            architecture=model.spec.model_dump(mode="json"),
            training={},
        )
        enc = Encoder(Path(tmp) / "m", device="cpu", threads=args.threads)

    def torch_embed(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    results = {}
    for batch in (1, 32):
        x = np.ascontiguousarray(grids[:batch])
        best = {"torch_eager": 0.0, "onnxruntime": 0.0}
        for _ in range(args.repeats):
            best["torch_eager"] = max(best["torch_eager"], rate(torch_embed, x, args.seconds))
            best["onnxruntime"] = max(best["onnxruntime"], rate(enc.embed_array, x, args.seconds))
        best["ratio_ort_over_torch"] = best["onnxruntime"] / best["torch_eager"]
        results[f"batch_{batch}"] = best
        print(
            f"batch {batch:2d}: torch eager {best['torch_eager']:7.1f} vol/s, onnxruntime "
            f"{best['onnxruntime']:7.1f} vol/s, ratio {best['ratio_ort_over_torch']:.2f}"
        )
    results.update(
        {
            "threads": args.threads,
            "provider": enc.provider,
            "torch": torch.__version__,
            "grid": list(cfg.grid),
        }
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
