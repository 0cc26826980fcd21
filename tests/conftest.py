"""Shared fixtures: tiny volumes in tmp_path, a fixed pseudonymisation key, the real data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from gate.identity import Pseudonymizer
from gate.volume import ReadOptions

HIPPOCAMPUS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msd_hippocampus"
"""The shared MSD Task04 Hippocampus copy (CC-BY-SA 4.0), beside the checkout."""

TEST_KEY = bytes(range(32))


@pytest.fixture
def pseudonymizer() -> Pseudonymizer:
    return Pseudonymizer(key=TEST_KEY)


@pytest.fixture
def read_opts(pseudonymizer: Pseudonymizer) -> ReadOptions:
    return ReadOptions(pseudonymizer=pseudonymizer)


@pytest.fixture
def hippocampus_dir() -> Path:
    images = HIPPOCAMPUS_DIR / "imagesTr"
    if not images.is_dir():
        pytest.skip(f"real data not found at {images}")
    return images


@pytest.fixture(autouse=True, scope="session")
def _site_keys_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Demo site keys made by tests go to a temporary folder, never ~/.config/gate (subprocesses too)."""
    import os

    os.environ["GATE_KEY_DIR"] = str(tmp_path_factory.mktemp("site-keys"))


@pytest.fixture
def shipped_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip without the shipped encoder and index; point the key and the audit log into tmp_path."""
    from gate.embed import DEFAULT_ENCODER_DIR
    from gate.index import DEFAULT_INDEX_DIR

    if (
        not (DEFAULT_INDEX_DIR / "manifest.json").is_file()
        or not (DEFAULT_ENCODER_DIR / "encoder.json").is_file()
    ):
        pytest.skip("no shipped encoder / index in gate/models")
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.setenv("GATE_AUDIT_LOG", str(tmp_path / "audit.jsonl"))
