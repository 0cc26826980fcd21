"""Cost of retrieve-then-verify per candidate, one CPU core, against the shipped index.

Stages timed per candidate (wall and CPU seconds, median over the candidates), in one run:

- ``search``: embed the candidate and search the index (what a non-verifying index does);
- ``views``: the grid and its 14 shifted query views embedded and searched for the 20 nearest
  patients (:data:`gate.verify.QUERY_SHIFTS_VOX`, :data:`gate.verify.VERIFY_K`);
- ``voxel``: the voxel channel's patients (:meth:`gate.verify.Verifier.voxel_patients`), added
  to that search with their exact cosine;
- ``verify``: :meth:`gate.verify.Verifier.verify` on the merged patients;
- ``verify_k5``: the issue's setting, k = 5: the 5 patients the plain search retrieved verified
  (a second :class:`gate.verify.Verifier` of the same index, so neither's kept templates serve
  the other);
- the ratio of the whole verifying path to search alone, and the k = 5 path (search and
  ``verify_k5``).

Candidates: near copies of shipped-index training volumes (a 3-voxel field-of-view cut, a 6-degree
turn, blur sigma 1) and real volumes, so both the easy and the hard path are timed.

    OMP_NUM_THREADS=1 .venv/bin/python bench/verify_cost.py --n 40 --out docs/results/verify_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads OpenBLAS, or it is ignored

import numpy as np
from scipy import ndimage


def main() -> None:
    """Time the stages and write the JSON."""
    from gate.cli.options import read_options
    from gate.embed import Encoder
    from gate.index import DEFAULT_INDEX_DIR, TrainingIndex, embed_volumes
    from gate.values import Volume, merge_neighbours
    from gate.verify import VERIFY_K, VOXEL_K, Verifier, grid_search, search_windows
    from gate.volume import discover, read_volumes

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/msd_hippocampus/imagesTr"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    encoder = Encoder(device="cpu", threads=1)
    index = TrainingIndex.load(DEFAULT_INDEX_DIR, encoder)
    verifier = index.verifier
    if verifier is None:
        raise SystemExit("the shipped index does not verify")
    opts = read_options(Path("gate/models/demo-pseudonym.key"), None, None, 1 << 27)
    files = discover([args.data])[: args.n]
    vols = []
    for i, f in enumerate(files):
        (v,) = read_volumes(f, opts)
        data = v.data
        if i % 2 == 0:  # a near copy: cut, turned, blurred
            data = ndimage.gaussian_filter(
                ndimage.rotate(data[3:], 6.0, axes=(0, 2), reshape=False, order=1), 1.0
            )
        vols.append(
            Volume(np.ascontiguousarray(data, np.float32), v.affine, v.spacing, v.source, v.patient_id)
        )
    search = grid_search(encoder, index)
    if index.grids is None:
        raise SystemExit("the shipped index holds no training grids")
    k5_verifier = Verifier(
        list(index.grids),
        [r.patient_id for r in index.manifest.rows],
        index.manifest.poses,
        index.manifest.preprocess,
        verifier.max_shift,
    )
    times: dict[str, list[tuple[float, float]]] = {
        "search": [],
        "voxel": [],
        "views": [],
        "verify": [],
        "verify_k5": [],
    }

    def clock() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    merged_sizes: list[int] = []
    for vol in vols:
        t0 = clock()
        (probe,) = embed_volumes([vol], encoder)
        (nb,) = index.search_many([probe.embedding], [probe.voxel_sha256], 5)
        t1 = clock()
        view = verifier.view(vol)
        grids = search_windows(view, verifier.config.grid)
        voxel = verifier.voxel_patients(view, windows=grids)
        tv = clock()
        merged = merge_neighbours([nb, *search(grids, VERIFY_K, [voxel] * len(grids))], VERIFY_K, voxel)
        t2 = clock()
        verifier.verify(merged, view)
        t3 = clock()
        k5_verifier.verify(nb, k5_verifier.view(vol))
        t4 = clock()
        merged_sizes.append(len(merged.patient_ids))
        stages = (
            ("search", (t0, t1)),
            ("voxel", (t1, tv)),
            ("views", (tv, t2)),
            ("verify", (t2, t3)),
            ("verify_k5", (t3, t4)),
        )
        for name, (a, b) in stages:
            times[name].append((b[0] - a[0], b[1] - a[1]))
    med = {
        k: {
            "wall_ms": 1e3 * float(np.median([w for w, _ in v])),
            "cpu_ms": 1e3 * float(np.median([c for _, c in v])),
        }
        for k, v in times.items()
    }
    total = sum(m["cpu_ms"] for k, m in med.items() if k != "verify_k5")
    result = {
        "candidates": len(vols),
        "verified_patients": VERIFY_K,
        "voxel_patients": VOXEL_K,
        "merged_patients_median": float(np.median(merged_sizes)),
        "grid": list(verifier.config.grid),
        "threads": 1,
        "stages_median": med,
        "verifying_path_cpu_ms": total,
        "verifying_over_search_cpu": total / med["search"]["cpu_ms"],
        "k5_path_cpu_ms": med["search"]["cpu_ms"] + med["verify_k5"]["cpu_ms"],
        "load_average_1min": os.getloadavg()[0],
        "note": "one run; CPU ms are what one core spends, wall ms include waiting for the CPU",
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
