"""Which index poses? The detection benchmark for one encoder under several pose sets, one run.

Scores the same candidates (exact copies, every family at every severity, holdout patients)
against the train split indexed under each pose set of :func:`choices`, with exact search, as
``gate eval`` does for ``NAME+poses``. The encoder must be trained on the split's train half
(``gate eval --write-split``; docs/encoder.md)::

    .venv/bin/python bench/poses_ablation.py --data ../shared/data/msd_hippocampus/imagesTr \
        --encoder runs/bench_models/contrastive --out runs/poses_ablation.json --threads 1

Prints, per pose set: rows per volume, TPR at FPR 5% per family at its default severity, pooled
AUROC, the crop-shift severity curve, and the holdout's 95th percentile similarity.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from gate.embed import Encoder
from gate.encoder import benchmark as bm
from gate.identity import Pseudonymizer
from gate.poses import CORNERS, DEFAULT_POSES, EDGES, Pose, PoseSet
from gate.preprocess import PreprocessConfig, preprocess_batch
from gate.volume import ReadOptions, discover, read_volumes


def _is_diagonal_turn(p: Pose) -> bool:
    return sum(1 for r in p.rotate_deg if r) >= 2


def _cuts(sizes: tuple[int, ...]) -> list[Pose]:
    return [Pose(window_cut_vox=(sx * c, sy * c, sz * c)) for c in sizes for sx, sy, sz in CORNERS]


def _face_diagonal_turns(deg: float) -> list[Pose]:
    """Turns of ``deg`` degrees about the 12 face diagonals (the shipped set turns about the 8 body ones)."""
    c = deg / math.sqrt(2.0)
    return [Pose(rotate_deg=(ex * c, ey * c, ez * c)) for ex, ey, ez in EDGES]


def choices() -> dict[str, PoseSet]:
    """Named pose sets compared; ``shipped_86`` is :data:`gate.poses.DEFAULT_POSES`.

    ``window_shifts_62`` is the earlier default (no cuts, no diagonal turns).
    """
    base = PoseSet(
        poses=tuple(p for p in DEFAULT_POSES.poses if not any(p.window_cut_vox) and not _is_diagonal_turn(p))
    )
    no_window = PoseSet(poses=tuple(p for p in base.poses if not any(p.window_shift_vox)))
    return {
        "window_shifts_62": base,
        "cuts_3_5_instead_of_window_shifts": PoseSet(poses=(*no_window.poses, *_cuts((3, 5)))),
        "plus_cuts_3": PoseSet(poses=(*base.poses, *_cuts((3,)))),
        "plus_cuts_3_5": PoseSet(poses=(*base.poses, *_cuts((3, 5)))),
        "shipped_86": DEFAULT_POSES,
        "plus_cuts_3_5_edge_turns": PoseSet(poses=(*base.poses, *_cuts((3, 5)), *_face_diagonal_turns(10.0))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--encoder", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None, help="names from choices()")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    files = discover([args.data])
    tr, ho = bm.split(len(files), 0.2, 0)
    key = bytes(32)  # ids are not used by the benchmark
    raws = [v for p in files for v in read_volumes(p, ReadOptions(pseudonymizer=Pseudonymizer(key)))]
    cfg = PreprocessConfig()
    grids = preprocess_batch(raws, cfg)
    enc = Encoder(args.encoder, device="cpu")
    sets = choices()
    names = args.only or list(sets)
    scorers: list[bm.Scorer] = [
        bm.EmbeddingScorer(n, enc.embed_array, sets[n], [raws[i] for i in tr], cfg) for n in names
    ]
    t0 = time.perf_counter()
    result = bm.run_benchmark(
        grids[tr], [raws[i] for i in tr], grids[ho], scorers, cfg, seed=0, sweep=True, progress=print
    )
    summary = {}
    for n in names:
        m = result["methods"][n]
        fams = {
            f.name: m["families"][f.name][str(f.default)]["tpr_at_fpr_5pct"] for f in bm.FAMILIES.values()
        }
        curve = {sev: v["tpr_at_threshold"] for sev, v in m["families"]["crop_shift"].items()}
        summary[n] = {
            "poses": len(sets[n]),
            "tpr_at_fpr_5pct_default": fams,
            "pooled_auroc": m["pooled"]["auroc"],
            "crop_shift_tpr_at_threshold": curve,
            "holdout_p95": m["threshold"],
        }
        low = {k: round(v, 3) for k, v in fams.items() if v < 0.99}
        print(
            f"{n:36s} poses {len(sets[n]):3d}  pooled AUROC {m['pooled']['auroc']:.4f}  "
            f"holdout p95 {m['threshold']:.3f}  below 0.99: {low or 'none'}  crop curve {curve}"
        )
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "benchmark": result}, indent=1) + "\n")


if __name__ == "__main__":
    main()
