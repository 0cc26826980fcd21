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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": (4, 32, 32)}, "every grid size must be >= 8 voxels"),
        ({"spacing_mm": (1.0, 0.0, 1.0)}, "every spacing must be > 0 mm"),
        ({"clip_percentiles": (99.0, 1.0)}, "clip_percentiles must satisfy 0 <= low < high <= 100"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
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
