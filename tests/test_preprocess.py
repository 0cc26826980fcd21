from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from gate.preprocess import (
    PreprocessConfig,
    crop_or_pad,
    normalize_intensity,
    preprocess,
    preprocess_batch,
    resample,
    to_canonical,
)
from gate.values import Volume
from gate.volume import ReadOptions, read_volumes
from tests.volumes import make_blob


def _vol(data: np.ndarray, affine: np.ndarray | None = None, spacing=(1.0, 1.0, 1.0)) -> Volume:
    aff = np.diag([*spacing, 1.0]) if affine is None else affine
    return Volume(data=data, affine=aff, spacing=spacing, source="mem", patient_id="p-0")


def test_canonical_undoes_axis_flip() -> None:
    data = make_blob((8, 10, 12))
    flipped_affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped_affine[0, 3] = 7.0  # voxel 0 sits at x = 7 (right-to-left storage)
    out = to_canonical(_vol(data[::-1].copy(), flipped_affine))
    np.testing.assert_array_equal(out.data, data)
    assert out.affine[0, 0] > 0


def test_canonical_is_identity_for_ras() -> None:
    vol = _vol(make_blob())
    assert to_canonical(vol) is vol


def test_resample_halves_shape() -> None:
    out = resample(_vol(make_blob((16, 16, 16)), spacing=(1.0, 1.0, 1.0)), (2.0, 2.0, 2.0))
    assert out.shape == (8, 8, 8)
    assert out.spacing == (2.0, 2.0, 2.0)


def test_crop_or_pad_centres() -> None:
    data = np.arange(6 * 10 * 4, dtype=np.float32).reshape(6, 10, 4)
    out = crop_or_pad(_vol(data), (4, 12, 4))
    assert out.shape == (4, 12, 4)
    np.testing.assert_array_equal(out.data[:, 1:11, :], data[1:5])
    assert np.all(out.data[:, 0] == 0) and np.all(out.data[:, 11] == 0)
    # world position of output voxel (0, 1, 0) equals input voxel (1, 0, 0)
    np.testing.assert_allclose(out.affine @ [0, 1, 0, 1], _vol(data).affine @ [1, 0, 0, 1])


def test_normalize_robust_to_outliers() -> None:
    data = make_blob()
    data[0, 0, 0] = 1.7e6  # one hot voxel like the float32 hippocampus volumes
    out = normalize_intensity(_vol(data), (0.5, 99.5))
    assert out.data.min() == 0.0 and out.data.max() == 1.0
    assert np.median(out.data) > 0.01  # the anatomy is not squashed to ~0


def test_preprocess_output_grid_and_range() -> None:
    cfg = PreprocessConfig(grid=(16, 24, 16))
    out = preprocess(_vol(make_blob((20, 20, 12))), cfg)
    assert out.shape == (16, 24, 16)
    assert 0.0 <= out.data.min() and out.data.max() <= 1.0
    batch = preprocess_batch([_vol(make_blob()), _vol(make_blob(seed=2))], cfg)
    assert batch.shape == (2, 1, 16, 24, 16) and batch.dtype == np.float32


def test_config_digest_stable_and_sensitive() -> None:
    assert PreprocessConfig().digest == PreprocessConfig().digest
    assert PreprocessConfig().digest != PreprocessConfig(grid=(32, 32, 32)).digest
    assert len(PreprocessConfig().digest) == 64


SHIPPED_PREPROCESS_DIGEST = "afdbf85a3fb0dd9044bd973c91d367932ae34b482acfe8b4959a8144393fe52a"
"""The default config's digest that the shipped encoder and index are bound to."""


def test_added_fields_keep_the_default_digest_and_change_it_when_set() -> None:
    assert PreprocessConfig().digest == SHIPPED_PREPROCESS_DIGEST
    changed = [
        PreprocessConfig(percentile_region="foreground"),
        PreprocessConfig(fov="fit"),
        PreprocessConfig(intensity="hu_window", hu_window=(-1000.0, 1000.0)),
    ]
    digests = {c.digest for c in changed}
    assert len(digests) == 3 and SHIPPED_PREPROCESS_DIGEST not in digests


def test_hu_window_clips_fixed_hounsfield_units() -> None:
    data = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], np.float32).reshape(5, 1, 1)
    out = normalize_intensity(_vol(data), (0.5, 99.5), hu_window=(-1000.0, 1000.0)).data.ravel()
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_foreground_percentiles_ignore_a_zero_background() -> None:
    rng = np.random.default_rng(0)
    tissue = rng.uniform(100.0, 200.0, size=(8, 8, 8)).astype(np.float32)
    big = np.zeros((30, 30, 30), np.float32)  # 98.1% background
    big[16:24, 16:24, 16:24] = tissue
    whole = normalize_intensity(_vol(big), (0.5, 99.5)).data[16:24, 16:24, 16:24]
    fg = normalize_intensity(_vol(big), (0.5, 99.5), region="foreground").data[16:24, 16:24, 16:24]
    alone = normalize_intensity(_vol(tissue), (0.5, 99.5)).data
    np.testing.assert_allclose(fg, alone, atol=1e-6)
    assert whole.mean() > alone.mean() + 0.2  # the whole-volume clip squashes the tissue upwards


def test_fit_keeps_the_whole_field_of_view() -> None:
    data = np.zeros((64, 96, 64), np.float32)
    data[:4] = 100.0  # anatomy at the edge a centre crop would cut
    data[4:] = 10.0
    cfg = PreprocessConfig(grid=(16, 24, 16), fov="fit")
    out = preprocess(_vol(data), cfg)
    assert out.data.shape == (16, 24, 16) and out.data[0].mean() > 0.9
    cropped = preprocess(_vol(data), PreprocessConfig(grid=(16, 24, 16)))
    assert cropped.data[0].mean() < 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": (4, 32, 32)}, "every grid size must be >= 8 voxels"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "every spacing must be > 0 mm"),
        ({"clip_percentiles": (99.0, 1.0)}, "clip_percentiles must satisfy 0 <= low < high <= 100"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
        ({"intensity": "hu_window"}, "intensity hu_window needs hu_window"),
        ({"intensity": "hu_window", "hu_window": (300.0, -100.0)}, "low < high"),
        ({"hu_window": (-100.0, 300.0)}, "hu_window is set but intensity is 'percentile'"),
        ({"fov": "stretch"}, "Input should be 'crop' or 'fit'"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PreprocessConfig(**kwargs)


@pytest.mark.realdata
def test_real_volumes_share_range(hippocampus_dir: Path, read_opts: ReadOptions) -> None:
    # a uint8 volume (001) and one of the float32 volumes reaching ~1.7e6 (the ids ~170-212)
    names = ["hippocampus_001.nii.gz", "hippocampus_185.nii.gz"]
    paths = [hippocampus_dir / n for n in names if (hippocampus_dir / n).exists()]
    vols = [v for p in paths for v in read_volumes(p, read_opts)]
    batch = preprocess_batch(vols, PreprocessConfig())
    for x in batch:
        assert x.min() == 0.0 and x.max() == 1.0
        assert 0.05 < float(x.mean()) < 0.6


def test_suggest_config_mr_crops_head_mr_and_ct() -> None:
    from gate.preprocess import config_flags, suggest_config

    crops = suggest_config(np.array([[35, 50, 36], [31, 40, 24], [43, 59, 47]]), np.ones((3, 3)), 0.0)
    assert crops == PreprocessConfig()  # the shipped default for the hippocampus crops
    head = suggest_config(np.array([[256, 256, 160]]), np.ones((1, 3)), 0.0, background_fraction=0.5)
    assert head.grid == (256, 256, 160) and head.percentile_region == "foreground"
    ct = suggest_config(np.array([[512, 512, 100]]), np.array([[0.7, 0.7, 2.5]]), -1024.0)
    assert ct.intensity == "hu_window" and ct.hu_window == (-1000.0, 1000.0)
    assert ct.spacing_mm == (0.7, 0.7, 2.5) and ct.grid == (512, 512, 96)
    assert (
        config_flags(ct)
        == "--grid 512 512 96 --spacing 0.7 0.7 2.5 --fov crop --intensity hu_window --hu-window -1000 1000"
    )


def test_train_preprocessing_flags_and_yaml_are_validated(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gate.cli import main
    from gate.cli.encoder import preprocess_config
    from gate.errors import UsageError

    yaml_file = tmp_path / "pre.yaml"
    yaml_file.write_text("grid: [64, 64, 64]\nintensity: hu_window\nhu_window: [-200, 400]\n")
    cfg = preprocess_config(yaml_file, {"spacing_mm": (2.0, 2.0, 2.0)})
    assert cfg == PreprocessConfig(
        grid=(64, 64, 64), spacing_mm=(2.0, 2.0, 2.0), intensity="hu_window", hu_window=(-200.0, 400.0)
    )
    assert preprocess_config(yaml_file, {"intensity": "percentile"}).hu_window is None
    with pytest.raises(UsageError, match="preprocessing grid: Value error, every grid size must be >= 8"):
        preprocess_config(None, {"grid": (4, 8, 8)})
    (tmp_path / "bad.yaml").write_text("- 1\n")
    with pytest.raises(UsageError, match="expected a mapping of PreprocessConfig fields"):
        preprocess_config(tmp_path / "bad.yaml", {})
    data = tmp_path / "data"
    data.mkdir()
    result = CliRunner().invoke(
        main,
        ["encoder", "train", "--data", str(data), "--out", str(tmp_path / "o"), "--intensity", "hu_window"],
    )
    assert result.exit_code == 2 and "intensity hu_window needs hu_window" in result.output
    result = CliRunner().invoke(
        main,
        ["encoder", "train", "--data", str(data), "--out", str(tmp_path / "o"), "--grid", "24", "32", "24"],
    )
    assert (
        result.exit_code == 2
        and "--grid (24, 32, 24): Value error, every grid size must be divisible by 16" in result.output
    )
