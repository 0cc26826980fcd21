"""The privacy reviewer's HTML report of one run (``gate audit report``). INTERNAL.

The report shows training images next to the candidates they resemble, so it is marked
internal on every page and is refused anywhere inside a bundle.

Sections, riskiest first:

1. what went out: the released (passed) samples closest to the threshold, with montages;
2. duplicates (rejected), most similar first;
3. similar candidates (rejected or flagged), most similar first;
4. per training patient: how often and how closely candidates approached each patient;
5. candidates that could not be decided (errors).

Above them, the verdict counts and a histogram of the run's nearest-patient similarities on
the data's range, stacked by verdict, with the index's calibration distribution overlaid and
bins whose edges fall on the policy's thresholds (no bin straddles a threshold).

Where the pictures come from (the audit log stores no images and the index no paths):

- candidates: the generate pipeline keeps every candidate that was not exported in a
  quarantine folder outside the bundle, one ``<candidate_sha256>.nii.gz`` each
  (:func:`quarantine_candidate`); released samples are the bundle's NIfTI files. The report
  finds a record's candidate by hashing the volumes it reads (so renamed files still match);
- training volumes: ``--data`` is the training set; its files are read with the same
  pseudonymisation key (and patient map / pattern) as the index was built with, so each
  volume's pseudonymous id equals the ``nearest_patient_id`` in the audit record. Without
  training views (``training=None``) only candidates are shown.

Figures are drawn with matplotlib (Agg, no display) and written as PNG with Pillow.
"""

from __future__ import annotations

import html
import io
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
from PIL import Image

from gate.audit import AuditRecord
from gate.bundle import find_bundle_root
from gate.digest import sha256_voxels
from gate.errors import UsageError
from gate.preprocess import PreprocessConfig, preprocess
from gate.values import Volume

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # imported when drawing: `gate generate` imports this module

INTERNAL_BANNER = "INTERNAL: shows training images; never publish this report or put it in a bundle"
"""Shown at the top and the bottom of the report and in its title."""

DEMO_KEY_FILE: Path = Path(__file__).resolve().parent / "models" / "demo-pseudonym.key"
"""The pseudonymisation key the shipped index was built with (public MSD data; a real site keeps
its key private)."""

MONTAGE_ZOOM = 3
"""Nearest-neighbour upscaling of montage slices: a 32x48 slice becomes 96x144 pixels (4 made
one candidate row of the report taller than a laptop screen's half)."""

HISTOGRAM_BINS = 40
"""About this many bins over the data's range; edges are then moved onto the thresholds."""

HISTOGRAM_PAD = 0.02
"""Share of the data's span added on each side of the histogram, so no bar touches the frame."""

TOP_RELEASED = 20
"""Released samples shown (closest to the threshold first): the riskiest output of a run."""

TOP_PATIENTS = 50
"""Training patients listed in the per-patient view (most closely approached first)."""

VERDICT_COLOURS = {"pass": "#3a7d44", "flag": "#d99a1e", "reject": "#b3261e", "error": "#666666"}

CALIBRATION_COLOUR = "#1f4e9c"

THRESHOLD_STYLES = {"similar": (0, (5, 3)), "duplicate": (0, (1, 2))}
"""Line dash of each threshold; the labels are in the legend, never on top of each other."""


def quarantine_candidate(volume: Volume, quarantine_dir: Path) -> Path:
    """Keep a candidate that was not exported, for review: ``<sha256_voxels>.nii.gz``.

    The quarantine folder is internal and must not be inside a bundle.

    Args:
        volume: the candidate exactly as judged (its voxels hash to the audit record's
            ``candidate_sha256``).
        quarantine_dir: created if missing.

    Returns:
        The file (an existing one with the same name already holds the same voxels).

    Raises:
        UsageError: the folder is inside a bundle.

    """
    if find_bundle_root(quarantine_dir) is not None:
        raise UsageError(f"{quarantine_dir}: inside a bundle; quarantined candidates must stay internal")
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    path = quarantine_dir / f"{sha256_voxels(volume.data)}.nii.gz"
    if path.exists():
        return path
    fd, tmp = tempfile.mkstemp(prefix=".q.", suffix=".nii.gz", dir=quarantine_dir)
    os.close(fd)
    try:
        nib.save(nib.Nifti1Image(np.ascontiguousarray(volume.data, np.float32), volume.affine), tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _to_uint8(slice2d: np.ndarray) -> np.ndarray:
    return (np.clip(slice2d, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _views(grid: np.ndarray) -> list[np.ndarray]:
    """Middle axial, coronal and sagittal slices of an (X, Y, Z) RAS grid, top = superior/anterior."""
    x, y, z = (n // 2 for n in grid.shape)
    axial = np.rot90(grid[:, :, z])  # rows = Y (anterior up), columns = X
    coronal = np.rot90(grid[:, y, :])  # rows = Z (superior up)
    sagittal = np.rot90(grid[x, :, :])
    return [axial, coronal, sagittal]


def montage(
    candidate: Volume, training: Volume | None = None, config: PreprocessConfig | None = None
) -> np.ndarray:
    """Side-by-side slices: top row the candidate, bottom row the training volume (if given).

    Both are preprocessed the same way (the gate's grid and intensity scaling), so what looks
    alike here is what the encoder compared.

    Returns:
        uint8 (H, W) image, rows separated by white lines, upscaled by :data:`MONTAGE_ZOOM`.

    """
    cfg = config or PreprocessConfig()
    rows = []
    for vol in (candidate, training):
        if vol is None:
            continue
        views = [_to_uint8(v) for v in _views(preprocess(vol, cfg).data)]
        height = max(v.shape[0] for v in views)
        padded = [np.pad(v, ((0, height - v.shape[0]), (0, 2)), constant_values=255) for v in views]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1])), constant_values=255) for r in rows]
    image = np.concatenate(rows, axis=0)
    return np.kron(image, np.ones((MONTAGE_ZOOM, MONTAGE_ZOOM), np.uint8))


def write_png(image: np.ndarray, path: Path) -> Path:
    """Write a uint8 (H, W) greyscale image as PNG (Pillow).

    Raises:
        ValueError: not a non-empty 2D uint8 array.

    """
    if image.ndim != 2 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"expected a non-empty uint8 (H, W) image; got {image.dtype} {image.shape}")
    Image.fromarray(image, mode="L").save(path, format="PNG")
    return path


def thresholds_of(records: Sequence[AuditRecord]) -> dict[str, list[float]]:
    """The distinct ``similar`` and ``duplicate`` thresholds the run's records were judged with."""
    return {
        "similar": sorted({r.similar_threshold for r in records if r.similar_threshold is not None}),
        "duplicate": sorted({r.duplicate_threshold for r in records if r.duplicate_threshold is not None}),
    }


def histogram_edges(
    values: Sequence[float], thresholds: Sequence[float], bins: int = HISTOGRAM_BINS
) -> np.ndarray:
    """Bin edges over the data's range in which every threshold is an edge.

    The range spans ``values`` and ``thresholds`` (padded by :data:`HISTOGRAM_PAD` of the span,
    clipped to [-1, 1]); each stretch between consecutive thresholds gets a whole number of
    equal bins of about ``span / bins``, so no bin straddles a threshold.

    Args:
        values: similarities to show (any number, finite).
        thresholds: cosine similarities that must fall on bin edges.
        bins: about how many bins over the whole range.

    Returns:
        Ascending edges, float64 (B + 1,).

    """
    points = np.asarray([*values, *thresholds], np.float64)
    if points.size == 0:
        points = np.asarray([0.0, 1.0])
    lo, hi = float(points.min()), float(points.max())
    pad = max(hi - lo, 0.02) * HISTOGRAM_PAD
    lo, hi = max(-1.0, lo - pad), min(1.0, hi + pad)
    if hi - lo < 1e-6:
        lo, hi = max(-1.0, lo - 0.01), min(1.0, hi + 0.01)
    width = (hi - lo) / bins
    breaks = sorted({lo, hi, *(float(t) for t in thresholds if lo < t < hi)})
    edges = [lo]
    for a, b in pairwise(breaks):
        k = max(1, round((b - a) / width))
        edges.extend(np.linspace(a, b, k + 1)[1:].tolist())
    return np.asarray(edges)


def histogram_png(records: Sequence[AuditRecord], calibration: Sequence[float] | None, path: Path) -> Path:
    """Write :func:`histogram_figure` as a PNG."""
    buf = io.BytesIO()
    histogram_figure(records, calibration).savefig(buf, format="png")
    path.write_bytes(buf.getvalue())
    return path


def histogram_figure(records: Sequence[AuditRecord], calibration: Sequence[float] | None) -> Figure:
    """Draw the similarity histogram (matplotlib's object API, Agg; no global pyplot state).

    Candidates are stacked by verdict, as a share of the run's candidates per bin; the
    calibration distribution (each real reference patient's nearest-training similarity) is a
    step outline, as a share of the reference patients; thresholds are vertical lines named in
    the legend.
    """
    from matplotlib.figure import Figure

    sims = {
        v: [r.similarity for r in records if r.verdict == v and r.similarity is not None]
        for v in VERDICT_COLOURS
    }
    decided = sum(len(s) for s in sims.values())
    limits = thresholds_of(records)
    cal = list(calibration or [])
    edges = histogram_edges(
        [s for v in sims.values() for s in v] + cal, limits["similar"] + limits["duplicate"]
    )
    fig = Figure(figsize=(10.0, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    bottom = np.zeros(len(edges) - 1)
    for verdict, values in sims.items():
        if not values:
            continue
        counts = np.histogram(values, bins=edges)[0] / max(decided, 1)
        ax.bar(
            edges[:-1], counts, width=np.diff(edges), bottom=bottom, align="edge",
            color=VERDICT_COLOURS[verdict], edgecolor="white", linewidth=0.5,
            label=f"{verdict} ({len(values)})",
        )  # fmt: skip
        bottom += counts
    if cal:
        shares = np.histogram(cal, bins=edges)[0] / len(cal)
        ax.stairs(
            shares, edges, color=CALIBRATION_COLOUR, linewidth=1.8,
            label=f"calibration: real patients ({len(cal)})",
        )  # fmt: skip
    for name, values in limits.items():
        for value in values:
            ax.axvline(
                value, color="black", linestyle=THRESHOLD_STYLES[name], linewidth=1.2,
                label=f"{name} from {value:.3f}",
            )  # fmt: skip
    ax.set_xlim(edges[0], edges[-1])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # headroom: the tallest bar does not touch the frame
    ax.set_xlabel("cosine similarity to the nearest training patient")
    ax.set_ylabel("share per bin")
    # the labels live in a legend beside the axes: they can neither overlap each other nor the bars
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


@dataclass(frozen=True)
class PatientRow:
    """How candidates approached one training patient.

    Attributes:
        patient_id: pseudonymous id.
        nearest: candidates whose nearest training patient this is.
        max_similarity: the closest approach (cosine similarity).
        duplicates: of those, graded duplicate.
        similar: of those, graded similar.
        released: of those, passed (released).

    """

    patient_id: str
    nearest: int
    max_similarity: float
    duplicates: int
    similar: int
    released: int


def patient_rows(records: Sequence[AuditRecord]) -> list[PatientRow]:
    """One row per training patient some candidate came nearest to, closest approach first."""
    by_patient: dict[str, list[AuditRecord]] = {}
    for rec in records:
        if rec.nearest_patient_id is not None and rec.similarity is not None:
            by_patient.setdefault(rec.nearest_patient_id, []).append(rec)
    rows = [
        PatientRow(
            patient_id=pid,
            nearest=len(recs),
            max_similarity=max(r.similarity for r in recs if r.similarity is not None),
            duplicates=sum(r.grade is not None and r.grade.value == "duplicate" for r in recs),
            similar=sum(r.grade is not None and r.grade.value == "similar" for r in recs),
            released=sum(r.verdict == "pass" for r in recs),
        )
        for pid, recs in by_patient.items()
    ]
    return sorted(rows, key=lambda r: (-r.max_similarity, -r.nearest, r.patient_id))


def risk_sections(records: Sequence[AuditRecord]) -> dict[str, list[AuditRecord]]:
    """The run's records by section, riskiest section first, most similar first inside each.

    ``released``: passes (top :data:`TOP_RELEASED`); ``duplicate``: rejected duplicates and exact
    copies; ``similar``: every other rejected or flagged candidate; ``error``: undecided.
    """

    def closest(recs: list[AuditRecord]) -> list[AuditRecord]:
        return sorted(recs, key=lambda r: (-(r.similarity if r.similarity is not None else -2.0), r.seq))

    dup = [r for r in records if r.verdict == "reject" and (r.exact_duplicate or _grade(r) == "duplicate")]
    dup_seqs = {r.seq for r in dup}
    similar = [r for r in records if r.verdict in ("reject", "flag") and r.seq not in dup_seqs]
    return {
        "released": closest([r for r in records if r.verdict == "pass"])[:TOP_RELEASED],
        "duplicate": closest(dup),
        "similar": closest(similar),
        "error": [r for r in records if r.verdict == "error"],
    }


def _grade(rec: AuditRecord) -> str:
    return rec.grade.value if rec.grade is not None else "-"


def build_report(
    run_id: str,
    records: Sequence[AuditRecord],
    candidates: dict[str, Volume],
    training: dict[str, Volume] | None,
    out_dir: Path,
    calibration: Sequence[float] | None = None,
) -> Path:
    """Write ``out_dir/index.html``, the histogram and one montage PNG per shown candidate.

    Args:
        run_id: the run reported.
        records: that run's audit records.
        candidates: candidate volumes by :func:`gate.digest.sha256_voxels`.
        training: training volumes by pseudonymous patient id; None: no training views (only
            candidates and pseudonymous ids are shown).
        out_dir: must not exist and must not be inside a bundle; built under a temporary name.
        calibration: the index's calibration similarities (overlaid on the histogram).

    Returns:
        The path of ``index.html``.

    Raises:
        UsageError: ``out_dir`` exists or is inside a bundle, or the run has no records.

    """
    if find_bundle_root(out_dir.parent if not out_dir.exists() else out_dir) is not None:
        raise UsageError(f"{out_dir}: inside a bundle; the report shows training images and stays internal")
    if out_dir.exists():
        raise UsageError(f"{out_dir}: already exists; reports are never overwritten; choose a new --out")
    if not records:
        raise UsageError(f"run {run_id!r} has no records in the audit log; see `gate audit show`")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        histogram_png(records, calibration, tmp / "histogram.png")
        sections = risk_sections(records)
        cells: dict[int, str] = {}
        for rec in [r for name in ("released", "duplicate", "similar") for r in sections[name]]:
            cells[rec.seq] = _montage_cell(rec, candidates, training, tmp)
        thumbs: dict[str, str] = {}
        patients = patient_rows(records)
        if training is not None:
            for row in patients[:TOP_PATIENTS]:
                vol = training.get(row.patient_id)
                if vol is not None:
                    name = f"patient_{row.patient_id}.png"
                    write_png(montage(vol), tmp / name)
                    thumbs[row.patient_id] = name
        page = _html(run_id, records, sections, cells, patients, thumbs, training, calibration)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        os.chmod(tmp, 0o700)  # internal: owner only
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _montage_cell(
    rec: AuditRecord, candidates: dict[str, Volume], training: dict[str, Volume] | None, folder: Path
) -> str:
    cand = candidates.get(rec.candidate_sha256 or "")
    if cand is None:
        return html.escape("candidate voxels not found in --candidates")
    train = None if training is None else training.get(rec.nearest_patient_id or "")
    name = f"montage_{rec.seq:06d}.png"
    write_png(montage(cand, train), folder / name)
    if training is None:
        alt, note = "candidate", ""
    elif train is None:
        alt = "candidate"
        note = f"<br>training patient {html.escape(rec.nearest_patient_id or '-')} not in --data"
    else:
        alt, note = "candidate (top) and nearest training volume (bottom)", ""
    return f'<img src="{name}" alt="{alt}">{note}'


STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
    ".internal{background:#b3261e;color:white;padding:8px;font-weight:bold}"
    "img{image-rendering:pixelated}nav a{margin-right:1em}"
)


def _html(
    run_id: str,
    records: Sequence[AuditRecord],
    sections: dict[str, list[AuditRecord]],
    cells: dict[int, str],
    patients: list[PatientRow],
    thumbs: dict[str, str],
    training: dict[str, Volume] | None,
    calibration: Sequence[float] | None,
) -> str:
    esc = html.escape
    counts = {v: sum(r.verdict == v for r in records) for v in VERDICT_COLOURS}
    policies = sorted({f"{r.policy_id} ({r.policy_sha256[:12]}…)" for r in records})
    providers = sorted({r.provider for r in records})
    limits = thresholds_of(records)
    passes = counts["pass"]
    titles = {
        "released": f"Released: the {len(sections['released'])} passed samples closest to the threshold "
        f"(of {passes})",
        "duplicate": f"Duplicates: rejected ({len(sections['duplicate'])})",
        "similar": f"Similar: rejected or flagged ({len(sections['similar'])})",
        "patients": f"Per training patient ({len(patients)} approached)",
        "error": f"Not decided: errors ({len(sections['error'])})",
    }
    picture = (
        "Top row: the candidate; bottom row: its nearest training patient's volume (middle axial, "
        "coronal and sagittal slices after the gate's preprocessing)."
        if training is not None
        else "Candidate slices only (report written with --no-training-views)."
    )
    body = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>INTERNAL gate audit report: run {esc(run_id)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<p class='internal'>{esc(INTERNAL_BANNER)}</p>",
        f"<h1>gate audit report: run {esc(run_id)}</h1>",
        f"<p>Policy: {esc(', '.join(policies))}; thresholds: similar from "
        f"{esc(', '.join(f'{t:.4f}' for t in limits['similar']) or '-')}, duplicate from "
        f"{esc(', '.join(f'{t:.4f}' for t in limits['duplicate']) or '-')}. "
        f"onnxruntime provider: {esc(', '.join(providers))}. "
        f"Records: {len(records)} (seq {records[0].seq}–{records[-1].seq}), "
        f"{esc(records[0].time)} to {esc(records[-1].time)}.</p>",
        "<nav>" + "".join(f"<a href='#{k}'>{esc(v)}</a>" for k, v in titles.items()) + "</nav>",
        "<h2>Verdicts</h2><table><tr>" + "".join(f"<th>{v}</th>" for v in counts) + "</tr>",
        "<tr>" + "".join(f"<td>{n}</td>" for n in counts.values()) + "</tr></table>",
        "<h2>Nearest-patient similarity</h2>",
        "<p>Share of the run's candidates per bin, stacked by verdict (green pass, amber flag, red "
        "reject)"
        + (
            f"; blue outline: the index's calibration, each of {len(calibration)} real reference "
            "patients' nearest-training similarity"
            if calibration
            else ""
        )
        + ". Dashed and dotted lines: the policy's thresholds; bin edges fall on them.</p>",
        "<img src='histogram.png' alt='similarity histogram with thresholds and calibration'>",
        f"<p>{esc(picture)}</p>",
    ]
    header = (
        "<table><tr><th>seq</th><th>sample</th><th>verdict</th><th>grade</th><th>similarity</th>"
        "<th>threshold</th><th>verified</th><th>verified threshold</th><th>identity</th>"
        "<th>identity duplicate bound</th><th>exact copy</th>"
        "<th>nearest patient</th><th>montage</th></tr>"
    )
    for key in ("released", "duplicate", "similar"):
        body.append(f"<h2 id='{key}'>{esc(titles[key])}</h2>")
        if not sections[key]:
            body.append("<p>None.</p>")
            continue
        body.append(header)
        for rec in sections[key]:
            body.append(
                f"<tr><td>{rec.seq}</td><td>{esc(rec.sample_id or '-')}</td><td>{esc(rec.verdict)}</td>"
                f"<td>{esc(_grade(rec))}</td><td>{_num(rec.similarity)}</td><td>{_num(rec.threshold)}</td>"
                f"<td>{_num(rec.verified)}</td><td>{_num(rec.verified_similar_threshold)}</td>"
                f"<td>{_num(rec.identity)}</td><td>{_num(rec.identity_duplicate_threshold)}</td>"
                f"<td>{'yes' if rec.exact_duplicate else 'no'}</td>"
                f"<td>{esc(rec.nearest_patient_id or '-')}</td><td>{cells.get(rec.seq, '')}</td></tr>"
            )
        body.append("</table>")
    body.append(f"<h2 id='patients'>{esc(titles['patients'])}</h2>")
    body.append(
        "<p>Each training patient some candidate came nearest to, closest approach first"
        + (f" (top {TOP_PATIENTS})" if len(patients) > TOP_PATIENTS else "")
        + ".</p><table><tr><th>patient</th><th>training file</th><th>candidates nearest</th>"
        "<th>closest similarity</th><th>duplicates</th><th>similar</th><th>released</th>"
        "<th>training volume</th></tr>"
    )
    for row in patients[:TOP_PATIENTS]:
        vol = None if training is None else training.get(row.patient_id)
        source = "-" if vol is None else Path(vol.source).name
        thumb = (
            f"<img src='{thumbs[row.patient_id]}' alt='training volume'>" if row.patient_id in thumbs else ""
        )
        body.append(
            f"<tr><td>{esc(row.patient_id)}</td><td>{esc(source)}</td><td>{row.nearest}</td>"
            f"<td>{row.max_similarity:.4f}</td><td>{row.duplicates}</td><td>{row.similar}</td>"
            f"<td>{row.released}</td><td>{thumb}</td></tr>"
        )
    body.append("</table>")
    body.append(f"<h2 id='error'>{esc(titles['error'])}</h2>")
    if sections["error"]:
        body.append("<table><tr><th>seq</th><th>sample</th><th>error</th></tr>")
        for rec in sections["error"]:
            body.append(
                f"<tr><td>{rec.seq}</td><td>{esc(rec.sample_id or '-')}</td>"
                f"<td>{esc(rec.error or '-')}</td></tr>"
            )
        body.append("</table>")
    else:
        body.append("<p>None.</p>")
    body.append(f"<p class='internal'>{esc(INTERNAL_BANNER)}</p></body></html>\n")
    return "\n".join(body)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
