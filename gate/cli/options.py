"""Click options shared by every command that reads volumes, and their resolution."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from gate.errors import UsageError
from gate.identity import Pseudonymizer, default_key_path, load_or_create_key, read_mapping_csv
from gate.volume import DEFAULT_MAX_VOXELS, ReadOptions

F = TypeVar("F", bound=Callable[..., Any])


def input_options(func: F) -> F:
    """Add ``--id-key-file``, ``--patient-map``, ``--patient-pattern`` and ``--max-voxels``."""
    options = [
        click.option(
            "--id-key-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="HMAC key for pseudonymous patient ids (default: $GATE_ID_KEY_FILE or "
            "~/.config/gate/pseudonym.key, created on first use).",
        ),
        click.option(
            "--patient-map",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="CSV with columns file,patient: several scans can share one patient.",
        ),
        click.option(
            "--patient-pattern",
            default=None,
            help="Regex with a (?P<patient>...) group searched in each file name.",
        ),
        click.option(
            "--max-voxels",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_VOXELS,
            show_default=True,
            help="Refuse volumes (and .npz archives, all arrays together) with more voxels than "
            "this, from the file's header before any voxel is read or inflated.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def read_options(
    id_key_file: Path | None, patient_map: Path | None, patient_pattern: str | None, max_voxels: int
) -> ReadOptions:
    """Build :class:`ReadOptions` from the values of :func:`input_options`."""
    key = load_or_create_key(id_key_file or default_key_path())
    try:
        pattern = re.compile(patient_pattern) if patient_pattern else None
    except re.error as err:
        raise UsageError(f"--patient-pattern {patient_pattern!r} is not a valid regex ({err})") from err
    mapping = read_mapping_csv(patient_map) if patient_map else {}
    return ReadOptions(
        pseudonymizer=Pseudonymizer(key=key, mapping=mapping, pattern=pattern), max_voxels=max_voxels
    )
