"""Hostile inputs are refused from their headers, with one line, before memory is spent.

Costs (time, peak RSS) are measured on the CLI in docs/benchmarks.md, not asserted here.
"""

from __future__ import annotations

import gzip
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gate.cli.check
import gate.cli.index
from gate.audit import AuditLog
from gate.cli import main
from gate.errors import InputError, PolicyError
from gate.policy import MAX_POLICY_BYTES, load_policy, policy_path
from gate.volume import MAX_NIFTI_OFFSET, ReadOptions, discover, read_volumes
from tests.index_helpers import ProjectionEncoder
from tests.volumes import (
    YAML_BOMB,
    make_blob,
    nifti_header_bytes,
    write_gzip_bomb,
    write_huge_npy,
    write_nifti,
)

LIMIT = "more than the limit of 134217728 (raise --max-voxels)"


def test_nifti_header_claiming_10000_cubed(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "huge.nii"
    path.write_bytes(nifti_header_bytes((10000, 10000, 10000)))
    with pytest.raises(InputError, match=re.escape(f"{path}: volume has 1000000000000 voxels, {LIMIT}")):
        read_volumes(path, read_opts)


def test_gzip_bomb_declaring_10gb_refused_from_header(tmp_path: Path, read_opts: ReadOptions) -> None:
    # header declares 2200^3 uint8 (10.6 GB); the stream holds 256 MiB of zeros (a 256 KiB file)
    path = write_gzip_bomb(tmp_path / "bomb.nii.gz", (2200, 2200, 2200), 1 << 28)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(InputError, match=re.escape(f"{path}: volume has 10648000000 voxels, {LIMIT}")):
        read_volumes(path, read_opts)


def test_gzip_stream_read_only_as_far_as_the_header_declares(tmp_path: Path, read_opts: ReadOptions) -> None:
    data = make_blob()
    plain = write_nifti(tmp_path / "a.nii", data)
    path = tmp_path / "padded.nii.gz"
    # the volume, then 1 GiB of zeros in further gzip members: never inflated
    member = gzip.compress(b"\0" * (1 << 26), compresslevel=9)
    path.write_bytes(gzip.compress(plain.read_bytes()) + member * 16)
    (vol,) = read_volumes(path, read_opts)
    np.testing.assert_array_equal(vol.data, data)


def test_gzip_stream_shorter_than_declared(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(nifti_header_bytes((64, 64, 64)) + b"\1" * 1000))
    with pytest.raises(
        InputError,
        match=re.escape(
            f"{path}: cannot read NIfTI: truncated or corrupt file (file holds 1352 of the 262496"
        ),
    ):
        read_volumes(path, read_opts)


def test_nifti_voxel_offset_beyond_limit(tmp_path: Path, read_opts: ReadOptions) -> None:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((4, 4, 4))
    header.set_data_offset(MAX_NIFTI_OFFSET + 16)
    path = tmp_path / "far.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(
        InputError, match=re.escape(f"{path}: NIfTI voxels start at byte {MAX_NIFTI_OFFSET + 16}")
    ):
        read_volumes(path, read_opts)


def test_npy_header_claiming_10000_cubed(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = write_huge_npy(tmp_path / "huge.npy", (10000, 10000, 10000))
    with pytest.raises(InputError, match=re.escape(f"{path}: volume has 1000000000000 voxels, {LIMIT}")):
        read_volumes(path, read_opts)


def test_npy_shorter_than_its_header(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = write_huge_npy(tmp_path / "short.npy", (32, 32, 32))
    with pytest.raises(
        InputError, match=r"short\.npy: cannot read NumPy file: truncated or corrupt \(file holds"
    ):
        read_volumes(path, read_opts)


def test_npz_member_declaring_huge_array(tmp_path: Path, read_opts: ReadOptions) -> None:
    member = tmp_path / "x.npy"
    write_huge_npy(member, (5000, 5000, 5000))
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(member, "x.npy")
    with pytest.raises(InputError, match=re.escape(f"{path}#x: volume has 125000000000 voxels, {LIMIT}")):
        read_volumes(path, read_opts)


def test_npz_stack_over_the_limit_in_all(tmp_path: Path, pseudonymizer: object) -> None:
    path = tmp_path / "stack.npz"
    np.savez_compressed(path, train_images=np.zeros((20, 8, 8, 8), dtype=np.uint8))
    opts = ReadOptions(pseudonymizer=pseudonymizer, max_voxels=4096)  # type: ignore[arg-type]
    with pytest.raises(
        InputError, match=re.escape(f"{path}: archive holds 10240 voxels in all, more than the limit of 4096")
    ):
        read_volumes(path, opts)


def test_object_npy_refused_from_header(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}] * 8, dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match=re.escape(f"{path}: voxels must be numeric; found dtype object")):
        read_volumes(path, read_opts)


# ------------------------------------------------------------------------------ OS errors


def test_symlink_loop_file(tmp_path: Path, read_opts: ReadOptions) -> None:
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    with pytest.raises(
        InputError, match=re.escape(f"{loop}: cannot open (Too many levels of symbolic links)")
    ):
        discover([loop])
    with pytest.raises(
        InputError, match=re.escape(f"{loop}: cannot open (Too many levels of symbolic links)")
    ):
        read_volumes(loop, read_opts)


def test_symlink_loop_inside_folder_is_not_skipped(tmp_path: Path, read_opts: ReadOptions) -> None:
    write_nifti(tmp_path / "a.nii.gz", make_blob())
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    sources = discover([tmp_path])
    assert loop in sources
    with pytest.raises(
        InputError, match=re.escape(f"{loop}: cannot open (Too many levels of symbolic links)")
    ):
        read_volumes(loop, read_opts)


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "gone.nii"
    link.symlink_to(tmp_path / "missing.nii")
    with pytest.raises(
        InputError, match=re.escape(f"{link}: broken symbolic link (its target does not exist)")
    ):
        discover([link])


def test_folder_loop(tmp_path: Path) -> None:
    top = tmp_path / "data"
    (top / "sub").mkdir(parents=True)
    write_nifti(top / "sub" / "a.nii.gz", make_blob())
    (top / "sub" / "back").symlink_to(top)
    with pytest.raises(
        InputError, match=re.escape(f"{top / 'sub' / 'back'}: folder loop: a symbolic link leads")
    ):
        discover([top])


def test_fifo_refused_without_opening(tmp_path: Path, read_opts: ReadOptions) -> None:
    fifo = tmp_path / "pipe.nii"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=re.escape(f"{fifo}: not a regular file (a device, FIFO or socket)")):
        read_volumes(fifo, read_opts)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path: Path, read_opts: ReadOptions) -> None:
    path = write_nifti(tmp_path / "secret.nii.gz", make_blob())
    path.chmod(0)
    with pytest.raises(InputError, match=re.escape(f"{path}: cannot read (Permission denied)")):
        read_volumes(path, read_opts)
    folder = tmp_path / "closed"
    folder.mkdir()
    folder.chmod(0)
    try:
        with pytest.raises(InputError, match=re.escape(f"{folder}: cannot list folder (Permission denied)")):
            discover([folder])
    finally:
        folder.chmod(0o700)


def test_gate_check_audits_a_symlink_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
    enc = ProjectionEncoder(dim=16)
    monkeypatch.setattr(gate.cli.index, "load_encoder", lambda encoder_dir, device: enc)
    monkeypatch.setattr(gate.cli.check, "load_encoder", lambda encoder_dir, device: enc)
    runner = CliRunner()
    train = tmp_path / "train"
    train.mkdir()
    for i in range(4):
        write_nifti(train / f"c{i}.nii.gz", make_blob(seed=i))
    index = tmp_path / "index"
    built = runner.invoke(
        main, ["index", "build", "--data", str(train), "--out", str(index), "--poses", "none"]
    )
    assert built.exit_code == 0, built.output
    loop = tmp_path / "loop.nii.gz"
    loop.symlink_to(loop)
    result = runner.invoke(main, ["check", str(loop), "--index", str(index), "--allow-flag"])
    assert result.exit_code == 3, result.output
    assert "loop.nii.gz: cannot open (Too many levels of symbolic links)" in result.output
    (record,) = AuditLog(tmp_path / "audit.jsonl").records()
    assert record.verdict == "error"
    assert record.error == "unreadable input: cannot open (Too many levels of symbolic links)"


# ------------------------------------------------------------------------------ policies


def test_yaml_alias_bomb_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(YAML_BOMB)
    assert len(YAML_BOMB) < 700
    with pytest.raises(
        PolicyError,
        match=re.escape(
            "policy bomb.yaml: not valid YAML (anchors and aliases (&name, *name) are not allowed"
        ),
    ):
        load_policy(str(path))


def test_yaml_anchor_alone_refused(tmp_path: Path) -> None:
    path = tmp_path / "anchored.yaml"
    path.write_text(policy_path("strict").read_text().replace("\nk: ", "\nk: &five ", 1))
    with pytest.raises(PolicyError, match=r"anchors and aliases .* are not allowed in a policy \(line \d+\)"):
        load_policy(str(path))


def test_policy_file_size_capped(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(policy_path("strict").read_text() + "#" * MAX_POLICY_BYTES)
    with pytest.raises(
        PolicyError, match=re.escape(f"policy big.yaml: larger than the limit of {MAX_POLICY_BYTES} bytes")
    ):
        load_policy(str(path))


def test_shipped_policies_still_load() -> None:
    assert load_policy("strict").id == "strict"
