"""Leave-one-out measurement behind gate.domain's tolerances.

For every training volume, how far outside the other volumes' per-axis range (field of view
in mm, canonical axes) does it fall, relative to that range? The largest such margin is the
smallest tolerance that admits every held-out real volume.

    .venv/bin/python bench/domain_tolerance.py /work/shared/data/msd_hippocampus/imagesTr

Measured 2026-12-01 on the 261 MSD hippocampus volumes: FOV 31-43 x 40-59 x 24-47 mm, spacing
1 mm everywhere, leave-one-out margin 0.083 (gate.domain.FOV_TOLERANCE = 0.10).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from gate.domain import geometry
from gate.identity import Pseudonymizer
from gate.volume import ReadOptions, discover, read_volumes


def main(folder: Path) -> None:
    options = ReadOptions(pseudonymizer=Pseudonymizer(key=bytes(32)))
    geo = [geometry(v) for src in discover([folder]) for v in read_volumes(src, options)]
    fov = np.stack([g[2] for g in geo])
    spacing = np.stack([g[1] for g in geo])
    need = 0.0
    for i in range(len(fov)):
        rest = np.delete(fov, i, axis=0)
        lo, hi = rest.min(axis=0), rest.max(axis=0)
        need = max(need, float(np.max(np.maximum(fov[i] / hi - 1.0, lo / fov[i] - 1.0))))
    print(f"volumes {len(fov)}")
    print(f"fov mm min {fov.min(axis=0)} max {fov.max(axis=0)}")
    print(f"spacing mm min {spacing.min(axis=0)} max {spacing.max(axis=0)}")
    print(f"leave-one-out relative margin needed: {need:.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
