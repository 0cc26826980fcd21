"""Sampling cost per generated volume against batch size and DDIM steps.

    .venv/bin/python bench/sampling.py [--model DIR] [--batch-sizes 1 4 16 32] [--steps 10 25 50]
        [--volumes 32] [--threads 2] [--device cpu] [--out runs/sampling_bench.jsonl]

For every (batch size, steps) pair it draws ``--volumes`` volumes (rounded up to whole batches)
after one warm-up batch and reports seconds per volume, and the same as a ratio to the default
setting (batch 16, the model's default steps), so runs on a busy machine stay comparable.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gate.generator.sample import DEFAULT_GENERATOR_DIR, Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_GENERATOR_DIR)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50])
    parser.add_argument("--volumes", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--out", type=Path, default=Path("runs/sampling_bench.jsonl"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = Generator(args.model, device=args.device)
    rows = []
    for steps in args.steps:
        for bs in args.batch_sizes:
            gen.sample(0, 0, bs, steps)  # warm-up
            batches = -(-args.volumes // bs)
            t0 = time.perf_counter()
            for b in range(batches):
                gen.sample(1, b * bs, bs, steps)
            if gen.device.type == "cuda":
                torch.cuda.synchronize()
            per = (time.perf_counter() - t0) / (batches * bs)
            row = {
                "steps": steps,
                "batch_size": bs,
                "s_per_volume": per,
                "volumes": batches * bs,
                "threads": args.threads,
                "device": str(gen.device),
                "model": gen.sha256[:12],
            }
            rows.append(row)
            print(f"steps {steps:>3} batch {bs:>3}: {per * 1000:8.1f} ms/volume", flush=True)
    ref = next((r for r in rows if r["batch_size"] == 16 and r["steps"] == gen.config.ddim_steps), rows[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        for r in rows:
            r["ratio_to_default"] = r["s_per_volume"] / ref["s_per_volume"]
            fh.write(json.dumps(r) + "\n")
    print(
        f"reference: batch {ref['batch_size']}, {ref['steps']} steps = "
        f"{ref['s_per_volume'] * 1000:.1f} ms/volume"
    )


if __name__ == "__main__":
    main()
