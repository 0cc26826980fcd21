"""End-to-end evaluation of ``gate index build`` + ``gate check`` on msd_hippocampus.

A seeded split of the 261 volumes (one patient each) into train (80%) and holdout (20%):

1. ``gate index build`` on the train split (leave-one-patient-out calibration: the holdout is
   never seen by the index);
2. candidates written as .nii.gz into the run folder: exact copies of every train volume,
   near copies of every train volume under each perturbation of :data:`PERTURBATIONS`
   (default severity), and the untouched holdout volumes;
3. the real ``gate check`` (subprocess) of each candidate set under each shipped policy,
   with ``--json``; the rates per policy and set are printed and written to summary.json.

    .venv/bin/python bench/check_eval.py --encoder gate/models/encoder --out runs/check_eval

If the encoder was trained on all 261 volumes, the holdout numbers are optimistic (the
encoder has seen the holdout patients); pass a train-split encoder when there is one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"
POLICIES = ("strict", "standard", "permissive")


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, 0.03 * float(x.std()), x.shape)


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=0.7)


def _shift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.shift(x, rng.uniform(-1.5, 1.5, size=3), order=1, mode="nearest")


def _intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    scaled = (x - lo) / (hi - lo)
    return lo + (hi - lo) * scaled ** rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1)


def _mixed(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _noise(_intensity(_shift(x, rng), rng), rng)


PERTURBATIONS = {"noise": _noise, "blur": _blur, "shift": _shift, "intensity": _intensity, "mixed": _mixed}
"""Default-severity near copies: what a generator that memorised a scan might emit (3% noise,
0.7-voxel blur, <= 1.5-voxel sub-voxel shift, +-15% gamma and +-10% gain, and all of them)."""


def write_like(src: Path, data: np.ndarray, dst: Path) -> None:
    img = nib.load(src)
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), dst)


def gate_check(
    gate_bin: Path, cand: Path, policy: str, index: Path, encoder: Path, report: Path, env: dict[str, str]
) -> dict:
    cmd = [str(gate_bin), "check", str(cand), "--policy", policy, "--index", str(index)]
    cmd += ["--encoder", str(encoder), "--device", "cpu", "--json", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"gate check failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(report.read_text())
    data["returncode"] = proc.returncode
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--encoder", type=Path, default=Path("gate/models/encoder"))
    ap.add_argument("--out", type=Path, default=Path("runs/check_eval"))
    ap.add_argument("--train-fraction", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="use only this many volumes (smoke test)")
    args = ap.parse_args()
    gate_bin = Path(sys.executable).parent / "gate"
    files = sorted(DATA.glob("*.nii.gz"))
    if args.limit:
        files = files[: args.limit]
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(files))
    n_train = round(args.train_fraction * len(files))
    train, held = [files[i] for i in order[:n_train]], [files[i] for i in order[n_train:]]
    out = args.out
    out.mkdir(parents=True, exist_ok=False)
    env = dict(os.environ, GATE_ID_KEY_FILE=str(out / "pseudonym.key"))
    sets = {name: out / "cand" / name for name in ["exact", *PERTURBATIONS, "holdout"]}
    (out / "train").mkdir()
    for d in sets.values():
        d.mkdir(parents=True)
    for f in train:
        (out / "train" / f.name).symlink_to(f)
        data = np.asanyarray(nib.load(f).dataobj).astype(np.float32)
        write_like(f, data, sets["exact"] / f.name)
        for name, fn in PERTURBATIONS.items():
            write_like(f, fn(data.astype(np.float64), rng), sets[name] / f.name)
    for f in held:
        (sets["holdout"] / f.name).symlink_to(f)
    build = subprocess.run(
        [str(gate_bin), "index", "build", "--data", str(out / "train"), "--encoder", str(args.encoder),
         "--device", "cpu", "--out", str(out / "index")],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    print(build.stdout, build.stderr, flush=True)
    if build.returncode != 0:
        raise SystemExit(build.returncode)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for policy in POLICIES:
        summary[policy] = {}
        for name, cand in sets.items():
            rep = gate_check(
                gate_bin, cand, policy, out / "index", args.encoder, out / f"{policy}_{name}.json", env
            )
            verdicts = [r["verdict"] for r in rep["results"]]
            sims = [r["similarity"] for r in rep["results"]]
            summary[policy][name] = {
                "n": len(verdicts),
                "reject": verdicts.count("reject") / len(verdicts),
                "flag": verdicts.count("flag") / len(verdicts),
                "pass": verdicts.count("pass") / len(verdicts),
                "similarity_min": float(np.min(sims)),
                "similarity_median": float(np.median(sims)),
                "similarity_max": float(np.max(sims)),
            }
            print(policy, name, json.dumps(summary[policy][name]), flush=True)
    manifest = json.loads((out / "index" / "manifest.json").read_text())
    cal = np.asarray(manifest["calibration"]["similarities"])
    result = {
        "train": len(train),
        "holdout": len(held),
        "seed": args.seed,
        "encoder": str(args.encoder),
        "calibration_percentiles": {p: float(np.percentile(cal, p)) for p in (1, 5, 25, 50, 75, 90, 95, 99)},
        "policies": summary,
    }
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n| policy | set | n | reject | flag | pass | sim min / median / max |")
    print("|---|---|---|---|---|---|---|")
    for policy, rows in summary.items():
        for name, r in rows.items():
            print(
                f"| {policy} | {name} | {r['n']} | {r['reject']:.1%} | {r['flag']:.1%} | {r['pass']:.1%} | "
                f"{r['similarity_min']:.4f} / {r['similarity_median']:.4f} / {r['similarity_max']:.4f} |"
            )


if __name__ == "__main__":
    main()
