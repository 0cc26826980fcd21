"""Retrieve, then verify: score a candidate against its retrieved training patients' voxels.

The encoder retrieves; this stage checks. For each of the top-k patients the index retrieved,
the candidate's preprocessed grid (with a margin of its own context) is aligned to each of the
patient's stored training grids by an exhaustive integer-shift search and scored by their
normalised cross-correlation (NCC) over the voxels both actually hold (masked NCC, Padfield
2012): zero padding on either side is not anatomy and is left out, so a copy cut short or
shifted by a few voxels scores as the copy it is. The verified score of a patient is the max
over its volumes and over the shifts; the decision grades it beside the cosine
(:mod:`gate.decide`).

Two channels retrieve the patients verified: the encoder (the index's nearest by cosine, over the
candidate and its shifted views) and a voxel channel that learns nothing (the correlation of 4x4x4
block means with every stored grid, :meth:`Verifier.voxel_patients`), so a copy the encoder was
not trained to see (a generator's smoothing and contrast drift) still has its source verified.

Every correlation is one FFT product (:func:`scipy.fft.rfftn`), so the cost is 5 FFTs of the
margin-enlarged grid per training grid tried (:class:`View`), whatever the shift range. numpy, scipy
and one numba loop (the turns, :func:`_trilinear`): ``gate check`` does not need torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numba
import numpy as np
from scipy import fft, ndimage

from gate.calibration import Calibration, CalibrationMethod
from gate.errors import IntegrityError
from gate.poses import PoseSet, rotation_matrix
from gate.preprocess import (
    DEFAULT_GRID_VOXELS,
    PreprocessConfig,
    grid_voxels,
    preprocess_uncropped,
    with_margin,
)
from gate.values import Neighbours, Volume, merge_neighbours

if TYPE_CHECKING:
    from gate.index_manifest import EmbeddingModel, Verification

MAX_SHIFT_VOX = 8
"""Shifts searched per axis, voxels (+-): the benchmark's widest translation and crop shift (8
voxels, FAMILIES in gate.encoder.benchmark), a quarter of the 32-voxel axes."""

MIN_OVERLAP = 0.5
"""A shift counts only where the candidate and the training grid overlap on at least this
fraction of the training grid's valid voxels: NCC over a thin sliver of tissue is noise (a
correlation of a few hundred voxels reaches 0.9 by chance on smooth MR)."""

VARIANCE_FLOOR = 1e-6
"""Minimum variance (intensities in [0, 1]) of either side over the overlap; a flat overlap has
no correlation to measure and scores 0."""


EMPTY_LEVEL = 0.05
"""A candidate voxel at or below this intensity (of [0, 1]) that is connected to the outside of
its grid (through other such voxels or invalid ones) is empty: padding or a cut field of view
that blur, rotation or resampling smeared, which exact-zero trimming (:func:`trim_empty_planes`)
misses. The final alignment of each refined patient is scored with and without this outside
(:meth:`View.content`) and keeps the higher NCC, so leaving it out can only add evidence: used
alone, the rule dropped a flipped, gamma-darkened simulated copy from 0.985 to 0.205 (its dark
tissue counted as outside). Level and :data:`EDGE_MARGIN` come from a sweep on the composite
family (encoder trained on the 209-volume train split; ``docs/encoder.md``, "The empty
outside"), in which the test halves were printed beside the validation halves."""

EDGE_MARGIN = 1
"""Voxels of the candidate next to its empty outside (:data:`EMPTY_LEVEL`), the grid's invalid
margin included, that are left out too: where interpolation and blur mix anatomy with the fill.
Margin 2 removed too much of a 32-voxel axis (composite validation TPR 0.895 against 1.000)."""


def content_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask`` without the candidate's empty outside and the :data:`EDGE_MARGIN` voxels next to it.

    Args:
        image: float (X, Y, Z), intensities in [0, 1].
        mask: bool, same shape: True where the candidate holds voxels.

    Returns:
        A new bool mask; ``mask`` itself when nothing would be left.

    """
    empty = (image <= EMPTY_LEVEL) | ~mask
    labels, _ = ndimage.label(empty)
    faces = np.concatenate(
        [np.moveaxis(labels, axis, 0)[side].ravel() for axis in range(3) for side in (0, -1)]
    )
    touching = np.unique(faces)
    outside = np.isin(labels, touching[touching > 0])
    if EDGE_MARGIN > 0:
        outside = ndimage.binary_dilation(outside, iterations=EDGE_MARGIN)
    keep = mask & ~outside
    return keep if keep.any() else mask.copy()


@dataclass(frozen=True)
class Aligned:
    """The best alignment of a candidate to one training grid.

    Attributes:
        ncc: masked normalised cross-correlation in [-1, 1] at the best shift.
        shift: (3,) integer voxels moving the training grid onto the candidate's grid.
        overlap: fraction of the training grid's valid voxels the candidate covers there.

    """

    ncc: float
    shift: tuple[int, int, int]
    overlap: float


def grid_with_mask(
    volume: Volume, config: PreprocessConfig, margin: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """The preprocessed grid of ``volume`` with ``margin`` voxels of context, and where it is real.

    Args:
        volume: as read from disk.
        config: the index's preprocessing.
        margin: voxels of context on every side.

    Returns:
        float32 (X + 2m, Y + 2m, Z + 2m) in [0, 1] (the centre window equals
        :func:`gate.preprocess.preprocess`) and its bool validity mask (True on voxels from the
        volume, the same crop/pad applied to ones).

    """
    v = preprocess_uncropped(volume, config)
    ones = Volume(np.ones(v.data.shape, np.float32), v.affine, v.spacing, v.source, v.patient_id)
    data = with_margin(v, config.grid, margin).data
    return data, with_margin(ones, config.grid, margin).data > 0.5


def trim_empty_planes(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``mask`` without the boundary planes that hold nothing but zeros.

    A slab of exact zeros at a grid's edge is padding, whoever added it: the preprocessing
    (a scan smaller than the grid), a cut field of view, or a copy shifted with zero fill. It
    carries no anatomy, so it must not count for or against a match; walking in from each side,
    planes whose real voxels are all zero are dropped from the mask.

    Args:
        image: float (X, Y, Z).
        mask: bool, same shape.

    Returns:
        A new bool mask.

    """
    keep = mask.copy()
    empty = (image == 0) | ~mask
    for axis in range(3):
        planes = np.moveaxis(empty, axis, 0).reshape(image.shape[axis], -1).all(axis=1)
        n = len(planes)
        lo = 0
        while lo < n and planes[lo]:
            lo += 1
        hi = n
        while hi > lo and planes[hi - 1]:
            hi -= 1
        index = [slice(None)] * 3
        index[axis] = slice(0, lo)
        keep[tuple(index)] = False
        index[axis] = slice(hi, n)
        keep[tuple(index)] = False
    return keep


class View:
    """A candidate grid with its margin, ready to be aligned to many training grids.

    Holds the spectra of the candidate side once, and the overlap sums that depend only on a
    template's mask (most training grids share the full-grid mask), so each further template
    costs two forward and three inverse FFTs.

    Args:
        image: float (X + 2S, Y + 2S, Z + 2S), S = the margin, intensities in [0, 1].
        mask: bool, same shape: True where the candidate holds voxels.
        trim: leave boundary planes of zeros out of the mask (:func:`trim_empty_planes`); the
            localisation over a whole field of view keeps them (zeros there are the field's).

    """

    def __init__(self, image: np.ndarray, mask: np.ndarray, trim: bool = True) -> None:
        if image.shape != mask.shape or image.ndim != 3:
            raise ValueError(
                f"a View needs a 3D image and a mask of its shape; got {image.shape}, {mask.shape}"
            )
        self.valid = mask  # before trimming: where the candidate holds voxels, zeros or not
        if trim:
            mask = trim_empty_planes(image, mask)
        self._full = bool(mask.all())
        self.image, self.mask = image, mask
        self.shape = tuple(int(s) for s in image.shape)
        m = mask.astype(np.float32)
        # NCC ignores an offset: centring keeps the float32 sums small (no cancellation)
        x = (image.astype(np.float32) - np.float32(image[mask].mean() if mask.any() else 0.0)) * m
        self._spec = tuple(fft.rfftn(a, self.shape) for a in (m, x, x * x))
        self._by_mask: dict[bytes, tuple[np.ndarray, ...]] = {}
        self._coarse: View | None = None
        self._reduced: dict[int, View] = {}
        self._content: View | None = None
        self._whole: View | None = None

    def _corr(self, a: np.ndarray, b: np.ndarray, tshape: tuple[int, ...]) -> np.ndarray:
        return valid_correlation(a * b, self.shape, tshape).astype(np.float64)

    def _mask_terms(
        self, template_mask: np.ndarray, terms: TemplateTerms | None = None
    ) -> tuple[np.ndarray, ...]:
        key = template_mask.shape.__repr__().encode() + np.packbits(template_mask).tobytes()
        if key not in self._by_mask:
            mt = _mask_spectrum(template_mask, self.shape) if terms is None else terms.mask_spectrum()
            mi, xi, xi2 = self._spec
            ts = template_mask.shape
            self._by_mask[key] = (mt, self._corr(mt, mi, ts), self._corr(mt, xi, ts), self._corr(mt, xi2, ts))
        return self._by_mask[key]

    def coarse(self) -> View:
        """This view at half resolution (2x2x2 means; real where at least half of a block is)."""
        if self._coarse is None:
            self._coarse = View(*_half_template(self.image, self.mask))
        return self._coarse

    def content(self) -> View:
        """This view without its empty outside (:func:`content_mask`; kept for the next call)."""
        if self._content is None:
            self._content = View(self.image, content_mask(self.image, self.mask), trim=False)
        return self._content

    def reduced(self, f: int) -> View:
        """This view at ``1/f`` resolution (:func:`block_view`; kept for the next call)."""
        if f not in self._reduced:
            small = View(*block_view(self.image, self.mask, f))
            small.valid = block_view(self.image, self.valid, f)[1]
            self._reduced[f] = small
        return self._reduced[f]

    def whole(self) -> View:
        """This view with its planes of zeros kept: every voxel the candidate holds counts.

        The reference of the real-LDM benchmark (docs/ldm_copies.md) correlates whole grids,
        zero padding included: a copy that reproduces where its source's scan ends is scored
        by that too (:data:`WHOLE_GRID`). Kept for the next call.
        """
        if np.array_equal(self.valid, self.mask):
            return self  # not kept in an attribute: a view holding itself lives until a GC cycle
        if self._whole is None:
            self._whole = View(self.image, self.valid, trim=False)
        return self._whole

    def template_terms(self, template: np.ndarray, template_mask: np.ndarray) -> TemplateTerms:
        """``template``'s spectra for views of this shape: made once, aligned to several views.

        Args:
            template: float (X, Y, Z) training grid.
            template_mask: bool (X, Y, Z), True where the template holds anatomy.

        """
        flip = (slice(None, None, -1),) * 3
        tm = template_mask[flip].astype(np.float32)
        offset = np.float32(template[template_mask].mean() if template_mask.any() else 0.0)
        tx = (template[flip].astype(np.float32) - offset) * tm
        xt, xt2 = padded_spectrum(tx, self.shape), padded_spectrum(tx * tx, self.shape)
        return TemplateTerms(self.shape, template_mask, xt, xt2)

    def align(
        self, template: np.ndarray, template_mask: np.ndarray, terms: TemplateTerms | None = None
    ) -> Aligned:
        """Best masked NCC of ``template`` over every integer placement inside this view.

        Args:
            template: float (X, Y, Z) training grid.
            template_mask: bool (X, Y, Z), True where the template holds anatomy.
            terms: ``template``'s spectra (:meth:`template_terms` of a view of this shape) when
                already made; made here otherwise.

        Returns:
            The best alignment (shift 0 = the template on the view's centre window); NCC -1
            when no placement overlaps enough (:data:`MIN_OVERLAP`).

        Raises:
            ValueError: ``terms`` were made for another view shape or template shape.

        """
        tshape = tuple(int(t) for t in template.shape)
        if terms is None:
            terms = self.template_terms(template, template_mask)
        elif terms.shape != self.shape or terms.mask.shape != tshape:
            raise ValueError(
                f"template terms for a {terms.mask.shape} template in a {terms.shape} view; "
                f"aligning a {tshape} template in a {self.shape} view"
            )
        _, n, s_i, s_ii = self._mask_terms(template_mask, terms)
        mi, xi, _ = self._spec
        xt, xt2 = terms.xt, terms.xt2
        s_t, s_tt, s_ti = self._corr(xt, mi, tshape), self._corr(xt2, mi, tshape), self._corr(xt, xi, tshape)
        total = float(template_mask.sum())
        n_safe = np.maximum(n, 1.0)
        cov = s_ti - s_t * s_i / n_safe
        var_t = s_tt - s_t * s_t / n_safe
        var_i = s_ii - s_i * s_i / n_safe
        floor = VARIANCE_FLOOR * n_safe
        ok = (n >= MIN_OVERLAP * total - 0.5) & (var_t > floor) & (var_i > floor)
        ncc = np.where(ok, cov / np.sqrt(np.maximum(var_t * var_i, 1e-30)), -1.0)
        pos = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
        margin = [(f - t) // 2 for f, t in zip(self.shape, tshape, strict=True)]
        return Aligned(
            ncc=float(np.clip(ncc[pos], -1.0, 1.0)),
            shift=tuple(int(p - m) for p, m in zip(pos, margin, strict=True)),  # type: ignore[arg-type]
            overlap=float(n[pos] / max(total, 1.0)),
        )

    def align_many(self, templates: TemplateSpectra) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`align` for many templates that share one mask, in one batched FFT product.

        Args:
            templates: their spectra at this view's shape (:func:`template_spectra`).

        Returns:
            float64 (N,) best masked NCC per template (-1 where no placement overlaps enough)
            and int (N, 3) the placement (start of the template inside this view) where it is.

        """
        if templates.shape != self.shape:
            raise ValueError(f"template spectra for {templates.shape}, view of {self.shape}")
        tshape = templates.mask.shape
        _, n, s_i, s_ii = self._mask_terms(templates.mask)
        mi, xi, _ = self._spec

        def corr(a: np.ndarray) -> np.ndarray:
            return valid_correlation(a, self.shape, tshape).astype(np.float64)

        s_ti = corr(templates.xt * xi)
        if self._full:  # every placement covers the whole template: its sums are constants
            s_t = np.zeros_like(s_ti)
            s_tt = np.broadcast_to(templates.sum_sq[:, None, None, None], s_ti.shape)
        else:
            s_t, s_tt = corr(templates.xt * mi), corr(templates.xt2 * mi)
        total = float(templates.mask.sum())
        n_safe = np.maximum(n, 1.0)
        cov = s_ti - s_t * s_i / n_safe
        var_t = s_tt - s_t * s_t / n_safe
        var_i = s_ii - s_i * s_i / n_safe
        floor = VARIANCE_FLOOR * n_safe
        ok = (n >= MIN_OVERLAP * total - 0.5) & (var_t > floor) & (var_i > floor)
        ncc = np.where(ok, cov / np.sqrt(np.maximum(var_t * var_i, 1e-30)), -1.0).reshape(len(s_t), -1)
        at = np.argmax(ncc, axis=1)
        pos = np.stack(np.unravel_index(at, s_t.shape[1:]), axis=1)
        return np.clip(ncc[np.arange(len(at)), at], -1.0, 1.0), pos


def valid_correlation(spectrum: np.ndarray, shape: tuple[int, ...], tshape: tuple[int, ...]) -> np.ndarray:
    """The placements of a correlation where a template lies wholly inside the view, and only those.

    ``fft.irfftn(spectrum, shape, axes=(-3, -2, -1))[..., x - 1 :, y - 1 :, z - 1 :]`` without
    computing the outputs the slice drops: the inverse is taken axis by axis as pocketfft takes
    it (unscaled complex transforms along X, then Y, then the real one along Z, scaled once by
    ``1 / (X Y Z)``), and each axis keeps only its valid outputs before the next is transformed.
    The same 1D transforms of the same lines in the same order give the same bits
    (tests/test_verify.py holds them to ``irfftn``). A 48x64x48 view and a 32x48x32 template
    transform 17 of 48 X-planes along Y and 17x17 of 48x64 lines along Z.

    Args:
        spectrum: complex (..., X, Y, Z // 2 + 1), the product of a view's and a flipped
            template's spectra (:func:`scipy.fft.rfftn` at ``shape``).
        shape: (X, Y, Z) the view shape.
        tshape: (x, y, z) the template shape.

    Returns:
        real (..., X - x + 1, Y - y + 1, Z - z + 1), the dtype ``irfftn`` gives ``spectrum``.

    """
    shape, tshape = tuple(int(n) for n in shape), tuple(int(t) for t in tshape)
    lead = spectrum.ndim - 3
    if lead < 0 or any(t < 1 or t > n for t, n in zip(tshape, shape, strict=True)):
        valid = (Ellipsis, *(slice(t - 1, n) for t, n in zip(tshape, shape, strict=True)))
        return fft.irfftn(spectrum, shape, axes=(-3, -2, -1))[valid]
    x = spectrum
    for k in range(2):
        x = fft.ifft(x, shape[k], axis=lead + k, norm="forward")  # unscaled: scaled once below
        x = x[(slice(None),) * (lead + k) + (slice(tshape[k] - 1, shape[k]),)]
    out = fft.irfft(x, shape[2], axis=lead + 2, norm="forward")[..., tshape[2] - 1 : shape[2]]
    # pocketfft's scale: 1 / N in long double, then in the transform's precision
    return out * out.dtype.type(1 / np.longdouble(shape[0] * shape[1] * shape[2]))


def padded_spectrum(template: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``fft.rfftn(template, shape, axes=(-3, -2, -1))`` without transforming the zero padding.

    pocketfft's ``rfftn`` takes the real transform along Z, then the complex ones along X and Y,
    of every line of the zero-padded array; a line of zeros stays zeros, so each axis here
    transforms only the lines that hold template voxels, padding the next axis as it goes. The
    same 1D transforms of the same lines in the same order give the same bits
    (tests/test_verify.py holds them to ``rfftn``). A 32x48x32 template in a 48x64x48 view: 0.36
    -> 0.29 ms here.

    Args:
        template: real (..., x, y, z), x <= X, y <= Y, z <= Z.
        shape: (X, Y, Z) the view shape.

    Returns:
        complex (..., X, Y, Z // 2 + 1), the dtype ``rfftn`` gives ``template``.

    """
    shape = tuple(int(n) for n in shape)
    lead = template.ndim - 3
    if lead < 0 or any(t > n for t, n in zip(template.shape[lead:], shape, strict=True)):
        return fft.rfftn(template, shape, axes=(-3, -2, -1))
    x = fft.rfft(template, shape[2], axis=lead + 2)
    for k in range(2):
        x = fft.fft(x, shape[k], axis=lead + k)
    return x


class TemplateTerms:
    """One template transformed for views of one shape (:meth:`View.template_terms`).

    Args:
        shape: the view shape the spectra are for.
        mask: bool (X, Y, Z) the template's validity mask.
        xt: complex spectrum of the flipped, centred, masked template.
        xt2: complex spectrum of its square.

    """

    def __init__(self, shape: tuple[int, ...], mask: np.ndarray, xt: np.ndarray, xt2: np.ndarray) -> None:
        self.shape, self.mask, self.xt, self.xt2 = shape, mask, xt, xt2
        self._mt: np.ndarray | None = None

    def mask_spectrum(self) -> np.ndarray:
        """Complex spectrum of the flipped mask, made on first use.

        A view that has seen the mask before (most training grids share the full-grid mask) has
        its terms already and never asks.
        """
        if self._mt is None:
            self._mt = _mask_spectrum(self.mask, self.shape)
            self._mt.setflags(write=False)
        return self._mt


def _mask_spectrum(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Complex spectrum of a template's flipped bool ``mask`` for views of ``shape``."""
    flip = (slice(None, None, -1),) * 3
    return padded_spectrum(mask[flip].astype(np.float32), shape)


@dataclass(frozen=True)
class TemplateSpectra:
    """Templates sharing one mask, transformed once for views of one shape (:meth:`View.align_many`).

    Attributes:
        mask: bool (X, Y, Z) the templates' shared validity mask.
        shape: the view shape the spectra are for.
        xt: complex (N, ...) spectra of the flipped, centred, masked templates.
        xt2: complex (N, ...) spectra of their squares.
        sum_sq: float64 (N,) sum of squares of each centred, masked template.

    """

    mask: np.ndarray
    shape: tuple[int, ...]
    xt: np.ndarray
    xt2: np.ndarray
    sum_sq: np.ndarray


def template_spectra(templates: np.ndarray, mask: np.ndarray, shape: tuple[int, ...]) -> TemplateSpectra:
    """Spectra of ``templates`` (float (N, X, Y, Z), one shared ``mask``) for views of ``shape``."""
    flip = (slice(None), *(slice(None, None, -1),) * 3)
    m = mask.astype(np.float32)
    t = templates.astype(np.float32)
    offset = (t * m).sum(axis=(1, 2, 3), keepdims=True) / max(float(m.sum()), 1.0)
    tx = ((t - offset) * m)[flip]
    return TemplateSpectra(
        mask=mask,
        shape=tuple(shape),
        xt=padded_spectrum(tx, shape),
        xt2=padded_spectrum(tx * tx, shape),
        sum_sq=(tx.astype(np.float64) ** 2).sum(axis=(1, 2, 3)),
    )


VERIFY_K = 20
"""Patients verified per candidate (retrieval depth), whatever a policy's ``k`` reports: the
verified score is the max over them. Blurred copies made by a real memorizing LDM
(docs/ldm_copies.md) had their source outside the encoder's top 5 (6 of 360 samples passed strict,
verified 0.76-0.77 against the wrong patients); at depth 20 five of them verified 0.86-0.87
against their source, at 50 all six. Each patient beyond the first costs one half-resolution
alignment per trial pose (~1.5 ms); bench/verify_cost.py."""


def stored_grid(grid: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A training grid as ``grids.npy`` stores it: float16, NaN where it holds no anatomy.

    NaN where ``mask`` is False and on boundary planes of zeros (:func:`trim_empty_planes`).
    """
    out = grid.astype(np.float16)
    out[~trim_empty_planes(grid, mask)] = np.float16(np.nan)
    return out


ROTATION_STEPS_DEG: tuple[float, ...] = (4.0, 2.0)
"""Step sizes of the rotation search (coordinate descent over the three angles, at half
resolution, around the pose that retrieved the patient). A shift search cannot undo a turn:
NCC of a copy turned 10 degrees about a random axis fell to a median 0.82 aligned by shifts
alone (runs/verify, msd_hippocampus), inside the range of real other patients."""

ROTATION_ROUNDS = 2
"""Descent moves per step size."""

ROTATION_REPLACE = True
"""After each step size the turned grid is placed again at its own best shift (one FFT
alignment) and the next step descends there. A turn about a point other than the copy's moves
its best placement; held at the start's, the descent of a copy turned 9 degrees about an
oblique axis stopped at (4, 4, 2) degrees, NCC 0.736 at half resolution, 0.802 verified; placed
again after each step it reached (8, 0, 4), 0.909, 0.879 verified, in as many turns (25;
seed-1 composite copy 49, whose source aligned by a brute-force search of turns reaches 0.882)."""

REFINE_NEAREST = 2
"""Patients nearest by cosine (the encoder's first) refined as well, when the half-resolution NCC
did not already pick them. A copy turned 9-12 degrees about a random axis is often not first by
unturned half-resolution NCC, while the encoder (trained on turns) does rank its source first: of
the shipped index's 522 simulated copies, 26 verified below 0.80 when only the best by NCC was
refined (all turned 8-12 degrees; bench/refine_ablation.py, docs/results/refine_ablation.json).
Refining the top 3 by NCC left 11 of them below 0.80; the top 1 by NCC and the nearest by cosine
3; the top 2 by NCC and the 2 nearest by cosine 1, at 1.6x the time on those copies (0.24 s
against 0.15 s, one core, search included); all 25 merged patients none, at 6.6x."""

WHOLE_GRID = True
"""Each refined patient is also scored over whole grids: its stored grid with the padding counted
as zeros (mask all True) against the candidate's untrimmed view (:meth:`View.whole`); the higher
NCC counts, so this too can only add evidence. A memorizing LDM's copy of hippocampus_243 (75% of
the grid, the rest zero padding, which the copy reproduced) verified 0.797 over the scan's voxels,
below the closest real pair, and passed strict; over whole grids 0.881 (the benchmark's reference:
0.883). On that benchmark the verified score's correlation with the reference rose from 0.954 to
0.984; the real patients' calibration of the shipped index did not move (2 of 261 values, by
1e-7), nor did the composite family's detection (docs/ldm_copies.md, "Whole grids"). Only
computed where it can differ: a training grid with padding, or a candidate with planes of zeros."""

COARSE_CONTENT = True
"""Each trial alignment at half resolution is also made on the candidate's content view
(:meth:`View.content`, halved) when that differs from its view, and the better NCC picks the
patients to refine (the rotation search still descends on the view: started from the content
view's placement it found worse turns, 0.90 against 0.96 verified on cut, turned, noisy copies
of two of the first six msd_hippocampus volumes, 2026-12-07). A copy cut or shifted before
preprocessing holds planes of fill that blur, noise and turns keep from being trimmed; they
dragged the source's half-resolution NCC (0.60 where its full-resolution content NCC was 0.92)
below other patients', so it was never refined: 5 of the 6 composite misses of a fresh draw
(seed 1, docs/encoder.md "A fresh composite draw"), whose sources verify at 0.88-0.96 once
turned. Costs one more half-resolution alignment per trial, on such candidates only."""

REFINE_SCREEN = 8
"""Patients (the best by half-resolution NCC) whose turn is searched at half resolution
(:func:`refine_rotation`) before the :data:`REFINE_PATIENTS` to refine are chosen, by their
NCC after turning. A copy turned 6-9 degrees about an oblique axis and cut or shifted scored
0.66-0.68 unturned at half resolution, below other patients (0.69-0.70), while turned it
reached 0.77-0.82 (seed-1 composite draw); chosen unturned, it was never refined and its
verified score stayed at that of another patient. Chosen on the index's own simulated copies
of the 209 train-split volumes (bench/composite_misses.py, split encoder): screening 8, their
lowest verified score was 0.845 and AUROC against the real patients 0.99999; screening 5,
0.748 and 0.9985; before the screen, :data:`COARSE_CONTENT` and :data:`ROTATION_REPLACE`,
0.748 and 0.9982."""

SCREEN_NEAREST = 3
"""Patients nearest by cosine (the first of the merged neighbours) that join the
:data:`REFINE_SCREEN` for the half-resolution turn search when their unturned NCC did not already
put them there. A copy moved 4 voxels, turned 12 degrees and blurred had its source third by
cosine but unturned at half resolution below 8 others, so it was neither turned nor refined
(verified 0.646, another patient's 0.767). Chosen on the index's own simulated copies of the 209
train-split volumes (runs of seeds 0 and 3, split encoder, 418 copies each, no benchmark draw):
with :data:`VOXEL_MIRROR`, seed 3's copies below the real patients' maximum (0.849) went from 3
to 2 and their AUROC against the real patients from 0.9960 to 0.9970; seed 0's stayed at none
(AUROC 1.0); 5 nearest did no better than 3 on either seed, nor a screen of 12 by NCC."""

POLISH_STEPS_DEG: tuple[float, ...] = (2.0, 1.0)
"""Step sizes (degrees) of a last turn search at full resolution, on the refined patient with the
highest verified score (:func:`refine_rotation` on its full-resolution content view, or its view
when the two are the same); empty: none. At half resolution turns 2-3 degrees apart score alike
(0.747-0.750) while at full resolution they differ (0.846-0.903): a composite copy (crop shift
3, turn 7.7 degrees, gamma, bias field, noise 0.05; seed-4 draw, copy 17) verified 0.807, below
the real patients' maximum; polished 0.923 (one step of 1 degree: 0.878). Chosen on the index's
own simulated copies of the 209 train-split volumes (seeds 0 and 3, 418 each): their 1st
percentile rose from 0.871 to 0.885 and from 0.862 to 0.874, seed 0's lowest from 0.860 to
0.867, the real patients' maximum stayed 0.849. Costs about 21 ms per candidate at k = 5 (median
113 -> 136 ms CPU, one core, the 20 first candidates of bench/verify_cost.py, switched off
and on in one run)."""

REFINE_PATIENTS = 2
"""Patients (the best of the :data:`REFINE_SCREEN` after their half-resolution turn search)
whose alignment is re-scored at full resolution, beside :data:`REFINE_NEAREST`."""


def _blocks(x: np.ndarray, f: int) -> np.ndarray:
    """``f``x``f``x``f`` block means (trailing voxels short of a block dropped), float32.

    The bits of ``y.reshape(a/f, f, b/f, f, c/f, f).mean(axis=(1, 3, 5))`` (numpy sums each
    block's rows along Z, then adds the rows in (X, Y) order), summed from strided views: 0.96
    -> 0.07 ms for a 48x64x48 grid at f = 2 (tests/test_verify.py holds the bits to the reshape).
    From f = 8 numpy sums a row pairwise, and with one block along Z it reorders the sum, so
    the reshape itself is used there.
    """
    if f < 1:
        raise ValueError(f"block size must be at least 1, got {f}")
    a, b, c = (n // f * f for n in x.shape)
    y = x[:a, :b, :c].astype(np.float32, copy=False)
    if f >= 8 or c // f < 2 or not a or not b:
        return y.reshape(a // f, f, b // f, f, c // f, f).mean(axis=(1, 3, 5))
    out = np.zeros((a // f, b // f, c // f), dtype=np.float32)
    for i, j in itertools.product(range(f), repeat=2):
        row = y[i::f, j::f, 0::f].copy()
        for k in range(1, f):
            row += y[i::f, j::f, k::f]
        np.add(out, row, out=out)
    return np.true_divide(out, np.float32(f**3), out=out)


def _half(x: np.ndarray) -> np.ndarray:
    """2x2x2 block means (odd trailing voxels dropped)."""
    return _blocks(x, 2)


def block_view(image: np.ndarray, mask: np.ndarray, f: int) -> tuple[np.ndarray, np.ndarray]:
    """An image and its validity mask at ``1/f`` resolution: block means, real where half a block is.

    Args:
        image: float (X, Y, Z); only voxels where ``mask`` holds count.
        mask: bool, same shape.
        f: block size, voxels per axis.

    Returns:
        float32 (X//f, Y//f, Z//f) block means of ``image * mask`` and the bool mask of the
        blocks at least half real (the convention of :meth:`View.coarse`).

    """
    return _blocks(np.where(mask, image, 0.0), f), _blocks(mask.astype(np.float32), f) >= 0.5


VOXEL_FACTOR = 4
"""Block size (voxels per axis) of the voxel channel's vectors: a 32x48x32 grid becomes 8x12x8 =
768 block means. Coarse enough that smoothing, lost texture and a voxel or two of shift barely
move it, fine enough to tell patients apart."""

VOXEL_K = 5
"""Patients the voxel channel adds to the encoder's retrieval (:meth:`Verifier.voxel_patients`).
The encoder retrieves by what it learned; a copy a generator blurred can fall outside its top
:data:`VERIFY_K`: one memorizing-LDM sample (reference NCC 0.840 to its source, closer than any
two real patients) passed strict at verified 0.768 because its source was not retrieved. Ranked
by the correlation of block means, the source of every reference "similar" and "duplicate"
sample of that benchmark was first (bench/ldm_copies.py voxel-rank, docs/encoder.md). A cut field
of view whose fill was smeared (the composite family's crop shift then blur) pulls the whole
window's correlation towards strangers; scored over the candidate's content as well
(:func:`masked_block_correlation`), the channel had the source of 186 of the 209 composite copies
in its 5 (166 over the whole window alone), and with the encoder's retrieval all 209 were
verified against their source (207 before; split encoder, bench/composite_misses.py)."""

VOXEL_MIRROR = True
"""The voxel channel also correlates the candidate's windows mirrored (axis X, as :func:`_turned`
mirrors). A mirrored copy moved 5.7 voxels, with light noise, was not retrieved by the encoder
and its source's block means did not correlate with the unmirrored windows, so its source was
never verified, although mirrored and aligned it scores 0.94 (one of the index's simulated copies
of the train split, seed 0, copy 340: verified 0.762, below the real patients' 0.849)."""


LOCATE_K = 5
"""Patients the localisation channel verifies inside a candidate larger than the grid
(:meth:`Verifier.locate`): the best by block-mean NCC over every placement, each at its placement."""


LOCATE_PHASES: tuple[tuple[int, int, int], ...] = tuple(
    (x, y, z) for x in (0, 2) for y in (0, 2) for z in (0, 2)
)
"""Voxel offsets of the block lattices the localisation tries: a training volume sits anywhere,
not on the 4-voxel block lattice, and block means two voxels off their source's blocks correlate
no better than another patient's (hippocampus crops, tests/test_verify.py); with the 8 lattices
offset by 0 or 2 voxels per axis no placement is more than one voxel off its blocks."""


LOCATE_BATCH = 512
"""Block templates transformed and correlated together (512 x 20x28x20 float32 = 23 MB)."""

LOCATE_CACHE_BYTES = 256 * 1024 * 1024
"""Template spectra kept between candidates of one shape at most (the shipped index: 261 grids,
~25 MB at the 80x112x80 mm benchmark field of view)."""


@dataclass(frozen=True)
class Located:
    """Where one training volume fits best inside a candidate larger than the grid.

    Attributes:
        patient_id: its patient.
        volume: its number among the patient's volumes.
        start: (X, Y, Z) voxel start of the grid-sized window it fits, in the candidate.
        ncc: masked NCC of the block means there.

    """

    patient_id: str
    volume: int
    start: tuple[int, int, int]
    ncc: float


def _block_means(grid: np.ndarray) -> np.ndarray:
    """A grid's :data:`VOXEL_FACTOR`-block means, raveled (axes padded with 0 to whole blocks).

    Args:
        grid: float (X, Y, Z); NaN (padding of a stored grid) counts as 0.

    Returns:
        float64 (X/f * Y/f * Z/f,) block means, C order.

    """
    f = VOXEL_FACTOR
    x = _whole_blocks(np.nan_to_num(np.asarray(grid, dtype=np.float32), nan=0.0))
    return _blocks(x, f).ravel().astype(np.float64)


def _whole_blocks(x: np.ndarray) -> np.ndarray:
    """``x`` cut or padded (zeros / False) to whole :data:`VOXEL_FACTOR` blocks, at least one per axis."""
    f = VOXEL_FACTOR
    a, b, c = (max(n // f, 1) * f for n in x.shape)
    return np.pad(x, [(0, max(t - n, 0)) for t, n in zip((a, b, c), x.shape, strict=True)])[:a, :b, :c]


def voxel_vector(grid: np.ndarray) -> np.ndarray:
    """A grid's voxel-channel vector: :data:`VOXEL_FACTOR`-block means, centred, unit length.

    Args:
        grid: float (X, Y, Z) intensities in [0, 1]; NaN (padding of a stored grid) counts as 0.

    Returns:
        float32 (X/f * Y/f * Z/f,) unit vector (zero for a flat grid): the dot product of two is
        the Pearson correlation of their block means.

    """
    return _unit_vector(_block_means(grid))


def _unit_vector(means: np.ndarray) -> np.ndarray:
    """Block means (:func:`_block_means`) centred and scaled to unit length (zero if flat), float32."""
    y = means - means.mean()
    norm = float(np.linalg.norm(y))
    return (y / norm if norm > 1e-9 else y).astype(np.float32)


def _block_mask(mask: np.ndarray) -> np.ndarray:
    """The :data:`VOXEL_FACTOR` blocks of a bool (X, Y, Z) ``mask`` that are at least half True.

    Raveled as :func:`_block_means` ravels (axes padded with False to whole blocks). Counted by
    three sums over one axis each: exact, and faster than a float mean over three axes.
    """
    f = VOXEL_FACTOR
    x = _whole_blocks(mask)
    a, b, c = x.shape
    y = x.astype(np.uint8).reshape(a, b, c // f, f).sum(axis=3, dtype=np.uint16)
    y = y.reshape(a, b // f, f, c // f).sum(axis=2, dtype=np.uint16)
    y = y.reshape(a // f, f, b // f, c // f).sum(axis=1, dtype=np.uint16)
    return y.ravel() * 2 >= f**3


def masked_block_correlation(
    means: np.ndarray, masks: np.ndarray, vectors: np.ndarray, squares: np.ndarray
) -> np.ndarray:
    """Pearson correlation of query block means with stored voxel vectors over each query's mask.

    Correlation ignores a per-vector offset and scale, so the stored unit vectors
    (:func:`voxel_vector`) serve as they are: three matrix products, no stored block means.

    Args:
        means: float (W, D) query block means (:func:`_block_means`).
        masks: bool (W, D): the blocks of each query that count.
        vectors: float32 (N, D) stored voxel vectors.
        squares: float32 (N, D) ``vectors ** 2``.

    Returns:
        float64 (W, N) correlations; -1 where a query or a stored vector is flat over the mask.

    """
    m = masks.astype(np.float32)
    y = np.where(masks, means, 0.0)
    n = np.maximum(masks.sum(axis=1, keepdims=True), 1).astype(np.float64)
    sx = (m @ vectors.T).astype(np.float64)
    sxx = (m @ squares.T).astype(np.float64)
    sqx = (y.astype(np.float32) @ vectors.T).astype(np.float64)
    sq = y.sum(axis=1, keepdims=True)
    sqq = (y * y).sum(axis=1, keepdims=True)
    var = (sqq - sq * sq / n) * np.maximum(sxx - sx * sx / n, 0.0)
    cov = sqx - sq * sx / n
    return np.where(var > 1e-12, cov / np.sqrt(np.maximum(var, 1e-300)), -1.0)


def _ncc_at(
    template: np.ndarray, tmask: np.ndarray, image: np.ndarray, imask: np.ndarray, start: Sequence[int]
) -> float:
    """Masked NCC of ``template`` against ``image`` at one integer placement ``start``."""
    sl = tuple(slice(int(o), int(o) + int(t)) for o, t in zip(start, template.shape, strict=True))
    win, wmask = image[sl], imask[sl]
    if win.shape != template.shape:
        return -1.0
    m = tmask & wmask
    n = int(m.sum())
    if n < MIN_OVERLAP * max(int(tmask.sum()), 1):
        return -1.0
    a = template[m].astype(np.float64)
    b = win[m].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > VARIANCE_FLOOR * n else -1.0


_CENTRED: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}


def _centred_indices(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A grid's centre, float64 (3, 1), and its voxel coordinates less the centre, float64 (3, X*Y*Z).

    Cached per shape, read-only: a fresh 1.2 MB array cost ~0.4 ms here (first-touch page
    faults) against ~0.04 ms for the arithmetic on it.
    """
    if shape not in _CENTRED:
        centre = ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)[:, None]
        centred = np.indices(shape, dtype=np.float64).reshape(3, -1) - centre
        centre.setflags(write=False)
        centred.setflags(write=False)
        _CENTRED[shape] = (centre, centred)
    return _CENTRED[shape]


def _turned(
    grid: np.ndarray, mask: np.ndarray, flip: bool, angles: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """A grid and its mask mirrored (axis X) and turned about the grid centre, trilinear, zeros outside.

    The same mapping as :func:`gate.poses.apply_pose` (output voxel ``o`` samples the input at
    ``R^T (o - c) + c``), computed once for both arrays. scipy's ``affine_transform`` called twice
    took 1.8 ms per half-resolution turn here, 70% of the verification time; numpy's gathers of
    the 8 corners 0.29 ms; the compiled loop of :func:`_trilinear` 0.10 ms (8.2 -> 1.9 ms at
    32x48x32), with the bits of the numpy gathers (tests/test_verify.py).
    """
    if flip:
        grid, mask = grid[::-1], mask[::-1]
    if not any(angles):
        return np.ascontiguousarray(grid, dtype=np.float32), np.ascontiguousarray(mask)
    shape = tuple(int(n) for n in grid.shape)
    out_g, out_m = _trilinear(
        _sample_points(shape, angles),
        np.ascontiguousarray(grid, dtype=np.float32),
        np.ascontiguousarray(mask, dtype=np.bool_),
        bool(mask.all()),
    )
    return out_g.reshape(shape), out_m.reshape(shape)


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled by numba, its machine code cached beside the source or in the user's cache.

    Where neither is writable (a read-only install with no writable home) numba refuses
    ``cache=True`` at import, which would take the whole gate down; ``fn`` is then compiled in
    each process on its first call instead (0.8 s here).
    """
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError as err:
        if "cannot cache" not in str(err):
            raise
        return numba.njit(nogil=True)(fn)


@_compiled
def _corners(
    grid: np.ndarray, mask: np.ndarray, full: bool, cx: float, cy: float, cz: float
) -> tuple[float, float]:  # pragma: no cover - compiled; its bits are tested through _turned
    """The trilinear sample of ``grid`` and of ``mask`` at one point, corners outside read as 0.

    The 8 corners summed in float64 in the order numpy's corner arrays were summed (x, then y,
    then z; weight ``(wx * wy) * wz``); the mask's sum is 0 when ``full`` (not needed then).
    """
    nx, ny, nz = grid.shape
    bx, by, bz = np.floor(cx), np.floor(cy), np.floor(cz)
    fx, fy, fz = cx - bx, cy - by, cz - bz
    ix, iy, iz = np.int64(bx), np.int64(by), np.int64(bz)
    acc = 0.0
    acc_m = 0.0
    for dx in range(2):
        x = ix + dx
        wx = fx if dx else 1.0 - fx
        for dy in range(2):
            y = iy + dy
            wxy = wx * (fy if dy else 1.0 - fy)
            for dz in range(2):
                z = iz + dz
                w = wxy * (fz if dz else 1.0 - fz)
                inside = 0 <= x < nx and 0 <= y < ny and 0 <= z < nz
                acc += w * (np.float64(grid[x, y, z]) if inside else 0.0)
                if not full:
                    acc_m += w * (1.0 if inside and mask[x, y, z] else 0.0)
    return acc, acc_m


@_compiled
def _trilinear(
    coords: np.ndarray, grid: np.ndarray, mask: np.ndarray, full: bool
) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled; its bits are tested
    """Trilinear samples of a grid and its mask at ``coords``, corners outside the grid read as 0.

    One loop over the sample points, each summing its 8 corners in float64 in the order
    numpy's corner arrays were summed (x, then y, then z; weight ``(wx * wy) * wz``) and
    rounding once to float32: the bits of the numpy gathers, held by
    ``test_turned_keeps_the_bits_of_numpy_corner_gathers`` (which a relative change of 1e-9 in
    the samples fails).

    Args:
        coords: float64 (3, N) sample points, voxels of ``grid``.
        grid: float32 (X, Y, Z), C order.
        mask: bool (X, Y, Z), C order.
        full: ``mask`` is all True: a sample is then valid where it lies within half a voxel of
            the grid, rather than where its trilinear mask exceeds 0.5.

    Returns:
        float32 (N,) samples clipped to [0, 1] and bool (N,) validity.

    """
    nx, ny, nz = grid.shape
    n = coords.shape[1]
    out_g = np.empty(n, dtype=np.float32)
    out_m = np.empty(n, dtype=np.bool_)
    for i in range(n):
        cx, cy, cz = coords[0, i], coords[1, i], coords[2, i]
        acc, acc_m = _corners(grid, mask, full, cx, cy, cz)
        out_g[i] = np.float32(min(max(acc, 0.0), 1.0))
        out_m[i] = _within(cx, cy, cz, nx, ny, nz) if full else acc_m > 0.5
    return out_g, out_m


@_compiled
def _within(
    cx: float, cy: float, cz: float, nx: int, ny: int, nz: int
) -> bool:  # pragma: no cover - compiled; tested through _turned
    """Whether a sample point lies within half a voxel of an (nx, ny, nz) grid: a full mask turned."""
    return -0.5 <= cx <= nx - 0.5 and -0.5 <= cy <= ny - 0.5 and -0.5 <= cz <= nz - 0.5


def _turned_full_mask(shape: Sequence[int], flip: bool, angles: Sequence[float]) -> np.ndarray:
    """The mask :func:`_turned` gives a grid of ``shape`` whose mask is all True."""
    shape = tuple(int(n) for n in shape)
    if not any(angles):
        return np.ones(shape, dtype=bool)
    return _within_grid(_sample_points(shape, angles), shape).reshape(shape)


def _sample_points(shape: tuple[int, ...], angles: Sequence[float]) -> np.ndarray:
    """float64 (3, X*Y*Z): where each output voxel of a turn by ``angles`` (degrees) samples its input."""
    rot = rotation_matrix(np.radians(np.asarray(angles, dtype=np.float64)))
    centre, centred = _centred_indices(shape)
    coords = rot.T @ centred
    coords += centre  # in place: the bits of ``rot.T @ centred + centre`` without a second array
    return coords


@_compiled
def _within_grid(
    coords: np.ndarray, shape: tuple[int, int, int]
) -> np.ndarray:  # pragma: no cover - compiled; tested through _turned_full_mask
    """The sample points (bool (N,)) within half a voxel of a grid of ``shape``: a full mask turned."""
    nx, ny, nz = shape
    out = np.empty(coords.shape[1], dtype=np.bool_)
    for i in range(coords.shape[1]):
        out[i] = _within(coords[0, i], coords[1, i], coords[2, i], nx, ny, nz)
    return out


@_compiled
def _turned_ncc(
    rot: np.ndarray,
    grid: np.ndarray,
    mask: np.ndarray,
    full: bool,
    image: np.ndarray,
    imask: np.ndarray,
    start: np.ndarray,
    min_overlap: float,
    variance_floor: float,
) -> float:  # pragma: no cover - compiled; tested against _ncc_at of _turned
    """Masked NCC of ``grid`` turned by ``rot`` (as :func:`_turned`) against ``image`` at ``start``.

    :func:`_ncc_at` of :func:`_turned` in one pass: each output voxel is sampled (trilinear,
    the same corners and validity as :func:`_trilinear`) and its sums accumulated in float64
    where both sides are valid, so no turned grid is made. For the rotation search's many
    trial turns: 0.18 against 0.39 ms per turn for ``_ncc_at(_turned(...))`` at half
    resolution (16x24x16, one core, the other core busy; 2026-12-07).

    Args:
        rot: float64 (3, 3) rotation matrix; an output voxel ``o`` samples ``rot.T (o - c) + c``.
        grid: float32 (X, Y, Z), C order (mirrored beforehand where the pose mirrors).
        mask: bool (X, Y, Z), its validity.
        full: ``mask`` is all True.
        image: float32 the candidate's view, C order.
        imask: bool, same shape, its mask.
        start: int64 (3,) where the turned grid's first voxel sits in ``image``.
        min_overlap: :data:`MIN_OVERLAP`.
        variance_floor: :data:`VARIANCE_FLOOR`.

    Returns:
        The NCC in [-1, 1], or -1 where the placement leaves the image, the overlap is short of
        ``min_overlap`` of the turned grid's valid voxels, or either side is flat.

    """
    nx, ny, nz = grid.shape
    ax, ay, az = start[0], start[1], start[2]
    if ax < 0 or ay < 0 or az < 0:
        return -1.0
    if ax + nx > image.shape[0] or ay + ny > image.shape[1] or az + nz > image.shape[2]:
        return -1.0
    c0, c1, c2 = (nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0
    valid = 0
    n = 0
    sa = 0.0
    sb = 0.0
    saa = 0.0
    sbb = 0.0
    sab = 0.0
    for ox in range(nx):
        px = ox - c0
        for oy in range(ny):
            py = oy - c1
            for oz in range(nz):
                pz = oz - c2
                cx = rot[0, 0] * px + rot[1, 0] * py + rot[2, 0] * pz + c0
                cy = rot[0, 1] * px + rot[1, 1] * py + rot[2, 1] * pz + c1
                cz = rot[0, 2] * px + rot[1, 2] * py + rot[2, 2] * pz + c2
                if full:  # validity needs no sample: the candidate's mask can skip it
                    if not _within(cx, cy, cz, nx, ny, nz):
                        continue
                    valid += 1
                    if not imask[ax + ox, ay + oy, az + oz]:
                        continue
                acc, acc_m = _corners(grid, mask, full, cx, cy, cz)
                if not full:
                    if acc_m <= 0.5:
                        continue
                    valid += 1
                    if not imask[ax + ox, ay + oy, az + oz]:
                        continue
                a = np.float64(np.float32(min(max(acc, 0.0), 1.0)))
                b = np.float64(image[ax + ox, ay + oy, az + oz])
                n += 1
                sa += a
                sb += b
                saa += a * a
                sbb += b * b
                sab += a * b
    if n < min_overlap * max(valid, 1):
        return -1.0
    cov = sab - sa * sb / n
    var_a = saa - sa * sa / n
    var_b = sbb - sb * sb / n
    if var_a <= 0.0 or var_b <= 0.0:
        return -1.0
    den = np.sqrt(var_a * var_b)
    if den <= variance_floor * n:
        return -1.0
    return min(max(cov / den, -1.0), 1.0)  # the one-pass sums can round past 1 on an exact copy


def refine_rotation(
    coarse: View,
    grid_c: np.ndarray,
    mask_c: np.ndarray,
    flip: bool,
    start_deg: Sequence[float],
    start: Aligned,
    content: View | None = None,
    steps: Sequence[float] = ROTATION_STEPS_DEG,
) -> tuple[tuple[float, float, float], float]:
    """Search small turns of a half-resolution training grid against a half-resolution view.

    The same search polishes a turn at full resolution (:data:`POLISH_STEPS_DEG`): any grid and
    view of matching resolution serve.

    Coordinate descent over the three angles (:data:`ROTATION_STEPS_DEG`), each turn scored by
    masked NCC at one placement: that of ``start`` (the best shift of the start pose), then,
    after each step size that moved, the turned grid's own best shift (:data:`ROTATION_REPLACE`).

    Args:
        coarse: the candidate at half resolution (:meth:`View.coarse`).
        grid_c: the training grid at half resolution, unposed, float32.
        mask_c: its validity mask.
        flip: mirror it first.
        start_deg: the turn to start from, degrees about X, Y, Z.
        start: the start pose's alignment on ``coarse``.
        content: the candidate's content view at half resolution (``View.content().coarse()``)
            when it differs from ``coarse``: the turn found is aligned there too (every shift).
        steps: the descent's step sizes, degrees, largest first.

    Returns:
        The best angles found (degrees) and their masked NCC: at the final placement on
        ``coarse``, or on ``content`` at its best shift, whichever is higher.

    """
    margin = [(v - t) // 2 for v, t in zip(coarse.shape, grid_c.shape, strict=True)]
    at = [m + sh for m, sh in zip(margin, start.shift, strict=True)]

    # the descent comes back to angles it tried: each turn is made once, scored once per placement
    turned: dict[tuple[float, ...], tuple[np.ndarray, np.ndarray]] = {}
    scored: dict[tuple[float, ...], float] = {}

    def turn(angles: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        key = tuple(float(a) for a in angles)
        if key not in turned:
            turned[key] = _turned(grid_c, mask_c, flip, angles)
        return turned[key]

    src = np.ascontiguousarray(grid_c[::-1] if flip else grid_c, dtype=np.float32)
    src_mask = np.ascontiguousarray(mask_c[::-1] if flip else mask_c, dtype=np.bool_)
    full = bool(mask_c.all())
    image = np.ascontiguousarray(coarse.image, dtype=np.float32)
    imask = np.ascontiguousarray(coarse.mask, dtype=np.bool_)

    def score(angles: Sequence[float]) -> float:
        key = tuple(float(a) for a in angles)
        if key not in scored:
            rot = rotation_matrix(np.radians(np.asarray(key, dtype=np.float64)))
            place = np.asarray(at, dtype=np.int64)
            scored[key] = float(
                _turned_ncc(rot, src, src_mask, full, image, imask, place, MIN_OVERLAP, VARIANCE_FLOOR)
            )
        return scored[key]

    angles = [float(a) for a in start_deg]
    best = score(angles)
    for step in steps:
        before = list(angles)
        for _ in range(ROTATION_ROUNDS):
            moved = False
            for axis in range(3):
                for sign in (-1.0, 1.0):
                    trial = list(angles)
                    trial[axis] += sign * step
                    value = score(trial)
                    if value > best:
                        best, angles, moved = value, trial, True
            if not moved:
                break
        if ROTATION_REPLACE and angles != before:
            placed = coarse.align(*turn(angles))
            if placed.ncc > best:  # the turned grid's own best shift: the next step descends there
                best, at = placed.ncc, [m + sh for m, sh in zip(margin, placed.shift, strict=True)]
                scored.clear()  # scores at the old placement
    if content is not None:  # at its own best shift: without the fill the placement can move
        best = max(best, content.align(*turn(angles)).ncc)
    return (angles[0], angles[1], angles[2]), best


VERIFY_MAX_VOXELS = 131_072
"""Voxels verification aligns at most per grid: a larger grid is aligned at ``1/f`` resolution
(``f``-block means, :func:`verify_factor`), the same way at build time (calibration) and at check
time. At the 32x48x32 default (49,152 voxels) nothing changes. At 128x128x80 (a 256x256x160 mm
head at 2 mm) verification at full resolution took 1.65 s of a 3.7 s candidate with 8 training
patients, most of it in turning the refined patients' 1.3M-voxel grids (bench/large_volumes.py,
2026-12-03); at ``f`` = 3 it aligns 42x42x26 blocks, the default grid's cost."""


def verify_factor(grid: Sequence[int]) -> int:
    """The smallest block size ``f`` that leaves at most :data:`VERIFY_MAX_VOXELS` of ``grid``."""
    f = 1
    while int(np.prod([max(1, int(g) // f) for g in grid])) > VERIFY_MAX_VOXELS:
        f += 1
    return f


TEMPLATE_CACHE_BYTES = 256 * 1024 * 1024
"""What a :class:`Verifier` keeps between candidates at most, first come first kept: each training
grid's half-resolution template (the shipped index: 261 x 16x24x16 float32 + mask, 8 MB) and each
trial pose of one (as it is, its retrieving pose, mirrored) turned and transformed for the
candidates' half-resolution view shape (~0.28 MB at the 32x48x32 grid; 20 candidates kept 666 of
them, 186 MB)."""


class Verifier:
    """The training grids of one index (or shard set), aligned to candidates on request.

    Args:
        grids: per training volume (index row order), float16 (X, Y, Z), NaN = padding.
        patient_ids: per training volume, its pseudonymous patient id.
        poses: the index's pose set (a neighbour's ``matched`` pose number refers to it).
        config: the index's preprocessing.
        max_shift: shifts searched per axis, voxels.

    """

    def __init__(
        self,
        grids: Sequence[np.ndarray],
        patient_ids: Sequence[str],
        poses: PoseSet,
        config: PreprocessConfig,
        max_shift: int,
    ) -> None:
        if len(grids) != len(patient_ids):
            raise ValueError(f"{len(grids)} grids for {len(patient_ids)} patient ids")
        self.poses, self.config, self.max_shift = poses, config, max_shift
        self.factor = verify_factor(config.grid)
        self._grids = list(grids)
        self._volumes: dict[str, list[int]] = {}
        for i, pid in enumerate(patient_ids):
            self._volumes.setdefault(pid, []).append(i)
        self._patient_of = list(patient_ids)
        self._ordinals = volume_ordinals(self._patient_of)
        self._blocks: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._halves: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self._trials: dict[tuple[object, ...], tuple[np.ndarray, np.ndarray, TemplateTerms]] = {}
        self._kept_bytes = 0
        self._kept_lock = threading.Lock()  # candidates may be verified on several threads
        self._spectra: tuple[tuple[int, ...], list[tuple[np.ndarray, TemplateSpectra]]] | None = None
        self._voxel_vectors = (
            np.stack([voxel_vector(g) for g in self._grids]) if self._grids else np.zeros((0, 1), np.float32)
        )
        self._voxel_squares = self._voxel_vectors**2

    def voxel_patients(
        self, view: View, n: int = VOXEL_K, windows: Sequence[np.ndarray] | None = None
    ) -> tuple[str, ...]:
        """The voxel channel: the ``n`` patients whose block means correlate best with the candidate's.

        A second retrieval beside the encoder's, that learns nothing: the candidate's grid window
        and its shifted windows (:data:`QUERY_SHIFTS_VOX`) are reduced to block means
        (:func:`voxel_vector`) and correlated with every stored training grid's (one matrix
        product), once over the whole window and once over its content (the blocks at least half
        inside :meth:`View.content`, :func:`masked_block_correlation`); the higher of the two
        counts, as in :meth:`verify`. With :data:`VOXEL_MIRROR` the windows are correlated
        mirrored as well. Patient-level max over volumes and windows.

        Args:
            view: the candidate (:meth:`view`).
            n: patients returned.
            windows: the candidate's grid window and shifted windows when already cut
                (:func:`search_windows`); cut from ``view`` otherwise.

        Returns:
            Pseudonymous patient ids, best first.

        """
        grid = self.config.grid
        if windows is None:
            windows = search_windows(view, grid)
        content = mask_windows(self._content_mask(view), grid)
        if len(content) != len(windows):
            raise ValueError(f"{len(windows)} search windows for {len(content)} content windows")
        if VOXEL_MIRROR:
            windows = [*windows, *(w[::-1] for w in windows)]
            content = [*content, *(c[::-1] for c in content)]
        means = np.stack([_block_means(np.ascontiguousarray(w)) for w in windows])
        q = np.stack([_unit_vector(m) for m in means])  # voxel_vector of each window
        per_volume = (q @ self._voxel_vectors.T).max(axis=0)
        masks = np.stack([_block_mask(c) for c in content])
        inside = masked_block_correlation(means, masks, self._voxel_vectors, self._voxel_squares)
        per_volume = np.maximum(per_volume, inside.max(axis=0))
        best: dict[str, float] = {}
        for vol in np.argsort(-per_volume, kind="stable").tolist():
            pid = self._patient_of[vol]
            if pid not in best:
                best[pid] = float(per_volume[vol])
                if len(best) == n:
                    break
        return tuple(best)

    def _content_mask(self, view: View) -> np.ndarray:
        """``view``'s content mask (:meth:`View.content`) at full resolution.

        Made where :meth:`verify` makes it, so the two share it: on ``view`` at the default grid,
        on its :attr:`factor`-reduced view above it (each block's verdict given to its voxels;
        trailing voxels short of a block count as outside).
        """
        if self.factor == 1:
            return view.content().mask
        f = self.factor
        small = view.reduced(f).content().mask
        out = np.zeros(view.shape, dtype=bool)
        up = small.repeat(f, axis=0).repeat(f, axis=1).repeat(f, axis=2)
        out[: up.shape[0], : up.shape[1], : up.shape[2]] = up
        return out & view.mask

    def locate(self, image: np.ndarray, mask: np.ndarray, n: int = LOCATE_K) -> list[Located]:
        """The localisation channel: where each training volume fits best inside a larger candidate.

        Every stored training grid, reduced to :data:`VOXEL_FACTOR`-block means, is slid over
        the candidate's block means at every placement (masked NCC, one FFT product per grid:
        :meth:`View.align`), so where a training volume sits inside a larger field of view is
        found exhaustively, whatever the encoder makes of the windows there. Patient-level max
        over volumes.

        Args:
            image: float (X, Y, Z) the whole candidate, oriented, resampled and normalised, any
                shape (axes shorter than the grid are padded, the padding not real).
            mask: bool, same shape: True where the candidate holds voxels.
            n: patients returned.

        Returns:
            Up to ``n`` :class:`Located`, best first; their ``start`` places a grid-sized window
            inside ``image`` (0 on an axis shorter than the grid).

        """
        f = VOXEL_FACTOR
        grid = [int(g) for g in self.config.grid]
        shape = [int(s) for s in image.shape]
        reach = max(max(p) for p in LOCATE_PHASES)
        padded = tuple(max(s, g + reach) for s, g in zip(shape, grid, strict=True))
        data = np.zeros(padded, dtype=np.float32)
        real = np.zeros(padded, dtype=bool)
        inside = tuple(slice(0, s) for s in shape)
        data[inside], real[inside] = image, mask
        limits = [max(0, s - g) for s, g in zip(shape, grid, strict=True)]
        block_shape = tuple((p - reach) // f for p in padded)  # whole blocks at every phase
        per_row = np.full(len(self._grids), -2.0)
        starts = np.zeros((len(self._grids), 3), dtype=np.int64)
        for phase in LOCATE_PHASES:
            moved = tuple(slice(p, p + b * f) for p, b in zip(phase, block_shape, strict=True))
            view = View(*block_view(data[moved], real[moved], f), trim=False)
            for rows, spectra in self._located_spectra(block_shape):
                ncc, pos = view.align_many(spectra)
                better = ncc > per_row[rows]
                per_row[rows[better]] = ncc[better]
                starts[rows[better]] = np.asarray(phase) + pos[better] * f
        starts = np.minimum(starts, np.asarray(limits))
        best: dict[str, Located] = {}
        for row in np.argsort(-per_row, kind="stable").tolist():
            pid = self._patient_of[row]
            if pid not in best and per_row[row] > -2.0:
                best[pid] = Located(
                    pid, self._ordinals[row], tuple(int(x) for x in starts[row]), float(per_row[row])
                )  # type: ignore[arg-type]
                if len(best) == n:
                    break
        return list(best.values())

    def _located_spectra(self, block_shape: tuple[int, ...]) -> list[tuple[np.ndarray, TemplateSpectra]]:
        """The block templates grouped by mask, as spectra for views of ``block_shape``.

        Kept for the last shape seen when they fit in :data:`LOCATE_CACHE_BYTES` (a generate run's
        candidates share one shape), made again per candidate otherwise.
        """
        if self._spectra is not None and self._spectra[0] == block_shape:
            return self._spectra[1]
        groups: dict[bytes, list[int]] = {}
        blocks = self._block_templates()
        for row, (tmpl, tmask) in enumerate(blocks):
            if all(t <= b for t, b in zip(tmpl.shape, block_shape, strict=True)):
                groups.setdefault(np.packbits(tmask).tobytes() + repr(tmask.shape).encode(), []).append(row)
        out = []
        for rows in groups.values():
            for i in range(0, len(rows), LOCATE_BATCH):
                part = np.asarray(rows[i : i + LOCATE_BATCH])
                stack = np.stack([blocks[r][0] for r in part])
                out.append((part, template_spectra(stack, blocks[int(part[0])][1], block_shape)))
        size = sum(sp.xt.nbytes + sp.xt2.nbytes for _, sp in out)
        if size <= LOCATE_CACHE_BYTES:
            self._spectra = (block_shape, out)
        return out

    def _block_templates(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every stored grid at :data:`VOXEL_FACTOR`-block resolution with its mask (made once)."""
        if self._blocks is None:
            self._blocks = []
            for stored in self._grids:
                valid = np.isfinite(stored)
                self._blocks.append(
                    block_view(np.where(valid, stored, 0).astype(np.float32), valid, VOXEL_FACTOR)
                )
        return self._blocks

    def view(self, volume: Volume) -> View:
        """The candidate ``volume`` with :attr:`max_shift` voxels of its own context."""
        return View(*grid_with_mask(volume, self.config, self.max_shift))

    def template(self, patient_id: str, volume: int) -> tuple[np.ndarray, np.ndarray]:
        """A patient's stored training grid (float32, padding 0) and its validity mask.

        Raises:
            IntegrityError: the patient or its volume is not in this index.

        """
        vols = self._volumes.get(patient_id)
        if vols is None or not 0 <= volume < len(vols):
            raise IntegrityError(
                f"verification: patient {patient_id} volume {volume} is not in the index; "
                "the search and the verification disagree about the index; rebuild it"
            )
        stored = self._grids[vols[volume]]
        mask = np.isfinite(stored)
        return np.where(mask, stored, 0).astype(np.float32), mask

    def verify(self, neighbours: Neighbours, view: View) -> Neighbours:
        """``neighbours`` with the verified score of each of its patients filled in.

        Each patient's matched training grid is aligned as it is and under the pose that
        retrieved it; the better masked NCC is its verified score.

        Raises:
            IntegrityError: ``neighbours`` does not say which rows matched.

        """
        if not neighbours.matched:
            raise IntegrityError(
                "verification needs the matched index rows of every neighbour; the search returned none"
            )
        if self.factor > 1:
            view = view.reduced(self.factor)
        coarse = view.coarse()
        # the empty outside left out can only add evidence (see below); at half resolution too,
        # or a cut or shifted copy whose smeared fill drags its half-resolution NCC is never
        # chosen for refining (:data:`COARSE_CONTENT`)
        content = view.content()
        content_differs = not np.array_equal(content.mask, view.mask)
        half_content = content.coarse() if COARSE_CONTENT and content_differs else None
        scores: list[float] = []
        found: list[tuple[float, int, int, bool, tuple[float, float, float], Aligned]] = []
        # per patient: its grid at the aligned resolution (made only when needed, once per call)
        # and at half that (kept between candidates: _half_of)
        fulls: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        halves: list[tuple[np.ndarray, np.ndarray]] = []

        def full_of(i: int) -> tuple[np.ndarray, np.ndarray]:
            if i not in fulls:
                fulls[i] = self._aligned_template(neighbours.patient_ids[i], neighbours.matched[i][0])
            return fulls[i]

        for i, (pid, (volume, pose)) in enumerate(
            zip(neighbours.patient_ids, neighbours.matched, strict=True)
        ):
            if not 0 <= pose < len(self.poses):
                raise IntegrityError(
                    f"verification: pose {pose} of patient {pid} is not in the index's pose set; rebuild it"
                )
            p = self.poses.poses[pose]
            trials = [(False, (0.0, 0.0, 0.0))]
            if not p.on_grid_identity:
                trials.append((p.flip, p.rotate_deg))
            if not p.flip:
                trials.append((True, (0.0, 0.0, 0.0)))  # a mirrored copy the encoder did not tell apart
            halves.append(self._half_of(pid, volume, lambda i=i: full_of(i)))
            grid_c, mask_c = halves[-1]
            best: tuple[float, Aligned, bool, tuple[float, float, float]] | None = None
            for flip, angles in trials:
                tmpl, tmask, terms = self._trial_of(pid, volume, flip, angles, coarse, halves[-1])
                a = coarse.align(tmpl, tmask, terms=terms)
                ncc = a.ncc
                if half_content is not None:  # one shape: the template's spectra serve both
                    ncc = max(ncc, half_content.align(tmpl, tmask, terms=terms).ncc)
                if best is None or ncc > best[0]:
                    best = (ncc, a, flip, angles)  # the turn search starts on the view, where a is
            if best is None:  # trials is never empty
                raise IntegrityError("verification tried no alignment")
            scores.append(best[0])
            found.append((best[0], i, volume, best[2], best[3], best[1]))
        # the best REFINE_SCREEN by half-resolution NCC are turned there first, and the best
        # REFINE_PATIENTS of them after turning are refined (with the REFINE_NEAREST by cosine)
        turns: dict[int, tuple[float, float, float]] = {}

        def turn_of(t: tuple[float, int, int, bool, tuple[float, float, float], Aligned]) -> float:
            _, i, _, flip, angles, aligned = t
            turns[i], ncc = refine_rotation(coarse, *halves[i], flip, angles, aligned, half_content)
            return ncc

        screened = sorted(found, key=lambda t: -t[0])[: max(REFINE_SCREEN, REFINE_PATIENTS)]
        in_screen = {t[1] for t in screened}
        screened += [t for t in found[:SCREEN_NEAREST] if t[1] not in in_screen]  # cosine order
        if len(screened) > REFINE_PATIENTS:
            after = [turn_of(t) for t in screened]
            screened = [screened[j] for j in np.argsort(-np.asarray(after), kind="stable")]
        refine = screened[:REFINE_PATIENTS]
        chosen = {t[1] for t in refine}
        refine += [t for t in found[:REFINE_NEAREST] if t[1] not in chosen]  # found is in cosine order
        # the empty outside left out can only add evidence: a darkened copy whose dark tissue
        # would count as "outside" keeps the score of its whole grid (a candidate with no empty
        # outside has the same view twice: aligned once); so can the padding counted (WHOLE_GRID)
        whole = view.whole() if WHOLE_GRID else None
        identity = [-1.0] * len(scores)
        posed: dict[int, tuple[tuple[np.ndarray, np.ndarray], TemplateTerms]] = {}  # kept for the polish
        for _, i, _, flip, angles, aligned in refine:
            (grid, mask), (grid_c, mask_c) = full_of(i), halves[i]
            if i not in turns:
                turns[i] = refine_rotation(coarse, grid_c, mask_c, flip, angles, aligned)[0]
            turn = turns[i]
            turned = _turned(grid, mask, flip, turn)
            terms = view.template_terms(*turned)  # one set of spectra for all views
            posed[i] = (turned, terms)
            as_is = self._view_score(view, whole, *turned, bool(mask.all()), flip, turn, terms)
            scores[i] = as_is
            if content_differs:
                scores[i] = max(scores[i], content.align(*turned, terms=terms).ncc)
            # a refined turn of none is the grid as stored: its score is the identity score
            unturned = not flip and not any(turn)
            identity[i] = as_is if unturned else self._identity_score(view, whole, grid, mask)
        if POLISH_STEPS_DEG and refine:
            # the best refined patient's turn, searched once more at full resolution
            _, i, _, flip, _, _ = max(refine, key=lambda t: scores[t[1]])
            grid, mask = full_of(i)
            turned, terms = posed[i]
            on = content if content_differs else view
            start = on.align(*turned, terms=terms)
            _, polished = refine_rotation(on, grid, mask, flip, turns[i], start, None, POLISH_STEPS_DEG)
            scores[i] = max(scores[i], polished)
        return dataclasses.replace(
            neighbours,
            verified=np.asarray(scores, dtype=np.float64),  # every NCC above is in [-1, 1]
            identity=np.asarray(identity, dtype=np.float64),
        )

    @staticmethod
    def _identity_score(view: View, whole: View | None, grid: np.ndarray, mask: np.ndarray) -> float:
        """The identity score of one training grid: aligned as stored, no turn, no mirror.

        The best masked NCC over :attr:`max_shift` integer shifts on the candidate's view and, with
        :data:`WHOLE_GRID`, on its whole view (padding counted). The search on top of it (turns,
        mirror, content view) is what lets a turned or cut copy be found, and it lifts a sample
        the reference calls similar by more than a duplicate (+0.018 against +0.007 on the real-LDM
        benchmark, docs/ldm_copies.md); this score keeps the gap, so policies grade duplicate
        against similar on it (``identity`` in a policy).

        Args:
            view: the candidate's view at the aligned resolution.
            whole: its whole view, or None.
            grid: float32 (X, Y, Z) the training grid at that resolution, padding 0.
            mask: bool, same shape, its validity mask.

        """
        return Verifier._view_score(
            view, whole, grid, mask, bool(mask.all()), False, (0.0, 0.0, 0.0), view.template_terms(grid, mask)
        )

    @staticmethod
    def _view_score(
        view: View,
        whole: View | None,
        grid: np.ndarray,
        mask: np.ndarray,
        full: bool,
        flip: bool,
        turn: Sequence[float],
        terms: TemplateTerms,
    ) -> float:
        """A posed training grid's masked NCC on the view and, with :data:`WHOLE_GRID`, the whole view.

        Args:
            view: the candidate's view at the aligned resolution.
            whole: its whole view, or None.
            grid: float32 (X, Y, Z) the training grid mirrored by ``flip`` and turned by ``turn``.
            mask: bool, same shape, its validity mask posed the same way.
            full: whether the unposed mask was all True (``mask`` is then the full mask posed, and
                its spectra in ``terms`` serve the whole view too).
            flip: the pose's mirror.
            turn: the pose's angles, degrees.
            terms: ``view.template_terms(grid, mask)``.

        Returns:
            The higher of the two NCCs.

        """
        score = view.align(grid, mask, terms=terms).ncc
        if whole is not None and not (whole is view and full):
            if full:
                score = max(score, whole.align(grid, mask, terms=terms).ncc)
            else:
                score = max(score, whole.align(grid, _turned_full_mask(mask.shape, flip, turn)).ncc)
        return float(score)

    def _half_of(
        self, patient_id: str, volume: int, full: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """:func:`_half_template` of a patient's aligned template (``full()``), kept between candidates.

        A training grid's half-resolution template does not depend on the candidate; made per
        candidate it was ~15% of verification (cProfile of 20 candidates, 2026-12-03). Kept while
        the kept ones fit in :data:`TEMPLATE_CACHE_BYTES`, made afresh beyond.
        """
        key = (patient_id, volume)
        if key in self._halves:
            return self._halves[key]
        half = _half_template(*full())
        for a in half:
            a.setflags(write=False)  # shared between candidates: nothing may write into it
        if self._keeps(half[0].nbytes + half[1].nbytes):
            self._halves[key] = half
        return half

    def _trial_of(
        self,
        patient_id: str,
        volume: int,
        flip: bool,
        angles: tuple[float, float, float],
        coarse: View,
        half: tuple[np.ndarray, np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray, TemplateTerms]:
        """A half-resolution template under one trial pose, with its spectra for ``coarse``'s shape.

        Neither depends on the candidate, only on its view shape (one per run): made per
        candidate, turning and transforming them was ~0.2 ms of each ~0.4 ms trial alignment
        (runs of bench/verify_cost.py, 2026-12-03). Kept like :meth:`_half_of`.

        Args:
            patient_id: the patient.
            volume: its volume number.
            flip: mirror the template (axis X).
            angles: turn, degrees about X, Y, Z.
            coarse: the candidate's half-resolution view.
            half: the patient's half-resolution template and mask (:meth:`_half_of`).

        Returns:
            The turned template (float32), its mask and their :class:`TemplateTerms`.

        """
        key = (patient_id, volume, flip, tuple(float(a) for a in angles), coarse.shape)
        if key in self._trials:
            return self._trials[key]
        tmpl, tmask = _turned(*half, flip, angles)
        terms = coarse.template_terms(tmpl, tmask)
        for a in (tmpl, tmask, terms.xt, terms.xt2):
            a.setflags(write=False)
        if self._keeps(tmpl.nbytes + tmask.nbytes + 3 * terms.xt.nbytes):  # xt, xt2, the mask's
            self._trials[key] = (tmpl, tmask, terms)
        return tmpl, tmask, terms

    def _keeps(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in :data:`TEMPLATE_CACHE_BYTES` (counted as kept if so)."""
        with self._kept_lock:
            if self._kept_bytes + size > TEMPLATE_CACHE_BYTES:
                return False
            self._kept_bytes += size
            return True

    def _aligned_template(self, patient_id: str, volume: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`template` at the resolution verification aligns (:attr:`factor`)."""
        grid, mask = self.template(patient_id, volume)
        return block_view(grid, mask, self.factor) if self.factor > 1 else (grid, mask)


def _half_template(grid: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An image and its mask at half resolution (2x2x2 means; real where at least half of a block is)."""
    return _half(grid * mask), _half(mask.astype(np.float32)) >= 0.5


def volume_ordinals(patient_ids: Sequence[str]) -> list[int]:
    """Per volume (index row order), its number among its patient's volumes (0, 1, ...)."""
    seen: dict[str, int] = {}
    out = []
    for pid in patient_ids:
        out.append(seen.get(pid, 0))
        seen[pid] = out[-1] + 1
    return out


def exact_neighbours(
    query: np.ndarray,
    vectors: np.ndarray,
    row_patient_ids: Sequence[str],
    n_poses: int,
    ordinals: Sequence[int],
    k: int,
    exclude: str | None = None,
    include: Sequence[str] = (),
) -> Neighbours:
    """The top-``k`` patients of one query by exact cosine, with the rows that matched.

    What :meth:`gate.index.TrainingIndex.search_many` answers, computed exactly over all rows
    (for build-time calibration, where the graph is not built yet).

    Args:
        query: float32 (D,) unit embedding.
        vectors: float32 (N, D) index rows, volume-major with ``n_poses`` rows per volume.
        row_patient_ids: (N,) patient id per row.
        n_poses: rows per volume.
        ordinals: per volume, its number among its patient's volumes.
        k: patients returned.
        exclude: a patient left out (leave-one-patient-out).
        include: patients answered after the ``k`` whatever their rank (not ``exclude``).

    """
    sims = vectors @ query
    best: dict[str, tuple[float, int]] = {}
    wanted = set(include) - {exclude}
    for row in np.argsort(-sims).tolist():
        pid = row_patient_ids[row]
        if pid == exclude or pid in best:
            continue
        if len(best) < k or pid in wanted:
            best[pid] = (float(sims[row]), row)
        if len(best) >= k and wanted <= best.keys():
            break
    ranked = sorted(best.items(), key=lambda kv: kv[1][0], reverse=True)
    return Neighbours(
        patient_ids=tuple(pid for pid, _ in ranked),
        similarities=np.asarray([min(max(s, -1.0), 1.0) for _, (s, _) in ranked], dtype=np.float64),
        matched=tuple((ordinals[r // n_poses], r % n_poses) for _, (_, r) in ranked),
    )


QUERY_SHIFTS_VOX: tuple[tuple[int, int, int], ...] = tuple(
    tuple(4 * sign if a == axis else 0 for a in range(3))  # type: ignore[misc]
    for axis in range(3)
    for sign in (-1, 1)
) + tuple((3 * sx, 3 * sy, 3 * sz) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1))
"""Extra views of a candidate searched beside the identity (the grid window moved over the
candidate's own margin of context): 4 voxels along each axis, 3 along each body diagonal.
With the 8 compact index poses (no shifts), 16 of 522 simulated copies of the shipped index
(mostly field-of-view shifts of 4-6 voxels) had their source outside the top 5; the 6 axis views
brought back 3 of them, all 14 brought back 12 (runs/verify, docs/encoder.md). They cost 14
embeddings and searches per candidate instead of 78 more index rows per training volume."""

_SEARCH_SHIFTS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), *QUERY_SHIFTS_VOX)
"""The windows searched per candidate (:func:`search_windows`, :func:`mask_windows`): its own, then
the shifted ones."""

Search = Callable[[list[np.ndarray], int, Sequence[Sequence[str]]], list[Neighbours]]
"""Embed and search preprocessed grid-sized views (float32, shape ``config.grid``), in order, for
the given number of patients each, plus per view the named patients with their exact cosine
(``include`` of :meth:`gate.index.TrainingIndex.search_many`)."""


def window(view: View, grid: Sequence[int], shift: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """The grid-sized window of ``view`` moved by ``shift`` from its centre (outside the mask: 0).

    ``shift`` (0, 0, 0) is the candidate's own grid.
    """
    sl = _window_slice(view.shape, grid, shift)
    return np.ascontiguousarray(np.where(view.mask[sl], view.image[sl], 0.0), dtype=np.float32)


def _window_slice(shape: Sequence[int], grid: Sequence[int], shift: Sequence[int]) -> tuple[slice, ...]:
    """Where :func:`window` cuts a grid-sized window moved by ``shift`` out of a view of ``shape``."""
    margin = [(int(v) - int(g)) // 2 for v, g in zip(shape, grid, strict=True)]
    return tuple(slice(m + s, m + s + int(g)) for m, s, g in zip(margin, shift, grid, strict=True))


def mask_windows(mask: np.ndarray, grid: Sequence[int]) -> list[np.ndarray]:
    """A view-shaped bool ``mask`` cut as :func:`search_windows` cuts the view, in the same order."""
    return [mask[_window_slice(mask.shape, grid, s)] for s in _SEARCH_SHIFTS]


def query_views(view: View, grid: Sequence[int]) -> list[np.ndarray]:
    """The candidate's grid windows moved by :data:`QUERY_SHIFTS_VOX` within its view's margin."""
    return [window(view, grid, shift) for shift in QUERY_SHIFTS_VOX]


def search_windows(view: View, grid: Sequence[int]) -> list[np.ndarray]:
    """The candidate's own grid window followed by its :func:`query_views`: what is searched."""
    return [window(view, grid, s) for s in _SEARCH_SHIFTS]


VERIFY_WORKERS_MAX = 4
"""At most this many threads verify a batch's candidates (:func:`verify_workers`). Each candidate's
verification is independent and its result does not depend on the thread (asserted bit-equal in
tests/test_verify.py); the FFTs and compiled turn kernels release the GIL, the Python between them
does not, so on 2 cores 2 threads verified 16 candidates in 0.82x the time of one, and 6 in 0.73x
(2026-12-07; the whole generate run in docs/benchmarks.md)."""


def verify_workers() -> int:
    """Threads that verify a batch: the CPUs this process may run on, at most :data:`VERIFY_WORKERS_MAX`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, VERIFY_WORKERS_MAX))


def retrieve_and_verify(
    verifier: Verifier | None,
    neighbours: Sequence[Neighbours],
    views: Sequence[View],
    search: Search,
    k: int,
    workers: int | None = None,
) -> list[Neighbours]:
    """Retrieve each candidate's :data:`VERIFY_K` nearest patients over its views, verify them.

    The candidate's grid (the view's centre) and its shifted views (:data:`QUERY_SHIFTS_VOX`)
    are searched for :data:`VERIFY_K` patients each and merged (patient-level max) with
    ``neighbours``; the voxel channel's :data:`VOXEL_K` patients
    (:meth:`Verifier.voxel_patients`) are added with their exact cosine; every merged patient
    is verified.

    Args:
        verifier: the index's verifier; None returns ``neighbours`` unchanged.
        neighbours: each candidate's neighbours as searched (their exact-duplicate flag is kept).
        views: each candidate's view (:meth:`Verifier.view`).
        search: embeds and searches grids (the index's encoder and search).
        k: patients reported (a policy's ``k``).
        workers: threads verifying the candidates (None: :func:`verify_workers`); the results
            are the same for any number.

    Returns:
        Per candidate its ``k`` nearest patients by cosine, plus the patient with the highest
        verified score when that one is not among them, each with its verified score.

    """
    if verifier is None:
        return list(neighbours)
    if len(neighbours) != len(views):
        raise IntegrityError(f"{len(neighbours)} search results for {len(views)} verification views")
    grid = verifier.config.grid
    depth = max(k, VERIFY_K)
    n = len(QUERY_SHIFTS_VOX) + 1
    voxel: list[tuple[str, ...]] = []
    found: list[Neighbours] = []
    step = query_batch(grid)
    for start in range(0, len(views), step):  # windows cut once per batch, for both channels
        part = views[start : start + step]
        cut = [search_windows(v, grid) for v in part]
        channel = [verifier.voxel_patients(v, windows=w) for v, w in zip(part, cut, strict=True)]
        voxel.extend(channel)
        found.extend(search([g for w in cut for g in w], depth, [p for p in channel for _ in range(n)]))
    merged = [
        merge_neighbours([nb, *found[i * n : (i + 1) * n]], depth, voxel[i])
        for i, nb in enumerate(neighbours)
    ]
    threads = min(len(views), verify_workers() if workers is None else workers)
    if threads <= 1:
        return [reported(verifier.verify(m, view), k) for m, view in zip(merged, views, strict=True)]
    with ThreadPoolExecutor(threads) as pool:  # map keeps order; an error in any one is raised here
        return [reported(nb, k) for nb in pool.map(verifier.verify, merged, views)]


def reported(nb: Neighbours, k: int) -> Neighbours:
    """The ``k`` nearest by cosine, then the best verified and the best identity patient if not among them."""
    keep = list(range(min(k, len(nb.patient_ids))))
    for scores in (nb.verified, nb.identity):
        if scores is not None:
            best = int(np.argmax(scores))
            if best not in keep:
                keep.append(best)
    keep.sort()  # cosine order: the two added patients lie past the k nearest, in either order
    return Neighbours(
        patient_ids=tuple(nb.patient_ids[i] for i in keep),
        similarities=nb.similarities[keep],
        exact_duplicate=nb.exact_duplicate,
        matched=tuple(nb.matched[i] for i in keep) if nb.matched else (),
        verified=None if nb.verified is None else nb.verified[keep],
        identity=None if nb.identity is None else nb.identity[keep],
    )


QUERY_BATCH = 16
"""Candidates whose shifted views are embedded together (16 x 14 x 32x48x32 float32 = 44 MB);
fewer on a larger grid (:func:`query_batch`)."""


def query_batch(grid: Sequence[int]) -> int:
    """Candidates per batch of :func:`retrieve_and_verify` on ``grid``.

    The windows of :data:`QUERY_BATCH` candidates at 32x48x32 in voxels, at least one candidate
    (a 128x128x80 grid: one, its 15 windows 79 MB).
    """
    return max(1, QUERY_BATCH * DEFAULT_GRID_VOXELS // grid_voxels(grid))


def verify_all(
    verifier: Verifier | None,
    neighbours: Sequence[Neighbours],
    volumes: Sequence[Volume],
    search: Search,
    k: int,
) -> list[Neighbours]:
    """:func:`retrieve_and_verify` for candidates as read (their views made here)."""
    if verifier is None:
        return list(neighbours)
    return retrieve_and_verify(verifier, neighbours, [verifier.view(v) for v in volumes], search, k)


def grid_search(encoder: EmbeddingModel, searcher: Any) -> Search:
    """A :data:`Search` over ``searcher.search_many`` with ``encoder``'s embeddings."""
    from gate.index import embed_grids

    def run(grids: list[np.ndarray], k: int, include: Sequence[Sequence[str]]) -> list[Neighbours]:
        if not grids:
            return []
        probes = embed_grids(grids, encoder, ["view"] * len(grids))
        return searcher.search_many([p.embedding for p in probes], [None] * len(probes), k, include)

    return run


def exact_grid_search(
    embed: Callable[[np.ndarray], np.ndarray],
    vectors: np.ndarray,
    row_patient_ids: Sequence[str],
    n_poses: int,
    ordinals: Sequence[int],
    exclude: str | None = None,
) -> Search:
    """A :data:`Search` by exact cosine over index rows (:func:`exact_neighbours`), for build time."""

    def run(grids: list[np.ndarray], k: int, include: Sequence[Sequence[str]]) -> list[Neighbours]:
        if not grids:
            return []
        emb = embed(np.stack(grids)[:, None].astype(np.float32))
        return [
            exact_neighbours(e, vectors, row_patient_ids, n_poses, ordinals, k, exclude, inc)
            for e, inc in zip(emb, include, strict=True)
        ]

    return run


CALIBRATION_MAX_QUERIES = 2000
"""Reference volumes verified at build time at most (seeded sample beyond): each costs ~60 ms,
so the verified calibration of a 100k-patient index stays near two minutes."""


@dataclass(frozen=True)
class VerifySetup:
    """What :func:`gate.index.build_index` writes for a verifying index.

    Attributes:
        grids: float16 (volumes, X, Y, Z), NaN = padding (:func:`stored_grid`).
        max_shift: shifts searched per axis, voxels.
        calibration: reference patients' verified scores.
        cosine_calibration: the same patients' nearest cosine as a verifying index answers it
            (the patient-level maximum over the identity and the shifted query views,
            :data:`QUERY_SHIFTS_VOX`): the index's cosine calibration, so that percentile
            thresholds see the scores `gate check` will compute.
        copies: simulated copies' verified scores.
        copies_cosine: simulated copies' nearest cosine similarities.
        identity: the reference patients' identity scores (:meth:`Verifier._identity_score`, the
            highest over the refined patients).
        copies_identity: the simulated copies' identity scores.
        novel_pairs: float64 (n, 3) per reference query, (nearest cosine, verified score,
            identity score): what ``gate index build`` reports each policy's pass rate on (not
            stored).
        copy_pairs: float64 (m, 3) the same per simulated copy (not stored).

    """

    grids: np.ndarray
    max_shift: int
    calibration: Calibration
    cosine_calibration: Calibration
    copies: Calibration
    copies_cosine: Calibration
    identity: Calibration
    copies_identity: Calibration
    novel_pairs: np.ndarray
    copy_pairs: np.ndarray

    def record(self, grids_sha256: str) -> Verification:
        """The manifest's :class:`~gate.index_manifest.Verification` of this setup: its one definition.

        Args:
            grids_sha256: sha256 of the stored ``grids.npy``.

        """
        from gate.index_manifest import Verification

        return Verification(
            max_shift_vox=self.max_shift,
            grids_sha256=grids_sha256,
            calibration=self.calibration,
            copies=self.copies,
            copies_cosine=self.copies_cosine,
            identity=self.identity,
            copies_identity=self.copies_identity,
        )


def _calibration(method: CalibrationMethod, values: Sequence[float]) -> Calibration:
    arr = np.sort(np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0))
    return Calibration(method=method, n_patients=len(arr), similarities=tuple(float(v) for v in arr))


def prepare_verification(
    volumes: Sequence[Volume],
    vectors: np.ndarray,
    poses: PoseSet,
    config: PreprocessConfig,
    embed: Callable[[np.ndarray], np.ndarray],
    seed: int,
    held: Sequence[Volume] = (),
    held_vectors: np.ndarray | None = None,
    max_shift: int = MAX_SHIFT_VOX,
    k: int = VERIFY_K,
) -> VerifySetup:
    """Store the training grids and calibrate the verified score, on real and on simulated copies.

    Args:
        volumes: the training volumes, index row order.
        vectors: float32 (volumes x poses, D) their index rows, volume-major.
        poses: the index's poses.
        config: the index's preprocessing.
        embed: the encoder: (N, 1, X, Y, Z) float32 -> (N, D) unit rows.
        seed: the build seed (samples and simulated copies).
        held: holdout volumes (calibrate on them), or none (leave one patient out).
        held_vectors: float32 (len(held), D) their identity-pose embeddings.
        max_shift: shifts searched per axis, voxels.
        k: patients verified per query.

    Returns:
        The grids to store and the three distributions.

    """
    from gate.copies import simulated_copies

    n_poses = len(poses)
    pids = [v.patient_id for v in volumes]
    row_pids = [p for p in pids for _ in range(n_poses)]
    ordinals = volume_ordinals(pids)
    views = [grid_with_mask(v, config, max_shift) for v in volumes]
    inner = (slice(max_shift, -max_shift),) * 3 if max_shift else (slice(None),) * 3
    grids = np.stack([stored_grid(img[inner], mask[inner]) for img, mask in views])
    verifier = Verifier(list(grids), pids, poses, config, max_shift)
    rng = np.random.default_rng(seed)

    def best(query: np.ndarray, view: View, exclude: str | None) -> tuple[float, float, float]:
        """What `gate check` would answer: (verified, cosine, identity), the views searched, then verified."""
        nb = exact_neighbours(query, vectors, row_pids, n_poses, ordinals, k, exclude)
        search = exact_grid_search(embed, vectors, row_pids, n_poses, ordinals, exclude)
        (out,) = retrieve_and_verify(verifier, [nb], [view], search, k)
        v, idn = out.nearest_verified, out.nearest_identity
        if v is None or idn is None:
            raise IntegrityError("calibration: verification returned no score")
        return v, out.nearest_similarity, idn

    per_patient: dict[str, float] = {}
    per_patient_cos: dict[str, float] = {}
    per_patient_id: dict[str, float] = {}
    novel_pairs: list[tuple[float, float, float]] = []
    if held:
        if held_vectors is None or len(held_vectors) != len(held):
            raise ValueError("holdout calibration needs one embedding per holdout volume")
        order = np.arange(len(held))
        if len(order) > CALIBRATION_MAX_QUERIES:
            order = np.sort(rng.choice(len(order), CALIBRATION_MAX_QUERIES, replace=False))
        for i in order.tolist():
            score, cos, idn = best(held_vectors[i], verifier.view(held[i]), None)
            novel_pairs.append((cos, score, idn))
            pid = held[i].patient_id
            per_patient[pid] = max(per_patient.get(pid, -1.0), score)
            per_patient_cos[pid] = max(per_patient_cos.get(pid, -1.0), cos)
            per_patient_id[pid] = max(per_patient_id.get(pid, -1.0), idn)
        method = CalibrationMethod.HOLDOUT
    else:
        order = np.arange(len(volumes))
        if len(order) > CALIBRATION_MAX_QUERIES:
            order = np.sort(rng.choice(len(order), CALIBRATION_MAX_QUERIES, replace=False))
        for i in order.tolist():
            score, cos, idn = best(vectors[i * n_poses], View(*views[i]), pids[i])
            novel_pairs.append((cos, score, idn))
            per_patient[pids[i]] = max(per_patient.get(pids[i], -1.0), score)
            per_patient_cos[pids[i]] = max(per_patient_cos.get(pids[i], -1.0), cos)
            per_patient_id[pids[i]] = max(per_patient_id.get(pids[i], -1.0), idn)
        method = CalibrationMethod.LEAVE_ONE_PATIENT_OUT
    sample = np.arange(len(volumes))
    if len(sample) > CALIBRATION_MAX_QUERIES:
        sample = np.sort(rng.choice(len(sample), CALIBRATION_MAX_QUERIES, replace=False))
    copies = simulated_copies([views[i] for i in sample.tolist()], seed)
    centres = np.stack([c.centre(max_shift) for c in copies])[:, None]
    copy_vectors = np.concatenate(
        [embed(np.ascontiguousarray(centres[i : i + 64])) for i in range(0, len(centres), 64)]
    )
    copy_verified, copy_cosine, copy_identity = [], [], []
    for c, q in zip(copies, copy_vectors, strict=True):
        score, cos, idn = best(q.astype(np.float32), View(c.image, c.mask), None)
        copy_verified.append(score)
        copy_cosine.append(cos)
        copy_identity.append(idn)
    return VerifySetup(
        grids=grids,
        max_shift=max_shift,
        calibration=_calibration(method, list(per_patient.values())),
        cosine_calibration=_calibration(method, list(per_patient_cos.values())),
        copies=_calibration(CalibrationMethod.SIMULATED_COPIES, copy_verified),
        copies_cosine=_calibration(CalibrationMethod.SIMULATED_COPIES, copy_cosine),
        identity=_calibration(method, list(per_patient_id.values())),
        copies_identity=_calibration(CalibrationMethod.SIMULATED_COPIES, copy_identity),
        novel_pairs=np.asarray(novel_pairs, dtype=np.float64).reshape(-1, 3),
        copy_pairs=np.stack([copy_cosine, copy_verified, copy_identity], axis=1).astype(np.float64),
    )
