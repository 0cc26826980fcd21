"""Pseudonymous patient identity.

The gate works at patient level, so every volume carries a patient id, but never a clear one:
a DICOM PatientID, a CSV label or a filename-derived label is turned into
``p-<16 hex>`` = HMAC-SHA256(key, label) truncated. Without the key the ids cannot be linked
back to the labels by a dictionary attack; with the same key, the same patient always maps to
the same id (index build and check agree).
"""

from __future__ import annotations

import csv
import hmac
import os
import re
import secrets
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from gate.digest import sha256_source
from gate.errors import InputError, UsageError

ID_HEX_CHARS = 16
"""64 bits of HMAC output: collision probability ~n^2 / 2^65, negligible for any cohort."""

KEY_BYTES = 32
"""HMAC key length: the SHA-256 block-size recommendation."""

KEY_ENV = "GATE_ID_KEY_FILE"
"""Environment variable naming the pseudonymisation key file (overrides the default path)."""


def default_key_path() -> Path:
    """Where the pseudonymisation key lives unless ``GATE_ID_KEY_FILE`` says otherwise."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "gate" / "pseudonym.key"


def load_or_create_key(path: Path) -> bytes:
    """Read the HMAC key, creating a random one (mode 0600) if the file does not exist.

    Args:
        path: key file; 64 hex characters.

    Returns:
        The 32-byte key.

    Raises:
        UsageError: the file exists but does not hold 64 hex characters.

    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES))
        os.replace(tmp, path)
    text = path.read_text().strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise UsageError(f"{path}: pseudonymisation key must be 64 hex characters; regenerate it")
    return bytes.fromhex(text)


@dataclass(frozen=True)
class Pseudonymizer:
    """Maps clear patient labels to keyed-hash ids and decides each file's label.

    Attributes:
        key: HMAC key (32 bytes).
        mapping: file name or path -> patient label (from a CSV); wins over ``pattern``.
        pattern: regex with a named group ``patient`` searched in the file name.

    """

    key: bytes
    mapping: dict[str, str] = field(default_factory=dict)
    pattern: re.Pattern[str] | None = None

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("pseudonymisation key must be at least 16 bytes")
        if self.pattern is not None and "patient" not in self.pattern.groupindex:
            raise UsageError(
                f"patient-id pattern {self.pattern.pattern!r} needs a named group (?P<patient>...)"
            )

    def pseudonym(self, label: str) -> str:
        """Keyed hash of a clear label, e.g. ``p-3f2a9c0d1e4b5a67``."""
        digest = hmac.new(self.key, label.encode("utf-8"), sha256).hexdigest()
        return "p-" + digest[:ID_HEX_CHARS]

    def label_for(self, path: Path) -> str:
        """Clear patient label of a non-DICOM file: CSV mapping, then pattern, then file name.

        Args:
            path: the file (or DICOM folder without PatientID).

        Returns:
            The label; the default (one file = one patient) is the sha256 of the file's bytes
            (:func:`gate.digest.sha256_source`, as recorded in index manifests), so the id does not depend
            on where the data sits: an index built on one machine and checked on another, or
            reached through a symlinked split, gives the same file the same id.

        """
        for key in (str(path), path.name):
            if key in self.mapping:
                return self.mapping[key]
        if self.pattern is not None:
            match = self.pattern.search(path.name)
            if match is None:
                raise InputError(
                    path, f"file name does not match the patient-id pattern {self.pattern.pattern!r}"
                )
            return match.group("patient")
        return "sha256:" + sha256_source(path)


def read_mapping_csv(path: Path) -> dict[str, str]:
    """Read a ``file,patient`` CSV (header required) into a dict.

    Raises:
        InputError: missing columns or an empty patient label.

    """
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "patient"} <= set(reader.fieldnames):
                raise InputError(path, "patient mapping CSV needs the header columns 'file,patient'")
            mapping: dict[str, str] = {}
            for row_no, row in enumerate(reader, start=2):
                if not row["file"] or not row["patient"]:
                    raise InputError(path, f"line {row_no}: empty 'file' or 'patient'")
                mapping[row["file"]] = row["patient"]
    except OSError as err:
        raise InputError(path, f"cannot read patient mapping CSV ({err.strerror})") from err
    return mapping
