"""Choose verification settings on the index's own simulated copies, never on a benchmark draw (issue 12).

For each setting, the product's retrieve-then-verify code (:class:`gate.encoder.benchmark.VerifiedScorer`,
the 209 train-split volumes of ``gate eval``'s split under the compact poses) is fitted afresh (its
leave-one-patient-out real-patient scores move with the setting) and scores the simulated copies
(:func:`gate.copies.simulated_copies`, seeds disjoint from every benchmark draw) of those volumes.
No holdout patient and no composite draw is read, so a setting chosen here leaves both benchmark
halves untouched. Per setting and copy seed: the lowest and 1st-percentile verified copy score,
the AUROC against the real patients, how many copies fall at or below the real patients' maximum,
and CPU ms per copy (the whole merged path: retrieval, voxel channel, verification).

A setting is ``screen,nearest,mirror,polish,refine``: :data:`gate.verify.REFINE_SCREEN`,
:data:`gate.verify.SCREEN_NEAREST`, :data:`gate.verify.VOXEL_MIRROR` (0/1),
:data:`gate.verify.POLISH_STEPS_DEG` (0: none, 1: (2, 1)), :data:`gate.verify.REFINE_PATIENTS`.

    OMP_NUM_THREADS=1 .venv/bin/python bench/verify_select.py --encoder runs/enc_inv_model \\
        --setting 8,3,1,1,2 --setting 8,3,1,0,2 --out docs/results/verify_select.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy loads OpenBLAS, or it is ignored

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe import Data


def apply_setting(setting: str) -> dict[str, Any]:
    """Set :mod:`gate.verify`'s constants from ``screen,nearest,mirror,polish,refine``; return them."""
    import gate.verify as gv

    screen, nearest, mirror, polish, refine = (int(x) for x in setting.split(","))
    gv.REFINE_SCREEN, gv.SCREEN_NEAREST, gv.VOXEL_MIRROR = screen, nearest, bool(mirror)
    gv.POLISH_STEPS_DEG = (2.0, 1.0) if polish else ()
    gv.REFINE_PATIENTS = refine
    return {
        "REFINE_SCREEN": screen,
        "SCREEN_NEAREST": nearest,
        "VOXEL_MIRROR": bool(mirror),
        "POLISH_STEPS_DEG": list(gv.POLISH_STEPS_DEG),
        "REFINE_PATIENTS": refine,
    }


def main() -> None:
    """Score every setting on every copy seed, write the JSON."""
    from gate.copies import simulated_copies
    from gate.embed import Encoder
    from gate.encoder import benchmark as bm
    from gate.poses import POSE_SETS
    from gate.verify import MAX_SHIFT_VOX, View, grid_with_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, required=True)
    ap.add_argument("--setting", action="append", required=True, metavar="S,N,M,P,R")
    ap.add_argument("--copy-seed", type=int, action="append", default=None, help="default: 0 and 3")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data = Data()
    tr, _ = bm.split(len(data.raws), 0.2, 0)
    train_raws = [data.raws[i] for i in tr]
    g_tr = data.grids[tr]
    enc = Encoder(args.encoder, device="cpu")
    views = [grid_with_mask(v, data.config, MAX_SHIFT_VOX) for v in train_raws]
    sets = {}
    for seed in args.copy_seed or [0, 3]:
        copies = simulated_copies(views, seed)
        centres = np.ascontiguousarray(np.stack([c.centre(MAX_SHIFT_VOX) for c in copies])[:, None])
        sets[seed] = (copies, enc.embed_array(centres).astype(np.float32))
    out: dict[str, Any] = {"encoder": str(args.encoder), "settings": {}}
    for setting in args.setting:
        res: dict[str, Any] = {"constants": apply_setting(setting)}
        sc = bm.VerifiedScorer("verify", enc.embed_array, POSE_SETS["compact"], train_raws, data.config)
        sc.fit(g_tr)
        real = np.asarray(sc._fitted["lopo"][1])
        res["real_max"] = float(real.max())
        for seed, (copies, emb) in sets.items():
            t = time.process_time()
            scores = []
            for c, q in zip(copies, emb, strict=True):
                v = sc.judge(q, View(c.image, c.mask)).verified
                scores.append(float(v.max()) if v is not None else -1.0)
            cv = np.asarray(scores)
            res[f"copy_seed_{seed}"] = {
                "n": len(cv),
                "min": float(cv.min()),
                "p1": float(np.quantile(cv, 0.01)),
                "auroc_vs_real_patients": bm.auroc(cv, real),
                "at_or_below_real_max": int((cv <= real.max()).sum()),
                "cpu_ms_per_copy": (time.process_time() - t) / len(cv) * 1e3,
                "verified": scores,
            }
            r = res[f"copy_seed_{seed}"]
            print(
                f"{setting} copies seed {seed}: min {r['min']:.3f} p1 {r['p1']:.3f} AUROC "
                f"{r['auroc_vs_real_patients']:.5f}, {r['at_or_below_real_max']} at or below the real max "
                f"{res['real_max']:.3f}, {r['cpu_ms_per_copy']:.0f} ms/copy",
                flush=True,
            )
        out["settings"][setting] = res
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
