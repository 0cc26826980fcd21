"""Wall time and peak RSS of one ``gate check`` candidate per size, one run each, this CPU.

Each case runs ``gate check`` in a fresh process on one candidate against the shipped index
(load encoder + index + its self-test included, as a user runs it) and reports the child's
wall time and peak RSS (``ru_maxrss`` of a wrapper process whose only child is the check).

    .venv/bin/python bench/check_cost.py /work/shared/data/msd_hippocampus/imagesTr/hippocampus_001.nii.gz

Cases: the training volume as read (35x50x36, judged: reject), and that volume pasted into a
256x256x160 zero field of view (refused before preprocessing by the domain guard, exit 3).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

GATE = Path(sys.executable).parent / "gate"

MEASURE = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
    "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)
"""Runs the command in a fresh wrapper so RUSAGE_CHILDREN's peak is that command's alone."""


def run(path: Path, tmp: Path) -> tuple[int, float, float]:
    """Exit code, wall seconds and peak RSS (MiB) of ``gate check path`` in a fresh process."""
    cmd = [str(GATE), "check", str(path), "--device", "cpu", "--audit-log", str(tmp / "audit.jsonl")]
    env = {"GATE_ID_KEY_FILE": str(tmp / "key"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, env=env, check=False
    )
    wall = time.perf_counter() - t
    code, rss_kib = proc.stdout.strip().splitlines()[-1].split()
    return int(code), wall, int(rss_kib) / 1024.0


def main(source: Path) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        img = nib.load(source)
        data = np.asarray(img.dataobj, dtype=np.float32)
        big = np.zeros((256, 256, 160), np.float32)
        corner = [(b - n) // 2 for b, n in zip(big.shape, data.shape, strict=True)]
        big[tuple(slice(c, c + n) for c, n in zip(corner, data.shape, strict=True))] = data
        nib.save(nib.Nifti1Image(big, np.eye(4)), tmp / "pasted_256x256x160.nii.gz")
        cases = [
            ("as read " + "x".join(map(str, data.shape)), source),
            ("256x256x160", tmp / "pasted_256x256x160.nii.gz"),
        ]
        print(f"{'case':<20} {'exit':>4} {'wall s':>7} {'peak RSS MiB':>12}")
        for name, path in cases:
            code, wall, rss = run(path, tmp)
            print(f"{name:<20} {code:>4} {wall:>7.2f} {rss:>12.0f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
