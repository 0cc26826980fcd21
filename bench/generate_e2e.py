"""End-to-end ``gate generate --n 500 --policy strict`` wall time, split by stage.

    .venv/bin/python bench/generate_e2e.py [--n 500] [--policy strict] [--device cpu]
        [--extra "--ddim-steps 25 --batch-size 16"] [--out runs/generate_e2e.jsonl]

Runs the real command in a fresh process (cold start included) with its output under a
temporary folder, reads the ``--json`` summary and prints the wall time and the time per stage
(load, generate, embed, search, decide, audit, export).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--policy", default="strict")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--extra", default="", help="More gate generate options, one string.")
    parser.add_argument("--out", type=Path, default=Path("runs/generate_e2e.jsonl"))
    parser.add_argument("--summary", type=Path, default=None, help="Keep the run's JSON summary here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gate-e2e-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable,
            "-m",
            "gate",
            "generate",
            "--n",
            str(args.n),
            "--policy",
            args.policy,
            "--device",
            args.device,
            "--out",
            str(Path(tmp) / "out"),
            "--json",
            str(summary_path),
            *shlex.split(args.extra),
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        print(proc.stdout, end="")
        if proc.returncode not in (0, 1):
            print(proc.stderr, file=sys.stderr)
            raise SystemExit(proc.returncode)
        summary = json.loads(summary_path.read_text())
        if args.summary is not None:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(summary_path.read_text())
    row = {
        "n": args.n,
        "policy": args.policy,
        "device": args.device,
        "extra": args.extra,
        "wall_s": wall,
        "exit_code": proc.returncode,
        "candidates": summary["candidates"],
        "passed": summary["passed"],
        "exported": summary["exported"],
        "times_s": summary["times_s"],
        "memorization": summary["memorization"],
        "provider": summary["provider"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    split = ", ".join(f"{k} {v:.1f} s ({v / wall:.0%})" for k, v in summary["times_s"].items())
    print(
        f"wall {wall:.1f} s for {summary['candidates']} candidates / {summary['exported']} exported: {split}"
    )


if __name__ == "__main__":
    main()
