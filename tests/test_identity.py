from __future__ import annotations

import re
from pathlib import Path

import pytest

from gate.errors import InputError, UsageError
from gate.identity import Pseudonymizer, load_or_create_key, read_mapping_csv
from tests.conftest import TEST_KEY


def test_pseudonym_is_keyed_and_stable() -> None:
    a, b = Pseudonymizer(key=TEST_KEY), Pseudonymizer(key=bytes(32))
    assert a.pseudonym("PAT-1") == a.pseudonym("PAT-1")
    assert a.pseudonym("PAT-1") != b.pseudonym("PAT-1")
    assert re.fullmatch(r"p-[0-9a-f]{16}", a.pseudonym("PAT-1"))


def test_key_created_once_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "cfg" / "pseudonym.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and load_or_create_key(path) == key
    assert path.stat().st_mode & 0o777 == 0o600


def test_bad_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k"
    path.write_text("short")
    with pytest.raises(UsageError, match="pseudonymisation key must be 64 hex characters"):
        load_or_create_key(path)


def test_pattern_needs_patient_group() -> None:
    with pytest.raises(UsageError, match=r"needs a named group \(\?P<patient>...\)"):
        Pseudonymizer(key=TEST_KEY, pattern=re.compile(r"sub-\d+"))


def test_pattern_mismatch_names_file() -> None:
    p = Pseudonymizer(key=TEST_KEY, pattern=re.compile(r"(?P<patient>sub-\d+)"))
    with pytest.raises(InputError, match=r"x\.nii: file name does not match the patient-id pattern"):
        p.label_for(Path("x.nii"))


def test_mapping_csv(tmp_path: Path) -> None:
    path = tmp_path / "map.csv"
    path.write_text("file,patient\na.nii.gz,P1\nb.nii.gz,P1\n")
    assert read_mapping_csv(path) == {"a.nii.gz": "P1", "b.nii.gz": "P1"}
    path.write_text("name,id\na,b\n")
    with pytest.raises(InputError, match="needs the header columns 'file,patient'"):
        read_mapping_csv(path)


def test_default_label_is_the_content_not_the_location(tmp_path: Path) -> None:
    """One file = one patient, keyed by its bytes: a moved, renamed or symlinked copy keeps its id."""
    p = Pseudonymizer(key=TEST_KEY)
    a = tmp_path / "site-a" / "scan.nii.gz"
    b = tmp_path / "site-b" / "other-name.nii.gz"
    link = tmp_path / "split" / "scan.nii.gz"
    for path in (a, b, link):
        path.parent.mkdir()
    a.write_bytes(b"volume one")
    b.write_bytes(b"volume one")
    link.symlink_to(a)
    other = tmp_path / "site-a" / "scan2.nii.gz"
    other.write_bytes(b"volume two")
    ids = {p.pseudonym(p.label_for(x)) for x in (a, b, link)}
    assert len(ids) == 1 and p.pseudonym(p.label_for(other)) not in ids
    assert str(tmp_path) not in p.label_for(a)
