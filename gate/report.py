"""The privacy reviewer's HTML report of one run (``gate audit report``). INTERNAL.

The report shows training images next to the candidates they resemble, so it is marked
internal on every page and is refused anywhere inside a bundle.

Where the pictures come from (the audit log stores no images and the index no paths):

- candidates: the generate pipeline keeps every candidate that was not exported in a
  quarantine folder outside the bundle, one ``<candidate_sha256>.nii.gz`` each
  (:func:`quarantine_candidate`); the report finds a rejected record's candidate by hashing the
  volumes it reads from ``--candidates`` (so renamed files still match);
- training volumes: ``--data`` is the training set; its files are read with the same
  pseudonymisation key (and patient map / pattern) as the index was built with, so each
  volume's pseudonymous id equals the ``nearest_patient_id`` in the audit record.

A rejected candidate whose voxels or nearest patient cannot be found still gets its table
row, with a note saying which is missing.
"""

from __future__ import annotations

import html
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from gate.audit import AuditRecord
from gate.bundle import find_bundle_root
from gate.digest import sha256_voxels
from gate.errors import UsageError
from gate.png import encode_gray
from gate.preprocess import PreprocessConfig, preprocess
from gate.values import Volume

INTERNAL_BANNER = "INTERNAL: shows training images; never publish this report or put it in a bundle"
"""Shown at the top of the report and in its title."""

MONTAGE_ZOOM = 4
"""Nearest-neighbour upscaling of montage slices: a 32x48 slice becomes 128x192 pixels."""

HISTOGRAM_BINS = 40
"""Bins of the similarity histogram over [-1, 1] (0.05 wide)."""

VERDICT_COLOURS = {"pass": "#3a7d44", "flag": "#d99a1e", "reject": "#b3261e", "error": "#666666"}


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


def montage(candidate: Volume, training: Volume, config: PreprocessConfig | None = None) -> np.ndarray:
    """Side-by-side slices: top row the candidate, bottom row the training volume.

    Both are preprocessed the same way (the gate's grid and intensity scaling), so what looks
    alike here is what the encoder compared.

    Returns:
        uint8 (H, W) image, separated by white lines, upscaled by :data:`MONTAGE_ZOOM`.

    """
    cfg = config or PreprocessConfig()
    rows = []
    for vol in (candidate, training):
        views = [_to_uint8(v) for v in _views(preprocess(vol, cfg).data)]
        height = max(v.shape[0] for v in views)
        padded = [np.pad(v, ((0, height - v.shape[0]), (0, 2)), constant_values=255) for v in views]
        rows.append(np.concatenate(padded, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1])), constant_values=255) for r in rows]
    image = np.concatenate(rows, axis=0)
    return np.kron(image, np.ones((MONTAGE_ZOOM, MONTAGE_ZOOM), np.uint8))


def histogram_svg(records: Sequence[AuditRecord], width: int = 640, height: int = 220) -> str:
    """Inline SVG: stacked similarity histogram per verdict, with the thresholds as lines."""
    edges = np.linspace(-1.0, 1.0, HISTOGRAM_BINS + 1)
    counts = {}
    for verdict in VERDICT_COLOURS:
        sims = [r.similarity for r in records if r.verdict == verdict and r.similarity is not None]
        counts[verdict] = np.histogram(sims, bins=edges)[0]
    total = sum(counts.values())
    top = max(1, int(np.max(total))) if len(records) else 1
    left, bottom, bar_w = 40, height - 30, (width - 50) / HISTOGRAM_BINS
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="similarity histogram">',
        f'<line x1="{left}" y1="{bottom}" x2="{width - 10}" y2="{bottom}" stroke="black"/>',
    ]
    for i in range(HISTOGRAM_BINS):
        base = 0
        for verdict, colour in VERDICT_COLOURS.items():
            c = int(counts[verdict][i])
            if c:
                h = c / top * (bottom - 20)
                y = bottom - (base + c) / top * (bottom - 20)
                parts.append(
                    f'<rect x="{left + i * bar_w:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" '
                    f'fill="{colour}"><title>{verdict}: {c}</title></rect>'
                )
                base += c
    for tick in (-1.0, -0.5, 0.0, 0.5, 1.0):
        x = left + (tick + 1.0) / 2.0 * (width - 50)
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 15}" font-size="10" text-anchor="middle">{tick:g}</text>'
        )
    for name, values in (
        ("similar", {r.similar_threshold for r in records if r.similar_threshold is not None}),
        ("duplicate", {r.duplicate_threshold for r in records if r.duplicate_threshold is not None}),
    ):
        for value in sorted(values):
            x = left + (value + 1.0) / 2.0 * (width - 50)
            parts.append(
                f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{bottom}" stroke="black" '
                'stroke-dasharray="4 3"/>'
                f'<text x="{x + 3:.1f}" y="18" font-size="10">{name} {value:.3f}</text>'
            )
    parts.append(f'<text x="4" y="20" font-size="10">{top}</text></svg>')
    return "".join(parts)


def build_report(
    run_id: str,
    records: Sequence[AuditRecord],
    candidates: dict[str, Volume],
    training: dict[str, Volume],
    out_dir: Path,
) -> Path:
    """Write ``out_dir/index.html`` and one montage PNG per rejected candidate.

    Args:
        run_id: the run reported.
        records: that run's audit records.
        candidates: candidate volumes by :func:`gate.digest.sha256_voxels`.
        training: training volumes by pseudonymous patient id.
        out_dir: must not exist and must not be inside a bundle; built under a temporary name.

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
        rows = []
        for rec in records:
            if rec.verdict != "reject":
                continue
            note = ""
            cand = candidates.get(rec.candidate_sha256 or "")
            train = training.get(rec.nearest_patient_id or "")
            if cand is None:
                note = "candidate voxels not found in --candidates"
            elif train is None:
                note = f"training patient {rec.nearest_patient_id} not found in --data (same key?)"
            else:
                name = f"montage_{rec.seq:06d}.png"
                (tmp / name).write_bytes(encode_gray(montage(cand, train)))
                note = f'<img src="{name}" alt="candidate (top) and nearest training volume (bottom)">'
            rows.append((rec, note))
        (tmp / "index.html").write_text(_html(run_id, records, rows))
        os.chmod(tmp, 0o700)  # internal: owner only
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _html(run_id: str, records: Sequence[AuditRecord], rejected: list[tuple[AuditRecord, str]]) -> str:
    esc = html.escape
    counts = {v: sum(r.verdict == v for r in records) for v in VERDICT_COLOURS}
    policies = sorted({f"{r.policy_id} ({r.policy_sha256[:12]}…)" for r in records})
    providers = sorted({r.provider for r in records})
    body = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>INTERNAL gate audit report: run {esc(run_id)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
        ".internal{background:#b3261e;color:white;padding:8px;font-weight:bold}</style></head><body>",
        f"<p class='internal'>{esc(INTERNAL_BANNER)}</p>",
        f"<h1>gate audit report: run {esc(run_id)}</h1>",
        f"<p>Policy: {esc(', '.join(policies))}. onnxruntime provider: {esc(', '.join(providers))}. "
        f"Records: {len(records)} (seq {records[0].seq}–{records[-1].seq}), "
        f"{esc(records[0].time)} to {esc(records[-1].time)}.</p>",
        "<h2>Verdicts</h2><table><tr>" + "".join(f"<th>{v}</th>" for v in counts) + "</tr>",
        "<tr>" + "".join(f"<td>{n}</td>" for n in counts.values()) + "</tr></table>",
        "<h2>Nearest-patient similarity</h2>",
        "<p>Cosine similarity of each candidate to its nearest training patient, stacked by verdict "
        "(green pass, amber flag, red reject); dashed lines are the policy's thresholds.</p>",
        histogram_svg(records),
        f"<h2>Rejected candidates ({len(rejected)})</h2>",
        "<p>Top row: the candidate; bottom row: the nearest training patient's volume (middle axial, "
        "coronal and sagittal slices after the gate's preprocessing).</p>",
        "<table><tr><th>seq</th><th>sample</th><th>grade</th><th>similarity</th><th>threshold</th>"
        "<th>exact copy</th><th>nearest patient</th><th>montage</th></tr>",
    ]
    for rec, note in rejected:
        montage_cell = note if note.startswith("<img") else esc(note)
        body.append(
            f"<tr><td>{rec.seq}</td><td>{esc(rec.sample_id or '-')}</td>"
            f"<td>{esc(rec.grade.value if rec.grade else '-')}</td>"
            f"<td>{_num(rec.similarity)}</td><td>{_num(rec.threshold)}</td>"
            f"<td>{'yes' if rec.exact_duplicate else 'no'}</td><td>{esc(rec.nearest_patient_id or '-')}</td>"
            f"<td>{montage_cell}</td></tr>"
        )
    body.append(f"</table><p class='internal'>{esc(INTERNAL_BANNER)}</p></body></html>\n")
    return "\n".join(body)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
