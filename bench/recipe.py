"""Encoder recipes compared on the validation split, reported on the test split (issue 12, item 2).

Each encoder (trained on the benchmark's train split, ``gate eval --write-split``) is scored as
the shipped gate uses it, with the product's own code:

- ``NAME``: the encoder alone (centre grid, exact cosine search);
- ``NAME+poses``: training volumes indexed under the compact poses (8 rows per volume);
- ``NAME+verify``: the compact poses, 14 shifted query views and verification of the 20 nearest
  patients (:class:`gate.encoder.benchmark.VerifiedScorer`, the decision's two-score rule).

Families: every default family of ``gate eval`` plus the wide levels the issue names (rotation
15 and 20 deg, translation 6 and 8 voxels), drawn with ``gate eval``'s seeds (``seed + 101 *
family index``), so the numbers match its sweep. Metrics per family on two disjoint halves of the
positives and of the holdout patients (:func:`gate.encoder.benchmark.validation_split`, the same
split as ``gate eval``): ``validation`` (threshold and metrics on the validation halves; the
recipe is chosen on these) and ``test`` (threshold from the validation novel scores, metrics on
the test halves, which no choice touched).

With ``--ldm`` the recipes are also compared on the real LDM copies of ``bench/ldm_copies.py``
(its samples and reference labels): every sample is judged against all 261 training volumes by
``NAME+verify``, and the report gives, for the samples the reference puts closer to a training
patient than any two real patients (``closer``), the rank of the reference's patient among the
retrieved ones, the Pearson correlation of the encoder's best cosine with the reference NCC, and
the AUROC of ``closer`` memorizing-generator samples against the default generator's samples.

    OMP_NUM_THREADS=1 .venv/bin/python bench/recipe.py --encoder base=runs/enc_base_model \
        --encoder inv=runs/enc_inv_model --ldm --out docs/results/recipe.json
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

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"
WIDE: tuple[tuple[str, float], ...] = (
    ("rotation", 15.0),
    ("rotation", 20.0),
    ("translation", 6.0),
    ("translation", 8.0),
)
"""The wide levels the issue's targets name, beside every family's default."""


class Data:
    """The 261 training volumes, read and preprocessed once for both parts.

    Attributes:
        stems: file names without extension, in ``discover`` order.
        raws: the raw volumes.
        grids: (N, 1, X, Y, Z) preprocessed grids (default :class:`PreprocessConfig`).
        config: that preprocessing.
        options: the read options (shipped demo pseudonym key).

    """

    def __init__(self) -> None:
        from gate.cli.options import read_options
        from gate.preprocess import PreprocessConfig, preprocess_batch
        from gate.volume import discover, read_volumes

        files = discover([DATA])
        self.options = read_options(None, None, None, 10**9)
        self.config = PreprocessConfig()
        self.stems = [p.name.split(".")[0] for p in files]
        self.raws = [v for p in files for v in read_volumes(p, self.options)]
        self.grids = preprocess_batch(self.raws, self.config)


def detection(data: Data, encoders: dict[str, Path], seed: int, say: Any) -> dict[str, Any]:
    """Score every recipe on every family; validation and test readings."""
    from gate.embed import Encoder
    from gate.encoder import benchmark as bm
    from gate.poses import POSE_SETS

    tr, ho = bm.split(len(data.raws), 0.2, 0)
    cfg, raws, grids = data.config, data.raws, data.grids
    train_raws = [raws[i] for i in tr]
    g_tr, g_ho = grids[tr], grids[ho]
    n = len(tr)
    nov_val, nov_test = bm.validation_split(len(ho), bm.VALIDATION_FRACTION, 0)
    pos_val, pos_test = bm.validation_split(n, bm.VALIDATION_FRACTION, 1)
    sets: dict[str, np.ndarray] = {}
    names = list(bm.FAMILIES)
    for fi, fam in enumerate(bm.FAMILIES.values()):
        sets[f"{fam.name}@{fam.default:g}"] = bm.perturb(
            fam.name, fam.default, g_tr, train_raws, cfg, seed + 101 * fi
        )
    for fam, sev in WIDE:
        sets[f"{fam}@{sev:g}"] = bm.perturb(fam, sev, g_tr, train_raws, cfg, seed + 101 * names.index(fam))
    say(f"{len(sets)} candidate sets of {n} volumes")
    defaults = [f"{f.name}@{f.default:g}" for f in bm.FAMILIES.values()]
    out: dict[str, Any] = {}
    for name, path in encoders.items():
        enc = Encoder(path, device="cpu")
        shared: dict[str, object] = {}
        scorers = [
            bm.EmbeddingScorer(name, enc.embed_array),
            bm.EmbeddingScorer(f"{name}+poses", enc.embed_array, POSE_SETS["compact"], train_raws, cfg),
            bm.VerifiedScorer(
                f"{name}+verify", enc.embed_array, POSE_SETS["compact"], train_raws, cfg, shared=shared
            ),
        ]
        for sc in scorers:
            t0 = time.perf_counter()
            sc.fit(g_tr)
            novel = sc.score(g_ho)
            thr_val = bm.validation_threshold(novel, nov_val)
            pos = {key: sc.score(cand) for key, cand in sets.items()}
            fams = {
                key: {
                    "validation": bm.family_metrics(p[pos_val], novel[nov_val], thr_val),
                    "test": bm.family_metrics(p[pos_test], novel[nov_test], thr_val),
                }
                for key, p in pos.items()
            }
            pooled_val = np.concatenate([pos[k][pos_val] for k in defaults])
            pooled_test = np.concatenate([pos[k][pos_test] for k in defaults])
            out[sc.name] = {
                "encoder": str(path),
                "threshold_validation": thr_val,
                "novel_scores": novel.tolist(),
                "families": fams,
                "pooled_validation": bm.family_metrics(pooled_val, novel[nov_val], thr_val),
                "pooled_test": bm.family_metrics(pooled_test, novel[nov_test], thr_val),
                "seconds": time.perf_counter() - t0,
            }
            sc.release()
            say(
                f"{sc.name}: pooled AUROC val {out[sc.name]['pooled_validation']['auroc']:.4f} "
                f"test {out[sc.name]['pooled_test']['auroc']:.4f}; composite TPR@5% val "
                f"{fams['composite@1']['validation']['tpr_at_fpr_5pct']:.3f} test "
                f"{fams['composite@1']['test']['tpr_at_fpr_5pct']:.3f}; rotation15 val "
                f"{fams['rotation@15']['validation']['tpr_at_fpr_5pct']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return {
        "split": {
            "train": n,
            "holdout": len(ho),
            "positive_validation": len(pos_val),
            "novel_validation": len(nov_val),
        },
        "seed": seed,
        "methods": out,
    }


def ldm(data: Data, encoders: dict[str, Path], samples: Path, labels_path: Path, say: Any) -> dict[str, Any]:
    """The recipes on real LDM copies: retrieval of the reference's patient and cosine vs NCC."""
    from gate.embed import Encoder
    from gate.encoder import benchmark as bm
    from gate.poses import POSE_SETS
    from gate.preprocess import preprocess_batch
    from gate.verify import VERIFY_K
    from gate.volume import read_volumes

    labels = json.loads(labels_path.read_text())
    rows = labels["samples"]
    sys.path.insert(0, str(ROOT / "bench"))
    from ldm_copies import thresholds_from  # the reference's own thresholds

    thr = thresholds_from(labels)
    sample_grids = preprocess_batch(
        [v for r in rows for v in read_volumes(samples / r["sample"], data.options)], data.config
    )
    ref_ncc = np.asarray([r["aligned_ncc"] for r in rows])
    closer = ref_ncc > thr["similar"]
    mem = np.asarray([r["generator"] == "mem" for r in rows])
    ref_index = [data.stems.index(r["nearest_file"].split(".")[0]) for r in rows]
    n_poses = len(POSE_SETS["compact"])
    out: dict[str, Any] = {"reference_thresholds": thr, "n": len(rows), "n_closer": int(closer.sum())}
    for name, path in encoders.items():
        t0 = time.perf_counter()
        enc = Encoder(path, device="cpu")
        sc = bm.VerifiedScorer(
            f"{name}+verify", enc.embed_array, POSE_SETS["compact"], data.raws, data.config
        )
        sc.fit(data.grids)
        ref = sc._fitted["ref"]  # the scorer's indexed rows, to read ranks as well as scores
        pid_index = {f"p-{i:016x}": i for i in range(len(data.raws))}  # the scorer's patient ids
        emb = enc.embed_array(sample_grids).astype(np.float32)
        ranks, best_cos, src_cos, verified = [], [], [], []
        for i, g in enumerate(sample_grids):
            cos = (ref @ emb[i]).reshape(len(data.raws), n_poses).max(1)
            ranks.append(int(np.sum(cos > cos[ref_index[i]])) + 1)
            best_cos.append(float(cos.max()))
            src_cos.append(float(cos[ref_index[i]]))
            res = sc.judge(emb[i], sc.candidate_view(g[0]))
            found = res.verified_patient_id is not None and pid_index[res.verified_patient_id] == ref_index[i]
            verified.append((float(res.verified.max()) if res.verified is not None else -1.0, found))
        ranks_a, best_a = np.asarray(ranks), np.asarray(best_cos)
        sel = closer & mem
        out[name] = {
            "encoder": str(path),
            "closer_rank_of_reference_patient": {
                "top1": float(np.mean(ranks_a[sel] <= 1)),
                "top5": float(np.mean(ranks_a[sel] <= 5)),
                "top20": float(np.mean(ranks_a[sel] <= VERIFY_K)),
                "max": int(ranks_a[sel].max()),
            },
            "pearson_best_cosine_vs_reference_ncc": float(np.corrcoef(best_a, ref_ncc)[0, 1]),
            "pearson_source_cosine_vs_reference_ncc": float(np.corrcoef(np.asarray(src_cos), ref_ncc)[0, 1]),
            "auroc_cosine_closer_mem_vs_default": bm.auroc(best_a[sel], best_a[~mem]),
            "verified_found_reference_patient_closer": float(
                np.mean([v[1] for v, s in zip(verified, sel, strict=True) if s])
            ),
            "auroc_verified_closer_mem_vs_default": bm.auroc(
                np.asarray([v[0] for v, s in zip(verified, sel, strict=True) if s]),
                np.asarray([v[0] for v, m in zip(verified, mem, strict=True) if not m]),
            ),
            "seconds": time.perf_counter() - t0,
        }
        say(f"ldm {name}: {json.dumps(out[name])}")
    return out


def main() -> None:
    """Run the comparison and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoder", action="append", required=True, metavar="NAME=DIR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-detection", action="store_true")
    ap.add_argument("--ldm", action="store_true")
    ap.add_argument("--samples", type=Path, default=ROOT / "runs" / "ldm_copies" / "samples")
    ap.add_argument("--labels", type=Path, default=ROOT / "runs" / "ldm_copies" / "labels.json")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    encoders = {e.partition("=")[0]: Path(e.partition("=")[2]) for e in args.encoder}

    def say(m: str) -> None:
        print(time.strftime("%H:%M:%S"), m, flush=True)

    result: dict[str, Any] = {"encoders": {k: str(v) for k, v in encoders.items()}}
    data = Data()
    if not args.no_detection:
        result["detection"] = detection(data, encoders, args.seed, say)
    if args.ldm:
        result["ldm"] = ldm(data, encoders, args.samples, args.labels, say)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
