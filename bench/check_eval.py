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

from gate.policy import policy_names

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"
POLICIES = tuple(policy_names())
"""The shipped policies, each judged by its own ``gate check`` run (``--policies`` picks some)."""


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


def encoder_families() -> list[str]:
    """The encoder benchmark's near-copy families (gate.encoder.benchmark.FAMILIES), less exact."""
    from gate.encoder.benchmark import FAMILIES

    return [name for name in FAMILIES if name != "exact"]


def write_encoder_family_copies(train: list[Path], sets: dict[str, Path], seed: int) -> None:
    """Near copies at each family's default severity, made by the encoder benchmark's perturb().

    perturb() returns preprocessed grids (1 mm, [0, 1]); each is written as .nii.gz with an
    identity affine, so ``gate check`` preprocesses it once more (a no-op up to the percentile
    re-normalisation).
    """
    from gate.encoder.benchmark import FAMILIES, perturb
    from gate.preprocess import PreprocessConfig, preprocess
    from gate.values import Volume

    cfg = PreprocessConfig()
    raws = []
    for i, f in enumerate(train):
        img = nib.load(f)
        data = np.asanyarray(img.dataobj).astype(np.float32)
        spacing = tuple(float(x) for x in np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0)))
        raws.append(Volume(data, np.asarray(img.affine, float), spacing, str(f), f"p-{i:016x}"))  # type: ignore[arg-type]
    grids = np.stack([preprocess(v, cfg).data[None] for v in raws])
    for name in encoder_families():
        fam = FAMILIES[name]
        cand = perturb(name, fam.default, grids, raws, cfg, seed)
        for f, grid in zip(train, cand, strict=True):
            nib.save(nib.Nifti1Image(np.asarray(grid[0], dtype=np.float32), np.eye(4)), sets[name] / f.name)


def write_like(src: Path, data: np.ndarray, dst: Path) -> None:
    img = nib.load(src)
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine), dst)


def gate_check(
    gate_bin: Path, cand: Path, policy: str, index: Path, encoder: Path, report: Path, env: dict[str, str]
) -> dict:
    args = ["check", str(cand), "--policy", policy, "--index", str(index)]
    args += ["--encoder", str(encoder), "--device", "cpu", "--json", str(report)]
    args += ["--audit-log", str(report.parent / "audit.jsonl")]
    code, _, err = run_gate(gate_bin, args, env)
    if code not in (0, 1, 5):  # 5: flagged (none rejected)
        raise SystemExit(f"gate check failed ({code}): {err[-2000:]}")
    data = json.loads(report.read_text())
    data["returncode"] = code
    return data


PROXY: list[object] = []
"""Set by --proxy-voxel-encoder: the in-process stand-in encoder (then gate runs in-process)."""


class VoxelEncoder:
    """Proxy encoder: the preprocessed grid average-pooled 4x4x4, centred, unit norm.

    The cosine of two such vectors is the Pearson correlation of the pooled volumes: the
    pixel-space baseline. Used only when no ONNX encoder is available.
    """

    def __init__(self) -> None:
        from gate.preprocess import PreprocessConfig

        self.preprocess = PreprocessConfig()
        x, y, z = self.preprocess.grid
        self.dim = (x // 4) * (y // 4) * (z // 4)
        self.sha256 = "0" * 63 + "1"
        self.provider = "numpy"

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        n, _, x, y, z = batch.shape
        pooled = batch.reshape(n, x // 4, 4, y // 4, 4, z // 4, 4).mean(axis=(2, 4, 6)).reshape(n, -1)
        pooled = pooled - pooled.mean(axis=1, keepdims=True)
        return (pooled / np.linalg.norm(pooled, axis=1, keepdims=True)).astype(np.float32)


def run_gate(gate_bin: Path, args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run the gate command: a subprocess, or in-process with the proxy encoder patched in."""
    if not PROXY:
        proc = subprocess.run([str(gate_bin), *args], capture_output=True, text=True, env=env, check=False)
        return proc.returncode, proc.stdout, proc.stderr
    from click.testing import CliRunner

    import gate.cli.check
    import gate.cli.index
    from gate.cli import main as gate_main

    gate.cli.index.load_encoder = lambda encoder_dir, device: PROXY[0]
    gate.cli.check.load_encoder = lambda encoder_dir, device: PROXY[0]
    result = CliRunner().invoke(gate_main, args, env=env)
    return result.exit_code, result.output, result.output


SWEEP_PERCENTILES = (5, 10, 25, 50, 75, 90, 95, 99, 100)
"""Calibration percentiles at which the reject rate of a single threshold is tabulated."""


def percentile_sweep(
    out: Path, sets: dict[str, Path], cal: np.ndarray, policy: str
) -> dict[str, dict[str, float]]:
    """Share of each set at or above each calibration percentile (from ``policy``'s run JSON: the
    cosines do not depend on the policy).

    Shows what a policy rejecting everything above percentile p would do, for every p, without
    re-running the check.
    """
    sweep: dict[str, dict[str, float]] = {}
    cuts = {p: min(float(np.percentile(cal, p)), 0.999) for p in SWEEP_PERCENTILES}
    for name in sets:
        sims = np.array(
            [r["similarity"] for r in json.loads((out / f"{policy}_{name}.json").read_text())["results"]]
        )
        sweep[name] = {f"p{p}": float(np.mean(sims >= cut)) for p, cut in cuts.items()}
    print("\n| set | " + " | ".join(f"p{p} ({c:.3f})" for p, c in cuts.items()) + " |")
    print("|---|" + "---|" * len(cuts))
    for name, row in sweep.items():
        print(f"| {name} | " + " | ".join(f"{v:.1%}" for v in row.values()) + " |")
    return sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--encoder", type=Path, default=Path("gate/models/encoder"))
    ap.add_argument("--out", type=Path, default=Path("runs/check_eval"))
    ap.add_argument("--train-fraction", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--split", type=Path, default=None, help="folder with train/ and holdout/ (overrides seed)"
    )
    ap.add_argument("--limit", type=int, default=0, help="use only this many volumes (smoke test)")
    ap.add_argument(
        "--encoder-families",
        action="store_true",
        help="near copies from gate.encoder.benchmark (default severity)",
    )
    ap.add_argument("--proxy-voxel-encoder", action="store_true", help="no ONNX encoder: pooled voxels")
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="policies to run")
    args = ap.parse_args()
    if args.proxy_voxel_encoder:
        PROXY.append(VoxelEncoder())
    gate_bin = Path(sys.executable).parent / "gate"
    files = sorted(DATA.glob("*.nii.gz"))
    if args.limit:
        files = files[: args.limit]
    rng = np.random.default_rng(args.seed)
    if args.split is not None:  # the encoder benchmark's split: its holdout is unseen by its encoder
        train = sorted(p.resolve() for p in (args.split / "train").glob("*.nii.gz"))
        held = sorted(p.resolve() for p in (args.split / "holdout").glob("*.nii.gz"))
    else:
        order = rng.permutation(len(files))
        n_train = round(args.train_fraction * len(files))
        train, held = [files[i] for i in order[:n_train]], [files[i] for i in order[n_train:]]
    out = args.out
    out.mkdir(parents=True, exist_ok=False)
    env = dict(os.environ, GATE_ID_KEY_FILE=str(out / "pseudonym.key"))
    families = encoder_families() if args.encoder_families else list(PERTURBATIONS)
    sets = {name: out / "cand" / name for name in ["exact", *families, "holdout"]}
    (out / "train").mkdir()
    for d in sets.values():
        d.mkdir(parents=True, exist_ok=True)
    for f in train:
        (out / "train" / f.name).symlink_to(f)
        data = np.asanyarray(nib.load(f).dataobj).astype(np.float32)
        write_like(f, data, sets["exact"] / f.name)
        if not args.encoder_families:
            for name, fn in PERTURBATIONS.items():
                write_like(f, fn(data.astype(np.float64), rng), sets[name] / f.name)
    if args.encoder_families:
        write_encoder_family_copies(train, sets, args.seed)
    for f in held:
        (sets["holdout"] / f.name).symlink_to(f)
    build_args = ["index", "build", "--data", str(out / "train"), "--encoder", str(args.encoder)]
    code, stdout, stderr = run_gate(
        gate_bin, [*build_args, "--device", "cpu", "--out", str(out / "index")], env
    )
    print(stdout, stderr, flush=True)
    if code != 0:
        raise SystemExit(code)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for policy in args.policies:
        summary[policy] = {}
        for name, cand in sets.items():
            rep = gate_check(
                gate_bin, cand, policy, out / "index", args.encoder, out / f"{policy}_{name}.json", env
            )
            verdicts = [r["verdict"] for r in rep["results"]]
            grades = [r["grade"] for r in rep["results"]]
            sims = [r["similarity"] for r in rep["results"]]
            summary[policy][name] = {
                "n": len(verdicts),
                "reject": verdicts.count("reject") / len(verdicts),
                "flag": verdicts.count("flag") / len(verdicts),
                "pass": verdicts.count("pass") / len(verdicts),
                "graded": {g: grades.count(g) for g in ("different", "similar", "duplicate")},
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
        "split": str(args.split) if args.split else "seeded",
        "families": "gate.encoder.benchmark defaults" if args.encoder_families else "bench/check_eval.py",
        "encoder": "proxy-voxel" if PROXY else str(args.encoder),
        "calibration_percentiles": {p: float(np.percentile(cal, p)) for p in (1, 5, 25, 50, 75, 90, 95, 99)},
        "policies": summary,
    }
    result["sweep"] = percentile_sweep(out, sets, cal, args.policies[0])
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
