"""gate.encoder: augmentations, model, losses, SSIM, training with resume, export with parity."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gate.embed import Encoder
from gate.encoder.augment import (
    AugmentConfig,
    augment,
    border_cut,
    centre_window,
    gaussian_blur,
    random_window,
    spatial,
)
from gate.encoder.export import export_encoder
from gate.encoder.model import EncoderSpec, build_encoder
from gate.encoder.ssim import ssim3d, ssim_matrix
from gate.encoder.train import TrainConfig, load_checkpoint, nt_xent, ssim_regression, train, training_views
from gate.errors import IntegrityError, UsageError
from gate.preprocess import PreprocessConfig

GRID = (16, 16, 16)
NONE = AugmentConfig(
    flip_prob=0.0,
    rotate_deg=0.0,
    translate_vox=0.0,
    scale=0.0,
    elastic_vox=0.0,
    gamma=(1.0, 1.0),
    contrast=(1.0, 1.0),
    bias=0.0,
    blur_sigma=0.0,
    noise_std=0.0,
    border_cut_vox=0,
    window_shift_vox=0,
)


def _blobs(n: int, seed: int = 0, margin: int = 0) -> torch.Tensor:
    """n smooth random volumes in [0, 1], shape (n, 1, 16 + 2 margin, 16 + 2 margin, 16 + 2 margin)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 4, 4, 4), generator=g)
    size = tuple(s + 2 * margin for s in GRID)
    x = torch.nn.functional.interpolate(x, size=size, mode="trilinear", align_corners=True)
    return (x - x.amin(dim=(2, 3, 4), keepdim=True)) / (
        x.amax(dim=(2, 3, 4), keepdim=True) - x.amin(dim=(2, 3, 4), keepdim=True)
    )


def _no_transform(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.zeros((n, 3)), torch.zeros((n, 3)), torch.ones(n), torch.zeros(n, dtype=torch.bool)


# ---------------------------------------------------------------- augmentations


def test_identity_augmentation_is_identity() -> None:
    x = _blobs(3)
    y = augment(x, NONE, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


def test_flip_is_left_right() -> None:
    x = _blobs(2)
    y = augment(x, NONE.model_copy(update={"flip_prob": 1.0}), torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, x.flip(2), atol=1e-5, rtol=0)


def test_translation_moves_centre_of_mass() -> None:
    x = torch.zeros((1, 1, *GRID))
    x[0, 0, 6:9, 6:9, 6:9] = 1.0
    rot, _, scale, flip = _no_transform(1)
    y = spatial(x, rot, torch.tensor([[2.0, 0.0, -1.0]]), scale, flip)
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in GRID], indexing="ij"))
    com = lambda v: (idx * v[0, 0]).sum(dim=(1, 2, 3)) / v.sum()  # noqa: E731
    torch.testing.assert_close(com(y) - com(x), torch.tensor([2.0, 0.0, -1.0]), atol=1e-4, rtol=0)


def test_rotation_by_90_degrees_is_rot90() -> None:
    x = _blobs(1)
    _, shift, scale, flip = _no_transform(1)
    y = spatial(x, torch.tensor([[0.0, 0.0, math.pi / 2]]), shift, scale, flip)
    candidates = [torch.rot90(x, k, dims=(2, 3)) for k in (1, -1)]
    assert min(float((y - c).abs().max()) for c in candidates) < 1e-4


def test_border_cut_zeroes_one_slab_per_axis() -> None:
    x = torch.ones((64, 1, *GRID))
    y = border_cut(x, 4, torch.Generator().manual_seed(0))
    for axis in range(3):
        other = tuple(a for a in (2, 3, 4) if a != 2 + axis)
        zero_planes = (y.amax(dim=(1, *other)) == 0).sum(dim=1)  # (N,) planes cut along this axis
        assert int(zero_planes.max()) == 4 and int(zero_planes.min()) == 0
    # what is not cut is untouched, and only border planes are cut
    assert torch.all((y == 0) | (y == 1))
    assert torch.all(y[:, :, 4:-4, 4:-4, 4:-4] == 1)
    torch.testing.assert_close(border_cut(x, 0, torch.Generator().manual_seed(0)), x)


def test_random_window_moves_the_crop_over_real_context() -> None:
    x = _blobs(32, margin=3)
    y = random_window(x, 3, torch.Generator().manual_seed(0))
    assert y.shape == (32, 1, *GRID)
    offsets = set()
    for i in range(32):  # every window is a crop of its own volume at an offset in 0..6
        hits = [
            (a, b, c)
            for a in range(7)
            for b in range(7)
            for c in range(7)
            if torch.equal(y[i], x[i, :, a : a + 16, b : b + 16, c : c + 16])
        ]
        assert hits
        offsets.update(hits)
    assert len(offsets) > 8  # offsets vary per sample
    torch.testing.assert_close(centre_window(x, 3), x[:, :, 3:19, 3:19, 3:19])
    assert random_window(x, 0, torch.Generator()) is x and centre_window(x, 0) is x


@pytest.mark.realdata
def test_centre_window_is_the_preprocessed_grid(hippocampus_dir: Path, read_opts: object) -> None:
    """The centre window of the grid-plus-margin preprocessing == the grid, for any size parity."""
    from gate.preprocess import preprocess_batch
    from gate.volume import read_volumes

    vols = [
        v
        for i in (1, 3, 4, 6)
        for v in read_volumes(hippocampus_dir / f"hippocampus_{i:03d}.nii.gz", read_opts)
    ]
    assert len({s % 2 for v in vols for s in v.data.shape}) == 2  # odd and even sizes
    cfg = PreprocessConfig()
    wide = preprocess_batch(vols, cfg, margin=3)
    assert wide.shape == (4, 1, 38, 54, 38)
    torch.testing.assert_close(
        centre_window(torch.from_numpy(wide), 3), torch.from_numpy(preprocess_batch(vols, cfg))
    )


def test_augment_ranges_and_reproducibility() -> None:
    x = _blobs(8)
    cfg = AugmentConfig()
    a = augment(x, cfg, torch.Generator().manual_seed(3))
    b = augment(x, cfg, torch.Generator().manual_seed(3))
    c = augment(x, cfg, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    assert float((a - c).abs().max()) > 0.05


def test_augment_config_defaults_are_documented_ranges() -> None:
    cfg = AugmentConfig()
    assert (cfg.rotate_deg, cfg.translate_vox, cfg.elastic_vox, cfg.blur_sigma, cfg.noise_std) == (
        15.0,
        3.0,
        1.5,
        1.5,
        0.05,
    )
    assert cfg.clean_pair_prob == 0.5 and cfg.window_shift_vox == 0
    assert cfg.gamma == (0.7, 1.5) and cfg.contrast == (0.75, 1.25) and cfg.bias == 0.3


def test_blur() -> None:
    x = _blobs(2) + 0.1 * torch.rand((2, 1, *GRID), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gaussian_blur(x, torch.zeros(2)), x, atol=1e-5, rtol=0)
    y = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    assert float(y[1].std()) < float(x[1].std())
    torch.testing.assert_close(y.mean(), x.mean(), atol=1e-2, rtol=0)


# ---------------------------------------------------------------- model and losses


def test_model_shapes_and_unit_norm() -> None:
    model = build_encoder(EncoderSpec(grid=GRID, channels=(4, 8, 8, 8), dim=16), seed=0)
    z = model(_blobs(3))
    assert z.shape == (3, 16) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    again = build_encoder(EncoderSpec(grid=GRID, channels=(4, 8, 8, 8), dim=16), seed=0)
    torch.testing.assert_close(again(_blobs(3)), z)


def test_spec_rejects_indivisible_grid() -> None:
    with pytest.raises(
        ValueError,
        match=r"every grid size must be divisible by 16 \(= 2\*\*4 stages\); got grid \(16, 24, 16\)",
    ):
        EncoderSpec(grid=(16, 24, 16))


def test_nt_xent_sanity() -> None:
    z = torch.eye(8)[:4]  # 4 orthogonal unit vectors
    perfect = nt_xent(z, z)
    swapped = nt_xent(z, z.roll(1, dims=0))
    rand = torch.nn.functional.normalize(
        torch.randn((64, 32), generator=torch.Generator().manual_seed(0)), dim=1
    )
    assert float(perfect) < 0.01
    assert float(swapped) > 5.0
    assert abs(float(nt_xent(rand[:32], rand[32:], temperature=10.0)) - math.log(63)) < 0.05


def test_ssim_regression_sanity() -> None:
    z = torch.nn.functional.normalize(torch.randn((6, 8), generator=torch.Generator().manual_seed(0)), dim=1)
    assert float(ssim_regression(z, z @ z.T)) < 1e-12
    assert float(ssim_regression(z, torch.ones(6, 6))) > 0.1


def test_ssim3d() -> None:
    x = _blobs(3)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    torch.testing.assert_close(ssim3d(x, x), torch.ones(3))
    s = ssim3d(x, noisy)
    assert bool((s < 0.9).all()) and bool((s > 0.0).all())
    torch.testing.assert_close(ssim3d(noisy, x), s)
    m = ssim_matrix(x)
    torch.testing.assert_close(m.diag(), torch.ones(3))
    torch.testing.assert_close(m, m.T)
    assert float(m[0, 1]) < 1.0


# ---------------------------------------------------------------- training


def _config(objective: str = "contrastive", epochs: int = 2, margin: int = 3) -> TrainConfig:
    return TrainConfig(
        augment=AugmentConfig(window_shift_vox=margin),
        objective=objective,
        epochs=epochs,
        batch_size=4,
        lr=1e-3,
        seed=1,  # type: ignore[arg-type]
        spec=EncoderSpec(grid=GRID, channels=(4, 8, 8, 8), dim=8),
        preprocess=PreprocessConfig(grid=GRID),
    )


@pytest.mark.parametrize("objective", ["contrastive", "ssim"])
def test_training_resumes_exactly(tmp_path: Path, objective: str) -> None:
    data = _blobs(5, margin=3).numpy()
    full = train(data, _config(objective), tmp_path / "a", "d" * 64, holdout=_blobs(2, seed=9).numpy())
    first = train(data, _config(objective), tmp_path / "b", "d" * 64, max_epochs_this_run=1)
    assert first.epoch == 1
    resumed = train(data, _config(objective), tmp_path / "b", "d" * 64)
    assert full.epoch == resumed.epoch == 2 and len(resumed.history) == 2
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert full.history[-1]["holdout"] is not None and np.isfinite(full.history[-1]["loss"])


def test_clean_pairs_put_the_stored_grid_beside_an_augmented_view() -> None:
    x = _blobs(64, margin=2)
    aug = AugmentConfig(window_shift_vox=2, clean_pair_prob=0.5)
    v1, v2 = training_views(x, aug, torch.Generator().manual_seed(0))
    grid = centre_window(x, 2)
    clean = (v1 - grid).abs().amax(dim=(1, 2, 3, 4)) == 0
    assert 16 <= int(clean.sum()) <= 48  # ~half of the first views are the grid, bit for bit
    assert float((v2 - grid).abs().amax(dim=(1, 2, 3, 4)).min()) > 0.01  # second views never
    always, _ = training_views(
        x, aug.model_copy(update={"clean_pair_prob": 1.0}), torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(always, grid)
    # p = 0 draws no extra random numbers: the views of existing recipes are unchanged
    two_views = AugmentConfig(window_shift_vox=2, clean_pair_prob=0.0)
    a = training_views(x, two_views, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    b1 = augment(random_window(x, 2, gen), two_views, gen)
    torch.testing.assert_close(a[0], b1)


def test_resume_refuses_other_run(tmp_path: Path) -> None:
    data = _blobs(5, margin=3).numpy()
    train(data, _config(epochs=1), tmp_path, "d" * 64)
    with pytest.raises(UsageError, match="holds a checkpoint of another run"):
        train(data, _config(epochs=1), tmp_path, "e" * 64)


def test_training_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(
        UsageError, match=r"training data must be \(N, 1, 22, 22, 22\) \(the grid plus a 3-voxel"
    ):
        train(np.zeros((3, 1, 8, 8, 8), np.float32), _config(), tmp_path, "d" * 64)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match=r"expected checkpoint\.npz and checkpoint\.json"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------- export


def _export(
    model: nn.Module, out: Path, grids: np.ndarray, grid: tuple[int, int, int] = GRID, **kw: object
) -> object:
    return export_encoder(
        model,
        grid,
        out,
        grids,
        preprocess=PreprocessConfig(grid=grid),
        objective="test",
        dim=8,
        architecture={},
        training={"data_digest": "x"},
        **kw,
    )  # type: ignore[arg-type]


def test_export_parity_and_runtime(tmp_path: Path) -> None:
    model = build_encoder(EncoderSpec(grid=GRID, channels=(4, 8, 8, 8), dim=8), seed=0)
    grids = _blobs(4).numpy()
    manifest = _export(model, tmp_path / "m", grids)
    assert manifest.parity["max_abs_diff"] <= 1e-4  # type: ignore[attr-defined]
    assert {p.name for p in (tmp_path / "m").iterdir()} == {
        "encoder.onnx",
        "encoder.json",
        "model_card.md",
        "model_card.json",
    }
    enc = Encoder(tmp_path / "m", device="cpu")
    with torch.no_grad():
        ref = model(torch.from_numpy(grids)).numpy()
    np.testing.assert_allclose(enc.embed_array(grids), ref, atol=1e-4)
    assert enc.embed_array(grids[:1]).shape == (1, 8)  # dynamic batch axis
    with pytest.raises(UsageError, match="exists; pass --force to replace it"):
        _export(model, tmp_path / "m", grids)
    _export(model, tmp_path / "m", grids, overwrite=True)


class _Stateful(nn.Module):
    """Returns a different answer on every call: tracing bakes in one, so parity must fail.

    The counter is class-level so that the copy the exporter traces shares it.
    """

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(int(np.prod(GRID)), 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        h = self.lin(x.flatten(1)) + float(type(self).calls)
        return h / h.norm(dim=1, keepdim=True)


def test_parity_failure_fails_export(tmp_path: Path) -> None:
    with pytest.raises(
        IntegrityError,
        match=r"ONNX parity check failed: max \|torch - onnxruntime\| = .* > tolerance "
        r"0\.0001 on 3 volumes; nothing was written",
    ):
        _export(_Stateful(), tmp_path / "m", _blobs(3).numpy())
    assert not (tmp_path / "m").exists()
    assert not list(tmp_path.iterdir())


@pytest.mark.realdata
def test_export_parity_on_real_volumes(tmp_path: Path, hippocampus_dir: Path, read_opts: object) -> None:
    from gate.preprocess import preprocess_batch
    from gate.volume import read_volumes

    files = sorted(hippocampus_dir.glob("*.nii.gz"))[:3]
    vols = [v for f in files for v in read_volumes(f, read_opts)]  # type: ignore[arg-type]
    cfg = PreprocessConfig()
    grids = preprocess_batch(vols, cfg)
    model = build_encoder(EncoderSpec(grid=cfg.grid), seed=0)
    manifest = export_encoder(
        model,
        cfg.grid,
        tmp_path / "m",
        grids,
        preprocess=cfg,
        objective="untrained",
        dim=128,
        architecture={},
        training={},
    )
    assert manifest.parity["max_abs_diff"] <= 1e-4
    assert (tmp_path / "m" / "encoder.onnx").stat().st_size < 5_000_000
    enc = Encoder(tmp_path / "m", device="cpu")
    e = enc.embed(vols)
    assert all(x.vector.dtype == np.float32 and abs(float(np.linalg.norm(x.vector)) - 1) < 1e-5 for x in e)


@pytest.mark.realdata
def test_shipped_encoder_finds_exact_and_near_copies(hippocampus_dir: Path, read_opts: object) -> None:
    from gate.embed import DEFAULT_ENCODER_DIR
    from gate.encoder.benchmark import perturb
    from gate.preprocess import preprocess_batch
    from gate.volume import read_volumes

    if not (DEFAULT_ENCODER_DIR / "encoder.json").is_file():
        pytest.skip("no shipped encoder yet")
    enc = Encoder(device="cpu")
    assert enc.manifest.parity["max_abs_diff"] <= enc.manifest.parity["tolerance"]
    files = sorted(hippocampus_dir.glob("*.nii.gz"))[:3]
    vols = [v for f in files for v in read_volumes(f, read_opts)]  # type: ignore[arg-type]
    grids = preprocess_batch(vols, enc.preprocess)
    ref = enc.embed_array(grids)
    np.testing.assert_allclose(enc.embed_array(grids[:1]), ref[:1], atol=1e-5)
    near = enc.embed_array(perturb("noise", 0.05, grids, vols, enc.preprocess, seed=0))
    sims = near @ ref.T
    assert (sims.argmax(axis=1) == np.arange(3)).all()
    assert (np.diag(sims) > 0.9).all()


def test_mean_pooling_head() -> None:
    model = build_encoder(EncoderSpec(grid=GRID, channels=(4, 8, 8, 8), dim=16, pooling="mean"), seed=0)
    z = model(_blobs(2))
    assert z.shape == (2, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
