"""Partial copies judged by windows, with and without the localisation channel, on one split half.

``gate eval --partial-copy`` reports the test half (the train-split volumes after the first
:data:`gate.encoder.benchmark.PARTIAL_VALIDATION`, placed with seed 1). Choices about
:mod:`gate.windows` are made here on the validation half (the first 40, placed with seed 0),
with the same function (:func:`gate.encoder.benchmark.partial_copy_family`, verification on), and
this also reports, per positive, the rank of its source among the localisation channel's
patients (:meth:`gate.verify.Verifier.locate`), so a miss can be told apart as retrieval or
verification.

    OMP_NUM_THREADS=2 .venv/bin/python bench/partial_copy.py --half validation \
        --background tissue --out docs/results/partial_copy_locate_validation.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import gate.verify as gv
import gate.windows as gw
from gate.cli.options import read_options
from gate.embed import Encoder
from gate.encoder import benchmark as bm
from gate.poses import POSE_SETS
from gate.preprocess import PreprocessConfig, normalize_for
from gate.volume import DEFAULT_MAX_VOXELS, discover, read_volumes

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"


def main() -> None:
    """Run one half, print the metrics, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--encoder", type=Path, default=ROOT / "gate" / "models" / "encoder")
    ap.add_argument("--poses", default="default", choices=sorted(POSE_SETS))
    ap.add_argument("--half", choices=("validation", "test"), default="validation")
    ap.add_argument("--background", action="append", choices=bm.BACKGROUNDS)
    ap.add_argument("--locate-k", type=int, default=gv.LOCATE_K, help="0 turns the channel off")
    ap.add_argument("--limit", type=int, default=None, help="positives at most (a quick look)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    gv.LOCATE_K = args.locate_k  # read at call time by gate.windows.locate_patients
    files = discover([args.data])
    tr, ho = bm.split(len(files), 0.2, 0)
    opts = read_options(ROOT / "gate" / "models" / "demo-pseudonym.key", None, None, DEFAULT_MAX_VOXELS)
    raws = [v for p in files for v in read_volumes(p, opts)]
    cfg = PreprocessConfig()
    enc = Encoder(args.encoder, device="cpu")
    train = [raws[i] for i in tr]
    holdout = [raws[i] for i in ho]
    if args.half == "validation":
        positives, seed = slice(0, bm.PARTIAL_VALIDATION), 0
    else:
        positives, seed = slice(bm.PARTIAL_VALIDATION, None), 1
    if args.limit is not None:
        start = positives.start or 0
        positives = slice(start, min(start + args.limit, positives.stop or len(train)))
    backgrounds = tuple(args.background or bm.BACKGROUNDS)
    poses = POSE_SETS[args.poses]
    t0 = time.perf_counter()
    result = bm.partial_copy_family(
        train,
        holdout,
        enc.embed_array,
        cfg,
        poses,
        backgrounds=backgrounds,
        seed=seed,
        positives=positives,
        progress=print,
        verify=True,
    )
    result["seconds"] = time.perf_counter() - t0
    # where the localisation channel ranks each positive's source (the same placements)
    grids = [gv.stored_grid(*gv.grid_with_mask(v, cfg, 0)) for v in train]
    verifier = gv.Verifier(grids, [v.patient_id for v in train], poses, cfg, gv.MAX_SHIFT_VOX)
    for b, background in enumerate(backgrounds):
        ranks = []
        for i, vol in enumerate(train[positives]):
            placed = bm.place(vol, bm.PARTIAL_FOV_MM, background, seed + 7919 * b + i)
            image = normalize_for(gw.oriented(placed, cfg), cfg).data
            found = verifier.locate(image, np.ones(image.shape, bool), len(train))
            ranks.append([loc.patient_id for loc in found].index(vol.patient_id) + 1)
        result["backgrounds"][background]["source_locate_rank"] = ranks
        print(
            f"{background}: source located first {np.mean(np.asarray(ranks) == 1):.3f}, "
            f"within {gv.LOCATE_K}: {np.mean(np.asarray(ranks) <= max(gv.LOCATE_K, 1)):.3f}, "
            f"worst {max(ranks)}"
        )
    result.update(half=args.half, poses_name=args.poses, locate_k=args.locate_k, encoder=str(args.encoder))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
