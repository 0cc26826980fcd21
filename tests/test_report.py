from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from gate.audit import AuditEntry, AuditLog, AuditRecord
from gate.cli import main
from gate.errors import UsageError
from gate.report import (
    DEMO_KEY_FILE,
    INTERNAL_BANNER,
    build_report,
    histogram_edges,
    histogram_figure,
    patient_rows,
    quarantine_candidate,
    risk_sections,
    write_png,
)
from gate.values import Decision, Grade, Verdict
from tests.bundle_helpers import (
    RUN_ID,
    candidate,
    make_training,
    release_policy_text,
    run_pipeline,
    write_policy,
)
from tests.conftest import TEST_KEY

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def record(
    seq: int, verdict: str, grade: Grade | None, sim: float | None, patient: str = "p-a"
) -> AuditRecord:
    return AuditRecord(
        run_id="run-a",
        time="2026-12-01T00:00:00+00:00",
        sample_id=f"c{seq:06d}",
        verdict=verdict,  # type: ignore[arg-type]
        grade=grade,
        nearest_patient_id=patient if sim is not None else None,
        similarity=sim,
        threshold=0.9,
        similar_threshold=0.9,
        duplicate_threshold=0.97,
        exact_duplicate=False,
        policy_id="strict",
        policy_sha256="b" * 64,
        provider="CPUExecutionProvider",
        seq=seq,
        prev_hash="0" * 64,
        hash="1" * 64,
    )


@pytest.mark.parametrize(
    ("values", "thresholds"),
    [
        ([0.85, 0.86, 0.9, 0.99], [0.912, 0.981]),  # data in the right 15%: the range follows it
        ([0.1, 0.5], [0.91, 0.98]),  # thresholds beyond the data still shown
        ([0.95], [0.95]),
        ([0.7, 0.72, 0.74], []),
    ],
)
def test_histogram_bins_fall_on_thresholds_and_follow_the_data(
    values: list[float], thresholds: list[float]
) -> None:
    edges = histogram_edges(values, thresholds)
    assert np.all(np.diff(edges) > 0)
    lo, hi = min(values + thresholds), max(values + thresholds)
    assert edges[0] <= lo and edges[-1] >= hi
    assert edges[-1] - edges[0] <= (hi - lo) * 1.1 + 0.05  # the data's range, not [-1, 1]
    for t in thresholds:
        assert np.isclose(edges, t, atol=1e-12).any(), (t, edges)
        assert not np.any((edges[:-1] < t - 1e-12) & (edges[1:] > t + 1e-12)), f"a bin straddles {t}"


def test_histogram_names_thresholds_in_a_legend_and_follows_the_data() -> None:
    recs = [record(i, "pass", Grade.DIFFERENT, 0.8 + 0.001 * i) for i in range(10)]
    recs += [record(10, "reject", Grade.SIMILAR, 0.93), record(11, "reject", Grade.DUPLICATE, 0.975)]
    fig = histogram_figure(recs, [0.7, 0.8, 0.85, 0.9])
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "calibration: real patients (4)",
        "similar from 0.900",
        "duplicate from 0.970",
        "pass (10)",
        "reject (2)",
    ]
    assert len(ax.texts) == 0  # no label drawn on the plot, where labels overlapped each other
    lo, hi = ax.get_xlim()
    assert 0.68 <= lo < 0.7 and 0.975 < hi <= 0.99  # the data's range, not [-1, 1]
    fig.canvas.draw()
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.x0 >= ax.get_window_extent().x1  # beside the bars, not on them


def test_write_png_round_trip(tmp_path: Path) -> None:
    image = (np.arange(7 * 5) * 7 % 256).astype(np.uint8).reshape(7, 5)
    path = write_png(image, tmp_path / "a.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(
        ValueError, match=re.escape("expected a non-empty uint8 (H, W) image; got float64 (2, 2)")
    ):
        write_png(np.zeros((2, 2)), tmp_path / "b.png")


def test_sections_put_duplicates_first_and_the_closest_first() -> None:
    recs = [
        record(0, "reject", Grade.SIMILAR, 0.93),
        record(1, "reject", Grade.DUPLICATE, 0.98),
        record(2, "pass", Grade.DIFFERENT, 0.50),
        record(3, "reject", Grade.SIMILAR, 0.95),
        record(4, "reject", Grade.DUPLICATE, 0.99, "p-b"),
        record(5, "pass", Grade.DIFFERENT, 0.88, "p-b"),
        record(6, "flag", Grade.SIMILAR, 0.91),
        record(7, "error", None, None),
    ]
    sections = risk_sections(recs)
    assert [r.seq for r in sections["released"]] == [5, 2]
    assert [r.seq for r in sections["duplicate"]] == [4, 1]
    assert [r.seq for r in sections["similar"]] == [3, 0, 6]
    assert [r.seq for r in sections["error"]] == [7]
    rows = patient_rows(recs)
    assert [
        (r.patient_id, r.nearest, r.max_similarity, r.duplicates, r.similar, r.released) for r in rows
    ] == [
        ("p-b", 2, 0.99, 1, 0, 1),
        ("p-a", 5, 0.98, 1, 3, 1),
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A gated run: three new candidates pass, a training copy is rejected; key, quarantine, bundle."""
    root = tmp_path_factory.mktemp("report")
    training = make_training(root)
    policy = write_policy(root / "pol", "release", release_policy_text())
    copy = training.volumes[2]
    cands = [("s000001", 100, candidate(100)), ("c000001", 101, copy)]
    cands += [(f"s{i:06d}", 100 + i, candidate(100 + i)) for i in (2, 3)]
    log_path = root / "audit.jsonl"
    bundle, verdicts = run_pipeline(training, policy, root / "bundle", log_path, cands)
    assert list(verdicts.values()).count(Verdict.REJECT) == 1, verdicts
    quarantine = root / "quarantine"
    quarantine_candidate(copy, quarantine)
    key = root / "key"
    key.write_text(TEST_KEY.hex())
    return {
        "root": root,
        "training": training,
        "copy": copy,
        "log": log_path,
        "bundle": bundle,
        "quarantine": quarantine,
        "key": key,
        "base": [
            "audit",
            "report",
            RUN_ID,
            "--log",
            str(log_path),
            "--candidates",
            str(quarantine),
            "--candidates",
            str(bundle / "samples"),
            "--index",
            str(training.index_dir),
        ],
    }


@pytest.fixture(scope="module")
def report_dir(run: dict[str, Any]) -> Path:
    out = run["root"] / "review"
    args = [*run["base"], "--data", str(run["training"].data_dir), "--id-key-file", str(run["key"])]
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_report_sections_riskiest_first_with_montages(run: dict[str, Any], report_dir: Path) -> None:
    page = (report_dir / "index.html").read_text()
    assert page.count(INTERNAL_BANNER) == 2
    assert "<td>3</td><td>0</td><td>1</td><td>0</td>" in page  # pass, flag, reject, error
    heads = [
        "Released: the 3 passed samples closest to the threshold (of 3)</h2>",
        "Duplicates: rejected (1)</h2>",
        "Similar: rejected or flagged (0)</h2>",
        "Per training patient (",
        "Not decided: errors (0)</h2>",
    ]
    positions = [page.index(h, page.index("</nav>")) for h in heads]
    assert positions == sorted(positions)
    released = page[positions[0] : positions[1]]
    sims = [float(s) for s in re.findall(r"<td>pass</td><td>different</td><td>([0-9.]+)</td>", released)]
    assert len(sims) == 3 and sims == sorted(sims, reverse=True)
    assert released.count('<img src="montage_') == 3  # what went out, beside its nearest patient
    dup = page[positions[1] : positions[2]]
    assert run["copy"].patient_id in dup and "<td>yes</td>" in dup and '<img src="montage_' in dup
    patients = page[positions[3] : positions[4]]
    assert "case_002.nii.gz" in patients and f"patient_{run['copy'].patient_id}.png" in patients
    assert "blue outline: the index's calibration, each of 8 real reference patients" in page
    for name in re.findall(r"src=['\"]([^'\"]+\.png)['\"]", page):
        with Image.open(report_dir / name) as img:
            assert img.width > 50 and img.height > 50, name
    # an exact copy's two montage rows (candidate, training) are identical
    (dup_png,) = re.findall(r'<img src="(montage_\d+\.png)"', dup)
    pixels = np.asarray(Image.open(report_dir / dup_png))
    half = pixels.shape[0] // 2
    np.testing.assert_array_equal(pixels[: half - 8], pixels[half : 2 * half - 8])


def test_report_refuses_overwrite_and_bundles(run: dict[str, Any], report_dir: Path) -> None:
    args = [*run["base"], "--data", str(run["training"].data_dir), "--id-key-file", str(run["key"])]
    again = CliRunner().invoke(main, [*args, "--out", str(report_dir)])
    assert again.exit_code == 2 and "already exists; reports are never overwritten" in again.output
    inside = CliRunner().invoke(main, [*args, "--out", str(run["bundle"] / "review")])
    assert inside.exit_code == 2
    assert "inside a bundle; the report shows training images and stays internal" in inside.output
    assert not (run["bundle"] / "review").exists()


def test_missing_key_is_a_usage_error(run: dict[str, Any], tmp_path: Path) -> None:
    missing = tmp_path / "no.key"
    args = [*run["base"], "--data", str(run["training"].data_dir), "--id-key-file", str(missing)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.output == (
        f"gate: error: {missing}: no pseudonymisation key; the report maps nearest patients back to "
        "--data with the key the index was built with: give --id-key-file KEY (or $GATE_ID_KEY_FILE; "
        f"the shipped index's is {DEMO_KEY_FILE}), or --no-training-views\n"
    )
    assert not missing.exists() and not (tmp_path / "r").exists()  # no key is created on the way


def test_wrong_key_is_an_integrity_error(run: dict[str, Any], tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text(bytes(range(1, 33)).hex())
    args = [*run["base"], "--data", str(run["training"].data_dir), "--id-key-file", str(wrong)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r")])
    assert result.exit_code == 3
    assert result.output == (
        f"gate: error: {wrong}: none of the 8 volume(s) in --data maps to a patient of index "
        f"{run['training'].index_dir} with this key: wrong key or not the index's training data; give "
        "the index's --id-key-file, or --no-training-views\n"
    )


def test_no_training_views_needs_no_key(
    run: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "absent.key"))
    out = tmp_path / "r"
    result = CliRunner().invoke(main, [*run["base"], "--no-training-views", "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert "Candidate slices only (report written with --no-training-views)." in page
    assert "case_0" not in page and "patient_p-" not in page
    assert not (tmp_path / "absent.key").exists()
    both = CliRunner().invoke(
        main,
        [*run["base"], "--no-training-views", "--data", str(run["training"].data_dir), "--out", str(out)],
    )
    assert (
        both.exit_code == 2
        and both.output == "gate: error: --data and --no-training-views exclude each other\n"
    )
    neither = CliRunner().invoke(main, [*run["base"], "--out", str(tmp_path / "r2")])
    assert neither.exit_code == 2
    assert neither.output == (
        "gate: error: give --data TRAINING_DIR (read with the index's key) or --no-training-views\n"
    )


def test_run_id_prefix(run: dict[str, Any], tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    decision = Decision(Verdict.PASS, Grade.DIFFERENT, "p-00000000000000aa", 0.1, 0.97, "strict", "b" * 64)
    for run_id in ("20261125T031500Z-3fa2c1", "20261125T031500Z-3fa2c2"):
        log.append(AuditEntry.for_decision(run_id, decision, "a" * 64, "CPUExecutionProvider"))
    base = ["audit", "report", "--log", str(log.path), "--candidates", str(tmp_path), "--no-training-views"]
    base += ["--index", str(run["training"].index_dir)]
    ambiguous = CliRunner().invoke(main, [*base, "20261125T031500Z-3fa2", "--out", str(tmp_path / "r")])
    assert ambiguous.exit_code == 2
    assert (
        "run id prefix '20261125T031500Z-3fa2' matches 2 runs (20261125T031500Z-3fa2c1, " in ambiguous.output
    )
    unique = CliRunner().invoke(main, [*base, "20261125T031500Z-3fa2c2", "--out", str(tmp_path / "r")])
    assert unique.exit_code == 0, unique.output
    assert "run 20261125T031500Z-3fa2c2</h1>" in (tmp_path / "r" / "index.html").read_text()
    none = CliRunner().invoke(main, [*base, "2099", "--out", str(tmp_path / "r3")])
    assert none.exit_code == 2 and "run '2099' has no records in the audit log" in none.output


def test_report_notes_missing_pictures(tmp_path: Path) -> None:
    recs = [record(1, "reject", Grade.DUPLICATE, 0.99)]
    path = build_report("run-a", recs, {}, {}, tmp_path / "r")
    assert "candidate voxels not found in --candidates" in path.read_text()
    with pytest.raises(UsageError, match=re.escape("run 'run-z' has no records in the audit log")):
        build_report("run-z", [], {}, {}, tmp_path / "r2")


def test_generate_prints_a_report_command_with_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from gate.cli.generate import _print_summary
    from gate.index import DEFAULT_INDEX_DIR
    from gate.pipeline import GenerateResult

    result = GenerateResult(
        run_id="r1", bundle=tmp_path / "gate-r1", wanted=2, audit_log=tmp_path / "a.jsonl"
    )
    result.candidates, result.exported, result.quarantine = 3, 2, tmp_path / "q" / "r1"
    _print_summary(result, "strict", 1.0, DEFAULT_INDEX_DIR)
    out = capsys.readouterr().out
    assert f"--id-key-file {DEMO_KEY_FILE} --out REPORT_DIR" in out
    assert f"--candidates {tmp_path / 'gate-r1' / 'samples'}" in out
    _print_summary(result, "strict", 1.0, tmp_path / "my-index")
    out = capsys.readouterr().out
    assert "--id-key-file INDEX_KEY_FILE" in out
    assert "the pseudonymisation key the index was built with" in out


IMAGE_CHECK = """<script>
window.addEventListener('load', () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src);
  document.body.setAttribute('data-images', String(document.images.length));
  document.body.setAttribute('data-broken', JSON.stringify(bad));
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_every_image_loads_in_headless_chromium(report_dir: Path, tmp_path: Path) -> None:
    view = tmp_path / "view"
    shutil.copytree(report_dir, view)
    page = (view / "index.html").read_text().replace("</body>", IMAGE_CHECK + "</body>")
    (view / "check.html").write_text(page)
    dom = _chromium("--dump-dom", (view / "check.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    count = re.search(r'data-images="(\d+)"', dom.stdout)
    broken = re.search(r'data-broken="([^"]*)"', dom.stdout)
    assert count is not None and broken is not None, dom.stdout[-2000:]
    expected = len(re.findall(r"<img ", (report_dir / "index.html").read_text()))
    assert int(count.group(1)) == expected > 5
    assert json.loads(broken.group(1).replace("&quot;", '"')) == []
    shot = tmp_path / "shot.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,1600", (view / "index.html").as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # a rendered page, not a blank one
