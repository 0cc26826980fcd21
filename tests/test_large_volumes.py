"""Sizes users have: an encoder and index built for 256x256x160 MR, 160x224x160 MR and 512x512xN CT.

The path a user takes, through the real commands: ``gate encoder train`` with the size's
``--grid`` / ``--spacing`` (and ``--intensity hu_window`` for CT), ``gate encoder export``,
``gate index build``, then ``gate check`` of a candidate of that size. The grids here are coarse
versions of the recipes in docs/benchmarks.md ("Large volumes": the whole field of view is one
view of the grid) so the test stays fast; the code path is the same. Timings are in
``bench/large_volumes.py``, never here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from gate.cli import main
from gate.embed import Encoder
from gate.shards import load_index


@dataclass(frozen=True)
class Case:
    """One size: the synthetic volumes' geometry and the encoder flags that judge it whole."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    ct: bool
    flags: tuple[str, ...]

    @property
    def fov_text(self) -> str:
        """The field of view as :meth:`gate.domain.Domain.describe` writes it for these volumes."""
        return " x ".join(f"{f:g}-{f:g}" for f in np.asarray(self.shape) * self.spacing_mm)


MR_GRID_256 = ("--grid", "32", "32", "32", "--spacing", "8", "8", "5")
MR_GRID_160 = ("--grid", "32", "48", "32", "--spacing", "5", "5", "5")
CT_GRID = ("--grid", "32", "32", "16", "--spacing", "12", "12", "12.5")
CT_WINDOW = ("--intensity", "hu_window", "--hu-window", "-1000", "1000")

CASES = {
    "mr_256x256x160": Case((256, 256, 160), (1.0, 1.0, 1.0), False, MR_GRID_256),
    "mr_160x224x160": Case((160, 224, 160), (1.0, 1.0, 1.0), False, MR_GRID_160),
    "ct_512x512x40": Case((512, 512, 40), (0.75, 0.75, 5.0), True, CT_GRID + CT_WINDOW),
}
"""Each grid x spacing covers the size's whole field of view (256x256x160 mm; 160x224x160 mm in
160x240x160; 384x384x200 mm), so nothing is cropped away."""

N_TRAIN = 5
"""Percentile thresholds need at least 5 calibration patients (gate.calibration)."""

FOREIGN = {
    "mr_256x256x160": "mr_160x224x160",
    "mr_160x224x160": "mr_256x256x160",
    "ct_512x512x40": "mr_256x256x160",
}
"""A candidate of another size for each index: outside its domain, refused (exit 3), never cropped."""


def synthetic(case: Case, seed: int) -> np.ndarray:
    """A smooth, seeded head-like volume: textured ellipsoid on a background (0, or -1000 HU for CT).

    Built at half resolution and repeated 2x per axis (four times cheaper than at full size).

    Returns:
        int16 (MR magnitudes 0..1000, CT -1000..1000 HU), shape ``case.shape``.

    """
    half = tuple(n // 2 for n in case.shape)
    rng = np.random.default_rng(seed)
    coarse = rng.random((8, 8, 6)).astype(np.float32)
    texture = ndimage.zoom(coarse, np.asarray(half) / np.asarray(coarse.shape), order=1)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in half]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.75) ** 2 <= 1.0
    signal = np.where(inside, 0.2 + 0.8 * texture, 0.0)
    low = -1000.0 if case.ct else 0.0
    small = np.round(low + (1000.0 - low) * signal).astype(np.int16)
    a, b, c = half
    return np.broadcast_to(small[:, None, :, None, :, None], (a, 2, b, 2, c, 2)).reshape(case.shape)


def _run(args: list[str], code: tuple[int, ...] = (0,)) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code in code, result.output
    return result.output


@pytest.mark.parametrize("name", list(CASES))
def test_build_and_check_a_volume_of_this_size(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = CASES[name]
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    affine = np.diag([*case.spacing_mm, 1.0])
    train, cand = tmp_path / "train", tmp_path / "cand"
    train.mkdir()
    cand.mkdir()
    for i in range(N_TRAIN):
        nib.save(nib.Nifti1Image(synthetic(case, i), affine), train / f"patient{i}.nii.gz")
    novel = cand / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(synthetic(case, 100), affine), novel)

    ck, enc, idx = tmp_path / "ck", tmp_path / "enc", tmp_path / "idx"
    _run(
        [
            "encoder",
            "train",
            "--data",
            str(train),
            "--out",
            str(ck),
            "--epochs",
            "1",
            "--batch-size",
            "3",
            *case.flags,
        ]
    )
    _run(
        [
            "encoder",
            "export",
            "--checkpoint",
            str(ck),
            "--data",
            str(train),
            "--out",
            str(enc),
            "--parity-volumes",
            "2",
        ]
    )
    _run(["index", "build", "--data", str(train), "--out", str(idx), "--encoder", str(enc)])
    index = load_index(idx, Encoder(enc, device="cpu"))
    assert index.domain.fov_mm_max == pytest.approx(np.asarray(case.shape) * case.spacing_mm)
    assert index.domain.grid == tuple(int(g) for g in case.flags[1:4])

    out = _run(["check", str(novel), "--index", str(idx), "--policy", "strict", "--device", "cpu"], (0, 1))
    assert "checked 1: " in out and "; 0 unreadable" in out
    row = next(line for line in out.splitlines() if line.endswith(str(novel)))
    assert row.split()[0] in ("pass", "reject")

    copy = train / "patient1.nii.gz"
    out = _run(["check", str(copy), "--index", str(idx), "--policy", "strict", "--device", "cpu"], (1,))
    header = next(line for line in out.splitlines() if line.startswith("verdict"))
    row = next(line for line in out.splitlines() if line.endswith(str(copy)))
    columns = dict(zip(header.split(), row.split(), strict=False))
    assert (columns["verdict"], columns["grade"], columns["exact"]) == ("reject", "duplicate", "yes")

    other = CASES[FOREIGN[name]]
    foreign = cand / "foreign.nii.gz"
    nib.save(nib.Nifti1Image(synthetic(other, 7), np.diag([*other.spacing_mm, 1.0])), foreign)
    out = _run(["check", str(foreign), "--index", str(idx), "--policy", "strict", "--device", "cpu"], (3,))
    found = "x".join(map(str, other.shape))
    assert f"outside the index's domain: it covers field of view {case.fov_text}" in out
    assert f"found {found} voxels" in out
