"""Retrieve, then verify (gate.verify) and simulated copies (gate.copies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from gate import copies as cp
from gate import verify
from gate.calibration import Calibration, CalibrationMethod
from gate.decide import decide, pass_rate
from gate.errors import IntegrityError, PolicyError
from gate.index_manifest import Verification
from gate.policy import LoadedPolicy, load_policy, policy_path
from gate.poses import COMPACT_POSES, IDENTITY_ONLY, Pose, apply_pose
from gate.preprocess import PreprocessConfig
from gate.values import Grade, Neighbours, Verdict, Volume, merge_neighbours
from gate.volume import ReadOptions, discover, read_volumes

CFG = PreprocessConfig()
S = verify.MAX_SHIFT_VOX


def _smooth(seed: int, shape: tuple[int, int, int] = (32, 48, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.random(shape), 2.0)
    x = (x - x.min()) / (x.max() - x.min())
    return x.astype(np.float32)


def _vol(data: np.ndarray, pid: str = "p-0000000000000001") -> Volume:
    return Volume(data, np.eye(4), (1.0, 1.0, 1.0), "mem", pid)


@pytest.fixture
def hippo(hippocampus_dir: Path, read_opts: ReadOptions) -> list[Volume]:
    return [read_volumes(p, read_opts)[0] for p in discover([hippocampus_dir])[:6]]


def test_align_finds_the_shift_of_a_copy_cut_short() -> None:
    data = _smooth(0, (36, 52, 36))
    grid, mask = verify.grid_with_mask(_vol(data), CFG, 0)
    cut = _vol(np.ascontiguousarray(data[5:]))
    view = verify.View(*verify.grid_with_mask(cut, CFG, S))
    a = view.align(grid, mask)
    assert a.ncc > 0.999
    assert a.shift[1:] == (0, 0) and a.shift[0] != 0
    other = verify.grid_with_mask(_vol(_smooth(1, (36, 52, 36))), CFG, 0)
    assert view.align(*other).ncc < 0.5


def test_align_ignores_padding_on_both_sides() -> None:
    """A copy smaller than the grid (zero-padded) matches its source exactly, not by its padding."""
    small = _smooth(2, (26, 40, 30))
    grid, mask = verify.grid_with_mask(_vol(small), CFG, 0)
    assert not mask.all()
    view = verify.View(*verify.grid_with_mask(_vol(small), CFG, S))
    assert view.align(grid, mask).ncc > 0.999


def test_trim_empty_planes_drops_zero_slabs_only() -> None:
    x = _smooth(3)
    x[:4] = 0.0
    x[:, -3:] = 0.0
    x[10, 10, 10] = 0.0  # an interior zero is anatomy (or background), not padding
    keep = verify.trim_empty_planes(x, np.ones(x.shape, bool))
    assert not keep[:4].any() and not keep[:, -3:].any()
    assert keep[4:, :-3].all()


def test_content_mask_leaves_out_the_smeared_outside_but_keeps_enclosed_dark_voxels() -> None:
    x = 0.3 + 0.7 * _smooth(4)
    x[:3] = 0.0  # a cut field of view, zero-filled, then blurred as a generator might
    x[12:15, 20:23, 12:15] = 0.0  # dark anatomy inside the grid
    x = ndimage.gaussian_filter(x, 1.0).astype(np.float32)
    x[12:15, 20:23, 12:15] = 0.0
    img, mask = np.pad(x, S), np.pad(np.ones(x.shape, bool), S)
    keep = verify.content_mask(img, mask)
    inner = keep[S:-S, S:-S, S:-S]
    assert not inner[:2].any()  # the smeared fill and the margin next to it
    assert inner[12:15, 20:23, 12:15].all()  # enclosed: not the outside
    assert not inner[:, 0].any() and not inner[:, -1].any()  # the edge next to the invalid margin
    assert inner[5:-1, 1:-1, 1:-1].all()
    assert verify.trim_empty_planes(x, np.ones(x.shape, bool))[:2].all()  # trimming alone keeps it
    blank = np.zeros((8, 8, 8), np.float32)
    assert verify.content_mask(blank, np.ones(blank.shape, bool)).all()  # nothing left: the mask as given


def test_a_cut_and_blurred_copy_verifies_as_its_source(hippo: list[Volume]) -> None:
    """The composite family's worst case (crop shift, then blur): the fill's smeared edge is left out."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    inner = (slice(S, -S),) * 3
    for k, v in enumerate(hippo):
        cut = Volume(np.ascontiguousarray(v.data[4:, :-4, 4:]), v.affine, v.spacing, v.source, v.patient_id)
        copy = ndimage.gaussian_filter(verify.grid_with_mask(cut, CFG, S)[0][inner], 1.0)
        nb = Neighbours(
            patient_ids=tuple(pids),
            similarities=np.linspace(0.9, 0.8, len(pids)),
            matched=tuple((0, 0) for _ in pids),
        )
        out = verifier.verify(nb, verify.View(np.pad(copy, S), np.pad(np.ones(copy.shape, bool), S)))
        assert out.verified is not None
        # measured 0.908-0.948 (0.742-0.948 before the content view), strangers <= 0.859
        assert out.verified[k] > 0.88, k
        assert out.verified[k] > np.delete(out.verified, k).max() + 0.05, k


def test_whole_grids_score_a_copy_that_reproduces_its_sources_padding(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of a scan the grid pads (zeros where the scan ends) is scored over the padding too.

    As memorizing LDMs copy hippocampus_243 (docs/ldm_copies.md): the anatomy smeared, the zeros
    of the padding reproduced; over the scan's voxels alone such a copy correlated less with its
    source than the closest real pair did.
    """
    v = hippo[0]
    short = Volume(np.ascontiguousarray(v.data[:, :, :22]), v.affine, v.spacing, v.source, v.patient_id)
    grid, mask = verify.grid_with_mask(short, CFG, 0)
    assert not mask.all()  # the preprocessing padded it
    stored = verify.stored_grid(grid, mask)
    rng = np.random.default_rng(0)
    copy = ndimage.gaussian_filter(grid, 1.5) + rng.normal(0.0, 0.08, grid.shape).astype(np.float32)
    copy = np.where(mask, np.clip(copy, 0.0, 1.0), 0.0).astype(np.float32)  # the padding reproduced
    verifier = verify.Verifier([stored], ["p-0000000000000001"], COMPACT_POSES, CFG, S)
    nb = Neighbours(("p-0000000000000001",), np.array([0.9]), matched=((0, 0),))
    view = verify.View(np.pad(copy, S), np.pad(np.ones(copy.shape, bool), S))
    assert view.whole() is not view  # the copy's planes of zeros were trimmed from its mask
    with_whole = verifier.verify(nb, view).verified
    monkeypatch.setattr(verify, "WHOLE_GRID", False)
    without = verifier.verify(nb, view).verified
    assert with_whole is not None and without is not None
    whole_ncc = float(np.corrcoef(copy.ravel(), np.nan_to_num(stored.astype(np.float32)).ravel())[0, 1])
    assert with_whole[0] >= whole_ncc - 1e-6  # at least the whole grids' NCC at shift 0
    assert with_whole[0] > without[0] + 0.02, (with_whole, without)  # measured 0.918 against 0.805


def test_whole_grids_change_nothing_when_neither_side_is_padded(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full training grids against a candidate without planes of zeros: the same score either way."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    full = [i for i, g in enumerate(grids) if np.isfinite(g).all()]
    assert full
    pids = [f"p-{i:016x}" for i in full]
    verifier = verify.Verifier([grids[i] for i in full], pids, COMPACT_POSES, CFG, S)
    nb = Neighbours(tuple(pids), np.linspace(0.9, 0.8, len(pids)), matched=tuple((0, 0) for _ in pids))
    copy = _blurred_copy(hippo[full[0]])
    assert copy.whole() is copy
    a = verifier.verify(nb, copy).verified
    monkeypatch.setattr(verify, "WHOLE_GRID", False)
    b = verifier.verify(nb, copy).verified
    assert a is not None and b is not None and (a == b).all()


def test_a_view_is_freed_as_soon_as_it_is_dropped() -> None:
    """No reference cycle keeps a candidate's spectra alive (a generate run held 5.3 GB so)."""
    import gc
    import weakref

    img = np.pad(_smooth(5), S)
    for zeros in (False, True):
        if zeros:
            img[S : S + 3] = 0.0  # planes of zeros: whole() is another view
        view = verify.View(img, np.pad(np.ones((32, 48, 32), bool), S))
        assert (view.whole() is view) is not zeros
        view.content()
        ref = weakref.ref(view)
        gc.disable()
        try:
            del view
            assert ref() is None
        finally:
            gc.enable()


def test_the_content_view_only_adds_evidence(hippo: list[Volume], monkeypatch: pytest.MonkeyPatch) -> None:
    """A darkened copy loses a third or more of its grid to the "empty outside"; no score drops."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    nb = Neighbours(
        patient_ids=tuple(pids),
        similarities=np.linspace(0.9, 0.8, len(pids)),
        matched=tuple((0, 0) for _ in pids),
    )
    views = []
    for v in hippo:
        img, mask = verify.grid_with_mask(v, CFG, S)
        views.append((np.ascontiguousarray(img**2.5, dtype=np.float32), mask))
    kept = [verify.View(*v).content().mask.sum() / verify.View(*v).mask.sum() for v in views]
    assert max(kept) < 0.7  # measured 0.50-0.64
    with_content = [verifier.verify(nb, verify.View(*v)).verified for v in views]
    monkeypatch.setattr(verify.View, "content", lambda self: self)
    whole = [verifier.verify(nb, verify.View(*v)).verified for v in views]
    for k, (a, b) in enumerate(zip(with_content, whole, strict=True)):
        assert a is not None and b is not None
        assert (a >= b - 1e-12).all(), k
        assert a[k] > 0.95 and a[k] > np.delete(a, k).max() + 0.1, k
    # at half resolution too (COARSE_CONTENT): patients left unrefined score their content NCC
    assert sum(int((a > b + 1e-6).sum()) for a, b in zip(with_content, whole, strict=True)) > len(views)


def test_verify_scores_a_turned_blurred_copy_above_other_patients(hippo: list[Volume]) -> None:
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    img, mask = verify.grid_with_mask(hippo[0], CFG, S)
    turned = apply_pose(img, Pose(rotate_deg=(6.0, -5.0, 4.0), translate_vox=(2.0, -3.0, 1.0)))
    copy = ndimage.gaussian_filter(turned, 1.0)
    nb = Neighbours(
        patient_ids=tuple(pids[:5]),
        similarities=np.linspace(0.9, 0.8, 5),
        matched=tuple((0, 0) for _ in range(5)),
    )
    out = verifier.verify(nb, verify.View(copy, mask))
    assert out.verified is not None
    assert out.verified[0] > 0.9
    assert out.verified[0] > out.verified[1:].max() + 0.1
    assert out.nearest_verified == out.verified[0] and out.verified_patient_id == pids[0]


def test_kept_half_templates_change_no_score(hippo: list[Volume], monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates kept between candidates (half resolution, trial poses) give afresh ones' scores."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    nb = Neighbours(tuple(pids), np.linspace(0.9, 0.8, len(pids)), matched=tuple((0, 2) for _ in pids))
    copies = [_blurred_copy(v) for v in hippo[:3]]
    kept = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    first = [kept.verify(nb, c).verified for c in copies]
    again = [kept.verify(nb, c).verified for c in copies]
    assert len(kept._halves) == len(pids)
    pose = COMPACT_POSES.poses[2]
    assert len(kept._trials) == len(pids) * (2 + (not pose.on_grid_identity) - pose.flip)
    monkeypatch.setattr(verify, "TEMPLATE_CACHE_BYTES", 0)
    fresh = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    afresh = [fresh.verify(nb, c).verified for c in copies]
    assert not fresh._halves and not fresh._trials
    for a, b, c in zip(first, again, afresh, strict=True):
        assert a is not None and b is not None and c is not None
        assert (a == b).all() and (a == c).all()


def test_verify_refuses_neighbours_without_matched_rows() -> None:
    verifier = verify.Verifier([], [], IDENTITY_ONLY, CFG, S)
    nb = Neighbours(patient_ids=("p-0000000000000001",), similarities=np.asarray([0.9]))
    view = verify.View(np.zeros((48, 64, 48), np.float32), np.ones((48, 64, 48), bool))
    with pytest.raises(IntegrityError, match="matched index rows"):
        verifier.verify(nb, view)


def test_verify_refuses_a_patient_the_index_does_not_hold() -> None:
    grids = [verify.stored_grid(_smooth(0), np.ones((32, 48, 32), bool))]
    verifier = verify.Verifier(grids, ["p-0000000000000001"], IDENTITY_ONLY, CFG, S)
    nb = Neighbours(patient_ids=("p-00000000000000ff",), similarities=np.asarray([0.9]), matched=((0, 0),))
    with pytest.raises(IntegrityError, match="is not in the index"):
        verifier.verify(nb, verifier.view(_vol(_smooth(0))))


def test_turned_matches_apply_pose_inside_the_grid() -> None:
    g = _smooth(4, (16, 24, 16))
    m = np.ones(g.shape, bool)
    for flip, angles in ((False, (5.0, 0.0, 0.0)), (True, (3.0, -7.0, 4.0))):
        a, _ = verify._turned(g, m, flip, angles)
        b = apply_pose(g, Pose(flip=flip, rotate_deg=angles))
        assert np.abs(a - b)[3:-3, 3:-3, 3:-3].max() < 1e-5


def _turned_by_corner_tests(
    grid: np.ndarray, mask: np.ndarray, flip: bool, angles: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """verify._turned as first written: each corner tested against the grid's bounds."""
    from gate.poses import rotation_matrix

    if flip:
        grid, mask = grid[::-1], mask[::-1]
    shape = grid.shape
    rot = rotation_matrix(np.radians(np.asarray(angles, dtype=np.float64)))
    centre = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1)
    coords = rot.T @ (idx - centre[:, None]) + centre[:, None]
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    full = bool(mask.all())
    flat_g, flat_m = grid.astype(np.float32).ravel(), mask.astype(np.float32).ravel()
    out_g, out_m = np.zeros(coords.shape[1]), np.zeros(coords.shape[1])
    strides = (shape[1] * shape[2], shape[2], 1)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                cx, cy, cz = base[0] + dx, base[1] + dy, base[2] + dz
                inside = (
                    (cx >= 0) & (cx < shape[0]) & (cy >= 0) & (cy < shape[1]) & (cz >= 0) & (cz < shape[2])
                )
                w = (
                    (frac[0] if dx else 1.0 - frac[0])
                    * (frac[1] if dy else 1.0 - frac[1])
                    * (frac[2] if dz else 1.0 - frac[2])
                    * inside
                )
                at = np.where(inside, cx * strides[0] + cy * strides[1] + cz * strides[2], 0)
                out_g += w * flat_g[at]
                out_m += w * flat_m[at]
    if full:
        lo, hi = -0.5, np.asarray(shape, dtype=np.float64)[:, None] - 0.5
        out_m = np.all((coords >= lo) & (coords <= hi), axis=0).astype(np.float64)
    return np.clip(out_g, 0.0, 1.0).reshape(shape).astype(np.float32), out_m.reshape(shape) > 0.5


def test_compiled_falls_back_to_compiling_per_process_where_nothing_can_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A read-only install with no writable home: numba refuses ``cache=True``; the gate still runs."""

    def plus_one(x: float) -> float:
        return x + 1.0

    import numba
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # no cache location writable
    with pytest.raises(RuntimeError, match="cannot cache"):
        numba.njit(cache=True)(plus_one)
    assert verify._compiled(plus_one)(1.0) == 2.0


def test_turned_keeps_the_bits_of_numpy_corner_gathers() -> None:
    """The compiled loop gives the bits of numpy's corner arrays: far turns, partial masks, clipping.

    Shapes include the default grid's half and full resolution; intensities reach outside [0, 1]
    so the clip is exercised.
    """
    rng = np.random.default_rng(7)
    shapes = [(16, 24, 16), (32, 48, 32)] + [tuple(int(n) for n in rng.integers(6, 20, 3)) for _ in range(22)]
    for t, shape in enumerate(shapes):
        g = (rng.random(shape) * (1.4 if t % 4 == 1 else 1.0) - (0.2 if t % 4 == 1 else 0.0)).astype(
            np.float32
        )
        m = rng.random(shape) > (0.0 if t % 2 else 0.3)
        angles = tuple(float(a) for a in rng.uniform(-40, 40, 3))
        flip = bool(t % 3 == 0)
        a = verify._turned(g, m, flip, angles)
        b = _turned_by_corner_tests(g, m, flip, angles)  # type: ignore[arg-type]
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not a[1].all()  # a 40-degree turn leaves corners outside: the border was read


def test_blocks_keep_the_bits_of_the_reshape_mean() -> None:
    """Strided sums give numpy's own block means bit for bit, trailing voxels dropped, any f."""
    rng = np.random.default_rng(11)
    for f in (1, 2, 3, 4, 5, 7, 8, 9):
        for _ in range(6):
            shape = tuple(int(n) for n in rng.integers(f, 4 * f + 6, 3))
            scale = rng.choice([1.0, 1e3, 1e-3])
            x = (rng.random(shape) * scale).astype(rng.choice([np.float32, np.float64]))
            a, b, c = (n // f * f for n in shape)
            y = x[:a, :b, :c].astype(np.float32)
            want = y.reshape(a // f, f, b // f, f, c // f, f).mean(axis=(1, 3, 5))
            got = verify._blocks(x, f)
            assert got.dtype == np.float32 and got.shape == want.shape
            assert np.array_equal(got, want), (f, shape)
    with pytest.raises(ValueError, match="at least 1"):
        verify._blocks(np.zeros((4, 4, 4), np.float32), 0)


def test_valid_correlation_keeps_the_bits_of_irfftn() -> None:
    """Axis by axis, valid outputs only: irfftn's bits, batched or not, float32 or float64."""
    from scipy import fft

    rng = np.random.default_rng(12)
    cases = [((48, 64, 48), (32, 48, 32), ()), ((24, 32, 24), (16, 24, 16), (3,))]
    for _ in range(10):
        shape = tuple(int(n) for n in rng.integers(3, 40, 3))
        cases.append(
            (
                shape,
                tuple(int(rng.integers(1, n + 1)) for n in shape),
                tuple(rng.integers(1, 3, int(rng.integers(0, 2)))),
            )
        )
    cases.append(((9, 8, 7), (10, 2, 2), ()))  # a template larger than the view: no placement
    for shape, tshape, lead in cases:
        for dtype in (np.float32, np.float64):
            a, b = (
                fft.rfftn(rng.random((*lead, *shape)).astype(dtype), shape, axes=(-3, -2, -1))
                for _ in range(2)
            )
            valid = (Ellipsis, *(slice(t - 1, n) for t, n in zip(tshape, shape, strict=True)))
            want = fft.irfftn(a * b, shape, axes=(-3, -2, -1))[valid]
            got = verify.valid_correlation(a * b, shape, tshape)
            assert got.dtype == want.dtype and got.shape == want.shape, (shape, tshape, lead)
            assert np.array_equal(got, want), (shape, tshape, lead, dtype)


def test_padded_spectrum_keeps_the_bits_of_rfftn() -> None:
    """Zero lines left untransformed: rfftn's bits, batched or not, float32 or float64, strided."""
    from scipy import fft

    rng = np.random.default_rng(13)
    cases = [((48, 64, 48), (32, 48, 32), ()), ((24, 32, 24), (16, 24, 16), (3,)), ((8, 8, 8), (8, 8, 8), ())]
    for _ in range(12):
        shape = tuple(int(n) for n in rng.integers(3, 40, 3))
        tshape = tuple(int(rng.integers(1, n + 1)) for n in shape)
        cases.append((shape, tshape, tuple(rng.integers(1, 3, int(rng.integers(0, 2))))))
    cases.append(((9, 8, 7), (10, 2, 2), ()))  # a template larger than the view: rfftn crops it
    for shape, tshape, lead in cases:
        for dtype in (np.float32, np.float64):
            t = rng.random((*lead, *tshape)).astype(dtype)[..., ::-1, ::-1, ::-1]  # flipped, as used
            want = fft.rfftn(t, shape, axes=(-3, -2, -1))
            got = verify.padded_spectrum(t, shape)
            assert got.dtype == want.dtype and got.shape == want.shape, (shape, tshape, lead)
            assert np.array_equal(got, want), (shape, tshape, lead, dtype)


def test_template_terms_made_once_align_like_terms_made_per_view() -> None:
    """One template's spectra serve the view and its content view with the same alignments."""
    img = np.zeros((48, 64, 48), np.float32)
    img[8:40, 8:56, 8:40] = _smooth(3)
    img[8:12] = 0.0  # an empty outside: the content view differs from the view
    mask = np.zeros(img.shape, bool)
    mask[8:40, 8:56, 8:40] = True
    view = verify.View(img, mask)
    content = view.content()
    assert not np.array_equal(content.mask, view.mask)
    tmpl, tmask = verify._turned(_smooth(3), np.ones((32, 48, 32), bool), False, (4.0, -2.0, 3.0))
    terms = view.template_terms(tmpl, tmask)
    for v in (view, content):
        fresh = verify.View(v.image, v.mask, trim=False)
        assert v.align(tmpl, tmask, terms=terms) == fresh.align(tmpl, tmask)
    with pytest.raises(ValueError, match="template terms for"):
        view.coarse().align(*verify._half_template(tmpl, tmask), terms=terms)


def test_rotation_search_turns_each_pose_once(hippo: list[Volume], monkeypatch: pytest.MonkeyPatch) -> None:
    """The descent comes back to angles it tried: each turn is scored once per placement, made once."""
    img, mask = verify.grid_with_mask(hippo[0], CFG, S)
    copy = verify.View(ndimage.gaussian_filter(apply_pose(img, Pose(rotate_deg=(5.0, -3.0, 2.0))), 1.0), mask)
    coarse = copy.coarse()
    g, m = verify._half_template(*verify.grid_with_mask(hippo[0], CFG, 0))
    scored: list[tuple[bytes, tuple[int, ...]]] = []
    turned: list[tuple[float, ...]] = []
    real_score, real_turn = verify._turned_ncc, verify._turned

    def counted_score(rot: np.ndarray, *rest: object) -> float:
        scored.append((np.round(rot, 12).tobytes(), tuple(int(a) for a in rest[5])))  # type: ignore[union-attr]
        return real_score(rot, *rest)  # type: ignore[no-any-return]

    def counted_turn(grid: np.ndarray, tmask: np.ndarray, flip: bool, angles: tuple[float, ...]) -> object:
        turned.append(tuple(angles))
        return real_turn(grid, tmask, flip, angles)  # type: ignore[arg-type]

    monkeypatch.setattr(verify, "_turned_ncc", counted_score)
    monkeypatch.setattr(verify, "_turned", counted_turn)
    start = coarse.align(g, m)
    angles, ncc = verify.refine_rotation(coarse, g, m, False, (0.0, 0.0, 0.0), start)
    assert len(scored) == len(set(scored)) > 6
    assert len(turned) == len(set(turned))  # made only to be placed again (ROTATION_REPLACE)
    assert angles != (0.0, 0.0, 0.0)
    assert ncc > start.ncc


def test_rotation_search_places_the_turned_grid_again(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy shifted, then turned about the centre: held at the start's shift, the descent falls short."""
    img, mask = verify.grid_with_mask(hippo[3], CFG, S)
    moved = apply_pose(ndimage.shift(img, (4.0, -4.0, 3.0), order=1), Pose(rotate_deg=(8.0, -2.0, 5.0)))
    coarse = verify.View(moved, mask).coarse()
    g, m = verify._half_template(*verify.grid_with_mask(hippo[3], CFG, 0))
    start = coarse.align(g, m)
    _, placed = verify.refine_rotation(coarse, g, m, False, (0.0, 0.0, 0.0), start)
    monkeypatch.setattr(verify, "ROTATION_REPLACE", False)
    _, held = verify.refine_rotation(coarse, g, m, False, (0.0, 0.0, 0.0), start)
    assert placed > 0.9 and held < placed - 0.03  # measured 0.923 against 0.850


def test_rotation_search_scores_the_content_view_at_its_own_shift(hippo: list[Volume]) -> None:
    """A cut copy's turn is scored on its content view over every shift, not at the view's placement."""
    img, mask = verify.grid_with_mask(hippo[0], CFG, 0)
    cut = np.zeros_like(img)
    cut[3:] = img[:-3]  # content moved by the cut, the fill left behind
    turned = apply_pose(cut, Pose(rotate_deg=(-11.0, 3.0, 1.0)))
    noisy = np.clip(turned + 0.05 * np.random.default_rng(0).standard_normal(turned.shape), 0, 1)
    view = verify.View(np.pad(noisy.astype(np.float32), S), np.pad(np.ones(img.shape, bool), S))
    coarse, content = view.coarse(), view.content().coarse()
    g, m = verify._half_template(img, mask)
    start = coarse.align(g, m)
    plain_angles, plain = verify.refine_rotation(coarse, g, m, False, (0.0, 0.0, 0.0), start)
    angles, score = verify.refine_rotation(coarse, g, m, False, (0.0, 0.0, 0.0), start, content)
    assert angles == plain_angles  # the descent runs on the view either way
    assert score == max(plain, content.align(*verify._turned(g, m, False, angles)).ncc)


def _screen_case(
    hippo: list[Volume], source_first: bool, monkeypatch: pytest.MonkeyPatch, **settings: int
) -> dict[int, np.ndarray]:
    """A turned copy of hippo[0] verified against its source (0) and a blurred look-alike (1).

    Unturned at half resolution the look-alike beats the source; turned, it loses. Each of the
    ``settings`` (a :mod:`gate.verify` constant -> values) is tried in turn, one refined patient,
    none refined for being nearest; returns each value's verified scores in patient order.
    """
    img, mask = verify.grid_with_mask(hippo[0], CFG, 0)
    lookalike = verify.stored_grid(ndimage.gaussian_filter(img, 2.0).astype(np.float32), mask)
    grids = [verify.stored_grid(img, mask), lookalike]
    pids = ["p-0000000000000001", "p-0000000000000002"]
    full, full_mask = verify.grid_with_mask(hippo[0], CFG, S)
    view = verify.View(apply_pose(full, Pose(rotate_deg=(8.0, -5.0, 4.0))), full_mask)
    order = (pids[0], pids[1]) if source_first else (pids[1], pids[0])
    nb = Neighbours(order, np.asarray([0.9, 0.8]), matched=((0, 0), (0, 0)))
    monkeypatch.setattr(verify, "REFINE_NEAREST", 0)
    monkeypatch.setattr(verify, "REFINE_PATIENTS", 1)
    ((name, values),) = settings.items()
    scores = {}
    for value in values:
        monkeypatch.setattr(verify, name, value)
        out = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S).verify(nb, view).verified
        assert out is not None
        scores[value] = out if source_first else out[::-1]
    return scores


def test_the_turn_screen_refines_the_patient_a_turn_lifts(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unturned, a blurred look-alike beats a turned copy's source at half resolution; turned, it loses."""
    monkeypatch.setattr(verify, "SCREEN_NEAREST", 0)
    scores = _screen_case(hippo, False, monkeypatch, REFINE_SCREEN=(2, 1))  # 1: no screen
    assert scores[2][0] > 0.95 and scores[2][0] > scores[2][1] + 0.1  # measured 0.984 against 0.772
    assert scores[1][0] < 0.8 < scores[1][1]  # unscreened the look-alike is refined: 0.888, the source 0.730


def test_the_nearest_by_cosine_join_the_turn_screen(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turned copy's source, first by cosine but not by unturned NCC, is turned and refined."""
    monkeypatch.setattr(verify, "REFINE_SCREEN", 1)  # the screen by NCC holds the look-alike only
    scores = _screen_case(hippo, True, monkeypatch, SCREEN_NEAREST=(1, 0))
    assert scores[1][0] > 0.95 and scores[1][0] > scores[1][1] + 0.1
    assert scores[0][0] < 0.8  # left out of the screen, the source keeps its unturned score


def test_the_best_refined_turn_is_polished_at_full_resolution(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cut, turned, noisy copy: the half-resolution turn is a few degrees off; polished it is not."""
    img, mask = verify.grid_with_mask(hippo[0], CFG, 0)
    grids = [verify.stored_grid(img, mask), verify.stored_grid(*verify.grid_with_mask(hippo[1], CFG, 0))]
    pids = ["p-0000000000000001", "p-0000000000000002"]
    cut = np.zeros_like(img)
    cut[3:] = img[:-3]
    turned = apply_pose(cut, Pose(rotate_deg=(-11.0, 3.0, 1.0)))
    noisy = np.clip(turned + 0.05 * np.random.default_rng(0).standard_normal(turned.shape), 0, 1)
    view = verify.View(np.pad(noisy.astype(np.float32), S), np.pad(np.ones(img.shape, bool), S))
    nb = Neighbours((pids[0], pids[1]), np.asarray([0.9, 0.8]), matched=((0, 0), (0, 0)))
    scores = {}
    for steps in ((), (2.0, 1.0)):
        monkeypatch.setattr(verify, "POLISH_STEPS_DEG", steps)
        out = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S).verify(nb, view).verified
        assert out is not None
        scores[steps] = out
    assert scores[(2.0, 1.0)][1] == scores[()][1]  # only the best refined patient is polished
    assert scores[(2.0, 1.0)][0] > scores[()][0] + 0.01  # measured 0.972 against 0.956


def test_the_one_pass_ncc_of_an_exact_copy_is_at_most_one() -> None:
    """Its sums round past 1 on some exact copies (seed 1: 1 + 8.9e-16), which the audit record refuses."""
    g = np.random.default_rng(1).random((16, 24, 16)).astype(np.float32)
    m = np.ones(g.shape, bool)
    rot = verify.rotation_matrix(np.radians(np.asarray((1e-9, 0.0, 0.0))))
    args = (
        np.pad(g, 4),
        np.pad(m, 4),
        np.asarray([4, 4, 4], np.int64),
        verify.MIN_OVERLAP,
        verify.VARIANCE_FLOOR,
    )
    assert verify._turned_ncc(rot, g, m, True, *args) == 1.0


def test_turned_ncc_is_the_ncc_of_the_turned_grid() -> None:
    """The rotation search's fused kernel scores what _ncc_at scores on _turned's output."""
    from gate.poses import rotation_matrix

    grid = _smooth(5, (16, 24, 16))
    image = np.pad(_smooth(6, (16, 24, 16)), 4)
    imask = np.ones(image.shape, bool)
    imask[:, :6] = False
    part = np.ones(grid.shape, bool)
    part[:3] = False
    for mask in (np.ones(grid.shape, bool), part):
        for angles in ((0.0, 0.0, 0.0), (5.0, -3.0, 2.0), (10.0, 4.0, -8.0)):
            rot = rotation_matrix(np.radians(np.asarray(angles)))
            for at in ((4, 4, 4), (2, 6, 3), (0, 0, 0), (9, 0, 0)):
                want = verify._ncc_at(*verify._turned(grid, mask, False, angles), image, imask, at)
                got = verify._turned_ncc(
                    rot, grid, mask, bool(mask.all()), image, imask, np.asarray(at),
                    verify.MIN_OVERLAP, verify.VARIANCE_FLOOR,
                )  # fmt: skip
                assert abs(got - want) < 1e-9, (mask.all(), angles, at)


def test_merge_keeps_the_best_verified_score_per_patient() -> None:
    a = Neighbours(("p-0000000000000001",), np.asarray([0.9]), matched=((0, 1),), verified=np.asarray([0.5]))
    b = Neighbours(("p-0000000000000001",), np.asarray([0.8]), matched=((0, 2),), verified=np.asarray([0.7]))
    m = merge_neighbours([a, b], 5)
    assert m.matched == ((0, 1),)
    assert m.verified is not None and m.verified[0] == 0.7
    c = Neighbours(("p-0000000000000001",), np.asarray([0.8]))
    assert merge_neighbours([a, c], 5).verified is None


def _record(novel: list[float], copies: list[float]) -> Verification:
    def cal(values: list[float], method: CalibrationMethod) -> Calibration:
        return Calibration(method=method, n_patients=len(values), similarities=tuple(sorted(values)))

    return Verification(
        max_shift_vox=S,
        grids_sha256="0" * 64,
        calibration=cal(novel, CalibrationMethod.LEAVE_ONE_PATIENT_OUT),
        copies=cal(copies, CalibrationMethod.SIMULATED_COPIES),
        copies_cosine=cal([0.9] * len(copies), CalibrationMethod.SIMULATED_COPIES),
    )


def _standard() -> tuple[LoadedPolicy, Calibration, Verification]:
    calibration = Calibration(
        method=CalibrationMethod.LEAVE_ONE_PATIENT_OUT,
        n_patients=100,
        similarities=tuple(np.linspace(0.5, 0.9, 100)),
    )
    record = _record(list(np.linspace(0.4, 0.8, 100)), list(np.linspace(0.9, 1.0, 100)))
    return load_policy("standard"), calibration, record


def test_decision_takes_the_higher_grade_of_the_two_scores() -> None:
    policy, calibration, record = _standard()
    low_cos = Neighbours(("p-0000000000000001",), np.asarray([0.6]), verified=np.asarray([0.95]))
    d = decide(low_cos, policy, calibration, record)
    assert d.grade is Grade.DUPLICATE and d.verdict is Verdict.REJECT
    assert d.details["verified"] == pytest.approx(0.95)
    low_both = Neighbours(("p-0000000000000001",), np.asarray([0.6]), verified=np.asarray([0.5]))
    assert decide(low_both, policy, calibration, record).verdict is Verdict.PASS
    with pytest.raises(IntegrityError, match="the index verifies but the candidate was not verified"):
        decide(Neighbours(("p-0000000000000001",), np.asarray([0.6])), policy, calibration, record)
    with pytest.raises(IntegrityError, match="records no verification"):
        decide(low_both, policy, calibration, None)


def test_pass_rate_runs_the_decision() -> None:
    policy, calibration, record = _standard()
    pairs = np.asarray([[0.6, 0.5, 0.5], [0.6, 0.95, 0.95], [0.95, 0.5, 0.5]])
    assert pass_rate(pairs, policy, calibration, record) == pytest.approx(1 / 3)


def test_simulated_copies_are_seeded_and_disjoint_from_the_benchmark_seeds() -> None:
    img, mask = verify.grid_with_mask(_vol(_smooth(5, (36, 52, 36))), CFG, S)
    a = cp.simulated_copies([(img, mask)], seed=0, per_volume=3)
    b = cp.simulated_copies([(img, mask)], seed=0, per_volume=3)
    assert len(a) == 3
    assert all(np.array_equal(x.image, y.image) and x.changes == y.changes for x, y in zip(a, b, strict=True))
    assert all(
        cp.FAMILIES_PER_COPY[0] <= len(set(c.changes) - {"flip"}) <= cp.FAMILIES_PER_COPY[1] for c in a
    )
    assert all(c.image.shape == img.shape and 0.0 <= c.image.min() and c.image.max() <= 1.0 for c in a)
    assert cp.COPY_SEED_OFFSET > 2**32  # above every single-family benchmark seed
    assert cp.COPY_SEED_OFFSET + 10**6 < 2**62


def test_simulated_copies_verify_as_copies(hippo: list[Volume]) -> None:
    """Every simulated copy of a real volume verifies closer to its source than to any other patient."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    copies = cp.simulated_copies([verify.grid_with_mask(hippo[0], CFG, S)], seed=1, per_volume=4)
    for c in copies:
        nb = Neighbours(tuple(pids), np.linspace(0.9, 0.8, len(pids)), matched=tuple((0, 0) for _ in pids))
        out = verifier.verify(nb, verify.View(c.image, c.mask))
        assert out.verified is not None
        assert out.verified_patient_id == pids[0], c.changes


def _blurred_copy(volume: Volume) -> verify.View:
    """What a memorizing generator emits: the source smoothed and its contrast drifted."""
    img, mask = verify.grid_with_mask(volume, CFG, S)
    return verify.View(np.clip(ndimage.gaussian_filter(img, 2.0), 0.0, 1.0) ** 1.3, mask)


def test_voxel_channel_ranks_a_blurred_copys_source_first(hippo: list[Volume]) -> None:
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    for source in (0, 3, 5):
        found = verifier.voxel_patients(_blurred_copy(hippo[source]), n=3)
        assert len(found) == 3 and found[0] == pids[source]
    assert len(verifier.voxel_patients(_blurred_copy(hippo[0]), n=len(hippo) + 4)) == len(hippo)
    v = verify.voxel_vector(grids[0])
    assert v.shape == (8 * 12 * 8,) and abs(float(v @ v) - 1.0) < 1e-5


def test_voxel_channel_ranks_a_cut_and_blurred_copys_source_first(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The composite family's retrieval misses: the smeared fill of a cut field of view.

    Over the whole window the fill's blocks pull the correlation towards strangers; over the
    copy's content the source is first again.
    """
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    inner = (slice(S, -S),) * 3
    views = []
    for v in hippo:
        cut = Volume(np.ascontiguousarray(v.data[4:, :-4, 4:]), v.affine, v.spacing, v.source, v.patient_id)
        copy = ndimage.gaussian_filter(verify.grid_with_mask(cut, CFG, S)[0][inner], 1.0) ** 1.2
        views.append(verify.View(np.pad(copy, S), np.pad(np.ones(copy.shape, bool), S)))
    assert [verifier.voxel_patients(v, n=1)[0] for v in views] == pids
    monkeypatch.setattr(verify, "masked_block_correlation", lambda m, *_: np.full((len(m), len(pids)), -1.0))
    whole = [verifier.voxel_patients(v, n=1)[0] for v in views]
    assert whole != pids  # measured: 2 of the 6 sources second over the whole window


def test_voxel_channel_ranks_a_mirrored_and_moved_copys_source_first(
    hippo: list[Volume], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mirrored copy moved off its grid: its source correlates only with the mirrored windows."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    views = []
    for v in hippo:
        img, mask = verify.grid_with_mask(v, CFG, S)
        moved = ndimage.shift(img[::-1], (3.0, -4.0, 2.0), order=1)
        views.append(verify.View(moved.astype(np.float32), mask[::-1].copy()))
    assert [verifier.voxel_patients(v, n=1)[0] for v in views] == pids
    monkeypatch.setattr(verify, "VOXEL_MIRROR", False)
    unmirrored = [verifier.voxel_patients(v, n=1)[0] for v in views]
    assert sum(a == b for a, b in zip(unmirrored, pids, strict=True)) < len(pids) // 2


def test_masked_block_correlation_is_pearson_over_the_mask() -> None:
    rng = np.random.default_rng(0)
    stored = rng.random((5, 40))
    blocky = [s.reshape(2, 5, 4).repeat(4, 0).repeat(4, 1).repeat(4, 2) for s in stored]  # 4^3 blocks = s
    vectors = np.stack([verify.voxel_vector(g) for g in blocky])
    means = rng.random((3, 40))
    masks = rng.random((3, 40)) > 0.3
    got = verify.masked_block_correlation(means, masks, vectors, vectors**2)
    for w in range(3):
        for n in range(5):
            want = np.corrcoef(means[w, masks[w]], stored[n, masks[w]])[0, 1]
            assert abs(got[w, n] - want) < 1e-5
    flat = verify.masked_block_correlation(np.ones((1, 40)), masks[:1], vectors, vectors**2)
    assert (flat == -1.0).all()


def test_retrieve_and_verify_verifies_the_source_the_encoder_missed(hippo: list[Volume]) -> None:
    """A search that never ranks the source: the voxel channel still brings it in, with its cosine."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    source = pids[2]
    others = tuple(p for p in pids if p != source)
    asked: list[tuple[str, ...]] = []

    def search(views: list[np.ndarray], k: int, include: list[tuple[str, ...]]) -> list[Neighbours]:
        out = []
        for inc in include:
            asked.append(tuple(inc))
            extra = tuple(p for p in inc if p not in others)
            ids = others + extra
            sims = np.concatenate([np.linspace(0.95, 0.9, len(others)), np.full(len(extra), 0.1)])
            out.append(Neighbours(ids, sims, matched=tuple((0, 0) for _ in ids)))
        return out

    first = Neighbours(others, np.linspace(0.95, 0.9, len(others)), matched=tuple((0, 0) for _ in others))
    (out,) = verify.retrieve_and_verify(verifier, [first], [_blurred_copy(hippo[2])], search, k=3)
    assert len(asked) == len(verify.QUERY_SHIFTS_VOX) + 1 and all(source in a for a in asked)
    assert out.verified is not None and out.verified_patient_id == source
    assert out.verified[-1] > 0.85 and out.verified[-1] > out.verified[:-1].max() + 0.05
    assert out.patient_ids[:3] == others[:3] and out.patient_ids[-1] == source
    assert out.similarities[-1] == pytest.approx(0.1)  # the cosine the search computed, not made up


def test_retrieve_and_verify_on_threads_is_bit_equal_to_one_thread(hippo: list[Volume]) -> None:
    """Candidates verified on several threads score exactly as on one, in order; an error is raised."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    nb = Neighbours(tuple(pids), np.linspace(0.9, 0.8, len(pids)), matched=((0, 0),) * len(pids))

    def search(views: list[np.ndarray], k: int, include: list[tuple[str, ...]]) -> list[Neighbours]:
        return [nb] * len(include)

    views = [_blurred_copy(v) for v in hippo] + [verify.View(*verify.grid_with_mask(hippo[1], CFG, S))]
    first = [nb] * len(views)
    runs = []
    for workers in (1, 3):  # a fresh verifier each: kept templates made on other threads too
        verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
        runs.append(verify.retrieve_and_verify(verifier, first, views, search, 3, workers=workers))
    for one, many in zip(*runs, strict=True):
        assert one.patient_ids == many.patient_ids and one.verified_patient_id == many.verified_patient_id
        assert one.verified is not None and many.verified is not None
        assert np.array_equal(one.verified, many.verified)
        assert np.array_equal(one.similarities, many.similarities)
        assert one.identity is not None and many.identity is not None
        assert np.array_equal(one.identity, many.identity)
    assert [nb.verified_patient_id for nb in runs[1]] == [*pids, pids[1]]
    stray = Neighbours(tuple(pids), np.linspace(0.99, 0.98, len(pids)), matched=((7, 0),) * len(pids))
    with pytest.raises(IntegrityError, match="is not in the index"):  # one candidate's, on a thread
        verify.retrieve_and_verify(verifier, [*first[:-1], stray], views, search, 3, workers=3)
    assert 1 <= verify.verify_workers() <= verify.VERIFY_WORKERS_MAX


def test_exact_neighbours_answers_included_patients_but_never_the_excluded_one() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    row_pids = [f"p-{i // 2:016x}" for i in range(12)]
    q = vectors[0]
    far = row_pids[int(np.argmin(vectors @ q))]
    nb = verify.exact_neighbours(q, vectors, row_pids, 2, [0] * 6, 2, exclude=None, include=(far,))
    assert len(nb.patient_ids) == 3 and nb.patient_ids[-1] == far
    nb = verify.exact_neighbours(q, vectors, row_pids, 2, [0] * 6, 2, exclude=far, include=(far,))
    assert far not in nb.patient_ids and len(nb.patient_ids) == 2


def test_merge_keeps_named_patients_beyond_k() -> None:
    a = Neighbours(
        tuple(f"p-{i:016x}" for i in range(4)), np.asarray([0.9, 0.8, 0.7, 0.6]), matched=((0, 0),) * 4
    )
    m = merge_neighbours([a], 2, keep=("p-0000000000000003", "p-00000000000000ff"))
    assert m.patient_ids == ("p-0000000000000000", "p-0000000000000001", "p-0000000000000003")


def _placed(volume: Volume, corner: tuple[int, int, int]) -> Volume:
    """A training volume pasted into an 80x112x80 mm tissue-like field at ``corner`` (1 mm, RAS)."""
    from gate.preprocess import to_canonical
    from tests.test_domain import paste

    data = paste(to_canonical(volume).data.astype(np.float32), (80, 112, 80), corner, "tissue")
    return Volume(data, np.eye(4), (1.0, 1.0, 1.0), "placed", "p-ffffffffffffffff")


def test_locate_finds_where_a_training_volume_sits_in_a_larger_field(hippo: list[Volume]) -> None:
    from gate.preprocess import normalize_for
    from gate.windows import margin_view, oriented

    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    for source, corner in ((4, (37, 9, 33)), (1, (3, 57, 2))):
        base = oriented(_placed(hippo[source], corner), CFG)
        image = normalize_for(base, CFG).data
        found = verifier.locate(image, np.ones(image.shape, bool), n=3)
        assert len(found) == 3 and found[0].patient_id == pids[source]
        assert found[0].ncc > found[1].ncc + 0.03
        nb = Neighbours((pids[source],), np.asarray([0.5]), matched=((found[0].volume, 0),))
        out = verifier.verify(nb, margin_view(base, found[0].start, CFG, S))
        assert out.verified is not None and out.verified[0] > 0.98  # the placement is within the shifts
    small = np.zeros((20, 30, 20), np.float32)  # shorter than the grid: padded, never an error
    assert len(verifier.locate(small + 0.5, np.ones(small.shape, bool), n=2)) == 2


def test_judge_windows_verifies_a_source_the_windows_never_retrieve(hippo: list[Volume]) -> None:
    """A search that never ranks the source on any window: the localisation channel brings it in."""
    from gate.windows import judge_windows

    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    source = pids[3]
    others = tuple(p for p in pids if p != source)
    asked: list[tuple[str, ...]] = []

    def judge(views: list[np.ndarray], include: list[tuple[str, ...]]) -> list[Neighbours]:
        out = []
        for inc in include:
            asked.append(tuple(inc))
            extra = tuple(p for p in inc if p not in others)
            ids = others + extra
            sims = np.concatenate([np.linspace(0.95, 0.9, len(others)), np.full(len(extra), 0.1)])
            out.append(Neighbours(ids, sims, matched=tuple((0, 0) for _ in ids)))
        return out

    result = judge_windows(_placed(hippo[3], (40, 20, 11)), CFG, judge, 3, verifier)
    nb = result.neighbours
    assert any(source in a for a in asked)
    assert nb.verified is not None and nb.verified_patient_id == source
    assert float(nb.verified[nb.patient_ids.index(source)]) > 0.98
    assert (
        float(nb.verified[nb.patient_ids.index(source)])
        > float(np.delete(nb.verified, nb.patient_ids.index(source)).max()) + 0.1
    )
    assert float(nb.similarities[nb.patient_ids.index(source)]) == pytest.approx(0.1)  # the search's cosine
    unverified = judge_windows(_placed(hippo[3], (40, 20, 11)), CFG, judge, 3)
    assert source not in unverified.neighbours.patient_ids  # without a verifier nothing is located


def test_align_many_agrees_with_align() -> None:
    view = verify.View(_smooth(4, (20, 28, 20)), np.ones((20, 28, 20), bool))
    mask = np.ones((8, 12, 8), bool)
    mask[:, :2] = False  # a padded template
    templates = np.stack(
        [_smooth(10 + i, (8, 12, 8)) for i in range(3)] + [_smooth(4, (20, 28, 20))[5:13, 9:21, 3:11]]
    )
    ncc, pos = view.align_many(verify.template_spectra(templates, mask, view.shape))
    for i, t in enumerate(templates):
        one = view.align(t, mask)
        assert ncc[i] == pytest.approx(one.ncc, abs=1e-5)
        margin = [(v - s) // 2 for v, s in zip(view.shape, t.shape, strict=True)]
        assert tuple(pos[i]) == tuple(m + s for m, s in zip(margin, one.shift, strict=True))
    assert ncc[3] > 0.999 and tuple(pos[3]) == (5, 9, 3)


def test_verification_factor_keeps_the_default_grid_and_reduces_large_ones() -> None:
    assert verify.verify_factor((32, 48, 32)) == 1
    assert verify.verify_factor((80, 112, 80)) == 2  # 40x56x40 blocks
    assert verify.verify_factor((128, 128, 80)) == 3  # 42x42x26 blocks
    assert verify.verify_factor((128, 128, 112)) == 3
    assert verify.query_batch((32, 48, 32)) == verify.QUERY_BATCH and verify.query_batch((128, 128, 80)) == 1


def test_verify_on_a_large_grid_aligns_blocks_and_still_tells_the_copy(tmp_path: Path) -> None:
    """At 96x96x64 (f = 2) a turned, blurred copy verifies near 1 and far above other patients."""
    cfg = PreprocessConfig(grid=(96, 96, 64))
    vols = [_vol(_smooth(10 + i, (96, 96, 64)), f"p-{i:016x}") for i in range(4)]
    grids = [verify.stored_grid(*verify.grid_with_mask(v, cfg, 0)) for v in vols]
    pids = [v.patient_id for v in vols]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, cfg, S)
    assert verifier.factor == 2
    img, mask = verify.grid_with_mask(vols[0], cfg, S)
    copy = ndimage.gaussian_filter(
        apply_pose(img, Pose(rotate_deg=(0.0, 0.0, 6.0), translate_vox=(4.0, -2.0, 0.0))), 1.0
    )
    nb = Neighbours(patient_ids=tuple(pids), similarities=np.linspace(0.9, 0.8, 4), matched=((0, 0),) * 4)
    view = verify.View(copy, mask)
    out = verifier.verify(nb, view)
    assert out.verified is not None and out.verified[0] > 0.95
    assert out.verified[0] > out.verified[1:].max() + 0.2
    assert 2 in view._reduced  # the alignment ran on the 2x2x2 block view
    content = verifier._content_mask(view)  # the reduced view's content, given back to its voxels
    assert content.shape == view.shape and not (content & ~view.mask).any()
    assert 0.5 < content.sum() / view.mask.sum() < 1.0  # the turn's zero-filled corners left out
    assert verifier.voxel_patients(view, n=1) == (pids[0],)


def test_identity_score_is_the_untransformed_ncc_and_a_turn_lifts_only_the_verified_score(
    hippo: list[Volume],
) -> None:
    """The identity score of a turned copy stays below its verified score; of an exact copy it is 1."""
    grids = [verify.stored_grid(*verify.grid_with_mask(v, CFG, 0)) for v in hippo]
    pids = [f"p-{i:016x}" for i in range(len(hippo))]
    verifier = verify.Verifier(grids, pids, COMPACT_POSES, CFG, S)
    img, mask = verify.grid_with_mask(hippo[0], CFG, S)
    nb = Neighbours(tuple(pids[:3]), np.linspace(0.9, 0.8, 3), matched=tuple((0, 0) for _ in range(3)))
    same = verifier.verify(nb, verify.View(img, mask))
    assert same.identity is not None and same.identity[0] == pytest.approx(1.0, abs=1e-5)
    plain = verify.View(img, mask)  # an exact copy refines to no turn: its score is reused, bit for bit
    refined = [i for i in range(3) if same.identity[i] > -1.0]
    score = verify.Verifier._identity_score
    by_score = [score(plain, plain.whole(), *verifier.template(p, 0)) for p in pids[:3]]
    assert refined and all(same.identity[i] == by_score[i] for i in refined)
    turned = apply_pose(img, Pose(rotate_deg=(10.0, -8.0, 6.0)))
    out = verifier.verify(nb, verify.View(turned, mask))
    assert out.verified is not None and out.identity is not None
    assert out.verified[0] > out.identity[0] + 0.02
    grid, gmask = verifier.template(pids[0], 0)
    view = verify.View(turned, mask)
    by_hand = max(view.align(grid, gmask).ncc, view.whole().align(grid, np.ones_like(gmask)).ncc)
    assert out.identity[0] == pytest.approx(by_hand, abs=1e-12)
    assert out.nearest_identity == out.identity.max()


def test_reported_keeps_cosine_order_with_the_best_verified_and_identity_patients() -> None:
    pids = tuple(f"p-{i:016x}" for i in range(8))
    nb = Neighbours(
        pids,
        np.linspace(0.9, 0.7, 8),
        verified=np.asarray([0.1] * 6 + [0.2, 0.9]),
        identity=np.asarray([0.1] * 6 + [0.8, 0.3]),
    )
    out = verify.reported(nb, 3)
    assert out.patient_ids == pids[:3] + pids[6:]
    assert out.identity is not None and out.identity.tolist() == [0.1, 0.1, 0.1, 0.8, 0.3]


def _identity_record() -> Verification:
    base = _record(list(np.linspace(0.4, 0.8, 100)), list(np.linspace(0.9, 1.0, 100)))
    cal = Calibration(
        method=CalibrationMethod.LEAVE_ONE_PATIENT_OUT,
        n_patients=100,
        similarities=tuple(np.linspace(0.3, 0.8, 100)),
    )
    return base.model_copy(update={"identity": cal, "copies_identity": base.copies})


def test_identity_grades_duplicate_against_similar_and_never_lets_a_copy_pass() -> None:
    policy = load_policy("deepssim")
    calibration, record = _standard()[1], _identity_record()

    def judged(cos: float, ver: float, idn: float) -> tuple[Grade, Verdict]:
        nb = Neighbours(
            ("p-0000000000000001",), np.asarray([cos]), verified=np.asarray([ver]), identity=np.asarray([idn])
        )
        d = decide(nb, policy, calibration, record)
        assert d.details["identity"] == pytest.approx(idn)
        assert d.details["identity_duplicate_threshold"] == pytest.approx(0.887)
        return d.grade, d.verdict

    assert judged(0.6, 0.95, 0.86) == (Grade.SIMILAR, Verdict.REJECT)  # verified alone: similar at most
    assert judged(0.6, 0.95, 0.90) == (Grade.DUPLICATE, Verdict.REJECT)
    assert judged(0.6, 0.5, 0.90) == (Grade.DUPLICATE, Verdict.REJECT)  # identity only raises
    assert judged(0.6, 0.5, 0.5) == (Grade.DIFFERENT, Verdict.PASS)
    nb = Neighbours(("p-0000000000000001",), np.asarray([0.6]), verified=np.asarray([0.5]))
    with pytest.raises(IntegrityError, match="has none"):
        decide(nb, policy, calibration, record)
    with pytest.raises(PolicyError, match="no identity calibration"):
        decide(nb, policy, calibration, _standard()[2])


def test_a_policy_grading_by_identity_may_not_pass_similar(tmp_path: Path) -> None:
    text = policy_path("deepssim").read_text().replace("  similar: reject", "  similar: pass")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(PolicyError, match=r"actions\.similar must then be flag or reject"):
        load_policy(str(tmp_path / "p.yaml"))
