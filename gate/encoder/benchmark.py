"""Detection benchmark: can an encoder tell copies of training patients from new patients?

Protocol (all seeded):

1. Split the files of a dataset into train / holdout (default 80 / 20, seed 0). One file is
   one patient here; in msd_hippocampus left and right crops of one scan may both be present,
   so a holdout volume can have a "twin" in train and holdout similarities are pessimistic
   (too high), which lowers every TPR at a holdout-derived threshold.
2. Score each candidate by its nearest-train similarity (exact search in numpy): cosine of
   unit embeddings for encoders, Pearson correlation of the preprocessed grids for the
   raw-voxel baseline, mean 3D SSIM for the SSIM baseline.
3. Candidates: ``exact`` copies of training volumes; near copies of training volumes under
   each perturbation family of :data:`FAMILIES`, at several severities (the default marked);
   ``novel`` = holdout volumes, which must pass.
4. Per family: TPR at the threshold (the :data:`THRESHOLD_PERCENTILE` percentile of novel
   scores, so FPR ~ 5% by construction), FPR on novel, AUROC (near copies vs novel), TPR at
   FPR = 1% and 5% (threshold-free).

Perturbations act on the preprocessed grid (in [0, 1]) and the result goes through
:func:`gate.preprocess.preprocess` again, as a candidate file would; ``crop_shift`` and
``resampling`` act on the raw volume before preprocessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gate.encoder.augment import BIAS_CONTROL, ELASTIC_CONTROL, gaussian_blur, smooth_field, spatial
from gate.encoder.ssim import set_stats, ssim_to_set
from gate.poses import IDENTITY_ONLY, PoseSet, cut_slices, posed_grids
from gate.preprocess import PreprocessConfig, preprocess
from gate.values import Volume

THRESHOLD_PERCENTILE = 95.0
"""Flag threshold = this percentile of the novel (holdout) nearest-train scores, i.e. the
policy "closer to training than 95% of real new patients are". FPR at it is ~5% by
construction; TPR at FPR = 1% is the stricter, threshold-free companion."""

FPR_POINTS: tuple[float, ...] = (0.01, 0.05)
"""False-positive rates at which TPR is reported."""


@dataclass(frozen=True)
class Family:
    """A perturbation family.

    Attributes:
        name: family id.
        kind: ``exact``, ``geometric``, ``intensity`` or ``resampling``.
        severities: levels swept (unit in ``unit``).
        default: the level the targets apply to.
        unit: what a severity means.

    """

    name: str
    kind: str
    severities: tuple[float, ...]
    default: float
    unit: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("exact", "exact", (0.0,), 0.0, "-"),
        Family("flip", "geometric", (1.0,), 1.0, "left-right flip"),
        Family("rotation", "geometric", (5.0, 10.0, 15.0, 20.0), 10.0, "degrees about a random axis"),
        Family("translation", "geometric", (1.5, 3.0, 6.0, 8.0), 3.0, "voxels (mm) in a random direction"),
        Family(
            "crop_shift",
            "geometric",
            (2.0, 4.0, 6.0, 8.0),
            4.0,
            "voxels cut from one side per axis before preprocessing",
        ),
        Family("elastic", "geometric", (0.75, 1.5, 3.0), 1.5, "max displacement, voxels"),
        Family("gamma", "intensity", (1.2, 1.5, 2.0), 1.5, "gamma factor (x**g or x**(1/g))"),
        Family("noise", "intensity", (0.02, 0.05, 0.1), 0.05, "Gaussian sigma (intensity in [0, 1])"),
        Family("blur", "intensity", (0.5, 1.0, 2.0), 1.0, "Gaussian sigma, voxels"),
        Family("bias_field", "intensity", (0.1, 0.3, 0.6), 0.3, "max |log gain| of a smooth field"),
        Family("resampling", "resampling", (1.25, 1.5, 2.0), 1.5, "mm: down- then re-sampled to 1 mm"),
        Family(
            "composite",
            "composite",
            (0.5, 1.0, 2.0),
            1.0,
            "scale on the drawn severities (0.5 mild, 1 moderate, 2 strong); see composite_draw",
        ),
    )
}
"""Default severities sit at the edge of the training augmentation ranges where those exist
(rotation 10 deg, translation 3 vox, elastic 1.5 vox, gamma 1.5, blur 1 vox, noise 0.05, bias
0.3): the encoder is built to be invariant over that range, and the sweep shows what happens
at half and at double. Crop shift and resampling are never seen in training. Rotation,
translation and crop shift sweep to 20 deg / 8 voxels to show where each method breaks (the
levels added later, 15 deg, 8 vox translation and 6 vox crop shift, draw the same directions as
the others, so earlier numbers are unchanged)."""

COMPOSITE_GEOMETRIC: tuple[str, ...] = ("rotation", "translation", "crop_shift", "elastic")
COMPOSITE_INTENSITY: tuple[str, ...] = ("gamma", "noise", "blur", "bias_field")
COMPOSITE_ORDER: tuple[str, ...] = (
    "crop_shift",
    "resampling",
    "rotation",
    "translation",
    "elastic",
    "gamma",
    "bias_field",
    "blur",
    "noise",
)
"""The order a composite applies its pieces in: raw-volume changes (crop, resampling) first, as a
scanner would, then geometry on the grid, then intensity, noise last."""

COMPOSITE_FAMILIES = (3, 5)
"""A composite draws between 3 and 5 families (inclusive)."""

COMPOSITE_SEED_FLOOR = 2**32
"""Seeds of a composite's pieces are drawn from [2**32, 2**62); single-family draws use
``seed + 101 * family index`` (< 2**32 for any seed the CLI takes), so no composite piece
repeats a single-family draw."""


@dataclass(frozen=True)
class Piece:
    """One family of a composite near copy.

    Attributes:
        family: a key of :data:`FAMILIES`.
        severity: its level (``FAMILIES[family].unit``).
        seed: the seed :func:`perturb` gets for it.

    """

    family: str
    severity: float
    seed: int


def _scaled(family: str, level: float, scale: float) -> float:
    if family in ("gamma", "resampling"):  # multiplicative: 1 is "no change"
        return 1.0 + (level - 1.0) * scale
    if family == "crop_shift":
        return float(max(1, round(level * scale)))
    return level * scale


def composite_draw(index: int, seed: int, scale: float = 1.0) -> tuple[Piece, ...]:
    """The pieces of composite near copy ``index``: a seeded draw of 3-5 families.

    One geometric family (:data:`COMPOSITE_GEOMETRIC`) and one intensity family
    (:data:`COMPOSITE_INTENSITY`) always, then 1-3 more from the rest of :data:`COMPOSITE_ORDER`
    (resampling included); each at a level drawn uniformly between the family's mildest
    severity and its default (mild to moderate), times ``scale`` (for gamma and resampling the
    excess over 1 is scaled; crop shift rounds to whole voxels, at least 1). The draw does not
    depend on ``scale``: a sweep changes only how far the same pieces go.

    Args:
        index: the copy's position in the candidate set.
        seed: the composite family's seed.
        scale: severity scale.

    Returns:
        The pieces in :data:`COMPOSITE_ORDER`.

    """
    rng = np.random.default_rng([seed, index, 7207])
    geo = str(rng.choice(COMPOSITE_GEOMETRIC))
    inten = str(rng.choice(COMPOSITE_INTENSITY))
    rest = [f for f in COMPOSITE_ORDER if f not in (geo, inten)]
    k = int(rng.integers(COMPOSITE_FAMILIES[0], COMPOSITE_FAMILIES[1] + 1))
    chosen = {geo, inten, *(str(f) for f in rng.choice(rest, k - 2, replace=False))}
    pieces = []
    for f in COMPOSITE_ORDER:
        if f in chosen:
            fam = FAMILIES[f]
            level = float(rng.uniform(fam.severities[0], fam.default))
            pieces.append(Piece(f, _scaled(f, level, scale), int(rng.integers(COMPOSITE_SEED_FLOOR, 2**62))))
    return tuple(pieces)


def _grid_volume(data: np.ndarray, like: Volume) -> Volume:
    return Volume(
        data=np.ascontiguousarray(data, dtype=np.float32),
        affine=np.eye(4),
        spacing=(1.0, 1.0, 1.0),
        source=like.source,
        patient_id=like.patient_id,
    )


def _repreprocess(grids: torch.Tensor, raws: list[Volume], cfg: PreprocessConfig) -> np.ndarray:
    arr = grids.numpy()
    return np.stack(
        [preprocess(_grid_volume(a[0], v), cfg).data[None] for a, v in zip(arr, raws, strict=True)]
    )


def _crop_raw(v: Volume, cut: int, rng: np.random.Generator) -> Volume:
    """``cut`` voxels off one random side of each axis of a raw volume (affine kept consistent)."""
    signs = [1 if rng.random() < 0.5 else -1 for _ in range(3)]
    sl = cut_slices(v.data.shape, (signs[0] * cut, signs[1] * cut, signs[2] * cut))
    shift = np.eye(4)
    shift[:3, 3] = [s.start or 0 for s in sl]
    return Volume(
        data=np.ascontiguousarray(v.data[sl]),
        affine=v.affine @ shift,
        spacing=v.spacing,
        source=v.source,
        patient_id=v.patient_id,
    )


def _resample_raw(v: Volume, severity: float) -> Volume:
    """A raw volume down-sampled to ``severity`` mm voxels (its spacing times ``severity``)."""
    from scipy import ndimage

    data = ndimage.zoom(v.data, 1.0 / severity, order=1, mode="nearest", grid_mode=True).astype(np.float32)
    return Volume(
        data=data,
        affine=v.affine @ np.diag([severity, severity, severity, 1.0]),
        spacing=tuple(float(s) * severity for s in v.spacing),  # type: ignore[arg-type]
        source=v.source,
        patient_id=v.patient_id,
    )


def composite(
    grids: np.ndarray, raws: list[Volume], cfg: PreprocessConfig, seed: int, scale: float = 1.0
) -> np.ndarray:
    """Composite near copies: copy ``i`` gets the pieces of ``composite_draw(i, seed, scale)`` together.

    Raw-volume pieces (crop shift, resampling) change the raw volume, which is preprocessed
    once; every grid piece then goes through :func:`perturb` (and so through preprocessing
    again, as a candidate file would).

    Args:
        grids: (N, 1, X, Y, Z) preprocessed training grids.
        raws: the N raw volumes they came from.
        cfg: preprocessing config.
        seed: fixes the draws.
        scale: severity scale (:data:`FAMILIES` ``composite`` severities).

    Returns:
        (N, 1, X, Y, Z) preprocessed candidates.

    """
    out = []
    for i, v in enumerate(raws):
        pieces = composite_draw(i, seed, scale)
        raw = v
        for p in pieces:
            if p.family == "crop_shift":
                raw = _crop_raw(raw, int(p.severity), np.random.default_rng(p.seed))
            elif p.family == "resampling":
                raw = _resample_raw(raw, p.severity)
        g = grids[i : i + 1] if raw is v else preprocess(raw, cfg).data[None, None]
        for p in pieces:
            if p.family not in ("crop_shift", "resampling"):
                g = perturb(p.family, p.severity, g, [v], cfg, p.seed)
        out.append(g[0])
    return np.stack(out).astype(np.float32, copy=False)


def perturb(
    family: str, severity: float, grids: np.ndarray, raws: list[Volume], cfg: PreprocessConfig, seed: int
) -> np.ndarray:
    """Near copies of ``grids`` under one perturbation family.

    Args:
        family: a key of :data:`FAMILIES`.
        severity: level (see ``FAMILIES[family].unit``).
        grids: (N, 1, X, Y, Z) preprocessed training grids.
        raws: the N raw volumes they came from.
        cfg: preprocessing config.
        seed: fixes directions and random fields.

    Returns:
        (N, 1, X, Y, Z) preprocessed candidates.

    """
    n = len(grids)
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.ascontiguousarray(grids, dtype=np.float32))
    zeros3, ones, no = torch.zeros((n, 3)), torch.ones(n), torch.zeros(n, dtype=torch.bool)
    shape = tuple(int(s) for s in grids.shape[2:])
    if family == "exact":
        return grids.copy()
    if family == "flip":
        return _repreprocess(spatial(x, zeros3, zeros3, ones, ~no), raws, cfg)
    if family == "rotation":
        axis = torch.randn((n, 3), generator=gen)
        axis = axis / axis.norm(dim=1, keepdim=True)
        # small-angle: Euler angles along a random unit axis, total angle = severity
        return _repreprocess(spatial(x, axis * math.radians(severity), zeros3, ones, no), raws, cfg)
    if family == "translation":
        d = torch.randn((n, 3), generator=gen)
        d = d / d.norm(dim=1, keepdim=True) * severity
        return _repreprocess(spatial(x, zeros3, d, ones, no), raws, cfg)
    if family == "elastic":
        disp = smooth_field(n, 3, ELASTIC_CONTROL, shape, torch.full((n,), severity), gen, x.device)  # type: ignore[arg-type]
        return _repreprocess(spatial(x, zeros3, zeros3, ones, no, disp), raws, cfg)
    if family == "gamma":
        up = torch.rand(n, generator=gen) < 0.5
        g = torch.where(up, torch.full((n,), severity), torch.full((n,), 1.0 / severity))
        return _repreprocess(x.clamp(0, 1) ** g.view(n, 1, 1, 1, 1), raws, cfg)
    if family == "noise":
        return _repreprocess((x + severity * torch.randn(x.shape, generator=gen)).clamp(0, 1), raws, cfg)
    if family == "blur":
        return _repreprocess(gaussian_blur(x, torch.full((n,), severity)), raws, cfg)
    if family == "bias_field":
        b = smooth_field(n, 1, BIAS_CONTROL, shape, torch.full((n,), severity), gen, x.device)  # type: ignore[arg-type]
        return _repreprocess((x * torch.exp(b)).clamp(0, 1), raws, cfg)
    if family == "composite":
        return composite(grids, raws, cfg, seed, severity)
    rng = np.random.default_rng(seed)
    if family == "crop_shift":
        return np.stack([preprocess(_crop_raw(v, int(severity), rng), cfg).data[None] for v in raws])
    if family == "resampling":
        return np.stack([preprocess(_resample_raw(v, severity), cfg).data[None] for v in raws])
    raise ValueError(f"unknown perturbation family {family!r}; expected one of {sorted(FAMILIES)}")


class Scorer:
    """Nearest-train similarity by exact search: fit on train grids, score candidates."""

    name: str = ""
    max_candidates: int | None = None

    def fit(self, train: np.ndarray) -> None:
        """Remember the training set (N, 1, X, Y, Z)."""
        raise NotImplementedError

    def score(self, candidates: np.ndarray) -> np.ndarray:
        """(M, 1, X, Y, Z) -> (M,) float64 nearest-train similarity (higher = closer)."""
        raise NotImplementedError

    def release(self) -> None:
        """Free the fitted reference once the benchmark is done with this scorer."""
        self.__dict__.pop("_ref", None)


class EmbeddingScorer(Scorer):
    """Cosine similarity of unit embeddings (an ONNX :class:`gate.embed.Encoder` or torch).

    With ``poses`` (and the raw training volumes they need), every training volume is embedded
    under each pose exactly as ``gate index build`` does (:func:`gate.poses.posed_grids`) and a
    candidate's score is its max over all.
    """

    def __init__(
        self,
        name: str,
        embed: Callable[[np.ndarray], np.ndarray],
        poses: PoseSet = IDENTITY_ONLY,
        raws: list[Volume] | None = None,
        config: PreprocessConfig | None = None,
    ) -> None:
        if len(poses) > 1 and (raws is None or config is None):
            raise ValueError("an EmbeddingScorer with poses needs the raw training volumes and the config")
        self.name, self._embed, self._poses = name, embed, poses
        self._raws, self._config = raws, config

    def fit(self, train: np.ndarray) -> None:  # noqa: D102
        if len(self._poses) == 1:
            self._ref = self._embed(train).astype(np.float64)
            return
        assert self._raws is not None and self._config is not None  # checked in __init__
        if len(self._raws) != len(train):
            raise ValueError(f"{len(self._raws)} raw volumes for {len(train)} training grids")
        posed = np.stack([g for v in self._raws for g in posed_grids(v, self._config, self._poses)])[:, None]
        self._ref = np.concatenate(
            [self._embed(np.ascontiguousarray(posed[i : i + 256])) for i in range(0, len(posed), 256)]
        ).astype(np.float64)

    def score(self, candidates: np.ndarray) -> np.ndarray:  # noqa: D102
        return (self._embed(candidates).astype(np.float64) @ self._ref.T).max(axis=1)


class PearsonScorer(Scorer):
    """Raw-voxel Pearson correlation of the preprocessed grids (the pixel-space baseline).

    With ``poses`` the training side is every training volume under each pose, the same posed
    grids (:func:`gate.poses.posed_grids`) the encoder+poses scorer embeds, and a candidate's
    score is its max over all (kept in float32: 86 poses x 209 volumes x 32x48x32 is 3.5 GB).
    """

    def __init__(
        self,
        poses: PoseSet = IDENTITY_ONLY,
        raws: list[Volume] | None = None,
        config: PreprocessConfig | None = None,
    ) -> None:
        if len(poses) > 1 and (raws is None or config is None):
            raise ValueError("a PearsonScorer with poses needs the raw training volumes and the config")
        self.name = "raw_voxel_pearson" if len(poses) == 1 else "raw_voxel_pearson+poses"
        self._poses, self._raws, self._config = poses, raws, config

    @staticmethod
    def _z(x: np.ndarray) -> np.ndarray:
        f = x.reshape(len(x), -1).astype(np.float64)
        f = f - f.mean(axis=1, keepdims=True)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    def fit(self, train: np.ndarray) -> None:  # noqa: D102
        if len(self._poses) == 1:
            self._ref = self._z(train)
            return
        assert self._raws is not None and self._config is not None  # checked in __init__
        if len(self._raws) != len(train):
            raise ValueError(f"{len(self._raws)} raw volumes for {len(train)} training grids")
        self._ref = np.concatenate(
            [
                self._z(np.stack(posed_grids(v, self._config, self._poses))).astype(np.float32)
                for v in self._raws
            ]
        )

    def score(self, candidates: np.ndarray) -> np.ndarray:  # noqa: D102
        z = self._z(candidates).astype(self._ref.dtype)
        return np.concatenate(
            [(z[i : i + 256] @ self._ref.T).max(axis=1) for i in range(0, len(z), 256)]
        ).astype(np.float64)


class VerifiedScorer(Scorer):
    """Retrieve, then verify, as ``gate check`` does on a verifying index (:mod:`gate.verify`).

    Training volumes are embedded under ``poses``; a candidate's top-``k`` patients by exact
    cosine are verified by :class:`gate.verify.Verifier` (the product's own code). The score is
    the decision's rule made one number: each of the two scores (nearest cosine, best verified
    NCC) is turned into its rank among the training patients' own leave-one-patient-out
    scores (as the index calibrates), and the candidate scores the higher rank, so a threshold
    on it flags what either score flags at that percentile. ``mode="verified"`` scores the
    verified NCC alone.
    """

    def __init__(
        self,
        name: str,
        embed: Callable[[np.ndarray], np.ndarray],
        poses: PoseSet,
        raws: list[Volume],
        config: PreprocessConfig,
        mode: str = "combined",
        shared: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("combined", "verified"):
            raise ValueError(f"mode must be combined or verified; got {mode!r}")
        self.name, self._embed, self._poses, self._raws, self._config = name, embed, poses, raws, config
        self._mode = mode
        # the two modes of one encoder and pose set may share their work (fit and scores)
        self._shared: dict[str, Any] = shared if shared is not None else {}

    def fit(self, train: np.ndarray) -> None:  # noqa: D102
        from gate.verify import MAX_SHIFT_VOX, Verifier, View, grid_with_mask, stored_grid

        if "fit" in self._shared:
            self._fitted = self._shared["fit"]
            return
        pids = [f"p-{i:016x}" for i in range(len(self._raws))]
        views = [grid_with_mask(v, self._config, MAX_SHIFT_VOX) for v in self._raws]
        inner = (slice(MAX_SHIFT_VOX, -MAX_SHIFT_VOX),) * 3
        grids = [stored_grid(img[inner], m[inner]) for img, m in views]
        posed = np.stack([g for v in self._raws for g in posed_grids(v, self._config, self._poses)])[:, None]
        ref = np.concatenate(
            [self._embed(np.ascontiguousarray(posed[i : i + 256])) for i in range(0, len(posed), 256)]
        ).astype(np.float32)
        self._fitted = {
            "verifier": Verifier(grids, pids, self._poses, self._config, MAX_SHIFT_VOX),
            "ref": ref,
            "row_pids": [p for p in pids for _ in range(len(self._poses))],
        }
        cos, ver = [], []
        for i, (img, m) in enumerate(views):  # leave one patient out, as `gate index build` calibrates
            c, v = self._pair(ref[i * len(self._poses)], View(img, m), pids[i])
            cos.append(c)
            ver.append(v)
        self._fitted["lopo"] = (np.sort(cos), np.sort(ver))
        self._shared["fit"] = self._fitted

    def judge(self, query: np.ndarray, view: Any, exclude: str | None = None) -> Any:
        """One candidate through retrieve-then-verify against the fitted training set.

        Args:
            query: (D,) the candidate's embedding.
            view: its :class:`gate.verify.View` (see :meth:`candidate_view`).
            exclude: a patient id left out (leave-one-patient-out calibration).

        Returns:
            The :class:`gate.values.Neighbours` the product would report.

        """
        from gate.verify import VERIFY_K, exact_grid_search, exact_neighbours, retrieve_and_verify

        f = self._fitted
        ordinals = [0] * len(self._raws)
        nb = exact_neighbours(query, f["ref"], f["row_pids"], len(self._poses), ordinals, VERIFY_K, exclude)
        search = exact_grid_search(self._embed, f["ref"], f["row_pids"], len(self._poses), ordinals, exclude)
        (out,) = retrieve_and_verify(f["verifier"], [nb], [view], search, VERIFY_K)
        return out

    @staticmethod
    def candidate_view(grid: np.ndarray) -> Any:
        """A preprocessed (X, Y, Z) candidate grid as a verification view: no context beyond it."""
        from gate.verify import MAX_SHIFT_VOX, View

        pad = MAX_SHIFT_VOX
        return View(np.pad(grid, pad), np.pad(np.ones(grid.shape, bool), pad))

    def _pair(self, query: np.ndarray, view: Any, exclude: str | None = None) -> tuple[float, float]:
        out = self.judge(query, view, exclude)
        verified = out.verified
        return out.nearest_similarity, float(verified.max()) if verified is not None else -1.0

    def score(self, candidates: np.ndarray) -> np.ndarray:  # noqa: D102
        from gate.digest import sha256_bytes

        key = sha256_bytes(np.ascontiguousarray(candidates).tobytes())
        if key not in self._shared:
            emb = self._embed(candidates).astype(np.float32)
            self._shared[key] = [
                self._pair(emb[i], self.candidate_view(c[0])) for i, c in enumerate(candidates)
            ]
        return np.array([self.combine(cos, ver) for cos, ver in self._shared[key]])

    def combine(self, cos: float, ver: float) -> float:
        """One candidate's score from its nearest cosine and best verified NCC (see the class)."""
        if self._mode == "verified":
            return ver
        lopo = self._fitted["lopo"]
        ranks = [np.searchsorted(r, x, side="right") / len(r) for r, x in zip(lopo, (cos, ver), strict=True)]
        # ties above the calibration's top keep their order: add the raw score as a tie-break
        return float(max(ranks) + 1e-3 * max(cos, ver))

    def release(self) -> None:  # noqa: D102
        self.__dict__.pop("_fitted", None)


class DarScorer(EmbeddingScorer):
    """Dar et al.'s rule: Pearson correlation of embeddings with the nearest training embedding.

    Dar et al. (2023, memorization in 3D latent diffusion models) flag a sample whose embedding
    correlates with a training embedding above the 95th percentile of real held-out patients'
    correlations. Correlation centres each embedding over its dimensions before the cosine, so
    it equals the encoder's cosine only for zero-mean embeddings; the benchmark records whether
    the two rows coincide (``identical_to``). No poses: the rule as published.
    """

    def __init__(self, name: str, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        def centred(x: np.ndarray) -> np.ndarray:
            e = embed(x).astype(np.float64)
            e = e - e.mean(axis=1, keepdims=True)
            return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

        super().__init__(name, centred)


class SSIMScorer(Scorer):
    """Mean 3D SSIM (7^3 uniform window); costly, so scored on a seeded subset per family."""

    name = "ssim_3d"

    def __init__(self, max_candidates: int) -> None:
        self.max_candidates = max_candidates

    def fit(self, train: np.ndarray) -> None:  # noqa: D102
        self._ref = torch.from_numpy(train)
        self._stats = set_stats(self._ref)

    def score(self, candidates: np.ndarray) -> np.ndarray:  # noqa: D102
        s = ssim_to_set(torch.from_numpy(np.ascontiguousarray(candidates)), self._ref, self._stats)
        return s.max(dim=1).values.double().numpy()


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney U)."""
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv), dtype=np.float64)
    sv = allv[order]
    i = 0
    while i < len(sv):
        j = i
        while j + 1 < len(sv) and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r = ranks[: len(pos)].sum()
    return float((r - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """TPR at the lowest threshold whose FPR on ``neg`` is <= ``fpr`` (flag: score > t)."""
    k = math.floor(fpr * len(neg))  # negatives allowed above the threshold
    t = np.sort(neg)[::-1][k] if k < len(neg) else -np.inf
    return float(np.mean(pos > t))


def family_metrics(pos: np.ndarray, novel: np.ndarray, threshold: float) -> dict[str, float]:
    """TPR at threshold (score >= threshold flags), FPR, AUROC, TPR at FPR points."""
    out = {
        "n": len(pos),
        "tpr_at_threshold": float(np.mean(pos >= threshold)),
        "fpr_at_threshold": float(np.mean(novel >= threshold)),
        "auroc": auroc(pos, novel),
        "min_score": float(pos.min()),
        "median_score": float(np.median(pos)),
    }
    for f in FPR_POINTS:
        out[f"tpr_at_fpr_{round(f * 100)}pct"] = tpr_at_fpr(pos, novel, f)
    return out


def split(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded patient split: (train indices, holdout indices), each sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = round(holdout_fraction * n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


VALIDATION_FRACTION = 0.5
"""Share of the holdout (novel) patients, and of the training-side positives, in the
validation split; the rest is the test split."""


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (validation indices, test indices) of ``n`` items, each sorted, disjoint, covering all.

    The holdout's 52 patients split 26 / 26: the threshold (95th percentile of 26 validation
    scores) falls between the two highest, so its FPR on new patients is ~8% +- 5% (the
    expected exceedance of that order statistic and its spread), and the test FPR is measured
    in steps of 1/26 = 0.038.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1); got {fraction}")
    val, test = split(n, 1.0 - fraction, seed)
    return val, test


def validation_threshold(novel: np.ndarray, validation: np.ndarray) -> float:
    """The flag threshold from the validation novel scores only."""
    return float(np.percentile(novel[validation], THRESHOLD_PERCENTILE))


def run_benchmark(
    train_grids: np.ndarray,
    train_raw: list[Volume],
    holdout_grids: np.ndarray,
    scorers: list[Scorer],
    cfg: PreprocessConfig,
    seed: int = 0,
    sweep: bool = True,
    progress: Callable[[str], None] | None = None,
    validation_fraction: float = VALIDATION_FRACTION,
    validation_seed: int = 0,
) -> dict[str, Any]:
    """Score every family with every scorer.

    Two readings per method: ``families`` / ``pooled`` use every holdout patient for the
    threshold and the metrics (comparable with earlier runs); ``test`` takes the threshold
    from the validation split of the holdout (:func:`validation_split`) and reports on the test
    split of the holdout and of the positives only, which no choice touched.

    Args:
        train_grids: (N, 1, X, Y, Z) preprocessed training grids.
        train_raw: the N raw training volumes.
        holdout_grids: (H, 1, X, Y, Z) preprocessed novel grids.
        scorers: the methods compared.
        cfg: preprocessing config.
        seed: fixes perturbations and SSIM subsets.
        sweep: also run the non-default severities.
        progress: callback for one-line progress messages.
        validation_fraction: share of holdout patients (and of positives) in the validation split.
        validation_seed: seeds that split.

    Returns:
        ``{"threshold_percentile", "n_train", "n_holdout", "validation_split": {indices},
        "methods": {name: {"threshold", "novel", "families": {family: {severity: metrics}},
        "pooled": metrics (composite included), "pooled_single_families": metrics (without the
        composite, comparable with runs before it), "test": {"threshold", "families",
        "pooled"}}}}``.

    """
    say = progress or (lambda _m: None)
    n = len(train_grids)
    novel_val, novel_test = validation_split(len(holdout_grids), validation_fraction, validation_seed)
    pos_val, pos_test = validation_split(n, validation_fraction, validation_seed + 1)
    candidates: dict[tuple[str, float], np.ndarray] = {}
    for fi, fam in enumerate(FAMILIES.values()):
        for sev in fam.severities if sweep else (fam.default,):
            candidates[(fam.name, sev)] = perturb(fam.name, sev, train_grids, train_raw, cfg, seed + 101 * fi)
    say(f"built {len(candidates)} candidate sets of {n} volumes")
    composite_seed = seed + 101 * list(FAMILIES).index("composite")
    result: dict[str, Any] = {
        "threshold_percentile": THRESHOLD_PERCENTILE,
        "n_train": n,
        "n_holdout": len(holdout_grids),
        "seed": seed,
        "methods": {},
        "families": {
            f.name: {"kind": f.kind, "severities": list(f.severities), "default": f.default, "unit": f.unit}
            for f in FAMILIES.values()
        },
        "composite": {
            "seed": composite_seed,
            "draws": [
                [[p.family, p.severity, p.seed] for p in composite_draw(i, composite_seed)] for i in range(n)
            ],
        },
        "validation_split": {
            "fraction": validation_fraction,
            "seed": validation_seed,
            "novel_validation": novel_val.tolist(),
            "novel_test": novel_test.tolist(),
            "positive_validation": pos_val.tolist(),
            "positive_test": pos_test.tolist(),
        },
    }
    rng = np.random.default_rng(seed)
    scores: dict[str, dict[tuple[str, float], np.ndarray]] = {}
    for scorer in scorers:
        scorer.fit(train_grids)
        novel = scorer.score(holdout_grids)
        thr = float(np.percentile(novel, THRESHOLD_PERCENTILE))
        thr_val = validation_threshold(novel, novel_val)
        fams: dict[str, dict[str, Any]] = {}
        fams_test: dict[str, dict[str, Any]] = {}
        pooled, pooled_test, pooled_single = [], [], []
        subset = np.arange(n)
        if scorer.max_candidates is not None and scorer.max_candidates < n:
            subset = np.sort(rng.choice(n, scorer.max_candidates, replace=False))
        on_test = np.isin(subset, pos_test)
        own: dict[tuple[str, float], np.ndarray] = {}
        for (name, sev), cand in candidates.items():
            fam = FAMILIES[name]
            if len(subset) < n and sev != fam.default:
                continue  # costly scorers: default severity only
            pos = scorer.score(cand if len(subset) == n else cand[subset])
            own[(name, sev)] = pos
            fams.setdefault(name, {})[str(sev)] = family_metrics(pos, novel, thr)
            test_metrics = family_metrics(pos[on_test], novel[novel_test], thr_val)
            fams_test.setdefault(name, {})[str(sev)] = test_metrics
            if sev == fam.default:
                pooled.append(pos)
                pooled_test.append(pos[on_test])
                if name != "composite":
                    pooled_single.append(pos)
        scorer.release()
        own[("novel", 0.0)] = novel
        scores[scorer.name] = own
        result["methods"][scorer.name] = {
            "threshold": thr,
            "novel": {
                "n": len(novel),
                "max": float(novel.max()),
                "median": float(np.median(novel)),
                "fpr_at_threshold": float(np.mean(novel >= thr)),
            },
            "families": fams,
            "pooled": family_metrics(np.concatenate(pooled), novel, thr),
            "pooled_single_families": family_metrics(np.concatenate(pooled_single), novel, thr),
            "subset": None if len(subset) == n else len(subset),
            "test": {
                "threshold": thr_val,
                "n_positives_per_family": int(on_test.sum()),
                "n_novel": len(novel_test),
                "families": fams_test,
                "pooled": family_metrics(np.concatenate(pooled_test), novel[novel_test], thr_val),
            },
        }
        say(
            f"{scorer.name}: threshold {thr:.4f}, "
            f"pooled AUROC {result['methods'][scorer.name]['pooled']['auroc']:.4f}"
        )
    for name, own in scores.items():
        for other, theirs in scores.items():
            if other != name and own.keys() == theirs.keys():
                same = all(own[k].shape == theirs[k].shape for k in own)
                if same and all(np.allclose(own[k], theirs[k], rtol=0.0, atol=1e-9) for k in own):
                    result["methods"][name]["identical_to"] = other
                    break
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """Default-severity table: one row per method x family."""
    lines = [
        f"Threshold = {result['threshold_percentile']:.0f}th percentile of novel (holdout) "
        f"nearest-train score; {result['n_train']} train / {result['n_holdout']} holdout volumes.",
        "",
        "| method | family | severity | TPR@thr | FPR@thr | AUROC | TPR@FPR1% | TPR@FPR5% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mname, m in result["methods"].items():
        for fname, fam in FAMILIES.items():
            r = m["families"][fname][str(fam.default)]
            lines.append(
                f"| {mname} | {fname} | {fam.default:g} | {r['tpr_at_threshold']:.3f} | "
                f"{r['fpr_at_threshold']:.3f} | {r['auroc']:.4f} | {r['tpr_at_fpr_1pct']:.3f} | "
                f"{r['tpr_at_fpr_5pct']:.3f} |"
            )
        p = m["pooled"]
        lines.append(
            f"| {mname} | **pooled** | default | {p['tpr_at_threshold']:.3f} | {p['fpr_at_threshold']:.3f} | "
            f"{p['auroc']:.4f} | {p['tpr_at_fpr_1pct']:.3f} | {p['tpr_at_fpr_5pct']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_sweep(result: dict[str, Any]) -> str:
    """Severity curves (AUROC, TPR@FPR1% and 5%) for the methods with a full sweep."""
    lines = [
        "| method | family | severity | TPR@thr | AUROC | TPR@FPR1% | TPR@FPR5% |",
        "|---|---|---|---|---|---|---|",
    ]
    for mname, m in result["methods"].items():
        if m.get("subset"):
            continue
        for fname, fam in FAMILIES.items():
            if len(fam.severities) < 2:
                continue
            for sev, r in m["families"][fname].items():
                lines.append(
                    f"| {mname} | {fname} | {sev} | {r['tpr_at_threshold']:.3f} | "
                    f"{r['auroc']:.4f} | {r['tpr_at_fpr_1pct']:.3f} | {r['tpr_at_fpr_5pct']:.3f} |"
                )
    return "\n".join(lines) + "\n"


def markdown_methods(result: dict[str, Any]) -> str:
    """Methods side by side: pooled and composite (default severity), all holdout and test split."""
    vs = result.get("validation_split")
    lines = [
        "Methods side by side (default severities). All: threshold and metrics on every holdout "
        "patient. Test: threshold from the validation half of the holdout"
        + (
            f" ({len(vs['novel_validation'])} patients), metrics on the other {len(vs['novel_test'])} "
            f"and on the {len(vs['positive_test'])}-volume test half of the positives"
            if vs
            else ""
        )
        + ".",
        "",
        "| method | pooled AUROC | pooled TPR@FPR5% | pooled AUROC w/o composite | composite AUROC | "
        "composite TPR@FPR5% | test: pooled AUROC | test: composite TPR@FPR5% | test: TPR@val thr | "
        "test: FPR@val thr | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mname, m in result["methods"].items():
        p = m["pooled"]
        c = m["families"]["composite"][str(FAMILIES["composite"].default)]
        single = m.get("pooled_single_families")
        single_cell = f"{single['auroc']:.4f}" if single else "-"
        t = m.get("test")
        note = []
        if m.get("subset"):
            note.append(f"subset of {m['subset']} per family")
        if m.get("identical_to"):
            note.append(f"identical to {m['identical_to']}")
        test_cells = "| - | - | - | - "
        if t:
            tc = t["families"]["composite"][str(FAMILIES["composite"].default)]
            tp = t["pooled"]
            test_cells = (
                f"| {tp['auroc']:.4f} | {tc['tpr_at_fpr_5pct']:.3f} | {tp['tpr_at_threshold']:.3f} | "
                f"{tp['fpr_at_threshold']:.3f} "
            )
        lines.append(
            f"| {mname} | {p['auroc']:.4f} | {p['tpr_at_fpr_5pct']:.3f} | {single_cell} | {c['auroc']:.4f} | "
            f"{c['tpr_at_fpr_5pct']:.3f} {test_cells}| {'; '.join(note)} |"
        )
    return "\n".join(lines) + "\n"


PARTIAL_FOV_MM: tuple[int, int, int] = (80, 112, 80)
"""Field of view (1 mm voxels) a partial copy is placed in: 2.5x the grid per axis, 15x its
volume, so most of what the gate sees is not the copy."""

PARTIAL_VALIDATION = 40
"""The first 40 train-split volumes (split seed 0), placed with seed 0, are the validation
positives on which :mod:`gate.windows`' stride, lattice and refinement were chosen; ``gate eval
--partial-copy`` reports on the other train volumes and places every volume with ``seed + 1``,
so no reported placement was seen while tuning (the holdout patients were, at other positions)."""

BACKGROUNDS: tuple[str, ...] = ("zero", "tissue")
"""``zero``: the copy on an empty field (as an MR crop pasted into a scan's air); ``tissue``:
on a smooth random field spanning the copy's own interquartile intensities (no edge of zeros
marks where the copy sits)."""


def place(volume: Volume, fov: tuple[int, int, int], background: str, seed: int) -> Volume:
    """``volume`` pasted at a seeded random position inside a larger 1 mm field of view.

    Args:
        volume: a raw volume at 1 mm (RAS axes), shape within ``fov``.
        fov: output shape (X, Y, Z) in voxels = mm.
        background: one of :data:`BACKGROUNDS`.
        seed: fixes the position and the background field.

    Returns:
        A raw-intensity Volume of shape ``fov`` (identity affine, 1 mm).

    """
    from scipy import ndimage

    from gate.preprocess import to_canonical

    rng = np.random.default_rng(seed)
    data = to_canonical(volume).data.astype(np.float32)
    if background == "zero":
        field = np.zeros(fov, dtype=np.float32)
    elif background == "tissue":
        lo, hi = np.percentile(data, (25.0, 75.0))
        noise = ndimage.gaussian_filter(rng.standard_normal(fov).astype(np.float32), sigma=6.0)
        noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-12)
        field = (lo + (hi - lo) * noise).astype(np.float32)
    else:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    starts = [int(rng.integers(0, f - n + 1)) for f, n in zip(fov, data.shape, strict=True)]
    field[tuple(slice(s, s + n) for s, n in zip(starts, data.shape, strict=True))] = data
    return Volume(field, np.eye(4), (1.0, 1.0, 1.0), volume.source, volume.patient_id)


class ExactPatientSearch:
    """Exact cosine search over (posed) training embeddings, patient-level max (numpy).

    The benchmark's stand-in for the hnswlib index: the same patient-level maximum, no graph,
    so the numbers measure the encoder and the windows, not the index's recall.
    """

    def __init__(self, vectors: np.ndarray, patient_ids: list[str], n_poses: int = 1) -> None:
        self._vectors = vectors.astype(np.float32)
        self._pids = list(patient_ids)
        self._n_poses = n_poses
        from gate.verify import volume_ordinals

        self._ordinals = volume_ordinals(self._pids[::n_poses])

    def neighbours(self, queries: np.ndarray, k: int, include: Sequence[Sequence[str]] = ()) -> list[Any]:
        """(M, D) unit vectors -> M :class:`gate.values.Neighbours` (with the matched rows).

        ``include``: per query, patients answered after the ``k`` with their exact cosine.
        """
        from gate.verify import exact_neighbours

        q = queries.astype(np.float32)
        inc = list(include) or [()] * len(q)
        return [
            exact_neighbours(row, self._vectors, self._pids, self._n_poses, self._ordinals, k, None, i)
            for row, i in zip(q, inc, strict=True)
        ]


class _BenchModel:
    """An embedding function as the :class:`~gate.index_manifest.EmbeddingModel` gate.index expects."""

    sha256 = "benchmark"

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], cfg: PreprocessConfig) -> None:
        self.embed_array = embed
        self.preprocess = cfg
        self.dim = int(embed(np.zeros((1, 1, *cfg.grid), np.float32)).shape[1])


def partial_reference(
    train_raw: list[Volume], embed: Callable[[np.ndarray], np.ndarray], cfg: PreprocessConfig, poses: PoseSet
) -> ExactPatientSearch:
    """Training volumes embedded under ``poses`` as ``gate index build`` does, searched exactly."""
    from gate.index import embed_volumes

    ref = [p.embedding.vector for p in embed_volumes(train_raw, _BenchModel(embed, cfg), poses)]  # type: ignore[arg-type]
    return ExactPatientSearch(
        np.stack(ref), [v.patient_id for v in train_raw for _ in range(len(poses))], len(poses)
    )


def partial_copy_family(
    train_raw: list[Volume],
    holdout_raw: list[Volume],
    embed: Callable[[np.ndarray], np.ndarray],
    cfg: PreprocessConfig,
    poses: PoseSet,
    fov: tuple[int, int, int] = PARTIAL_FOV_MM,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    seed: int = 0,
    positives: slice = slice(None),
    progress: Callable[[str], None] | None = None,
    reference: ExactPatientSearch | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Partial copies: training volumes at random positions in a larger field of view, judged by windows.

    Each training volume (positives) and each holdout volume (negatives, placed the same way)
    is pasted into ``fov`` on each background and judged by :func:`gate.windows.judge_windows`
    against the training volumes indexed under ``poses`` (exact search). Threshold: the
    :data:`THRESHOLD_PERCENTILE` percentile of the negatives' scores per background.

    Args:
        train_raw: training volumes (1 mm), the positives' sources and the reference.
        holdout_raw: novel volumes, the negatives.
        embed: (N, 1, X, Y, Z) grids -> (N, D) unit vectors.
        cfg: the encoder's preprocessing (``fov: crop``).
        poses: the poses the reference indexes training volumes under.
        fov: the larger field of view, voxels at 1 mm.
        backgrounds: from :data:`BACKGROUNDS`.
        seed: fixes positions and backgrounds (disjoint per background and per class).
        positives: which training volumes are placed as positives (all of them are the
            reference); :data:`PARTIAL_VALIDATION` separates tuning from reporting.
        progress: one-line progress callback.
        reference: a prebuilt :func:`partial_reference` (else built here).
        verify: also verify each candidate's top patients on their best windows
            (:func:`gate.windows.verify_windows`, as a verifying index does) and report the
            verified NCC alone (``verified``) and the decision's two-score rule (``combined``:
            the higher of the two scores' ranks among the negatives).

    Returns:
        ``{"fov", "n_positives", "n_negatives", "backgrounds": {bg: metrics + "windows_mean"}}``.

    """
    from gate.verify import MAX_SHIFT_VOX, VERIFY_K, Verifier, grid_with_mask, stored_grid
    from gate.windows import judge_windows

    say = progress or (lambda _m: None)
    search = reference or partial_reference(train_raw, embed, cfg, poses)
    verifier = None
    if verify:
        grids = [stored_grid(*grid_with_mask(v, cfg, 0)) for v in train_raw]
        verifier = Verifier(grids, [v.patient_id for v in train_raw], poses, cfg, MAX_SHIFT_VOX)
    k = VERIFY_K if verify else 1

    def judge(views: list[np.ndarray], include: Sequence[Sequence[str]]) -> list[Any]:
        parts = [embed(np.stack(views[i : i + 64])[:, None]) for i in range(0, len(views), 64)]
        vectors = np.concatenate(parts)
        return search.neighbours(vectors, k, include)

    placed_train = train_raw[positives]
    result: dict[str, Any] = {
        "fov": list(fov),
        "n_positives": len(placed_train),
        "n_negatives": len(holdout_raw),
        "poses": len(poses),
        "backgrounds": {},
    }
    for b, background in enumerate(backgrounds):
        scores: dict[str, list[float]] = {"pos": [], "neg": []}
        verified: dict[str, list[float]] = {"pos": [], "neg": []}
        windows: list[int] = []
        hits = 0
        for kind, vols in (("pos", placed_train), ("neg", holdout_raw)):
            for i, vol in enumerate(vols):
                placed = place(vol, fov, background, seed + 7919 * b + 104729 * (kind == "neg") + i)
                res = judge_windows(placed, cfg, judge, k, verifier)
                scores[kind].append(float(res.neighbours.similarities[0]))
                if res.neighbours.verified is not None:
                    verified[kind].append(float(res.neighbours.verified.max()))
                windows.append(res.n_windows)
                if kind == "pos" and res.neighbours.patient_ids[0] == vol.patient_id:
                    hits += 1
        pos, neg = np.asarray(scores["pos"]), np.asarray(scores["neg"])
        thr = float(np.percentile(neg, THRESHOLD_PERCENTILE))
        metrics = family_metrics(pos, neg, thr)
        metrics.update(
            threshold=thr,
            source_is_nearest=hits / max(1, len(pos)),
            windows_mean=float(np.mean(windows)),
            pos_min=float(pos.min()),
            neg_max=float(neg.max()),
        )
        metrics["scores"] = {"pos": scores["pos"], "neg": scores["neg"]}
        if verify:
            vpos, vneg = np.asarray(verified["pos"]), np.asarray(verified["neg"])
            metrics["verified"] = family_metrics(vpos, vneg, float(np.percentile(vneg, THRESHOLD_PERCENTILE)))
            metrics["verified"]["scores"] = {"pos": verified["pos"], "neg": verified["neg"]}

            def rank(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
                return np.searchsorted(np.sort(ref), x, side="right") / len(ref)

            cpos = np.maximum(rank(pos, neg), rank(vpos, vneg)) + 1e-3 * np.maximum(pos, vpos)
            cneg = np.maximum(rank(neg, neg), rank(vneg, vneg)) + 1e-3 * np.maximum(neg, vneg)
            metrics["combined"] = family_metrics(cpos, cneg, float(np.percentile(cneg, THRESHOLD_PERCENTILE)))
        result["backgrounds"][background] = metrics
        say(
            f"partial copy ({background}): TPR@5% {metrics['tpr_at_fpr_5pct']:.3f}, AUROC "
            f"{metrics['auroc']:.4f}, source nearest {metrics['source_is_nearest']:.3f}, "
            f"{metrics['windows_mean']:.0f} windows per candidate"
            + (
                f"; verified TPR@5% {metrics['verified']['tpr_at_fpr_5pct']:.3f} AUROC "
                f"{metrics['verified']['auroc']:.4f}; combined TPR@5% "
                f"{metrics['combined']['tpr_at_fpr_5pct']:.3f}"
                if verify
                else ""
            )
        )
    return result


def markdown_partial(result: dict[str, Any]) -> str:
    """The partial-copy rows: one per encoder and background."""
    lines = [
        "",
        "Partial copies (training volume at a random position in a larger field of view, judged by "
        "windows; negatives: holdout volumes placed the same way; threshold: 95th percentile of the "
        "negatives):",
        "",
        "| method | background | field of view | TPR @ FPR 5% | AUROC | source nearest | windows |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, part in result.get("partial_copy", {}).items():
        fov = "x".join(str(f) for f in part["fov"])
        for bg, m in part["backgrounds"].items():
            lines.append(
                f"| {method} | {bg} | {fov} | {m['tpr_at_fpr_5pct']:.3f} | {m['auroc']:.4f} | "
                f"{m['source_is_nearest']:.3f} | {m['windows_mean']:.0f} |"
            )
    return "\n".join(lines) + "\n"
