"""Why composite near copies miss, and what the verification does with simulated copies (issue 12).

Two readings with one encoder trained on the benchmark's train split (``gate eval
--write-split``), scored by the product's retrieve-then-verify code
(:class:`gate.encoder.benchmark.VerifiedScorer`, the 209 train-split volumes under the compact
poses):

- ``composite``: per composite near copy (``gate eval``'s draw, seed 0) and per holdout patient,
  the nearest cosine, the best verified NCC, whether the copy's source was among the verified
  patients, and the copy's pieces; the composite family's TPR at FPR 5% on the validation and
  test halves as ``bench/recipe.py`` computes them.
- ``simulated``: the index's own simulated copies (:func:`gate.copies.simulated_copies`, seeds
  disjoint from every benchmark draw) of the 209 train-split volumes against their
  leave-one-patient-out real-patient scores: no holdout patient and no benchmark draw is used,
  so a setting can be checked here without touching either benchmark half.

    OMP_NUM_THREADS=1 .venv/bin/python bench/composite_misses.py --encoder runs/enc_inv_model \\
        --out docs/results/composite_misses.json
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


def main() -> None:
    """Score, summarise, write the JSON."""
    from gate.copies import simulated_copies
    from gate.embed import Encoder
    from gate.encoder import benchmark as bm
    from gate.poses import POSE_SETS
    from gate.verify import MAX_SHIFT_VOX, View, grid_with_mask

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = Data()
    tr, ho = bm.split(len(data.raws), 0.2, 0)
    train_raws = [data.raws[i] for i in tr]
    g_tr, g_ho = data.grids[tr], data.grids[ho]
    fi = list(bm.FAMILIES).index("composite")
    comp = bm.perturb("composite", 1.0, g_tr, train_raws, data.config, args.seed + 101 * fi)
    enc = Encoder(args.encoder, device="cpu")
    sc = bm.VerifiedScorer("verify", enc.embed_array, POSE_SETS["compact"], train_raws, data.config)
    sc.fit(g_tr)
    pids = [f"p-{i:016x}" for i in range(len(train_raws))]
    rows: list[dict[str, Any]] = []
    for kind, grids in (("novel", g_ho), ("composite", comp)):
        emb = enc.embed_array(grids).astype(np.float32)
        for i, c in enumerate(grids):
            nb = sc.judge(emb[i], sc.candidate_view(c[0]))
            ver = nb.verified if nb.verified is not None else np.full(len(nb.patient_ids), -1.0)
            row: dict[str, Any] = {
                "kind": kind,
                "i": i,
                "cos": float(nb.similarities.max()),
                "ver": float(ver.max()),
            }
            if kind == "composite":
                src = pids[i]
                row["source_verified"] = src in nb.patient_ids
                row["pieces"] = [[p.family, p.severity] for p in bm.composite_draw(i, args.seed + 101 * fi)]
            rows.append(row)
    lopo_ver = np.asarray(sc._fitted["lopo"][1])
    novel = np.array([sc.combine(r["cos"], r["ver"]) for r in rows if r["kind"] == "novel"])
    pos = np.array([sc.combine(r["cos"], r["ver"]) for r in rows if r["kind"] == "composite"])
    nv, nt = bm.validation_split(len(novel), bm.VALIDATION_FRACTION, 0)
    pv, pt = bm.validation_split(len(pos), bm.VALIDATION_FRACTION, 1)
    thr = bm.validation_threshold(novel, nv)
    cut = float(np.quantile(novel, 0.95))
    misses = [r for r, s in zip((r for r in rows if r["kind"] == "composite"), pos, strict=True) if s <= cut]
    views = [grid_with_mask(v, data.config, MAX_SHIFT_VOX) for v in train_raws]
    copies = simulated_copies(views, args.seed)
    centres = np.stack([c.centre(MAX_SHIFT_VOX) for c in copies])[:, None]
    cemb = enc.embed_array(np.ascontiguousarray(centres)).astype(np.float32)
    copy_ver = []
    for c, q in zip(copies, cemb, strict=True):
        v = sc.judge(q, View(c.image, c.mask)).verified
        copy_ver.append(float(v.max()) if v is not None else -1.0)
    cv = np.asarray(copy_ver)
    result = {
        "encoder": str(args.encoder),
        "composite": {
            "validation": bm.family_metrics(pos[pv], novel[nv], thr),
            "test": bm.family_metrics(pos[pt], novel[nt], thr),
            "misses_at_pooled_novel_p95": misses,
            "source_verified": sum(bool(r["source_verified"]) for r in rows if r["kind"] == "composite"),
            "n_copies": len(pos),
        },
        "simulated": {
            "n": len(cv),
            "auroc_vs_real_patients": bm.auroc(cv, lopo_ver),
            "above_real_max": float((cv > lopo_ver.max()).mean()),
            "copy_p1": float(np.quantile(cv, 0.01)),
            "copy_min": float(cv.min()),
            "real_max": float(lopo_ver.max()),
            "verified": copy_ver,
        },
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    c, s = result["composite"], result["simulated"]
    print(
        f"composite TPR@5% val {c['validation']['tpr_at_fpr_5pct']:.3f} "
        f"test {c['test']['tpr_at_fpr_5pct']:.3f}; "
        f"{len(misses)} miss(es) at the pooled novel p95; source verified for "
        f"{c['source_verified']} of {c['n_copies']}; simulated copies AUROC "
        f"{s['auroc_vs_real_patients']:.4f}, above the real max {s['above_real_max']:.4f}, p1 "
        f"{s['copy_p1']:.3f}, min {s['copy_min']:.3f} ({result['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
