"""gate check throughput: local engine vs Ray with 1 and 2 embedding workers, and on a 2-node cluster.

Candidates are perturbed copies (Gaussian noise, 2% of the intensity range) of the msd_hippocampus
volumes, written once as NIfTI; checked against the shipped index under the strict policy. Each
configuration is one ``gate check`` process (its wall time includes Ray startup)::

    .venv/bin/python bench/ray_bench.py --n 10000 --out runs/ray_bench.jsonl
    .venv/bin/python bench/ray_bench.py --n 10000 --only ray-2 --ray-address 127.0.0.1:6390 --tag cluster
    .venv/bin/python bench/ray_bench.py --n 300 --only ray-2 --local-cluster 2 --tag cluster

``--local-cluster N`` starts N one-CPU Ray nodes on this machine (``ray.cluster_utils.Cluster``,
token authentication off) for the run and stops exactly those after.

Wall clock on whatever machine runs it; compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd_hippocampus" / "imagesTr"
CONFIGS = {
    "local": ["--engine", "local"],
    "ray-1": ["--engine", "ray", "--workers", "1"],
    "ray-2": ["--engine", "ray", "--workers", "2"],
}


def make_candidates(n: int, out: Path) -> Path:
    """Write ``n`` perturbed copies once (reused when already there)."""
    if out.is_dir() and len(list(out.glob("*.nii.gz"))) == n:
        return out
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(DATA.glob("*.nii.gz"))
    rng = np.random.default_rng(0)
    images = [nib.load(p) for p in sources]
    arrays = [np.asarray(im.dataobj, dtype=np.float32) for im in images]
    for i in range(n):
        j = i % len(sources)
        arr = arrays[j]
        noisy = arr + rng.normal(0, 0.02 * float(arr.max() - arr.min()), arr.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(noisy, images[j].affine), out / f"c{i:06d}.nii.gz")
    return out


def main() -> None:
    """Run the configurations, one ``gate check`` each, and append one JSON line per run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=Path("runs/ray_bench.jsonl"))
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--ray-address", default=None)
    ap.add_argument("--tag", default="single-node")
    ap.add_argument("--local-cluster", type=int, default=0, metavar="N")
    args = ap.parse_args()
    cluster = None
    if args.local_cluster:
        os.environ["RAY_AUTH_MODE"] = "disabled"  # one trusted machine; a real cluster shares a token
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        for _ in range(args.local_cluster - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        args.ray_address = cluster.address
    try:
        run(args)
    finally:
        if cluster is not None:
            cluster.shutdown()


def run(args: argparse.Namespace) -> None:
    """One ``gate check`` per configuration."""
    cands = make_candidates(args.n, Path("runs") / f"ray_bench_{args.n}")
    gate = str(Path(sys.executable).with_name("gate"))
    rows = []
    for name in args.only or list(CONFIGS):
        extra = list(CONFIGS[name])
        if args.ray_address and name != "local":
            extra += ["--ray-address", args.ray_address]
        log = Path("runs") / f"ray_bench_{name}.jsonl"
        log.unlink(missing_ok=True)
        env = os.environ | {"GATE_AUDIT_LOG": str(log)}
        t0 = time.perf_counter()
        proc = subprocess.run([gate, "check", str(cands), *extra], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        summary = [ln for ln in proc.stdout.splitlines() if ln.startswith("checked ")]
        row = {
            "config": name,
            "tag": args.tag,
            "n": args.n,
            "wall_s": round(wall, 1),
            "candidates_per_s": round(args.n / wall, 1),
            "exit_code": proc.returncode,
            "summary": summary[-1] if summary else proc.stderr.strip().splitlines()[-1:],
            "audit_records": sum(1 for _ in log.open()) if log.exists() else 0,
            "machine": platform.node(),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    base = next((r for r in rows if r["config"] == "local"), None)
    if base:
        print(
            json.dumps(
                {f"{r['config']}_over_local_throughput": round(base["wall_s"] / r["wall_s"], 2) for r in rows}
            )
        )


if __name__ == "__main__":
    main()
