"""Whole-field-of-view judging: windows of the index's grid over a candidate larger than it.

An index is built from training volumes preprocessed to a fixed grid (32x48x32 voxels at 1 mm
for the shipped one). A candidate with a larger field of view would otherwise be judged on its
central crop, so a training volume pasted anywhere else in it (a partial copy) is never looked
at. When the index was built to judge such candidates (``gate index build --window-fov``,
recorded as :attr:`gate.domain.Domain.window_fov_mm`), the candidate is judged on windows:

1. orient and resample it as the preprocessing does (raw intensities kept), then normalise each
   window on its own (:func:`gate.preprocess.normalize_for`), as a training volume is: a window
   on the grid needs no other step of :func:`gate.preprocess.preprocess`;
2. a lattice of grid-sized windows covering every voxel (stride :data:`STRIDE_FRACTION` of the
   grid, the last window flush with the far side), plus the central crop (the view the index
   would judge without windows, so windows can only add evidence, never remove it);
3. every window is embedded and searched; the :data:`REFINE_TOP` best windows (by their nearest
   patient) are refined by coordinate descent over shifts of :data:`REFINE_STEPS` grid
   fractions, so a copy sitting between two lattice positions is met almost aligned;
4. the candidate's neighbours are the patient-level maximum over every window judged;
5. on a verifying index, a localisation channel that learns nothing
   (:meth:`gate.verify.Verifier.locate`) slides every stored training grid's block means over
   the whole candidate and adds the :data:`gate.verify.LOCATE_K` best patients, each searched
   with its exact cosine and verified at the window where it fits, so a copy the encoder's
   windows never retrieve is still checked against its source.

Pure numpy + scipy (``gate check`` needs no torch); the embedding and the search are passed in,
so the local engine, the Python API and the benchmark run the same function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

import gate.verify as _verify
from gate.errors import DomainError, IntegrityError
from gate.preprocess import PreprocessConfig, normalize_for, resample, shifted, to_canonical
from gate.values import Neighbours, Volume, merge_neighbours
from gate.verify import Located, Verifier, View

STRIDE_FRACTION = 0.25
"""Lattice stride as a fraction of the grid per axis (8x12x8 voxels for 32x48x32): a copy is at
most 4x6x4 voxels off its nearest lattice window, inside the shifts the index poses cover.
Chosen on the validation patients of ``bench/partial_copy.py`` against 0.5 (which leaves copies
up to 8x12x8 voxels off and lost some of them)."""

REFINE_TOP = 8
"""Lattice windows refined per candidate (the best by nearest-patient similarity)."""

REFINE_STEPS: tuple[float, ...] = (0.125, 0.0625, 0.0)
"""Coordinate-descent step sizes as fractions of the grid per axis (0 means one voxel): 4, 2, 1
voxels along X for the 32-voxel grid."""

REFINE_ROUNDS = 3
"""Descent moves tried per step size before going finer."""

POLISH_STEPS: tuple[int, ...] = (2, 1)
"""Voxel steps of the last descent, on the best window only, over all 26 neighbours."""

VISIT_BATCH = 256
"""Windows normalised and judged at a time (256 x 32x48x32 float32 = 50 MB)."""

MAX_WINDOWS = 20_000
"""A candidate needing more windows than this is refused (fail closed, bounded time): measured
78.8 s for the 17,877 lattice windows of a 256x256x160 candidate at the 32x48x32 grid on the
loaded 2-core CPU (bench/large_volumes.py, 4.4 ms a window), so ~90 s at the limit; larger
fields of view need an index of a coarser grid (docs/benchmarks.md, large volumes)."""


@dataclass(frozen=True)
class WindowResult:
    """What window judging found for one candidate.

    Attributes:
        neighbours: patient-level maximum over every window judged.
        n_windows: windows embedded and searched (lattice + centre + refinement).
        best_start: voxel offset (X, Y, Z) of the best window in the oriented, resampled grid.

    """

    neighbours: Neighbours
    n_windows: int
    best_start: tuple[int, int, int]


def oriented(volume: Volume, config: PreprocessConfig) -> Volume:
    """The candidate oriented and resampled as the preprocessing does, raw intensities kept."""
    if config.canonical_orientation:
        volume = to_canonical(volume)
    return resample(volume, config.spacing_mm)


def needs_windows(shape: Sequence[int], grid: Sequence[int]) -> bool:
    """True when a resampled shape exceeds the grid on some axis (a crop would cut anatomy)."""
    return any(int(n) > int(g) for n, g in zip(shape, grid, strict=True))


def lattice(
    shape: Sequence[int], grid: Sequence[int], stride_fraction: float | None = None
) -> list[tuple[int, int, int]]:
    """Window starts covering every voxel of ``shape``: the centred window, then two interleaved lattices.

    The second lattice is offset by half a stride on every axis (a body-centred lattice), so no
    position is further than half a stride from a window on every axis at once.

    Args:
        shape: (X, Y, Z) voxels of the oriented, resampled candidate.
        grid: window size (X, Y, Z).
        stride_fraction: stride per axis as a fraction of ``grid`` (>= 1 voxel); default
            :data:`STRIDE_FRACTION`.

    Returns:
        Distinct (x, y, z) starts, the centred window first; a window never leaves ``shape``
        on an axis where the shape is at least the grid (smaller axes start at 0 and are padded).

    """
    fraction = STRIDE_FRACTION if stride_fraction is None else stride_fraction
    first: list[list[int]] = []
    second: list[list[int]] = []
    centre = []
    for n, g in zip(shape, grid, strict=True):
        last = max(0, int(n) - int(g))
        step = max(1, round(g * fraction))
        starts = list(range(0, last + 1, step))
        if starts[-1] != last:
            starts.append(last)
        first.append(starts)
        second.append([s for s in range(step // 2, last, step) if step // 2 > 0] or [last // 2])
        centre.append(last // 2)
    out: list[tuple[int, int, int]] = [(centre[0], centre[1], centre[2])]
    seen = set(out)
    for axes in (first, second):
        for x in axes[0]:
            for y in axes[1]:
                for z in axes[2]:
                    if (x, y, z) not in seen:
                        seen.add((x, y, z))
                        out.append((x, y, z))
    return out


def count_windows(shape: Sequence[int], grid: Sequence[int]) -> int:
    """Upper bound on the lattice windows for ``shape`` (both lattices, the centre), not built."""
    a = b = 1
    for s, g in zip(shape, grid, strict=True):
        last = max(0, int(s) - int(g))
        step = max(1, round(g * STRIDE_FRACTION))
        a *= len(range(0, last + 1, step)) + 1
        b *= max(1, len(range(step // 2, last, step)))
    return a + b + 1


def cut(base: Volume, start: Sequence[int], grid: Sequence[int]) -> Volume:
    """The grid-sized window at ``start`` (zero-padded where the candidate is smaller than the grid).

    Returns:
        A raw-intensity Volume of shape ``grid`` whose affine places it where it lies in the
        candidate (world coordinates preserved).

    """
    data = np.zeros(tuple(int(g) for g in grid), dtype=np.float32)
    src = tuple(slice(s, s + g) for s, g in zip(start, grid, strict=True))
    piece = base.data[src]
    data[tuple(slice(0, n) for n in piece.shape)] = piece
    return shifted(base, data, start)


Judge = Callable[[list[np.ndarray], Sequence[Sequence[str]]], list[Neighbours]]
"""Embed and search preprocessed grid-sized windows (float32, shape ``config.grid``), in order,
plus per window the named patients with their exact cosine (``include`` of
:meth:`gate.index.TrainingIndex.search_many`; empty for a lattice window)."""


def margin_view(base: Volume, start: Sequence[int], config: PreprocessConfig, margin: int) -> View:
    """The window at ``start`` with ``margin`` voxels of the candidate around it, for verification.

    Normalised on its own as a window is; where the margin leaves the candidate, the view's
    mask is False.
    """
    grid = [int(g) for g in config.grid]
    wide = tuple(g + 2 * margin for g in grid)
    lo = [int(s) - margin for s in start]
    data = np.zeros(wide, dtype=np.float32)
    mask = np.zeros(wide, dtype=bool)
    src, dst = [], []
    for a in range(3):
        a0, a1 = max(0, lo[a]), min(base.data.shape[a], lo[a] + wide[a])
        src.append(slice(a0, a1))
        dst.append(slice(a0 - lo[a], a1 - lo[a]))
    data[tuple(dst)] = base.data[tuple(src)]
    mask[tuple(dst)] = True
    normed = normalize_for(Volume(data, base.affine, base.spacing, base.source, base.patient_id), config).data
    return View(np.where(mask, normed, 0.0).astype(np.float32), mask)


def verify_windows(
    base: Volume,
    found: dict[tuple[int, int, int], Neighbours],
    merged: Neighbours,
    config: PreprocessConfig,
    verifier: Verifier,
    located: dict[str, tuple[tuple[int, int, int], Neighbours]] | None = None,
) -> Neighbours:
    """``merged`` with each patient verified on the window where that patient scored highest.

    A patient the localisation channel placed (``located``: its window and that window's search
    answer, which holds it) is verified there too; its verified score is the better of the two.
    """
    views: dict[tuple[int, int, int], View] = {}
    located = located or {}

    def verified_at(pid: str, s: tuple[int, int, int], nb: Neighbours) -> tuple[float, float]:
        """(verified, identity) score of patient ``pid`` on the window at ``s``."""
        i = nb.patient_ids.index(pid)
        if not nb.matched:
            raise IntegrityError(f"{base.source}: verification found no matched window for a neighbour")
        if s not in views:
            views[s] = margin_view(base, s, config, verifier.max_shift)
        single = Neighbours((pid,), nb.similarities[i : i + 1], matched=(nb.matched[i],))
        out = verifier.verify(single, views[s])
        if out.verified is None or out.identity is None:
            raise IntegrityError(f"{base.source}: verification returned no score for a neighbour")
        return float(out.verified[0]), float(out.identity[0])

    scores, identity = [], []
    for pid in merged.patient_ids:
        tries: list[tuple[tuple[int, int, int], Neighbours]] = []
        best_sim = -2.0
        for s, nb in found.items():
            if pid in nb.patient_ids:
                sim = float(nb.similarities[nb.patient_ids.index(pid)])
                if sim > best_sim:
                    tries, best_sim = [(s, nb)], sim
        if pid in located:
            tries.append(located[pid])
        if not tries:
            raise IntegrityError(f"{base.source}: verification found no matched window for a neighbour")
        both = [verified_at(pid, s, nb) for s, nb in tries]
        scores.append(max(v for v, _ in both))
        identity.append(max(x for _, x in both))
    return dataclasses.replace(
        merged, verified=np.asarray(scores, dtype=np.float64), identity=np.asarray(identity, dtype=np.float64)
    )


def locate_patients(
    base: Volume, config: PreprocessConfig, judge: Judge, verifier: Verifier, n: int | None = None
) -> dict[str, tuple[tuple[int, int, int], Neighbours]]:
    """The localisation channel's patients, each with its window's search answer (which holds it).

    Args:
        base: the candidate oriented and resampled (:func:`oriented`), raw intensities.
        config: the index's preprocessing.
        judge: embeds and searches windows (:data:`Judge`).
        verifier: the index's verifier (:meth:`gate.verify.Verifier.locate`).
        n: patients located (default :data:`gate.verify.LOCATE_K`; 0 turns the channel off).

    Returns:
        Per located patient, the start of the window where it fits and that window's answer.

    """
    n = _verify.LOCATE_K if n is None else n
    if n <= 0:
        return {}
    image = normalize_for(base, config).data
    found: list[Located] = verifier.locate(image, np.ones(image.shape, dtype=bool), n)
    if not found:
        return {}
    views = [normalize_for(cut(base, loc.start, config.grid), config).data for loc in found]
    answers = judge(views, [(loc.patient_id,) for loc in found])
    out: dict[str, tuple[tuple[int, int, int], Neighbours]] = {}
    for loc, nb in zip(found, answers, strict=True):
        if loc.patient_id not in nb.patient_ids:
            raise IntegrityError(
                f"{base.source}: the search did not answer patient {loc.patient_id} it was asked for"
            )
        out[loc.patient_id] = (loc.start, nb)
    return out


def judge_windows(
    volume: Volume, config: PreprocessConfig, judge: Judge, k: int, verifier: Verifier | None = None
) -> WindowResult:
    """Judge every part of a candidate larger than the grid (see the module docstring).

    Args:
        volume: the candidate as read, any shape.
        config: the index's (encoder's) preprocessing; ``fov`` must be ``crop``.
        judge: embeds and searches a list of windows (:data:`Judge`).
        k: neighbours kept (the policy's ``k``).
        verifier: a verifying index's verification: the localisation channel's patients are
            added (:func:`locate_patients`) and each reported patient is verified on the window
            where it scored highest, and a located one also where it fits
            (:func:`verify_windows`).

    Returns:
        The patient-level maximum over every window, the window count and the best window.

    Raises:
        DomainError: ``config.fov`` is ``fit`` (the whole field of view is already one view) or
            the candidate needs more than :data:`MAX_WINDOWS` windows.

    """
    if config.fov != "crop":
        raise DomainError(volume.source, "window judging needs fov: crop; a fov: fit index judges one view")
    base = oriented(volume, config)
    grid = config.grid
    shape = base.data.shape[:3]
    if count_windows(shape, grid) > MAX_WINDOWS:
        raise DomainError(
            volume.source,
            f"{count_windows(shape, grid)} windows of {'x'.join(map(str, grid))} needed, more than "
            f"{MAX_WINDOWS}; judge it with an index of a coarser grid",
        )
    limits = [max(0, int(n) - int(g)) for n, g in zip(shape, grid, strict=True)]
    found: dict[tuple[int, int, int], Neighbours] = {}

    def visit(starts: Sequence[tuple[int, int, int]]) -> None:
        new = list(dict.fromkeys(s for s in starts if s not in found))
        for i in range(0, len(new), VISIT_BATCH):  # bounded memory: one batch of views at a time
            part = new[i : i + VISIT_BATCH]
            views = [normalize_for(cut(base, s, grid), config).data for s in part]
            for s, nb in zip(part, judge(views, [()] * len(views)), strict=True):
                found[s] = nb

    def top1(s: tuple[int, int, int]) -> float:
        return float(found[s].similarities[0])

    visit(lattice(shape, grid))
    current = sorted(found, key=top1, reverse=True)[:REFINE_TOP]
    for fraction in REFINE_STEPS:
        steps = [max(1, round(g * fraction)) for g in grid]
        for _ in range(REFINE_ROUNDS):
            moves: dict[tuple[int, int, int], list[tuple[int, int, int]]] = {}
            for s in current:
                nxt = []
                for axis in range(3):
                    for sign in (-1, 1):
                        t = list(s)
                        t[axis] = min(limits[axis], max(0, t[axis] + sign * steps[axis]))
                        nxt.append((t[0], t[1], t[2]))
                moves[s] = nxt
            visit([t for nxt in moves.values() for t in nxt])
            moved = False
            for i, s in enumerate(current):
                best = max(moves[s], key=top1)
                if top1(best) > top1(s):
                    current[i] = best
                    moved = True
            if not moved:
                break
    best = max(found, key=top1)
    for step in POLISH_STEPS:  # the best window: every diagonal too (a ridge defeats axis moves)
        for _ in range(REFINE_ROUNDS):
            ring = [
                (
                    min(limits[0], max(0, best[0] + dx * step)),
                    min(limits[1], max(0, best[1] + dy * step)),
                    min(limits[2], max(0, best[2] + dz * step)),
                )
                for dx in (-1, 0, 1)
                for dy in (-1, 0, 1)
                for dz in (-1, 0, 1)
            ]
            visit(ring)
            nxt = max(ring, key=top1)
            if top1(nxt) <= top1(best):
                break
            best = nxt
    best_start = max(found, key=top1)
    if verifier is None:
        return WindowResult(merge_neighbours(list(found.values()), k), len(found), best_start)
    located = locate_patients(base, config, judge, verifier)
    parts = [*found.values(), *(nb for _, nb in located.values())]
    merged = merge_neighbours(parts, k, tuple(located))
    merged = verify_windows(base, found, merged, config, verifier, located)
    return WindowResult(merged, len(found) + len(located), best_start)
