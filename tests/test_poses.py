"""gate.poses: re-posing grids for the index (numpy/scipy), checked against the torch augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from gate.encoder.augment import spatial
from gate.poses import (
    DEFAULT_POSES,
    IDENTITY_ONLY,
    MIN_KEPT_VOX,
    POSE_SETS,
    Pose,
    PoseSet,
    apply_pose,
    cut_slices,
    posed_grids,
)
from gate.preprocess import PreprocessConfig, preprocess, preprocess_uncropped
from gate.values import Volume

SHAPE = (16, 20, 12)


def blob(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = torch.from_numpy(rng.random((1, 1, 4, 5, 3)).astype(np.float32))
    big = torch.nn.functional.interpolate(small, size=SHAPE, mode="trilinear", align_corners=True)
    return big[0, 0].numpy()


def com(x: np.ndarray) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in x.shape], indexing="ij"))
    return (idx * x).sum(axis=(1, 2, 3)) / x.sum()


def test_identity_is_the_grid_itself() -> None:
    x = blob()
    assert apply_pose(x, Pose()) is x


def test_flip_is_left_right_mirror() -> None:
    x = blob()
    np.testing.assert_array_equal(apply_pose(x, Pose(flip=True)), x[::-1])


def test_translation_moves_centre_of_mass() -> None:
    x = np.zeros(SHAPE, dtype=np.float32)
    x[6:9, 8:11, 4:7] = 1.0
    y = apply_pose(x, Pose(translate_vox=(2.0, -1.0, 1.5)))
    np.testing.assert_allclose(com(y) - com(x), [2.0, -1.0, 1.5], atol=1e-4)
    assert y.dtype == np.float32 and y.shape == SHAPE


@pytest.mark.parametrize(
    "pose",
    [
        Pose(rotate_deg=(0.0, 0.0, 10.0)),
        Pose(rotate_deg=(7.0, -5.0, 3.0), translate_vox=(1.0, 2.0, -1.5)),
        Pose(flip=True, rotate_deg=(0.0, 5.0, 0.0), translate_vox=(0.0, -3.0, 0.0)),
    ],
)
def test_matches_the_training_augmentation(pose: Pose) -> None:
    """The index poses a volume exactly as gate.encoder.augment.spatial does (up to the border)."""
    x = blob(1)
    ours = apply_pose(x, pose)
    t = torch.from_numpy(x)[None, None]
    ref = spatial(
        t,
        torch.tensor([[math.radians(a) for a in pose.rotate_deg]], dtype=torch.float32),
        torch.tensor([pose.translate_vox], dtype=torch.float32),
        torch.ones(1),
        torch.tensor([pose.flip]),
    )[0, 0].numpy()
    inner = (slice(3, -3),) * 3
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-4)


def test_pose_set_first_must_be_identity() -> None:
    with pytest.raises(ValidationError, match=r"the first pose of a PoseSet must be the identity"):
        PoseSet(poses=(Pose(flip=True), Pose()))
    with pytest.raises(ValidationError):
        PoseSet(poses=())


def test_window_shift_brings_in_anatomy_beyond_the_grid() -> None:
    rng = np.random.default_rng(0)
    raw = Volume(rng.random((20, 12, 12)).astype(np.float32) + 1.0, np.eye(4), (1.0, 1.0, 1.0), "v", "p-1")
    cfg = PreprocessConfig(grid=(12, 12, 12))
    poses = PoseSet(poses=(Pose(), Pose(window_shift_vox=(2.0, 0.0, 0.0)), Pose(flip=True)))
    as_read, shifted, flipped = posed_grids(raw, cfg, poses)
    np.testing.assert_array_equal(as_read, preprocess(raw, cfg).data)
    np.testing.assert_allclose(shifted[:-2], as_read[2:], atol=1e-6)  # the window moved +2 along X
    # real voxels from beyond the grid (the crop starts at 4 of 20; moved by 2), not zero padding
    np.testing.assert_allclose(shifted, preprocess_uncropped(raw, cfg).data[6:18], atol=1e-6)
    np.testing.assert_array_equal(flipped, as_read[::-1])


def test_window_cut_recentres_what_is_left() -> None:
    """A cut-short field of view: the rest re-centres on the grid, the cut side becomes padding."""
    rng = np.random.default_rng(1)
    raw = Volume(rng.random((20, 10, 12)).astype(np.float32) + 1.0, np.eye(4), (1.0, 1.0, 1.0), "v", "p-1")
    cfg = PreprocessConfig(grid=(12, 12, 12))
    poses = PoseSet(poses=(Pose(), Pose(window_cut_vox=(4, -2, 0)), Pose(window_cut_vox=(0, 0, -30))))
    _, cut, floor = posed_grids(raw, cfg, poses)
    full = preprocess_uncropped(raw, cfg).data
    expected = np.zeros((12, 12, 12), np.float32)
    # X: 4 cut at the low end leaves 16, centre crop starts at 2 -> scan voxels 6..17;
    # Y: 2 cut at the high end leaves 8, padded by 2 on each side; Z untouched (12 = grid)
    expected[:, 2:10, :] = full[6:18, 0:8, :]
    np.testing.assert_allclose(cut, expected, atol=1e-6)
    # never fewer than MIN_KEPT_VOX voxels: a 30-voxel cut of a 12-voxel axis keeps 8
    assert cut_slices((20, 10, 12), (0, 0, -30))[2] == slice(0, MIN_KEPT_VOX)
    np.testing.assert_allclose(floor[:, :, 2:10], preprocess(raw, cfg).data[:, :, :8], atol=1e-6)
    assert not Pose(window_cut_vox=(0, 0, 1)).is_identity


def test_default_pose_set_and_digest() -> None:
    assert len(DEFAULT_POSES) == 86 and POSE_SETS["default"] is DEFAULT_POSES
    assert sum(any(p.window_shift_vox) for p in DEFAULT_POSES.poses) == 16
    cuts = [p.window_cut_vox for p in DEFAULT_POSES.poses if any(p.window_cut_vox)]
    assert len(cuts) == 16 and {abs(c) for cut in cuts for c in cut} == {3, 5}
    turns = [p.rotate_deg for p in DEFAULT_POSES.poses if all(p.rotate_deg)]  # body diagonals
    assert len(turns) == 8 and all(np.linalg.norm(r) == pytest.approx(10.0) for r in turns)
    assert len(IDENTITY_ONLY) == 1 and DEFAULT_POSES.poses[0].is_identity
    assert sum(p.flip for p in DEFAULT_POSES.poses) == 1
    shifts = [np.linalg.norm(p.translate_vox) for p in DEFAULT_POSES.poses]
    assert (
        max(shifts) == pytest.approx(3.0)
        and max(max(map(abs, p.rotate_deg)) for p in DEFAULT_POSES.poses) == 10
    )
    assert DEFAULT_POSES.digest == PoseSet.model_validate(DEFAULT_POSES.model_dump(mode="json")).digest
    assert DEFAULT_POSES.digest != IDENTITY_ONLY.digest
