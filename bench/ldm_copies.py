"""Real LDM copies as the benchmark: DeepSSIM's protocol in 3D (issue 12, item 6).

A memorization-prone generator (``gate ldm train`` on a few msd_hippocampus volumes shown with
controlled multiplicities, see docs/ldm_copies.md) and the bundled default generator each emit
a fixed set of samples. An exhaustive reference labels every sample different / similar /
duplicate: the sample is aligned to every preprocessed training volume (all integer shifts up to
``--max-shift`` voxels, normalised cross-correlation over the overlap, computed by FFT), the
nearest training volume's aligned NCC decides the grade, and the aligned 3D SSIM is recorded
beside it. The gate is then scored against those labels through its real check path
(``gate.api.Gate``: what the gate reports, however it computes it), beside pixel SSIM, pixel
Pearson and Dar et al.'s binary rule. Steps (outputs of long runs under ``runs/ldm_copies/``)::

    .venv/bin/python bench/ldm_copies.py design      # train_folder/, patient_map.csv, design.json
    OMP_NUM_THREADS=1 .venv/bin/gate ldm train --data runs/ldm_copies/train_folder \\
        --patient-map runs/ldm_copies/patient_map.csv --id-key-file gate/models/demo-pseudonym.key \\
        --out runs/ldm_copies/mem_generator --ae-epochs 40 --unet-epochs 1200 \\
        --snapshot-every 100 --threads 1 --device cpu
    .venv/bin/python bench/ldm_copies.py sample --generator runs/ldm_copies/mem_generator \
        --n 360 --out runs/ldm_copies/samples/mem
    .venv/bin/python bench/ldm_copies.py sample --generator gate/models/generator \
        --n 360 --out runs/ldm_copies/samples/default
    .venv/bin/python bench/ldm_copies.py label --samples runs/ldm_copies/samples \
        --out runs/ldm_copies/labels.json --montage docs/results/ldm_copies_montage.png
    .venv/bin/python bench/ldm_copies.py score --index gate/models/index \
        --encoder gate/models/encoder --policy standard --policy strict \
        --out docs/results/ldm_copies.json

``score`` needs only ``labels.json`` and the samples: rerun it after any change to the gate.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

if TYPE_CHECKING:
    from gate.preprocess import PreprocessConfig
    from gate.verify import Verifier

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus" / "imagesTr"
RUNS = ROOT / "runs" / "ldm_copies"
GRADES = ("different", "similar", "duplicate")
SSIM_WINDOW = 7
"""Edge of the cubic SSIM window in voxels (scikit-image's default for 2D, used here in 3D)."""
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2
"""SSIM stabilisers for a data range of 1 (intensities are normalised to [0, 1])."""
SPLIT_SEED = 0
"""Seed of the validation / test halves of the samples (baseline thresholds use validation)."""


# ----------------------------------------------------------------------------- reference scores


def _box_sums(vol: np.ndarray, max_shift: int) -> np.ndarray:
    """Sums of ``vol`` over every box left after cutting a shift's overlap.

    Args:
        vol: (X, Y, Z).
        max_shift: largest |shift| per axis, s.

    Returns:
        (2s+1, 2s+1, 2s+1) array ``t``: ``t[i, j, k]`` is the sum of ``vol`` over the box from
        ``max(0, d)`` to ``L - max(0, -d)`` on each axis, for shift ``d = (i, j, k) - s``: the
        voxels ``x + d`` of the second volume of a pair that the first volume's ``x`` meets.

    """
    s = max_shift
    cs = np.zeros(tuple(n + 1 for n in vol.shape), dtype=np.float64)
    cs[1:, 1:, 1:] = vol.astype(np.float64).cumsum(0).cumsum(1).cumsum(2)
    d = np.arange(-s, s + 1)
    lo = [np.maximum(0, d) for _ in range(3)]
    hi = [n - np.maximum(0, -d) for n in vol.shape]
    lx, ly, lz = np.meshgrid(lo[0], lo[1], lo[2], indexing="ij")
    hx, hy, hz = np.meshgrid(hi[0], hi[1], hi[2], indexing="ij")
    return (
        cs[hx, hy, hz]
        - cs[lx, hy, hz]
        - cs[hx, ly, hz]
        - cs[hx, hy, lz]
        + cs[lx, ly, hz]
        + cs[lx, hy, lz]
        + cs[hx, ly, lz]
        - cs[lx, ly, lz]
    )


class ShiftNCC:
    """Aligned normalised cross-correlation of candidates against fixed references.

    For a candidate ``a`` and reference ``b`` (same grid) and every integer shift ``d`` with
    ``|d_i| <= max_shift``: the Pearson correlation of ``a[x]`` and ``b[x + d]`` over the voxels
    ``x`` where both are defined (no padding enters the score). The cross terms come from one
    batched FFT per candidate, the overlap sums from integral images.

    Args:
        refs: (M, X, Y, Z) reference volumes.
        max_shift: largest shift per axis in voxels, s >= 0.

    """

    def __init__(self, refs: np.ndarray, max_shift: int) -> None:
        self.s = max_shift
        self.shape = refs.shape[1:]
        self.pad = tuple(n + max_shift + (n + max_shift) % 2 for n in self.shape)
        # Pearson over any overlap ignores a constant offset: centring keeps float32 FFTs exact enough
        r = refs.astype(np.float64) - refs.mean(axis=(1, 2, 3), keepdims=True)
        self.ref_fft = sfft.rfftn(r.astype(np.float32), s=self.pad, axes=(1, 2, 3), workers=1)
        # reference sums over the box a shift d leaves of it: second-role boxes
        self.sb = np.stack([_box_sums(x, max_shift) for x in r])
        self.sbb = np.stack([_box_sums(x * x, max_shift) for x in r])
        d = np.arange(-max_shift, max_shift + 1)
        counts = [n - np.abs(d) for n in self.shape]
        self.n = np.einsum("i,j,k->ijk", *counts).astype(np.float64)

    def scores(self, a: np.ndarray) -> np.ndarray:
        """Aligned NCC of ``a`` against every reference at every shift.

        Args:
            a: (X, Y, Z) candidate on the references' grid.

        Returns:
            float64 (M, 2s+1, 2s+1, 2s+1); index ``[m, s, s, s]`` is the unshifted Pearson.

        """
        s = self.s
        a64 = a.astype(np.float64) - float(a.mean())
        fa = sfft.rfftn(a64.astype(np.float32), s=self.pad, workers=1)
        cross = sfft.irfftn(np.conj(fa)[None] * self.ref_fft, s=self.pad, axes=(1, 2, 3), workers=1)
        idx = [np.arange(-s, s + 1) % p for p in self.pad]
        c = cross[:, idx[0]][:, :, idx[1]][:, :, :, idx[2]]
        # candidate's first-role box for shift d is the reference's second-role box for -d
        sa = _box_sums(a64, s)[::-1, ::-1, ::-1]
        saa = _box_sums(a64 * a64, s)[::-1, ::-1, ::-1]
        n = self.n
        num = c - sa[None] * self.sb / n
        va = np.maximum(saa - sa * sa / n, 0.0)[None]
        vb = np.maximum(self.sbb - self.sb * self.sb / n, 0.0)
        den = np.sqrt(va * vb)
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def overlap(a: np.ndarray, b: np.ndarray, d: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The overlapping parts of ``a[x]`` and ``b[x + d]`` (same grid).

    Returns:
        Two arrays of one shape: ``a`` and ``b`` cut to the voxels where both are defined.

    """
    sa, sb = [], []
    for di, n in zip(d, a.shape, strict=True):
        sa.append(slice(max(0, -di), n - max(0, di)))
        sb.append(slice(max(0, di), n - max(0, -di)))
    return a[tuple(sa)], b[tuple(sb)]


def brute_ncc(a: np.ndarray, b: np.ndarray, d: Sequence[int]) -> float:
    """Pearson correlation of ``a[x]`` and ``b[x + d]`` over the overlap (reference for tests)."""
    x, y = overlap(a, b, d)
    x = x.ravel() - x.mean()
    y = y.ravel() - y.mean()
    den = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else 0.0


def _local_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = ndimage.uniform_filter(x, SSIM_WINDOW, mode="reflect")
    var = ndimage.uniform_filter(x * x, SSIM_WINDOW, mode="reflect") - mu * mu
    return mu, var


def ssim3d(a: np.ndarray, b: np.ndarray, stats: tuple | None = None) -> float:
    """Mean 3D SSIM of two volumes in [0, 1] (cubic uniform window, border of half a window cut).

    Args:
        a: (X, Y, Z).
        b: same shape.
        stats: optional precomputed ``(mu_a, var_a, mu_b, var_b)``.

    Returns:
        Mean SSIM in [-1, 1]; 1 for identical volumes.

    """
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    if stats is None:
        mu_a, var_a = _local_stats(a)
        mu_b, var_b = _local_stats(b)
    else:
        mu_a, var_a, mu_b, var_b = stats
    cov = ndimage.uniform_filter(a * b, SSIM_WINDOW, mode="reflect") - mu_a * mu_b
    num = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    h = SSIM_WINDOW // 2
    m = (num / den)[h:-h, h:-h, h:-h] if min(a.shape) > 2 * h else num / den
    return float(m.mean())


def grade_of(score: float, t_similar: float, t_duplicate: float) -> str:
    """The reference grade of an aligned NCC: duplicate >= t_duplicate > similar >= t_similar."""
    if score >= t_duplicate:
        return "duplicate"
    if score >= t_similar:
        return "similar"
    return "different"


# ----------------------------------------------------------------------------- metrics


def confusion(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str] = GRADES) -> np.ndarray:
    """Confusion matrix, rows = reference, columns = predicted, in ``classes`` order."""
    pos = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, pred, strict=True):
        m[pos[t], pos[p]] += 1
    return m


def class_metrics(truth: Sequence[str], pred: Sequence[str], classes: Sequence[str] = GRADES) -> dict:
    """Per-class precision / recall / F1 / support and macro-F1 over the classes present in truth.

    A class with no prediction has precision 0 (undefined taken as 0, as scikit-learn does);
    macro-F1 averages over the reference classes that occur (support > 0).

    """
    m = confusion(truth, pred, classes)
    out: dict = {"per_class": {}, "confusion": {"classes": list(classes), "rows_reference": m.tolist()}}
    f1s = []
    for i, c in enumerate(classes):
        tp = int(m[i, i])
        npred = int(m[:, i].sum())
        support = int(m[i].sum())
        p = tp / npred if npred else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        out["per_class"][c] = {"precision": p, "recall": r, "f1": f, "support": support, "predicted": npred}
        if support:
            f1s.append(f)
    out["macro_f1"] = float(np.mean(f1s)) if f1s else 0.0
    out["accuracy"] = float(np.trace(m) / m.sum()) if m.sum() else 0.0
    return out


def grades_from_score(scores: np.ndarray, t_similar: float, t_duplicate: float) -> list[str]:
    """Grade scores by two thresholds (higher = closer)."""
    return [grade_of(float(s), t_similar, t_duplicate) for s in scores]


def _threshold_candidates(scores: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct scores plus both ends; 120 quantiles of them when more."""
    u = np.unique(scores)
    cand = np.concatenate([[u[0] - 1e-9], (u[1:] + u[:-1]) / 2, [u[-1] + 1e-9]])
    if len(cand) > 120:  # keep the O(n^2) search small: quantiles of the candidates
        cand = np.unique(np.quantile(cand, np.linspace(0, 1, 120)))
    return cand


def choose_thresholds(scores: np.ndarray, truth: Sequence[str]) -> tuple[float, float, float]:
    """The two thresholds that maximise macro-F1 of ``scores`` against ``truth``.

    Candidates are the midpoints between consecutive distinct scores (plus both ends), so the
    search is exact for the given data.

    Returns:
        ``(t_similar, t_duplicate, macro_f1)`` with ``t_similar <= t_duplicate``.

    """
    cand = _threshold_candidates(scores)
    best = (float(cand[0]), float(cand[-1]), -1.0)
    for i, t1 in enumerate(cand):
        for t2 in cand[i:]:
            f = class_metrics(truth, grades_from_score(scores, t1, t2))["macro_f1"]
            if f > best[2]:
                best = (float(t1), float(t2), f)
    return best


def binary_metrics(truth_pos: Sequence[bool], pred_pos: Sequence[bool]) -> dict:
    """Precision / recall / F1 of a binary rule (positive = memorized: similar or duplicate)."""
    t = np.asarray(truth_pos, dtype=bool)
    p = np.asarray(pred_pos, dtype=bool)
    tp = int((t & p).sum())
    fp = int((~t & p).sum())
    fn = int((t & ~p).sum())
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": int((~t & ~p).sum()),
    }


def split_halves(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``n`` sample indices into validation and test halves."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])


# ----------------------------------------------------------------------------- I/O helpers


def _training_files(data: Path) -> list[Path]:
    return sorted(p for p in data.iterdir() if p.name.endswith((".nii", ".nii.gz")))


def _preprocess_files(files: Sequence[Path], config: PreprocessConfig) -> np.ndarray:
    return _read_preprocessed(files, config)[0]


def _read_preprocessed(files: Sequence[Path], config: PreprocessConfig) -> tuple[np.ndarray, list[str]]:
    """Read and preprocess files as the gate does; pseudonymous ids with the shipped demo key.

    Returns:
        float32 (N, X, Y, Z) grids and the N patient ids (the shipped index's ids for
        msd_hippocampus, which was built with the demo key).

    """
    from gate.cli.options import read_options
    from gate.preprocess import preprocess
    from gate.volume import DEFAULT_MAX_VOXELS, read_volumes

    opts = read_options(ROOT / "gate" / "models" / "demo-pseudonym.key", None, None, DEFAULT_MAX_VOXELS)
    out, ids = [], []
    for f in files:
        (vol,) = read_volumes(f, opts)
        out.append(preprocess(vol, config).data)
        ids.append(vol.patient_id)
    return np.stack(out).astype(np.float32), ids


def _index_preprocess(index_dir: Path) -> PreprocessConfig:
    from gate.preprocess import PreprocessConfig

    manifest = json.loads((index_dir / "manifest.json").read_text())
    return PreprocessConfig.model_validate(manifest["preprocess"])


def _sample_files(samples: Path) -> list[tuple[str, Path]]:
    out = []
    for group in ("mem", "default"):
        for f in sorted((samples / group).glob("*.nii.gz")):
            out.append((group, f))
    return out


# ----------------------------------------------------------------------------- commands


def design_links(design: dict) -> list[tuple[str, str]]:
    """(link name, source file name) for every copy of the memorizing generator's training folder.

    One link per copy, ``<stem>_c<kk>.nii.gz``, ``kk`` counting from 00, in the design's order.

    Raises:
        ValueError: a volume without a file name or with a multiplicity below 1.

    """
    links: list[tuple[str, str]] = []
    for vol in design["volumes"]:
        name, mult = str(vol.get("file", "")), int(vol.get("multiplicity", 0))
        if not name.endswith(".nii.gz") or mult < 1:
            raise ValueError(f"design volume {vol!r}: needs a .nii.gz file and a multiplicity >= 1")
        links += [(f"{name[: -len('.nii.gz')]}_c{k:02d}.nii.gz", name) for k in range(mult)]
    if "per_epoch" in design and int(design["per_epoch"]) != len(links):
        raise ValueError(f"design says {design['per_epoch']} scans per epoch; its volumes give {len(links)}")
    return links


def cmd_design(args: argparse.Namespace) -> None:
    """The memorizing generator's training folder from a committed design (symlinks + patient map).

    Each copy's patient is its source file's default patient label (the sha256 of its bytes, as
    the shipped index records it), so every copy of a volume is one patient, the index's.
    """
    from gate.digest import sha256_source

    design = json.loads(Path(args.design).read_text())
    out = Path(args.out)
    folder = out / "train_folder"
    folder.mkdir(parents=True, exist_ok=False)
    rows = []
    for link, name in design_links(design):
        source = (Path(args.data) / name).resolve()
        (folder / link).symlink_to(source)
        rows.append(f"{link},sha256:{sha256_source(source)}")
    (out / "patient_map.csv").write_text("file,patient\n" + "\n".join(rows) + "\n")
    (out / "design.json").write_text(json.dumps(design, indent=1) + "\n")
    print(f"{len(rows)} links of {len(design['volumes'])} volumes in {folder}", file=sys.stderr)


def cmd_sample(args: argparse.Namespace) -> None:
    """Draw ``--n`` samples from a generator and write each as NIfTI on the generator's grid."""
    import nibabel as nib
    import torch

    from gate.generator.sample import Generator

    torch.set_num_threads(args.threads)
    gen = Generator(Path(args.generator), device="cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    done = 0
    for vols in gen.batches(args.n, args.batch_size, seed=args.seed):
        for v in vols:
            path = out / f"{out.name}_{done:04d}.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(v.data, dtype=np.float32), v.affine), path)
            done += 1
        print(f"{done}/{args.n} samples ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    meta = {
        "generator": str(args.generator),
        "generator_weights_sha256": gen.sha256,
        "seed": args.seed,
        "n": args.n,
        "seconds": time.perf_counter() - t0,
    }
    (out / "samples.json").write_text(json.dumps(meta, indent=1))


def _real_pair_scores(ref: ShiftNCC, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each training volume's best aligned NCC / SSIM against every *other* training volume."""
    ncc = np.zeros(len(train))
    ssim = np.zeros(len(train))
    for i, a in enumerate(train):
        sc = ref.scores(a)
        best = sc.reshape(len(train), -1).max(1)
        best[i] = -np.inf
        j = int(np.argmax(best))
        ncc[i] = best[j]
        ssim[i] = _aligned_ssim(a, train[j], sc[j], ref.s)
    return ncc, ssim


def _best_shift(sc: np.ndarray, s: int) -> tuple[int, int, int]:
    k = np.unravel_index(int(np.argmax(sc)), sc.shape)
    return tuple(int(v) - s for v in k)  # type: ignore[return-value]


def _aligned_ssim(a: np.ndarray, b: np.ndarray, sc: np.ndarray, s: int) -> float:
    x, y = overlap(a, b, _best_shift(sc, s))
    return ssim3d(x, y)


def cmd_label(args: argparse.Namespace) -> None:
    """Exhaustive reference: every sample against every preprocessed training volume."""
    from gate.digest import sha256_file

    t0 = time.perf_counter()
    config = _index_preprocess(Path(args.index))
    files = _training_files(Path(args.data))
    train, train_ids = _read_preprocessed(files, config)
    print(f"{len(files)} training volumes preprocessed ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    ref = ShiftNCC(train, args.max_shift)
    stats = [_local_stats(x.astype(np.float64)) for x in train]
    cache = Path(args.out).with_name("real_pairs.json")
    key = {"files": [f.name for f in files], "max_shift": args.max_shift, "preprocess": config.digest}
    cached = json.loads(cache.read_text()) if cache.is_file() else None
    if cached is not None and cached["key"] == key:
        real_ncc, real_ssim = np.asarray(cached["aligned_ncc"]), np.asarray(cached["aligned_ssim"])
    else:
        real_ncc, real_ssim = _real_pair_scores(ref, train)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(
            json.dumps({"key": key, "aligned_ncc": real_ncc.tolist(), "aligned_ssim": real_ssim.tolist()})
        )
    print(f"real pairs done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    samples = _sample_files(Path(args.samples))
    sample_arr = _preprocess_files([f for _, f in samples], config)
    design = json.loads((RUNS / "design.json").read_text()) if (RUNS / "design.json").is_file() else None
    mult = {d["file_index"]: d["multiplicity"] for d in design["volumes"]} if design else {}
    previous = {}
    if Path(args.out).is_file():  # rows of unchanged samples are reused (same reference, same bytes)
        old = json.loads(Path(args.out).read_text())
        if old.get("key") == key:
            previous = {r["sample"]: r for r in old["samples"]}
    rows = []
    for n, ((group, path), a) in enumerate(zip(samples, sample_arr, strict=True)):
        digest = sha256_file(path)
        name = f"{group}/{path.name}"
        if name in previous and previous[name].get("file_sha256") == digest:
            rows.append(previous[name])
            continue
        sc = ref.scores(a)
        flat = sc.reshape(len(train), -1)
        best = flat.max(1)
        order = np.argsort(-best)
        j = int(order[0])
        top = [int(t) for t in order[: args.top_k]]
        aligned_ssim = {t: _aligned_ssim(a, train[t], sc[t], ref.s) for t in top}
        a64 = a.astype(np.float64)
        sa = _local_stats(a64)
        pixel_ssim = max(
            ssim3d(a64, train[t], (sa[0], sa[1], stats[t][0], stats[t][1])) for t in range(len(train))
        )
        pixel_pearson = float(flat[:, flat.shape[1] // 2].max())
        rows.append(
            {
                "sample": name,
                "file_sha256": digest,
                "generator": group,
                "nearest_file": files[j].name,
                "nearest_file_index": j,
                "nearest_patient_id": train_ids[j],
                "nearest_multiplicity": mult.get(j, 0),
                "aligned_ncc": float(best[j]),
                "shift_vox": list(_best_shift(sc[j], ref.s)),
                "second_ncc": float(best[order[1]]),
                "aligned_ssim": aligned_ssim[j],
                "best_aligned_ssim_top_k": max(aligned_ssim.values()),
                "pixel_ssim": float(pixel_ssim),
                "pixel_pearson": pixel_pearson,
            }
        )
        if (n + 1) % 20 == 0:
            print(
                f"{n + 1}/{len(samples)} samples ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    for r in rows:  # the design may have changed since a reused row was scored
        r["nearest_multiplicity"] = mult.get(r["nearest_file_index"], 0)
    out = {
        "key": key,
        "protocol": {
            "data": str(args.data),
            "n_training": len(files),
            "preprocess": config.model_dump(mode="json"),
            "max_shift_vox": args.max_shift,
            "ncc": "Pearson over the overlap of sample[x] and training[x + d], best over integer d",
            "ssim": f"3D SSIM, cubic uniform window {SSIM_WINDOW}, at the best NCC shift",
            "top_k_ssim": args.top_k,
        },
        "real_pairs": {
            "aligned_ncc": real_ncc.tolist(),
            "aligned_ssim": real_ssim.tolist(),
        },
        "design": design,
        "samples": rows,
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)


def cmd_ceiling(args: argparse.Namespace) -> None:
    """How close a perfect copy through the generator's own autoencoder gets (aligned NCC/SSIM).

    Each duplicated training volume is encoded and decoded (latent mean, no diffusion) and
    scored against its preprocessed original exactly as samples are: the best a copy made by
    this generator's decoder can reach.
    """
    import torch

    from gate.generator.sample import Generator

    torch.set_num_threads(args.threads)
    gen = Generator(Path(args.generator), device="cpu")
    labels = json.loads(Path(args.labels).read_text())
    files = _training_files(Path(args.data))
    config = _index_preprocess(Path(args.index))
    rows = []
    for d in json.loads(Path(args.design).read_text())["volumes"]:
        x = _preprocess_files([files[d["file_index"]]], config)[0]
        with torch.no_grad():
            z_mu, _ = gen.autoencoder.encode(torch.from_numpy(x)[None, None])
            rec = gen.autoencoder.decode(z_mu).clamp(0, 1)[0, 0].numpy()
        sc = ShiftNCC(x[None], labels["protocol"]["max_shift_vox"]).scores(rec)[0]
        rows.append(
            {
                "file": d["file"],
                "multiplicity": d["multiplicity"],
                "aligned_ncc": float(sc.max()),
                "aligned_ssim": _aligned_ssim(rec, x, sc, labels["protocol"]["max_shift_vox"]),
            }
        )
    ncc = [r["aligned_ncc"] for r in rows]
    out = {
        "generator": str(args.generator),
        "volumes": rows,
        "min_ncc": min(ncc),
        "median_ncc": float(np.median(ncc)),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "volumes"}))


def thresholds_from(labels: dict) -> dict:
    """The reference thresholds, derived from the measured distributions in ``labels.json``.

    similar from the largest aligned NCC between two real patients (closer than any two real
    patients are); duplicate from the median aligned NCC of the memorizing generator's samples
    whose nearest patient was shown 14x (as close as a copy of a duplicated patient is).
    """
    real = np.asarray(labels["real_pairs"]["aligned_ncc"])
    t_sim = float(real.max())
    heavy = [
        r["aligned_ncc"]
        for r in labels["samples"]
        if r["generator"] == "mem" and r["nearest_multiplicity"] == max_multiplicity(labels)
    ]
    t_dup = float(np.median(heavy)) if heavy else 1.0
    return {
        "similar": t_sim,
        "duplicate": max(t_dup, t_sim),
        "similar_rule": "max over real patients of the aligned NCC to any other real patient",
        "duplicate_rule": (
            "median aligned NCC of memorizing-generator samples nearest a most-duplicated patient"
        ),
    }


def max_multiplicity(labels: dict) -> int:
    design = labels.get("design") or {"volumes": [{"multiplicity": 0}]}
    return max(d["multiplicity"] for d in design["volumes"])


def reference_grades(labels: dict) -> list[str]:
    t = thresholds_from(labels)
    return [grade_of(r["aligned_ncc"], t["similar"], t["duplicate"]) for r in labels["samples"]]


def _gate_decisions(samples: Path, rows: list[dict], index: Path, encoder: Path, policy: str) -> list[dict]:
    from gate.api import Gate
    from gate.cli.options import read_options
    from gate.volume import DEFAULT_MAX_VOXELS

    opts = read_options(ROOT / "gate" / "models" / "demo-pseudonym.key", None, None, DEFAULT_MAX_VOXELS)
    with tempfile.TemporaryDirectory() as tmp:
        g = Gate(index, policy, audit_log=Path(tmp) / "audit.jsonl", encoder_dir=encoder, read_options=opts)
        paths = [samples / r["sample"] for r in rows]
        res = g.check(paths)
    if res.errors:
        raise SystemExit(f"gate check could not judge {len(res.errors)} samples: {res.errors[0]}")
    by_source = {Path(s).resolve(): d for s, d in zip(res.sources, res.decisions, strict=True)}
    out = []
    for p in paths:
        d = by_source[p.resolve()]
        out.append(
            {
                "grade": str(d.grade.value),
                "verdict": str(d.verdict.value),
                "similarity": float(d.similarity),
                "nearest_patient_id": d.nearest_patient_id,
                "details": {k: float(v) for k, v in (d.details or {}).items()},
            }
        )
    return out


def _dar_scores(samples: Path, rows: list[dict], data: Path, index: Path, encoder: Path) -> dict:
    """Dar et al.'s rule: max Pearson correlation of embeddings to the training patients.

    The threshold is the 95th percentile of each real patient's max correlation to the *other*
    patients (leave-one-patient-out: the shipped index holds all 261, so no patient is held out).
    """
    from gate.embed import Encoder

    enc = Encoder(encoder, device="cpu", threads=1)
    config = enc.preprocess
    train = _preprocess_files(_training_files(data), config)
    cand = _preprocess_files([samples / r["sample"] for r in rows], config)

    def emb(x: np.ndarray) -> np.ndarray:
        e = np.concatenate([enc.embed_array(x[i : i + 32, None]) for i in range(0, len(x), 32)])
        e = e - e.mean(1, keepdims=True)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    et, ec = emb(train), emb(cand)
    tt = et @ et.T
    np.fill_diagonal(tt, -np.inf)
    real = tt.max(1)
    thr = float(np.percentile(real, 95))
    return {"threshold": thr, "scores": (ec @ et.T).max(1).tolist(), "real_loo": real.tolist()}


def _methods_table(ref: list[str], rows: list[dict], gate_by_policy: dict, dar: dict) -> dict:
    n = len(rows)
    val, test = split_halves(n)
    truth = np.asarray(ref)
    out: dict = {"split": {"seed": SPLIT_SEED, "validation": len(val), "test": len(test)}}
    for name, key in (
        ("pixel_ssim", "pixel_ssim"),
        ("pixel_pearson", "pixel_pearson"),
        ("aligned_ssim", "aligned_ssim"),
    ):
        s = np.asarray([r[key] for r in rows])
        t1, t2, fval = choose_thresholds(s[val], list(truth[val]))
        pred = grades_from_score(s[test], t1, t2)
        out[name] = {
            "thresholds": {"similar": t1, "duplicate": t2},
            "validation_macro_f1": fval,
            "test": class_metrics(list(truth[test]), pred),
        }
    for policy, dec in gate_by_policy.items():
        grades = [d["grade"] for d in dec]
        out[f"gate_{policy}"] = {
            "all": class_metrics(ref, grades),
            "test": class_metrics(list(truth[test]), [grades[i] for i in test]),
        }
    mem = truth != "different"
    dpred = np.asarray(dar["scores"]) > dar["threshold"]
    out["dar_binary"] = {
        "threshold": dar["threshold"],
        "all": binary_metrics(mem, dpred),
        "test": binary_metrics(mem[test], dpred[test]),
        "duplicate_recall_all": float(dpred[truth == "duplicate"].mean())
        if (truth == "duplicate").any()
        else None,
    }
    for policy, dec in gate_by_policy.items():
        flagged = np.asarray([d["grade"] != "different" for d in dec])
        out[f"gate_{policy}"]["binary_all"] = binary_metrics(mem, flagged)
    return out


def stale_samples(rows: Sequence[dict], samples: Path) -> list[str]:
    """The labelled samples whose file is missing or holds other bytes than the row it was labelled in.

    Samples drawn on another CPU round differently (docs/ldm_copies.md), so the labels of one draw
    must not score another: ``label`` relabels what changed, ``score`` refuses it.
    """
    from gate.digest import sha256_file

    out = []
    for r in rows:
        path = samples / r["sample"]
        if not path.is_file() or sha256_file(path) != r["file_sha256"]:
            out.append(r["sample"])
    return out


def cmd_score(args: argparse.Namespace) -> None:
    """Score the gate's reported grades (and the baselines) against the reference labels."""
    t0 = time.perf_counter()
    labels = json.loads(Path(args.labels).read_text())
    rows = labels["samples"]
    samples = Path(args.samples)
    stale = stale_samples(rows, samples)
    if stale:
        raise SystemExit(
            f"{args.labels}: {len(stale)} of {len(rows)} samples under {samples} are missing or differ "
            f"from their labelled bytes (first: {stale[0]}); run `label` first"
        )
    ref = reference_grades(labels)
    thr = thresholds_from(labels)
    gate_by_policy = {}
    timing = {}
    for spec in args.policy:  # a shipped name or a .yaml path (keyed by its stem)
        policy = Path(spec).stem if spec.endswith((".yaml", ".yml")) else spec
        t = time.perf_counter()
        gate_by_policy[policy] = _gate_decisions(samples, rows, Path(args.index), Path(args.encoder), spec)
        timing[policy] = time.perf_counter() - t
    dar = _dar_scores(samples, rows, Path(args.data), Path(args.index), Path(args.encoder))
    methods = _methods_table(ref, rows, gate_by_policy, dar)
    closer = np.asarray([r["aligned_ncc"] > thr["similar"] for r in rows])
    per_policy = {}
    for policy, dec in gate_by_policy.items():
        passed = np.asarray([d["verdict"] == "pass" for d in dec])
        per_policy[policy] = {
            "passed": int(passed.sum()),
            "passed_closer_than_any_two_real_patients": int((passed & closer).sum()),
            "passed_by_reference_grade": {g: int((passed & (np.asarray(ref) == g)).sum()) for g in GRADES},
            "graded_different_but_reference_duplicate": int(
                sum(
                    1 for d, r in zip(dec, ref, strict=True) if d["grade"] == "different" and r == "duplicate"
                )
            ),
            "by_generator": {
                gen: {
                    "n": int(sum(r["generator"] == gen for r in rows)),
                    "passed": int(sum(p for p, r in zip(passed, rows, strict=True) if r["generator"] == gen)),
                }
                for gen in ("mem", "default")
            },
            "nearest_patient_agrees_with_reference": {
                g: float(
                    np.mean(
                        [
                            d["nearest_patient_id"] == r["nearest_patient_id"]
                            for d, r, x in zip(dec, rows, ref, strict=True)
                            if x == g
                        ]
                    )
                )
                for g in GRADES
                if g in ref
            },
            "seconds": timing[policy],
        }
    ncc = np.asarray([r["aligned_ncc"] for r in rows])
    gate_sim = {p: np.asarray([d["similarity"] for d in dec]) for p, dec in gate_by_policy.items()}
    out = {
        "index": str(args.index),
        "encoder": str(args.encoder),
        "n_samples": len(rows),
        "reference_thresholds": thr,
        "reference_counts": {
            gen: {
                g: sum(1 for r, x in zip(rows, ref, strict=True) if r["generator"] == gen and x == g)
                for g in GRADES
            }
            for gen in ("mem", "default")
        },
        "policies": per_policy,
        "methods": methods,
        "gate_similarity_vs_reference_ncc_pearson": {
            p: float(np.corrcoef(s, ncc)[0, 1]) for p, s in gate_sim.items()
        },
        "samples": [
            {
                "sample": r["sample"],
                "reference": g,
                "aligned_ncc": r["aligned_ncc"],
                **{f"{p}_grade": gate_by_policy[p][i]["grade"] for p in gate_by_policy},
                **{f"{p}_verdict": gate_by_policy[p][i]["verdict"] for p in gate_by_policy},
                "gate_similarity": next(iter(gate_by_policy.values()))[i]["similarity"]
                if gate_by_policy
                else None,
                "gate_verified": next(iter(gate_by_policy.values()))[i]["details"].get("verified")
                if gate_by_policy
                else None,
                "gate_identity": next(iter(gate_by_policy.values()))[i]["details"].get("identity")
                if gate_by_policy
                else None,
                "dar_score": dar["scores"][i],
            }
            for i, (r, g) in enumerate(zip(rows, ref, strict=True))
        ],
        "seconds": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(summary_text(out))


def summary_text(out: dict) -> str:
    """A few lines for the terminal / docs."""
    lines = [
        f"reference thresholds: similar >= {out['reference_thresholds']['similar']:.3f}, "
        f"duplicate >= {out['reference_thresholds']['duplicate']:.3f}; counts {out['reference_counts']}"
    ]
    m = out["methods"]
    for key, val in m.items():
        if key.startswith("gate_"):
            pc = val["all"]["per_class"]
            lines.append(
                f"{key}: macro-F1 all {val['all']['macro_f1']:.3f} test {val['test']['macro_f1']:.3f}; "
                + ", ".join(f"{c} P {pc[c]['precision']:.2f} R {pc[c]['recall']:.2f}" for c in GRADES)
            )
        elif key in ("pixel_ssim", "pixel_pearson", "aligned_ssim"):
            pc = val["test"]["per_class"]
            lines.append(
                f"{key}: macro-F1 test {val['test']['macro_f1']:.3f}; "
                + ", ".join(f"{c} P {pc[c]['precision']:.2f} R {pc[c]['recall']:.2f}" for c in GRADES)
            )
    d = m["dar_binary"]
    lines.append(
        f"dar_binary: F1 all {d['all']['f1']:.3f} P {d['all']['precision']:.2f} R {d['all']['recall']:.2f}"
    )
    for p, v in out["policies"].items():
        lines.append(
            f"{p}: passed {v['passed']}, passed closer than any two real patients "
            f"{v['passed_closer_than_any_two_real_patients']}"
        )
    return "\n".join(lines)


def report_markdown(out: dict) -> str:
    """Markdown tables of one ``score`` result (what docs/ldm_copies.md quotes)."""
    t = out["reference_thresholds"]
    m = out["methods"]
    lines = [
        f"Samples: {out['n_samples']} (index `{out['index']}`, encoder `{out['encoder']}`). Reference: "
        f"similar >= {t['similar']:.3f}, duplicate >= {t['duplicate']:.3f} (aligned NCC).",
        "",
        "| generator | different | similar | duplicate |",
        "|---|---:|---:|---:|",
    ]
    for gen, c in out["reference_counts"].items():
        lines.append(f"| {gen} | {c['different']} | {c['similar']} | {c['duplicate']} |")
    lines += [
        "",
        "| method | half | macro-F1 | P/R different | P/R similar | P/R duplicate |",
        "|---|---|---:|---:|---:|---:|",
    ]

    def row(name: str, half: str, mt: dict) -> str:
        pc = mt["per_class"]
        cells = " | ".join(f"{pc[g]['precision']:.2f} / {pc[g]['recall']:.2f}" for g in GRADES)
        return f"| {name} | {half} | {mt['macro_f1']:.3f} | {cells} |"

    for key, val in m.items():
        if key.startswith("gate_"):
            lines.append(row(f"gate `{key[5:]}`", "all", val["all"]))
            lines.append(row(f"gate `{key[5:]}`", "test", val["test"]))
    for key in ("pixel_ssim", "pixel_pearson", "aligned_ssim"):
        if key in m:
            th = m[key]["thresholds"]
            lines.append(
                row(
                    f"{key} (validation thresholds {th['similar']:.3f} / {th['duplicate']:.3f})",
                    "test",
                    m[key]["test"],
                )
            )
    lines += [
        "",
        "Binary (positive = similar or duplicate):",
        "",
        "| method | half | precision | recall | F1 |",
    ]
    lines.append("|---|---|---:|---:|---:|")
    d = m["dar_binary"]
    for half in ("all", "test"):
        b = d[half]
        lines.append(
            f"| Dar et al. (embedding corr. > {d['threshold']:.3f}) | {half} | {b['precision']:.2f} | "
            f"{b['recall']:.2f} | {b['f1']:.3f} |"
        )
    for key, val in m.items():
        if key.startswith("gate_"):
            b = val["binary_all"]
            lines.append(
                f"| gate `{key[5:]}` (grade != different) | all | {b['precision']:.2f} | "
                f"{b['recall']:.2f} | {b['f1']:.3f} |"
            )
    lines += [
        "",
        "| policy | passed | passed, closer than any two real patients "
        "| passed by reference grade (d/s/dup) |",
    ]
    lines.append("|---|---:|---:|---|")
    for p, v in out["policies"].items():
        g = v["passed_by_reference_grade"]
        lines.append(
            f"| {p} | {v['passed']} | {v['passed_closer_than_any_two_real_patients']} | "
            f"{g['different']} / {g['similar']} / {g['duplicate']} |"
        )
    for p in out["policies"]:
        cm = m[f"gate_{p}"]["all"]["confusion"]["rows_reference"]
        lines += ["", f"Confusion, `{p}` (rows reference, columns gate; different, similar, duplicate): {cm}"]
    return "\n".join(lines) + "\n"


def cmd_report(args: argparse.Namespace) -> None:
    """Write the markdown tables of a ``score`` result."""
    out = json.loads(Path(args.score).read_text())
    Path(args.out).write_text(report_markdown(out))
    print(report_markdown(out))


def cmd_montage(args: argparse.Namespace) -> None:
    """Borderline cases of each reference grade beside their nearest training volume (aligned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = json.loads(Path(args.labels).read_text())
    rows = labels["samples"]
    t = thresholds_from(labels)
    ref = reference_grades(labels)
    config = _index_preprocess(Path(args.index))
    files = _training_files(Path(args.data))
    picks = []  # (title, row)
    bounds = {
        "different": [t["similar"]],
        "similar": [t["similar"], t["duplicate"]],
        "duplicate": [t["duplicate"]],
    }
    for g in GRADES:
        for gen in ("default", "mem") if g == "different" else ("mem",):
            idx = [i for i, x in enumerate(ref) if x == g and rows[i]["generator"] == gen]
            if not idx:
                continue
            for b in bounds[g]:
                i = min(idx, key=lambda k: abs(rows[k]["aligned_ncc"] - b))
                if all(i != j for _, j in picks):
                    picks.append((g, i))
    fig, axes = plt.subplots(len(picks), 2, figsize=(3.2, 1.9 * len(picks)))
    axes = np.atleast_2d(axes)
    for r, (g, i) in enumerate(picks):
        row = rows[i]
        a = _preprocess_files([Path(args.samples) / row["sample"]], config)[0]
        b = _preprocess_files([files[row["nearest_file_index"]]], config)[0]
        x, y = overlap(a, b, row["shift_vox"])
        z = x.shape[2] // 2
        axes[r, 0].imshow(x[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[r, 1].imshow(y[:, :, z].T, cmap="gray", origin="lower", vmin=0, vmax=1)
        axes[r, 0].set_title(
            f"{g}: {row['sample'].split('/')[-1][:-7]}\nNCC {row['aligned_ncc']:.3f}", fontsize=6
        )
        axes[r, 1].set_title(
            f"nearest {row['nearest_file'][:-7]}\nx{row['nearest_multiplicity']}", fontsize=6
        )
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}", file=sys.stderr)


def _threshold_options() -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    similar = [("percentile", q) for q in (50.0, 75.0, 90.0, 95.0, 99.0, 100.0)]
    duplicate = [("percentile", q) for q in (95.0, 99.0, 100.0)] + [
        ("copies", q) for q in (1.0, 5.0, 10.0, 20.0, 30.0, 50.0)
    ]
    return similar, duplicate


def cmd_grades(args: argparse.Namespace) -> None:
    """How well can the gate's own two scores reproduce the reference's three grades?

    Reads a ``score`` result (per sample the gate's cosine and verified score) and the index's
    calibration, and reports on the test half, with every choice made on the validation half:
    (1) each score alone with two free thresholds (maximal validation macro-F1: the ceiling of a
    grade mapping on that score); (2) every policy over a grid of the threshold kinds policies
    can express (percentiles of real patients, percentiles of simulated copies) for both scores,
    graded as :func:`gate.decide.decide` does (the higher grade decides), the best by validation
    macro-F1 among those with validation duplicate recall 1.0, and the best without that
    constraint. ``DUPLICATE_CEILING`` is applied as the decision does.
    """
    from gate.decide import DUPLICATE_CEILING
    from gate.index_manifest import read_manifest
    from gate.policy import Threshold, ThresholdKind

    out_score = json.loads(Path(args.score).read_text())
    rows = out_score["samples"]
    if any(r.get("gate_verified") is None for r in rows):
        raise SystemExit(f"{args.score}: no verified scores (score against a verifying index)")
    ref = np.asarray([r["reference"] for r in rows])
    cos = np.asarray([r["gate_similarity"] for r in rows])
    ver = np.asarray([r["gate_verified"] for r in rows])
    closer = np.asarray([r["aligned_ncc"] for r in rows]) > out_score["reference_thresholds"]["similar"]
    val, test = split_halves(len(rows))
    manifest = read_manifest(Path(args.index))
    if manifest.verification is None:
        raise SystemExit(f"{args.index}: the index does not verify")
    dists = {  # (real patients, simulated copies) per score, as the decision resolves them
        "cosine": (manifest.calibration, manifest.verification.copies_cosine),
        "verified": (manifest.verification.calibration, manifest.verification.copies),
    }
    result: dict = {"score": str(args.score), "index": str(args.index), "alone": {}, "policies": {}}
    for name, x in (("cosine", cos), ("verified", ver)):
        t1, t2, fv = choose_thresholds(x[val], list(ref[val]))
        pred = grades_from_score(x[test], t1, t2)
        result["alone"][name] = {
            "thresholds": {"similar": t1, "duplicate": t2},
            "validation_macro_f1": fv,
            "test": class_metrics(list(ref[test]), pred),
        }

    def resolve(score: str, kind: str, value: float) -> float:
        novel, copies = dists[score]
        threshold = Threshold(kind=ThresholdKind(kind), value=value)
        return min(threshold.resolve(novel, score, copies), DUPLICATE_CEILING)

    order = {g: i for i, g in enumerate(GRADES)}
    similar_opts, duplicate_opts = _threshold_options()
    tried = []
    for cs in similar_opts:
        for cd in duplicate_opts:
            for vs in similar_opts:
                for vd in duplicate_opts:
                    t = [
                        resolve("cosine", *cs),
                        resolve("cosine", *cd),
                        resolve("verified", *vs),
                        resolve("verified", *vd),
                    ]
                    if t[0] > t[1] or t[2] > t[3]:
                        continue
                    g = np.maximum(
                        [order[x] for x in grades_from_score(cos, t[0], t[1])],
                        [order[x] for x in grades_from_score(ver, t[2], t[3])],
                    )
                    pred = [GRADES[i] for i in g]
                    mv = class_metrics(list(ref[val]), [pred[i] for i in val])
                    dup_val = float(np.mean(g[val][ref[val] == "duplicate"] == 2))
                    tried.append(
                        {
                            "cosine": {"similar": list(cs), "duplicate": list(cd)},
                            "verified": {"similar": list(vs), "duplicate": list(vd)},
                            "resolved": t,
                            "validation_macro_f1": mv["macro_f1"],
                            "validation_duplicate_recall": dup_val,
                            "passed_closer_than_any_two_real_patients": int(((g == 0) & closer).sum()),
                            "test": class_metrics(list(ref[test]), [pred[i] for i in test]),
                        }
                    )
    recall_one = [x for x in tried if x["validation_duplicate_recall"] == 1.0]
    result["policies"] = {
        "tried": len(tried),
        "best_with_duplicate_recall_1": max(recall_one, key=lambda x: x["validation_macro_f1"])
        if recall_one
        else None,
        "best": max(tried, key=lambda x: x["validation_macro_f1"]),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, r in result["alone"].items():
        print(
            f"{name} alone: validation {r['validation_macro_f1']:.3f}, "
            f"test macro-F1 {r['test']['macro_f1']:.3f}"
        )
    for key in ("best_with_duplicate_recall_1", "best"):
        r = result["policies"][key]
        if r is not None:
            rec = r["test"]["per_class"]["duplicate"]["recall"]
            print(
                f"policy grid, {key}: validation {r['validation_macro_f1']:.3f}, test macro-F1 "
                f"{r['test']['macro_f1']:.3f}, test duplicate recall {rec:.3f}, "
                f"closer-than-real passes {r['passed_closer_than_any_two_real_patients']}"
            )


def _index_verifier(index: Path) -> tuple[Verifier, list[str]]:
    """An index's :class:`gate.verify.Verifier` (the gate's shift range) and the patient of each row."""
    from gate.index_manifest import read_grids, read_manifest
    from gate.verify import MAX_SHIFT_VOX, Verifier

    m = read_manifest(index)
    grids = read_grids(index / "grids.npy", m)
    pids = [r.patient_id for r in m.rows]
    return Verifier(list(grids), pids, m.poses, m.preprocess, MAX_SHIFT_VOX), pids


def cmd_voxel_rank(args: argparse.Namespace) -> None:
    """Where the voxel channel (:meth:`gate.verify.Verifier.voxel_patients`) ranks each sample's source.

    The rank (0 = first) of the reference's nearest patient among every patient of the index,
    per reference grade; writes the per-sample ranks.
    """
    from gate.cli.options import read_options
    from gate.volume import DEFAULT_MAX_VOXELS, read_volumes

    labels = json.loads(Path(args.labels).read_text())
    rows = labels["samples"]
    ref = reference_grades(labels)
    index = Path(args.index)
    verifier, pids = _index_verifier(index)
    opts = read_options(ROOT / "gate" / "models" / "demo-pseudonym.key", None, None, DEFAULT_MAX_VOXELS)
    ranks = []
    for r in rows:
        (v,) = read_volumes(Path(args.samples) / r["sample"], opts)
        order = verifier.voxel_patients(verifier.view(v), n=len(set(pids)))
        ranks.append(order.index(r["nearest_patient_id"]))
    out = {
        "index": str(index),
        "by_reference_grade": {
            g: {
                "n": sum(x == g for x in ref),
                "rank_first": sum(1 for k, x in zip(ranks, ref, strict=True) if x == g and k == 0),
                "rank_max": max((k for k, x in zip(ranks, ref, strict=True) if x == g), default=None),
            }
            for g in GRADES
        },
        "samples": [{"sample": r["sample"], "rank": k} for r, k in zip(rows, ranks, strict=True)],
    }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["by_reference_grade"]))


def choose_thresholds_keeping(
    scores: np.ndarray, truth: Sequence[str], keep: str = "duplicate"
) -> tuple[float, float, float]:
    """:func:`choose_thresholds` among the pairs that grade every ``keep`` sample ``keep`` or worse.

    With ``keep="duplicate"``: duplicate recall 1.0 on ``truth``, the issue's target, kept.
    """
    low = min((float(x) for x, t in zip(scores, truth, strict=True) if t == keep), default=np.inf)
    cand = np.unique(np.concatenate([_threshold_candidates(scores), [low - 1e-9]]))
    best = (float(cand[0]), float(cand[0]), -1.0)
    for i, t1 in enumerate(cand):
        for t2 in cand[i:]:
            if t2 > low:
                break
            f = class_metrics(truth, grades_from_score(scores, t1, t2))["macro_f1"]
            if f > best[2]:
                best = (float(t1), float(t2), f)
    return best


def grades_from_two_scores(
    copy_score: np.ndarray, grade_score: np.ndarray, t_similar: float, t_duplicate: float
) -> list[str]:
    """Different below ``t_similar`` of ``copy_score``, else graded by ``t_duplicate`` of ``grade_score``."""
    return [
        "different" if c < t_similar else ("duplicate" if g >= t_duplicate else "similar")
        for c, g in zip(copy_score, grade_score, strict=True)
    ]


def choose_two_score_thresholds(
    copy_score: np.ndarray, grade_score: np.ndarray, truth: Sequence[str]
) -> tuple[float, float, float]:
    """The thresholds of :func:`grades_from_two_scores` with maximal macro-F1, duplicate recall 1.0 kept."""
    dup = [i for i, t in enumerate(truth) if t == "duplicate"]
    low = min((float(grade_score[i]) for i in dup), default=np.inf)
    grade_cand = np.unique(np.concatenate([_threshold_candidates(grade_score), [low - 1e-9]]))
    best = (0.0, 0.0, -1.0)
    for t1 in _threshold_candidates(copy_score):
        if any(copy_score[i] < t1 for i in dup):
            break
        for t2 in grade_cand:
            if t2 > low:
                break
            f = class_metrics(truth, grades_from_two_scores(copy_score, grade_score, t1, t2))["macro_f1"]
            if f > best[2]:
                best = (float(t1), float(t2), f)
    return best


def cmd_identity(args: argparse.Namespace) -> None:
    """The identity-pose score beside the gate's verified score: which tracks the reference.

    Per sample: the voxel channel's first patient (:meth:`gate.verify.Verifier.voxel_patients`),
    its stored grid aligned as it is (no turn, no flip) over the gate's shifts at full resolution,
    on the candidate's view and on its whole view (padding counted, :meth:`View.whole`); the
    higher NCC is the identity score. For it and for the gate's verified score (``--score``, a
    ``score`` result on the same samples): the correlation with the reference NCC, and the two
    grade thresholds chosen on the validation half (freely, and keeping validation duplicate
    recall 1.0), reported on the test half.
    """
    from gate.cli.options import read_options
    from gate.volume import DEFAULT_MAX_VOXELS, read_volumes

    labels = json.loads(Path(args.labels).read_text())
    rows = labels["samples"]
    ref = reference_grades(labels)
    scored = {r["sample"]: r for r in json.loads(Path(args.score).read_text())["samples"]}
    index = Path(args.index)
    verifier, _ = _index_verifier(index)
    opts = read_options(ROOT / "gate" / "models" / "demo-pseudonym.key", None, None, DEFAULT_MAX_VOXELS)
    identity, source_first = [], 0
    for r in rows:
        (v,) = read_volumes(Path(args.samples) / r["sample"], opts)
        view = verifier.view(v)
        (pid,) = verifier.voxel_patients(view, n=1)
        source_first += pid == r["nearest_patient_id"]
        grid, mask = verifier.template(pid, 0)
        best = view.align(grid, mask).ncc
        whole = view.whole()
        best = max(best, whole.align(grid, np.ones_like(mask)).ncc)
        identity.append(best)
    scores = {
        "identity": np.asarray(identity),
        "gate_verified": np.asarray([scored[r["sample"]]["gate_verified"] for r in rows], dtype=np.float64),
    }
    reference = np.asarray([r["aligned_ncc"] for r in rows])
    val, test = split_halves(len(rows))
    out: dict = {"index": str(index), "source_first": source_first, "n": len(rows), "scores": {}}
    for name, sc in scores.items():
        entry: dict = {
            "pearson_with_reference": float(np.corrcoef(sc, reference)[0, 1]),
            "residual_sd": float(np.std(sc - reference)),
        }
        for how, choose in (("free", choose_thresholds), ("duplicate_recall_1", choose_thresholds_keeping)):
            t1, t2, f_val = choose(sc[val], [ref[i] for i in val])
            mt = class_metrics([ref[i] for i in test], grades_from_score(sc[test], t1, t2))
            entry[how] = {
                "thresholds": [t1, t2],
                "validation_macro_f1": f_val,
                "test_macro_f1": mt["macro_f1"],
                "test_per_class": mt["per_class"],
            }
        out["scores"][name] = entry
    # the design proposed in docs/ldm_copies.md: copy against novel on the verified score,
    # duplicate against similar on the identity score
    v, i = scores["gate_verified"], scores["identity"]
    t1, t2, f_val = choose_two_score_thresholds(v[val], i[val], [ref[k] for k in val])
    mt = class_metrics([ref[k] for k in test], grades_from_two_scores(v[test], i[test], t1, t2))
    out["scores"]["verified_then_identity"] = {
        "duplicate_recall_1": {
            "thresholds": [t1, t2],
            "validation_macro_f1": f_val,
            "test_macro_f1": mt["macro_f1"],
            "test_per_class": mt["per_class"],
        }
    }
    out["samples"] = [
        {"sample": r["sample"], "identity": float(x)} for r, x in zip(rows, identity, strict=True)
    ]
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for name, e in out["scores"].items():
        print(
            f"{name}: r {e.get('pearson_with_reference', np.nan):.4f} sd {e.get('residual_sd', np.nan):.4f}; "
            + "; ".join(
                f"{h} t {e[h]['thresholds'][0]:.4f}/{e[h]['thresholds'][1]:.4f} test macro-F1 "
                f"{e[h]['test_macro_f1']:.3f} dup R {e[h]['test_per_class']['duplicate']['recall']:.3f}"
                for h in ("free", "duplicate_recall_1")
                if h in e
            )
        )
    print(f"voxel channel's first patient is the reference's nearest for {source_first} of {len(rows)}")


def _sample_set_args(parser: argparse.ArgumentParser) -> None:
    """``--labels``, ``--samples`` and ``--index``: the labelled sample set and the index it is judged on."""
    parser.add_argument("--labels", default=str(RUNS / "labels.json"))
    parser.add_argument("--samples", default=str(RUNS / "samples"))
    parser.add_argument("--index", default=str(ROOT / "gate" / "models" / "index"))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench/ldm_copies.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    de = sub.add_parser("design", help="the memorizing generator's training folder from its design")
    de.add_argument("--design", default=str(ROOT / "docs" / "results" / "ldm_copies_design.json"))
    de.add_argument("--data", default=str(DATA))
    de.add_argument("--out", default=str(RUNS))
    de.set_defaults(fn=cmd_design)
    s = sub.add_parser("sample", help="draw samples from a generator into NIfTI files")
    s.add_argument("--generator", required=True)
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=cmd_sample)
    lab = sub.add_parser("label", help="exhaustive reference labels")
    lab.add_argument("--samples", default=str(RUNS / "samples"))
    lab.add_argument("--data", default=str(DATA))
    lab.add_argument("--index", default=str(ROOT / "gate" / "models" / "index"))
    lab.add_argument("--max-shift", type=int, default=3)
    lab.add_argument("--top-k", type=int, default=5)
    lab.add_argument("--out", default=str(RUNS / "labels.json"))
    lab.set_defaults(fn=cmd_label)
    mo = sub.add_parser("montage", help="borderline cases per reference grade")
    _sample_set_args(mo)
    mo.add_argument("--data", default=str(DATA))
    mo.add_argument("--out", default=str(ROOT / "docs" / "results" / "ldm_copies_montage.png"))
    mo.set_defaults(fn=cmd_montage)
    sc = sub.add_parser("score", help="score the gate against the reference labels")
    _sample_set_args(sc)
    sc.add_argument("--data", default=str(DATA))
    sc.add_argument("--encoder", default=str(ROOT / "gate" / "models" / "encoder"))
    sc.add_argument("--policy", action="append", default=None)
    sc.add_argument("--out", default=str(ROOT / "docs" / "results" / "ldm_copies.json"))
    sc.set_defaults(fn=cmd_score)
    ce = sub.add_parser("ceiling", help="autoencoder reconstruction of the duplicated volumes")
    ce.add_argument("--generator", default=str(RUNS / "mem_generator"))
    ce.add_argument("--labels", default=str(RUNS / "labels.json"))
    ce.add_argument("--data", default=str(DATA))
    ce.add_argument("--index", default=str(ROOT / "gate" / "models" / "index"))
    ce.add_argument("--design", default=str(RUNS / "design.json"))
    ce.add_argument("--threads", type=int, default=1)
    ce.add_argument("--out", default=str(RUNS / "ceiling.json"))
    ce.set_defaults(fn=cmd_ceiling)
    gr = sub.add_parser("grades", help="how well the gate's two scores can reproduce the three grades")
    gr.add_argument("--score", default=str(ROOT / "docs" / "results" / "ldm_copies_verify.json"))
    gr.add_argument("--index", default=str(ROOT / "gate" / "models" / "index"))
    gr.add_argument("--out", default=str(ROOT / "docs" / "results" / "ldm_copies_grades.json"))
    gr.set_defaults(fn=cmd_grades)
    vr = sub.add_parser("voxel-rank", help="where the voxel channel ranks each sample's source")
    _sample_set_args(vr)
    vr.add_argument("--out", default=str(ROOT / "docs" / "results" / "ldm_copies_voxel_rank.json"))
    vr.set_defaults(fn=cmd_voxel_rank)
    idn = sub.add_parser("identity", help="the identity-pose NCC beside the verified score")
    _sample_set_args(idn)
    idn.add_argument("--score", default=str(ROOT / "docs" / "results" / "ldm_copies_verify.json"))
    idn.add_argument("--out", default=str(ROOT / "docs" / "results" / "ldm_copies_identity.json"))
    idn.set_defaults(fn=cmd_identity)
    rp = sub.add_parser("report", help="markdown tables of a score result")
    rp.add_argument("--score", default=str(ROOT / "docs" / "results" / "ldm_copies.json"))
    rp.add_argument("--out", default=str(ROOT / "docs" / "results" / "ldm_copies.md"))
    rp.set_defaults(fn=cmd_report)
    args = p.parse_args(argv)
    if getattr(args, "policy", "x") is None:
        args.policy = ["standard", "strict"]
    args.fn(args)


if __name__ == "__main__":
    main()
