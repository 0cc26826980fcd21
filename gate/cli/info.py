"""``gate info`` and ``gate inspect``: what is installed, and what a folder of volumes holds."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import click
import numpy as np

from gate import __version__
from gate.cli.options import input_options, read_options
from gate.errors import ExitCode, InputError
from gate.policy import policy_names
from gate.volume import discover, read_volumes

REPORTED_PACKAGES = ("torch", "monai", "onnxruntime", "onnxruntime-gpu", "hnswlib", "pydicom", "numpy")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


@click.command()
def info() -> None:
    """Versions of the stack, onnxruntime providers, and the policies found."""
    click.echo(f"gate {__version__}")
    for dist in REPORTED_PACKAGES:
        click.echo(f"  {dist:<16} {_version(dist)}")
    try:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
    except ImportError:
        providers = "onnxruntime not installed (pip install 'gate[cpu]' or 'gate[gpu]')"
    click.echo(f"onnxruntime providers: {providers}")
    click.echo(f"policies: {', '.join(policy_names())}")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@input_options
def inspect(
    paths: tuple[Path, ...],
    id_key_file: Path | None,
    patient_map: Path | None,
    patient_pattern: str | None,
    max_voxels: int,
) -> None:
    """Summarise volumes: count, shapes, spacings, intensities, patients, unreadable files.

    Exits 3 if any file cannot be read (each one is listed with its reason).
    """
    options = read_options(id_key_file, patient_map, patient_pattern, max_voxels)
    sources = discover(list(paths))
    shapes, spacings, lows, highs, patients = [], [], [], [], set()
    background: list[float] = []
    failures: list[InputError] = []
    for source in sources:
        try:
            volumes = read_volumes(source, options)
        except InputError as err:
            failures.append(err)
            continue
        for vol in volumes:
            shapes.append(vol.shape)
            spacings.append(vol.spacing)
            lows.append(float(vol.data.min()))
            highs.append(float(vol.data.max()))
            background.append(float(np.mean(vol.data <= vol.data.min())))
            patients.add(vol.patient_id)
    click.echo(f"volumes: {len(shapes)} from {len(sources)} source(s)")
    if shapes:
        arr = np.asarray(shapes)
        sp = np.asarray(spacings)
        click.echo(
            f"shape:   min {tuple(arr.min(0).tolist())}  max {tuple(arr.max(0).tolist())}  "
            f"median {tuple(np.median(arr, 0).astype(int).tolist())}"
        )
        click.echo(
            f"spacing: min {tuple(np.round(sp.min(0), 3).tolist())} mm  "
            f"max {tuple(np.round(sp.max(0), 3).tolist())} mm"
        )
        click.echo(
            f"intensity: min {min(lows):g}  max {max(highs):g}  "
            f"(per-volume max from {min(highs):g} to {max(highs):g})"
        )
        click.echo(f"patients: {len(patients)}")
        from gate.preprocess import config_flags, suggest_config

        suggested = suggest_config(arr, sp, min(lows), float(np.median(background)))
        click.echo(f"suggested encoder preprocessing: {config_flags(suggested)}")
    click.echo(f"unreadable: {len(failures)}")
    for err in failures:
        click.echo(f"  {err}")
    if failures:
        raise SystemExit(int(ExitCode.INPUT))
