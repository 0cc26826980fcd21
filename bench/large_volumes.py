"""Sizes users have: 256x256x160 and 160x224x160 MR, 512x512x200 CT, end to end on this CPU.

One run measures, per size, with an encoder and index built for that size's domain by the
recipe below (``gate encoder train`` + ``gate encoder export`` + ``gate index build``, the real
commands):

(a) ``gate check`` of one candidate end to end (read .nii.gz, domain check, preprocess, embed,
    search, decide, audit): wall time and peak RSS of a fresh process on 1 and on 5 candidates
    (``/usr/bin/time -v``), so process start-up (imports, encoder + index load and self-test)
    and the marginal time per candidate are separated; plus an in-process stage breakdown;
(b) index build time per training volume (builds on N/2 and N volumes; the slope);
(c) onnxruntime vs torch eager embedding one volume (same weights, 2 threads each) at each
    recipe grid and at the 32x48x32 default, interleaved best of repeats, as a ratio;
(d) the 32x48x32 default: ``gate check`` of hippocampus volumes against the shipped index with
    this checkout vs ``--old-tree`` (a worktree of an older commit run with the same venv).

The volumes are synthetic (no brain or CT data on this machine): real MSD hippocampus volumes
zoomed (trilinear) to the target shape with a smooth seeded texture, one hippocampus patient
per synthetic patient; CT is that content mapped to -1000..1000 HU, int16. The encoders are
timing models: trained for ``--epochs`` epochs on the synthetic training volumes, so their
detection quality means nothing; the timings do not depend on the weights.

    .venv/bin/python bench/large_volumes.py --work runs/large_volumes --old-tree /tmp/wt_old \\
        --out docs/results/large_volumes.json

Re-running reuses the volumes, encoders and indexes under ``--work`` (``--fresh`` to rebuild).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"
PY = Path(sys.executable)


@dataclass(frozen=True)
class Size:
    """One volume size users have, and the recipe (encoder flags) chosen for it.

    Attributes:
        name: row label.
        shape: voxels (X, Y, Z) of the synthetic volumes.
        spacing_mm: their voxel size.
        modality: ``MR`` (float32, percentile clip) or ``CT`` (int16 HU, fixed window).
        recipe: ``gate encoder train`` flags of the recipe.
        n_train: training volumes indexed.

    """

    name: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    modality: str
    recipe: tuple[str, ...]
    n_train: int = 8
    grid: tuple[int, int, int] = field(init=False)

    def __post_init__(self) -> None:
        i = self.recipe.index("--grid")
        object.__setattr__(self, "grid", tuple(int(x) for x in self.recipe[i + 1 : i + 4]))


SIZES = (
    Size(
        "MR 256x256x160 @1mm",
        (256, 256, 160),
        (1.0, 1.0, 1.0),
        "MR",
        ("--grid", "128", "128", "80", "--spacing", "2", "2", "2", "--percentile-region", "foreground"),
    ),
    Size(
        "MR 160x224x160 @1mm",
        (160, 224, 160),
        (1.0, 1.0, 1.0),
        "MR",
        ("--grid", "80", "112", "80", "--spacing", "2", "2", "2", "--percentile-region", "foreground"),
    ),
    Size(
        "CT 512x512x200 @0.7x0.7x1.5mm",
        (512, 512, 200),
        (0.7, 0.7, 1.5),
        "CT",
        (
            "--grid", "128", "128", "112", "--spacing", "3", "3", "3",
            "--intensity", "hu_window", "--hu-window", "-1000", "1000",
        ),
    ),
)  # fmt: skip
"""The recipes: the whole field of view is one view of the grid (fov crop, nothing cut): 256 x
256 x 160 mm at 2 mm is exactly 128x128x80; 160x224x160 mm at 2 mm is 80x112x80; the CT's 358 x
358 x 300 mm at 3 mm is 120x120x100 voxels, padded to 128x128x112 (multiples of 16, the
encoder's four stride-2 stages)."""

DEFAULT_GRID = (32, 48, 32)

CT_AT_2MM = (192, 192, 160)
"""The CT field of view at 2 mm (179x179x150 voxels, padded): timed for embedding only, against
the 3 mm recipe grid."""


def synthetic(source: np.ndarray, size: Size, seed: int) -> np.ndarray:
    """A smooth, structured volume of ``size.shape``: a hippocampus crop zoomed up, textured.

    Args:
        source: one MSD hippocampus volume (any intensity range).
        size: target shape and modality.
        seed: texture seed.

    Returns:
        float32 in 0..1000 (MR) or int16 HU in -1000..1000 (CT), shape ``size.shape``.

    """
    lo, hi = np.percentile(source, (0.5, 99.5))
    x = np.clip((source.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    x = ndimage.zoom(x, np.asarray(size.shape) / np.asarray(x.shape), order=1, mode="nearest", grid_mode=True)
    x = x[: size.shape[0], : size.shape[1], : size.shape[2]]
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal(tuple(max(2, s // 16) for s in size.shape)).astype(np.float32)
    texture = ndimage.zoom(coarse, np.asarray(size.shape) / np.asarray(coarse.shape), order=1)
    texture = texture[: size.shape[0], : size.shape[1], : size.shape[2]]
    x = np.clip(x * (1.0 + 0.1 * texture), 0.0, 1.0)
    if size.modality == "CT":
        return np.round(-1000.0 + 2000.0 * x).astype(np.int16)
    return (1000.0 * x).astype(np.float32)


def write_volumes(size: Size, folder: Path, sources: list[Path], seed0: int) -> list[Path]:
    """Write one synthetic .nii.gz per source file (one patient each) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*size.spacing_mm, 1.0])
    out = []
    for i, src in enumerate(sources):
        path = folder / f"{src.name.split('.')[0]}.nii.gz"
        if not path.exists():
            data = np.asarray(nib.load(src).dataobj, dtype=np.float32)
            tmp = folder / f".{path.name}"
            nib.save(nib.Nifti1Image(synthetic(data, size, seed0 + i), affine), tmp)
            tmp.rename(path)
        out.append(path)
    return out


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict[str, float | int]:
    """Run ``cmd`` under ``/usr/bin/time -v``: exit code, wall seconds, peak RSS (MiB)."""
    t = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env or bench_env(), check=False
    )
    wall = time.perf_counter() - t
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mib": int(rss.group(1)) / 1024 if rss else -1,
    }


def bench_env(pythonpath: str | None = None) -> dict[str, str]:
    """A clean environment for the child processes (2 threads; the key and log in the work dir)."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "GATE_ID_KEY_FILE")}
    env.update({"OMP_NUM_THREADS": "2", "PYTHONDONTWRITEBYTECODE": "1"})
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return env


def gate_cmd(*args: str) -> list[str]:
    """``python -m gate ARGS`` with this venv's interpreter."""
    return [str(PY), "-m", "gate", *args]


def build_models(size: Size, work: Path, epochs: int, log: Path) -> dict[str, object]:
    """Volumes, encoder (train + export) and indexes (N/2 and N volumes) for one size."""
    files = sorted(DATA.glob("*.nii.gz"))
    n = size.n_train
    train = write_volumes(size, work / "train", files[:n], 0)
    half = work / "train_half"
    half.mkdir(exist_ok=True)
    for p in train[: n // 2]:
        if not (half / p.name).exists():
            (half / p.name).symlink_to(p.resolve())
    write_volumes(size, work / "candidates", files[n : n + 5], 1000)
    record = work / "build.json"
    out: dict[str, object] = json.loads(record.read_text()) if record.exists() else {}
    ckpt, enc = work / "ckpt", work / "encoder"
    if not (enc / "encoder.onnx").exists():
        r = timed(
            gate_cmd(
                "encoder", "train", "--data", str(work / "train"), "--out", str(ckpt),
                "--epochs", str(epochs), "--batch-size", str(min(8, n)), "--threads", "2", *size.recipe,
            ),
            log,
        )  # fmt: skip
        out["train"] = r | {"epochs": epochs, "n_volumes": n}
        r = timed(
            gate_cmd(
                "encoder", "export", "--checkpoint", str(ckpt), "--data", str(work / "train"),
                "--out", str(enc), "--parity-volumes", "2", "--force",
            ),
            log,
        )  # fmt: skip
        out["export"] = r
        if not (enc / "encoder.onnx").exists():
            raise SystemExit(f"export failed for {size.name}; see {log}")
        record.write_text(json.dumps(out, indent=1))
    builds = [
        ("index_half", half, n // 2, ()),
        ("index", work / "train", n, ()),
        ("index_half_no_poses", half, n // 2, ("--poses", "none")),
        ("index_no_poses", work / "train", n, ("--poses", "none")),
    ]
    for name, data, count, extra in builds:
        idx = work / name
        if not (idx / "manifest.json").exists():
            r = timed(
                gate_cmd(
                    "index", "build", "--data", str(data), "--out", str(idx), "--encoder", str(enc), *extra
                ),
                log,
            )
            out[name] = r | {"n_volumes": count}
            if r["rc"] != 0:
                raise SystemExit(f"index build failed for {size.name}; see {log}")
            record.write_text(json.dumps(out, indent=1))
    for poses in ("", "_no_poses"):
        full, part = out.get(f"index{poses}"), out.get(f"index_half{poses}")
        if isinstance(full, dict) and isinstance(part, dict):
            out[f"index_build_per_volume_s{poses}"] = (full["wall_s"] - part["wall_s"]) / (
                full["n_volumes"] - part["n_volumes"]
            )
    return out


def check_runs(index: Path, candidates: list[Path], log: Path, repeats: int, audit: Path, **kw) -> dict:
    """``gate check`` on 1 and on all candidates, best of ``repeats`` (interleaved)."""
    env = kw.get("env")
    best: dict[int, dict] = {}
    for _ in range(repeats):
        for count in (1, len(candidates)):
            cmd = [
                *kw.get("cmd", gate_cmd()),
                "check", *map(str, candidates[:count]), "--index", str(index),
                "--policy", "strict", "--device", "cpu", "--audit-log", str(audit),
            ]  # fmt: skip
            r = timed(cmd, log, env)
            if count not in best or r["wall_s"] < best[count]["wall_s"]:
                best[count] = r
    n = len(candidates)
    per = (best[n]["wall_s"] - best[1]["wall_s"]) / (n - 1)
    per_cpu = (best[n]["cpu_s"] - best[1]["cpu_s"]) / (n - 1)
    return {
        "one": best[1],
        "many": best[n] | {"n": n},
        "per_candidate_s": per,
        "startup_s": best[1]["wall_s"] - per,
        "per_candidate_cpu_s": per_cpu,
        "startup_cpu_s": best[1]["cpu_s"] - per_cpu,
    }


def stage_breakdown(size: Size, work: Path, candidate: Path) -> dict[str, float]:
    """Seconds per stage of judging one candidate in this process (after a warm-up candidate)."""
    from gate.decide import decide
    from gate.digest import sha256_voxels
    from gate.domain import check_in_domain
    from gate.embed import Encoder
    from gate.identity import Pseudonymizer
    from gate.policy import load_policy
    from gate.preprocess import preprocess_batch
    from gate.shards import load_index
    from gate.values import Embedding
    from gate.verify import grid_search, verify_all
    from gate.volume import ReadOptions, read_volumes

    enc = Encoder(work / "encoder", device="cpu", threads=2)
    index = load_index(work / "index", enc)
    policy = load_policy("strict")
    opts = ReadOptions(pseudonymizer=Pseudonymizer(key=bytes(32)))
    times: dict[str, float] = {}
    for path in (candidate, candidate):  # warm-up, then measure
        t = time.perf_counter()
        vol = read_volumes(path, opts)[0]
        times["read"] = time.perf_counter() - t
        t = time.perf_counter()
        sha256_voxels(vol.data)
        times["hash"] = time.perf_counter() - t
        t = time.perf_counter()
        mode = check_in_domain(vol, index.domain, windows=True)
        times["domain"] = time.perf_counter() - t
        t = time.perf_counter()
        x = preprocess_batch([vol], enc.preprocess)
        times["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()
        e = enc.embed_array(x)
        times["embed"] = time.perf_counter() - t
        t = time.perf_counter()
        emb = Embedding(vector=e[0], encoder_sha256=enc.sha256, source=vol.source)
        nb = index.search_many([emb], [sha256_voxels(x[0, 0])], k=policy.policy.k)
        times["search"] = time.perf_counter() - t
        t = time.perf_counter()  # the 15 windows' embedding and search, both channels, alignment
        nb = verify_all(index.verifier, nb, [vol], grid_search(enc, index), policy.policy.k)
        times["retrieve_verify"] = time.perf_counter() - t
        t = time.perf_counter()
        decide(nb[0], policy, index.calibration, index.verification)
        times["decide"] = time.perf_counter() - t
    times["total"] = sum(times.values())
    times["mode"] = mode  # type: ignore[assignment]
    return times


def ort_vs_torch(grids: list[tuple[int, int, int]], repeats: int, seconds: float) -> list[dict]:
    """Embedding: onnxruntime vs torch eager, same (seed-0) weights, 2 threads each.

    Two readings per grid: one volume alone (``Encoder.embed_array`` never runs onnxruntime on a
    lone volume, :data:`gate.embed.MIN_RUN_BATCH`, so it computes two) and per volume in a batch
    of 2 (how the product embeds a candidate's windows at large grids, ``run_batch``).
    """
    import torch

    from gate.embed import Encoder
    from gate.encoder.export import export_encoder
    from gate.encoder.model import EncoderSpec, build_encoder
    from gate.preprocess import PreprocessConfig

    torch.set_num_threads(2)
    rows = []
    for grid in grids:
        model = build_encoder(EncoderSpec(grid=grid), seed=0)
        x2 = np.random.default_rng(0).random((2, 1, *grid), dtype=np.float32)
        x = x2[:1]
        with tempfile.TemporaryDirectory() as tmp:
            export_encoder(
                model,
                grid,
                Path(tmp) / "m",
                x,
                preprocess=PreprocessConfig(grid=grid),
                objective="speed",
                dim=model.spec.dim,
                architecture=model.spec.model_dump(mode="json"),
                training={},
            )
            enc = Encoder(Path(tmp) / "m", device="cpu", threads=2)

        def run_torch(a: np.ndarray, model: torch.nn.Module = model) -> None:
            with torch.no_grad():
                model(torch.from_numpy(a))

        runs = (
            (run_torch, x, "torch_ms"),
            (enc.embed_array, x, "onnxruntime_ms"),
            (run_torch, x2, "torch_batch2_ms_per_volume"),
            (enc.embed_array, x2, "onnxruntime_batch2_ms_per_volume"),
        )
        best = {key: float("inf") for _, _, key in runs}
        for fn, a, _ in runs:
            fn(a)  # warm-up
        for _ in range(repeats):  # interleaved: every reading sees the same machine
            for fn, a, key in runs:
                n, t0 = 0, time.perf_counter()
                while n < 2 or time.perf_counter() - t0 < seconds:
                    fn(a)
                    n += 1
                best[key] = min(best[key], 1000 * (time.perf_counter() - t0) / n / len(a))
        rows.append(
            {
                "grid": list(grid),
                **best,
                "ratio_torch_over_ort": best["torch_ms"] / best["onnxruntime_ms"],
                "ratio_torch_over_ort_batch2": best["torch_batch2_ms_per_volume"]
                / best["onnxruntime_batch2_ms_per_volume"],
            }
        )
        print(
            f"  {'x'.join(map(str, grid)):>12}: one volume torch {best['torch_ms']:7.1f} ms, onnxruntime "
            f"{best['onnxruntime_ms']:7.1f} ms ({rows[-1]['ratio_torch_over_ort']:.2f}); batch of 2 per "
            f"volume torch {best['torch_batch2_ms_per_volume']:7.1f} ms, onnxruntime "
            f"{best['onnxruntime_batch2_ms_per_volume']:7.1f} ms "
            f"({rows[-1]['ratio_torch_over_ort_batch2']:.2f})",
            flush=True,
        )
    return rows


def default_now_vs_old(old_tree: Path, work: Path, log: Path, repeats: int) -> dict:
    """``gate check`` of hippocampus volumes against the shipped index: this checkout vs old."""
    cands = sorted(DATA.glob("*.nii.gz"))[:5]
    out = {}
    old_env = bench_env(pythonpath=str(old_tree))
    probe = subprocess.run(
        [str(PY), "-c", "import gate, gate.cli; print(gate.__file__)"],
        capture_output=True, text=True, env=old_env, cwd=old_tree, check=True,
    )  # fmt: skip
    if not probe.stdout.strip().startswith(str(old_tree)):
        raise SystemExit(f"--old-tree: imported gate from {probe.stdout.strip()}, not {old_tree}")
    rows: dict[str, list[dict]] = {"now": [], "old": []}
    for _ in range(repeats):  # interleaved: both sides see the same machine
        for name, tree, env in (("now", REPO, bench_env()), ("old", old_tree, old_env)):
            rows[name].append(
                check_runs(
                    tree / "gate" / "models" / "index", cands, log, 1, work / f"audit_{name}.jsonl",
                    env=env, cmd=gate_cmd(),
                )
            )  # fmt: skip
    for name, rs in rows.items():
        out[name] = {
            "one_wall_s": min(r["one"]["wall_s"] for r in rs),
            "five_wall_s": min(r["many"]["wall_s"] for r in rs),
            "peak_rss_mib_one": min(r["one"]["peak_rss_mib"] for r in rs),
            "rc": sorted({r["one"]["rc"] for r in rs} | {r["many"]["rc"] for r in rs}),
        }
        out[name]["per_candidate_s"] = (out[name]["five_wall_s"] - out[name]["one_wall_s"]) / 4
    out["ratio_now_over_old_one"] = out["now"]["one_wall_s"] / out["old"]["one_wall_s"]
    out["ratio_now_over_old_five"] = out["now"]["five_wall_s"] / out["old"]["five_wall_s"]
    return out


def windows_baseline(candidate: Path, work: Path, log: Path, n_train: int = 20) -> dict:
    """The alternative to a coarser grid: judge a large candidate by windows of the 32x48x32 grid.

    An index of ``n_train`` hippocampus volumes with the shipped encoder, ``--poses none`` (the
    poses cost build time, not check time) and ``--window-fov`` the candidate's field of view;
    then ``gate check`` of the candidate, which :mod:`gate.windows` judges window by window.
    """
    train = work / "hippocampus_train"
    train.mkdir(parents=True, exist_ok=True)
    for p in sorted(DATA.glob("*.nii.gz"))[:n_train]:
        if not (train / p.name).exists():
            (train / p.name).symlink_to(p)
    img = nib.load(candidate)
    fov = [f"{float(n * z):g}" for n, z in zip(img.shape, img.header.get_zooms()[:3], strict=True)]
    idx = work / "index_windows"
    if not (idx / "manifest.json").exists():
        r = timed(
            gate_cmd(
                "index", "build", "--data", str(train), "--out", str(idx), "--poses", "none",
                "--window-fov", *fov,
            ),
            log,
        )  # fmt: skip
        if r["rc"] != 0:
            raise SystemExit(f"windows index build failed; see {log}")
    from gate.windows import count_windows

    shape = tuple(round(float(f)) for f in fov)  # 1 mm grid spacing: voxels = mm
    r = timed(
        gate_cmd(
            "check", str(candidate), "--index", str(idx), "--policy", "strict", "--device", "cpu",
            "--audit-log", str(work / "audit_windows.jsonl"),
        ),
        log,
    )  # fmt: skip
    return r | {"lattice_windows": count_windows(shape, DEFAULT_GRID), "fov_mm": fov}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "large_volumes")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON results (e.g. docs/results/large_volumes.json)"
    )
    ap.add_argument("--old-tree", type=Path, default=None, help="worktree of the commit to compare (d)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sizes", default="all", help="comma-separated indexes into SIZES, or all")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument(
        "--windows-baseline", action="store_true", help="also time the 32x48x32 grid by windows (slow)"
    )
    ap.add_argument(
        "--ort-only",
        action="store_true",
        help="only (c), onnxruntime vs torch; replaces ort_vs_torch in an existing --out JSON",
    )
    args = ap.parse_args()
    chosen = SIZES if args.sizes == "all" else [SIZES[int(i)] for i in args.sizes.split(",")]
    if args.ort_only:
        kept = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
        print("onnxruntime vs torch, 2 threads:", flush=True)
        kept["ort_vs_torch"] = ort_vs_torch(
            [DEFAULT_GRID, *dict.fromkeys(s.grid for s in chosen), CT_AT_2MM], args.repeats, 1.0
        )
        if args.out:
            args.out.write_text(json.dumps(kept, indent=1) + "\n")
        return
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["GATE_ID_KEY_FILE"] = str(args.work.resolve() / "pseudonym.key")
    log = args.work / "commands.log"
    result: dict[str, object] = {
        "machine": f"{os.cpu_count()} CPUs (shared with other jobs during the run)",
        "python": sys.version.split()[0],
        "sizes": [],
    }
    for size in chosen:
        work = args.work / re.sub(r"[^A-Za-z0-9]+", "_", size.name).strip("_")
        work.mkdir(exist_ok=True)
        print(f"{size.name}: recipe {' '.join(size.recipe)}", flush=True)
        built = build_models(size, work, args.epochs, log)
        cands = sorted((work / "candidates").glob("*.nii.gz"))
        train = sorted((work / "train").glob("*.nii.gz"))
        check = check_runs(work / "index", cands, log, args.repeats, work / "audit.jsonl")
        copy = timed(
            gate_cmd(
                "check", str(train[0]), "--index", str(work / "index"), "--policy", "strict",
                "--device", "cpu", "--audit-log", str(work / "audit.jsonl"),
            ),
            log,
        )  # fmt: skip
        stages = stage_breakdown(size, work, cands[0])
        row = {
            "name": size.name,
            "shape": list(size.shape),
            "spacing_mm": list(size.spacing_mm),
            "modality": size.modality,
            "recipe": " ".join(size.recipe),
            "file_mib": cands[0].stat().st_size / 2**20,
            "check": check,
            "training_volume_check_rc": copy["rc"],
            "stages_s": stages,
            "build": built,
        }
        result["sizes"].append(row)  # type: ignore[attr-defined]
        print(
            f"  check: 1 candidate {check['one']['wall_s']:.2f} s (peak RSS "
            f"{check['one']['peak_rss_mib']:.0f} MiB, exit {check['one']['rc']}); "
            f"{check['many']['n']} candidates {check['many']['wall_s']:.2f} s (peak "
            f"{check['many']['peak_rss_mib']:.0f} MiB); per candidate {check['per_candidate_s']:.2f} s, "
            f"start-up {check['startup_s']:.2f} s; CPU (user+sys) 1 candidate {check['one']['cpu_s']:.2f} s, "
            f"per candidate {check['per_candidate_cpu_s']:.2f} s; training volume exit {copy['rc']}",
            flush=True,
        )
        print("  stages: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items() if k != "mode"), flush=True)
        print(
            "  index build per training volume: "
            f"{built.get('index_build_per_volume_s', float('nan')):.2f} s (86 poses), "
            f"{built.get('index_build_per_volume_s_no_poses', float('nan')):.2f} s (--poses none)",
            flush=True,
        )
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.windows_baseline:
        first = args.work / re.sub(r"[^A-Za-z0-9]+", "_", SIZES[0].name).strip("_")
        w = windows_baseline(sorted((first / "candidates").glob("*.nii.gz"))[0], args.work, log)
        result["windows_baseline"] = w
        print(
            f"{SIZES[0].name} by windows of the 32x48x32 grid ({w['lattice_windows']} lattice windows): "
            f"gate check {w['wall_s']:.1f} s, peak RSS {w['peak_rss_mib']:.0f} MiB, exit {w['rc']}",
            flush=True,
        )
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("onnxruntime vs torch, 2 threads:", flush=True)
    result["ort_vs_torch"] = ort_vs_torch(
        [DEFAULT_GRID, *dict.fromkeys(s.grid for s in chosen), CT_AT_2MM], args.repeats, 1.0
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.old_tree is not None:
        d = default_now_vs_old(args.old_tree, args.work, log, args.repeats)
        result["default_now_vs_old"] = d
        print(
            f"32x48x32 default, shipped index: 1 candidate now {d['now']['one_wall_s']:.2f} s vs old "
            f"{d['old']['one_wall_s']:.2f} s ({d['ratio_now_over_old_one']:.2f}x); 5 candidates now "
            f"{d['now']['five_wall_s']:.2f} s vs old {d['old']['five_wall_s']:.2f} s "
            f"({d['ratio_now_over_old_five']:.2f}x)",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
