"""Sharded (N shards built in parallel) vs single index build: wall time and peak memory.

Random 128-d unit vectors (as bench/index_bench.py), one row per patient, identity pose, the
real build path (:func:`gate.index.build_index` / :func:`gate.shards.build_sharded`: graph,
self-test, digests, manifest). Each mode runs in its own process so peak RSS is its own::

    .venv/bin/python bench/shard_bench.py --rows 200000 --shards 2 --out runs/shard_bench.jsonl

Peak memory: ru_maxrss of the driver (holds every probe) and of the largest shard-build child.
Wall clock on whatever machine runs it; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DIM = 128


def _one(mode: str, rows: int, shards: int) -> dict[str, object]:
    from bench.index_bench import unit_rows
    from gate.calibration import holdout
    from gate.index import Probe, build_index
    from gate.preprocess import PreprocessConfig
    from gate.shards import build_sharded
    from gate.values import Embedding

    class _Enc:
        sha256 = "b" * 64
        dim = DIM
        preprocess = PreprocessConfig(grid=(8, 8, 8))

        def embed_array(self, batch: np.ndarray) -> np.ndarray:
            raise NotImplementedError

    enc = _Enc()
    vectors = unit_rows(rows, DIM, seed=0)
    ids = [f"p-{i:016x}" for i in range(rows)]
    probes = [Probe(Embedding(v, enc.sha256, f"r{i}"), f"{i:064x}") for i, v in enumerate(vectors)]
    held = unit_rows(64, DIM, seed=1)
    cal = holdout(held, [f"p-{i + rows:016x}" for i in range(64)], vectors, ids)
    with tempfile.TemporaryDirectory(dir="runs") as tmp:
        out = Path(tmp) / "index"
        t0 = time.perf_counter()
        if mode == "single":
            build_index(probes, ids, ["ab" * 32] * rows, enc, out, cal)
        else:
            build_sharded(probes, ids, ["ab" * 32] * rows, enc, out, cal, shards)
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {
        "mode": mode,
        "rows": rows,
        "shards": 1 if mode == "single" else shards,
        "build_s": round(wall, 1),
        "driver_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "largest_child_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "bytes_on_disk": size,
    }


def main() -> None:
    """Run both modes, each in a fresh process, and append one JSON line per mode."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/shard_bench.jsonl"))
    ap.add_argument("--mode", choices=("single", "sharded"), default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(_one(args.mode, args.rows, args.shards)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path("runs").mkdir(exist_ok=True)
    results = []
    for mode in ("sharded", "single"):
        cmd = [
            sys.executable,
            "-m",
            "bench.shard_bench",
            "--mode",
            mode,
            "--rows",
            str(args.rows),
            "--shards",
            str(args.shards),
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        row = json.loads(line) | {"machine": platform.node(), "cpus": __import__("os").cpu_count()}
        print(json.dumps(row), flush=True)
        results.append(row)
    single, sharded = results[1], results[0]
    ratio = {"single_over_sharded_build_time": round(single["build_s"] / sharded["build_s"], 2)}
    print(json.dumps(ratio))
    with args.out.open("a") as f:
        for row in [*results, ratio]:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
