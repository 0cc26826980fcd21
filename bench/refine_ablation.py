"""Which retrieved patients the rotation search refines: an ablation on an index's simulated copies.

The verified score of a patient that is not refined is its unturned half-resolution NCC, so a copy
turned 8-12 degrees about a random axis verifies as a stranger unless its source is refined
(:data:`gate.verify.REFINE_PATIENTS`, :data:`gate.verify.REFINE_NEAREST`). This scores every
simulated copy of an index (:func:`gate.copies.simulated_copies`, the build's seed) exactly as
``gate index build`` does (exact search over the index rows, the 15 views, the voxel channel,
verification), first with the shipped settings, then, on the copies that verified below
``--below`` there, under each setting of ``--settings``, and reports how many stay below and the
time per copy.

    OMP_NUM_THREADS=2 .venv/bin/python bench/refine_ablation.py --index gate/models/index \
        --settings 1,0 3,0 1,1 2,1 1,2 2,2 25,0 --out docs/results/refine_ablation.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import gate.verify as gv
from gate.cli.index import load_encoder, read_all
from gate.cli.options import read_options
from gate.copies import Copy, simulated_copies
from gate.index_manifest import read_grids, read_manifest, read_vectors
from gate.volume import DEFAULT_MAX_VOXELS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"


def score_copies(index: Path, data: Path, encoder: Path) -> tuple[list[Copy], list[str], object]:
    """The index's simulated copies and a function scoring a list of them."""
    m = read_manifest(index)
    opts = read_options(ROOT / "gate" / "models" / "demo-pseudonym.key", None, None, DEFAULT_MAX_VOXELS)
    vols, _, errors = read_all([data], opts)
    if errors:
        raise SystemExit(f"could not read the training data: {errors[0]}")
    pids = [v.patient_id for v in vols]
    if pids != [r.patient_id for r in m.rows]:
        raise SystemExit(f"{data} is not the data {index} was built from")
    enc = load_encoder(encoder, "cpu")
    vectors = read_vectors(index / "vectors.npy", m)
    grids = read_grids(index / "grids.npy", m)
    n_poses = len(m.poses)
    row_pids = [p for p in pids for _ in range(n_poses)]
    ordinals = gv.volume_ordinals(pids)
    verifier = gv.Verifier(list(grids), pids, m.poses, m.preprocess, gv.MAX_SHIFT_VOX)
    views = [gv.grid_with_mask(v, m.preprocess, gv.MAX_SHIFT_VOX) for v in vols]
    copies = simulated_copies(views, m.seed)
    centres = np.stack([c.centre(gv.MAX_SHIFT_VOX) for c in copies])[:, None]
    queries = np.concatenate(  # the copies' embeddings do not depend on the setting: once, batched
        [enc.embed_array(np.ascontiguousarray(centres[i : i + 64])) for i in range(0, len(centres), 64)]
    ).astype(np.float32)
    query_of = {id(c): q for c, q in zip(copies, queries, strict=True)}
    search = gv.exact_grid_search(enc.embed_array, vectors, row_pids, n_poses, ordinals, None)

    def run(chosen: Sequence[Copy]) -> list[dict]:
        out = []
        for c in chosen:
            nb = gv.exact_neighbours(query_of[id(c)], vectors, row_pids, n_poses, ordinals, gv.VERIFY_K)
            (r,) = gv.retrieve_and_verify(verifier, [nb], [gv.View(c.image, c.mask)], search, gv.VERIFY_K)
            out.append(
                {
                    "volume": c.volume,
                    "changes": c.changes,
                    "cosine": r.nearest_similarity,
                    "verified": float(r.verified.max()) if r.verified is not None else -1.0,
                    "verified_patient_is_source": r.verified_patient_id == pids[c.volume],
                }
            )
        return out

    return copies, pids, run


def main(argv: Sequence[str] | None = None) -> None:
    """Run the ablation and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--index", type=Path, default=ROOT / "gate" / "models" / "index")
    ap.add_argument(
        "--data", type=Path, default=ROOT.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"
    )
    ap.add_argument("--encoder", type=Path, default=ROOT / "gate" / "models" / "encoder")
    ap.add_argument("--below", type=float, default=0.80)
    ap.add_argument(
        "--baseline", default="1,0", help="REFINE_PATIENTS,REFINE_NEAREST picking the hard copies"
    )
    ap.add_argument("--settings", nargs="+", default=["1,0", "3,0", "1,1", "2,1", "1,2", "2,2", "25,0"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    copies, _, run = score_copies(args.index, args.data, args.encoder)

    def setting(text: str) -> tuple[int, int]:
        a, b = (int(x) for x in text.split(","))
        gv.REFINE_PATIENTS, gv.REFINE_NEAREST = a, b
        return a, b

    base = setting(args.baseline)
    t0 = time.perf_counter()
    first = run(copies)
    hard = [i for i, r in enumerate(first) if r["verified"] < args.below]
    result: dict = {
        "index": str(args.index),
        "copies": len(copies),
        "baseline": {"refine_patients": base[0], "refine_nearest": base[1]},
        "baseline_seconds_per_copy": (time.perf_counter() - t0) / len(copies),
        "hard": {"below": args.below, "count": len(hard), "copies": [first[i] for i in hard]},
        "settings": [],
    }
    for text in args.settings:
        a, b = setting(text)
        t = time.perf_counter()
        rows = run([copies[i] for i in hard])
        result["settings"].append(
            {
                "refine_patients": a,
                "refine_nearest": b,
                "still_below": sum(r["verified"] < args.below for r in rows),
                "source_verified_best": sum(r["verified_patient_is_source"] for r in rows),
                "seconds_per_hard_copy": (time.perf_counter() - t) / max(len(hard), 1),
                "verified": [r["verified"] for r in rows],
            }
        )
        print(json.dumps({k: v for k, v in result["settings"][-1].items() if k != "verified"}))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
