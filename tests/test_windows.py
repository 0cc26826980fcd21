"""gate.windows: a candidate larger than the index's grid is judged on windows over all of it.

A training volume pasted anywhere inside a larger field of view (a partial copy) must be found:
at the centre, at an offset, on a tissue-like background, under strict and standard, by an index
built with ``--window-fov``; the same candidate is refused (never judged on a crop) by an index
built without it and by a path that cannot run windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from gate.cli import main
from gate.domain import check_in_domain, measure_domain
from gate.errors import DomainError
from gate.preprocess import PreprocessConfig
from gate.values import Neighbours, Volume
from gate.values import merge_neighbours as max_over_views
from gate.windows import count_windows, cut, judge_windows, lattice, needs_windows
from tests.test_domain import paste
from tests.volumes import make_blob

PARTIAL_FOV = (80, 112, 80)
"""The partial-copy field of view of the benchmark (gate.encoder.benchmark.PARTIAL_FOV_MM)."""


def _vol(shape: tuple[int, int, int]) -> Volume:
    return Volume(make_blob(shape), np.eye(4), (1.0, 1.0, 1.0), f"mem:{shape}", "p-0000000000000000")


def test_lattice_covers_every_voxel_and_starts_with_the_centre() -> None:
    shape, grid = (80, 112, 37), (32, 48, 32)
    starts = lattice(shape, grid)
    assert starts[0] == ((80 - 32) // 2, (112 - 48) // 2, (37 - 32) // 2)
    assert len(starts) == len(set(starts)) <= count_windows(shape, grid)
    covered = np.zeros(shape, bool)
    for s in starts:
        assert all(0 <= a and a + g <= n for a, g, n in zip(s, grid, shape, strict=True))
        covered[tuple(slice(a, a + g) for a, g in zip(s, grid, strict=True))] = True
    assert covered.all()
    assert lattice((20, 48, 32), grid) == [(0, 0, 0)]  # smaller than the grid: one padded window


def test_cut_keeps_world_coordinates_and_pads() -> None:
    base = Volume(make_blob((40, 20, 30)), np.diag([2.0, 2.0, 2.0, 1.0]), (2.0, 2.0, 2.0), "m", "p")
    win = cut(base, (5, 0, 3), (16, 32, 16))
    assert win.data.shape == (16, 32, 16)
    np.testing.assert_array_equal(win.data[:, :20], base.data[5:21, :, 3:19])
    assert not win.data[:, 20:].any()
    np.testing.assert_allclose(win.affine @ [0, 0, 0, 1], base.affine @ [5, 0, 3, 1])


def test_max_over_views_is_a_patient_level_max() -> None:
    a = Neighbours(("p1", "p2"), np.array([0.9, 0.5]))
    b = Neighbours(("p2", "p1"), np.array([0.95, 0.1]), exact_duplicate=True)
    merged = max_over_views([a, b], 5)
    assert merged.patient_ids == ("p2", "p1")
    np.testing.assert_allclose(merged.similarities, [0.95, 0.9])
    assert merged.exact_duplicate


def test_window_domain_modes_and_refusals() -> None:
    cfg = PreprocessConfig(grid=(16, 16, 16))
    training = [_vol((18, 18, 18)), _vol((20, 20, 20))]
    plain = measure_domain(training, cfg)
    windowed = measure_domain(training, cfg, window_fov_mm=(64.0, 64.0, 64.0))
    big = _vol((60, 40, 30))
    assert needs_windows(big.data.shape, cfg.grid)
    with pytest.raises(DomainError, match="outside the index's domain"):
        check_in_domain(big, plain, windows=True)
    assert check_in_domain(big, windowed, windows=True) == "windows"
    assert check_in_domain(_vol((16, 16, 16)), windowed, windows=True) == "whole"
    assert check_in_domain(_vol((17, 17, 17)), windowed, windows=True) == "windows"  # any cut is judged
    with pytest.raises(DomainError, match="outside the index's domain"):
        check_in_domain(_vol((15, 16, 14)), windowed, windows=True)  # smaller than any training volume
    with pytest.raises(DomainError, match=r"judged by windows, which this path does not run"):
        check_in_domain(big, windowed)
    with pytest.raises(DomainError, match="by windows up to 64x64x64 mm"):
        check_in_domain(_vol((80, 20, 20)), windowed, windows=True)
    with pytest.raises(ValueError, match="smaller than the training volumes"):
        measure_domain(training, cfg, window_fov_mm=(19.0, 64.0, 64.0))
    with pytest.raises(ValueError, match="fov: crop"):
        measure_domain(training, PreprocessConfig(grid=(16, 16, 16), fov="fit"), window_fov_mm=(64.0,) * 3)


@pytest.fixture(scope="module")
def windowed_index(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An index of 8 real training volumes (default poses) built with --window-fov, and one without."""
    from tests.conftest import HIPPOCAMPUS_DIR

    files = sorted((HIPPOCAMPUS_DIR / "imagesTr").glob("*.nii.gz"))[:10]
    if len(files) < 10:
        pytest.skip("real data not found")
    root = tmp_path_factory.mktemp("windows")
    train = root / "train"
    train.mkdir()
    for f in files[:8]:
        (train / f.name).symlink_to(f)
    env = {"GATE_ID_KEY_FILE": str(root / "key")}
    runner = CliRunner(env=env)
    for name, extra in (("windowed", ["--window-fov", "96", "128", "96"]), ("plain", [])):
        args = ["index", "build", "--data", str(train), "--out", str(root / name), *extra]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    return {"root": root, "files": files, "windowed": root / "windowed", "plain": root / "plain"}  # type: ignore[dict-item]


def _pasted(files: list[Path], out: Path) -> Path:
    out.mkdir(exist_ok=True)
    src = nib.load(files[1])
    data = np.asarray(src.dataobj, dtype=np.float32)
    assert np.allclose(np.abs(np.diag(src.affine)[:3]), 1.0)
    cases = {"centre": (None, "zero"), "offset": ((41, 5, 39), "zero"), "tissue": ((3, 57, 44), "tissue")}
    for name, (corner, background) in cases.items():
        vol = paste(data, PARTIAL_FOV, corner, background)
        nib.save(nib.Nifti1Image(vol, src.affine), out / f"pasted_{name}.nii.gz")
    return out


def test_partial_copies_are_rejected_under_strict_and_standard(
    windowed_index: dict[str, Path], tmp_path: Path
) -> None:
    files: list[Path] = windowed_index["files"]  # type: ignore[assignment]
    cand = _pasted(files, tmp_path / "cand")
    root = windowed_index["root"]
    for policy in ("strict", "standard"):
        env = {"GATE_ID_KEY_FILE": str(root / "key"), "GATE_AUDIT_LOG": str(tmp_path / f"{policy}.jsonl")}
        args = ["check", str(cand), "--index", str(windowed_index["windowed"]), "--policy", policy]
        result = CliRunner(env=env).invoke(main, args)
        assert result.exit_code == 1, result.output
        assert "checked 3: 0 pass, 0 flag, 3 reject" in result.output, result.output


def test_partial_copies_are_refused_without_windows(windowed_index: dict[str, Path], tmp_path: Path) -> None:
    files: list[Path] = windowed_index["files"]  # type: ignore[assignment]
    cand = _pasted(files, tmp_path / "cand")
    root = windowed_index["root"]
    env = {"GATE_ID_KEY_FILE": str(root / "key"), "GATE_AUDIT_LOG": str(tmp_path / "a.jsonl")}
    args = ["check", str(cand), "--index", str(windowed_index["plain"]), "--policy", "standard"]
    result = CliRunner(env=env).invoke(main, args)
    assert result.exit_code == 3, result.output
    assert result.output.count("outside the index's domain") == 3


def test_windows_find_the_copy_the_centre_crop_misses(windowed_index: dict[str, Path]) -> None:
    """The windowed score of an off-centre partial copy is a near copy's; the centre crop's is not."""
    from gate.cli.index import encoder_for_index, load_encoder
    from gate.identity import Pseudonymizer, load_or_create_key
    from gate.index import TrainingIndex, embed_grids, embed_volumes
    from gate.poses import IDENTITY_ONLY
    from gate.volume import ReadOptions, read_volumes

    files: list[Path] = windowed_index["files"]  # type: ignore[assignment]
    index_dir = windowed_index["windowed"]
    encoder = load_encoder(encoder_for_index(None, index_dir), "cpu")
    index = TrainingIndex.load(index_dir, encoder)
    key = load_or_create_key(windowed_index["root"] / "key")
    (source,) = read_volumes(files[1], ReadOptions(Pseudonymizer(key=key)))
    placed = Volume(
        paste(source.data, PARTIAL_FOV, (41, 5, 39), "tissue"), source.affine, (1.0, 1.0, 1.0), "m", "x"
    )

    def judge(views: list[np.ndarray], include: Sequence[Sequence[str]]) -> list[Neighbours]:
        probes = embed_grids(views, encoder, ["m"] * len(views))
        return index.search_many([p.embedding for p in probes], [p.voxel_sha256 for p in probes], 5, include)

    result = judge_windows(placed, encoder.preprocess, judge, 5)
    assert result.neighbours.patient_ids[0] == source.patient_id
    assert result.neighbours.similarities[0] > 0.95
    (probe,) = embed_volumes([placed], encoder, IDENTITY_ONLY)  # what a crop-only gate would judge
    (centre,) = index.search_many([probe.embedding], [probe.voxel_sha256], 5)
    own = dict(zip(centre.patient_ids, centre.similarities, strict=True)).get(source.patient_id, -1.0)
    assert own < result.neighbours.similarities[0] - 0.1
    assert result.n_windows > len(lattice(placed.data.shape, encoder.preprocess.grid))


def test_ray_judges_windows_like_the_local_engine(windowed_index: dict[str, Path], tmp_path: Path) -> None:
    """--engine ray reads on ray.data, re-reads windowed candidates and gives the same records."""
    import json

    pytest.importorskip("ray")
    files: list[Path] = windowed_index["files"]  # type: ignore[assignment]
    cand = _pasted(files, tmp_path / "cand")
    (cand / "copy.nii.gz").symlink_to(files[0])  # judged whole, beside the windowed ones
    root = windowed_index["root"]
    records = {}
    for engine in ("local", "ray"):
        log = tmp_path / f"{engine}.jsonl"
        env = {"GATE_ID_KEY_FILE": str(root / "key"), "GATE_AUDIT_LOG": str(log)}
        args = ["check", str(cand), "--index", str(windowed_index["windowed"]), "--engine", engine]
        result = CliRunner(env=env).invoke(main, [*args, "--workers", "1", "--policy", "standard"])
        assert result.exit_code == 1, result.output
        assert "checked 4: 0 pass, 0 flag, 4 reject" in result.output, result.output
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        keys = ("candidate_sha256", "verdict", "grade", "nearest_patient_id", "similarity")
        records[engine] = [tuple(r[k] for k in keys) for r in rows]
    assert records["local"] == records["ray"]
