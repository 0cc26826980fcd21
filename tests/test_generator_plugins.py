"""Generator plug-ins: the entry-point group, the MONAI-bundle generator, its trust checks, and
``gate generate --generator BUNDLE_DIR`` end to end with a bundle exported from the shipped LDM."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gate.generator.plugins as plugins_module
from gate.cli import main
from gate.errors import IntegrityError, UsageError
from gate.generator.monai_bundle import (
    INFERENCE_CONFIG,
    MonaiBundleGenerator,
    bundle_digest,
    check_config_safe,
)
from gate.generator.plugins import ENTRY_POINT_GROUP, load_generator, plugins
from gate.generator.sample import DEFAULT_GENERATOR_DIR, Generator
from gate.index import DEFAULT_INDEX_DIR

pytest.importorskip("monai")


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("GATE_ID_KEY_FILE", str(tmp_path / "key"))
    monkeypatch.delenv("GATE_AUDIT_LOG", raising=False)
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not DEFAULT_GENERATOR_DIR.is_dir():
        pytest.skip(f"shipped generator missing: {DEFAULT_GENERATOR_DIR}")
    out = tmp_path_factory.mktemp("mb") / "bundle"
    result = CliRunner().invoke(main, ["ldm", "export-bundle", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"MONAI bundle {bundle_digest(out)[:12]} in {out}"
    return out


def test_entry_point_group_registers_gate_generators_first() -> None:
    registered = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered == {
        "ldm": "gate.generator.sample:Generator",
        "monai-bundle": "gate.generator.monai_bundle:MonaiBundleGenerator",
    }
    assert [p.name for p in plugins()] == ["ldm", "monai-bundle"]


def test_bundle_layout_and_same_samples_as_the_ldm(bundle: Path) -> None:
    assert sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()) == [
        "configs/inference.json",
        "configs/metadata.json",
        "models/autoencoder.pt",
        "models/model.pt",
    ]
    ldm = load_generator(DEFAULT_GENERATOR_DIR, "cpu")
    mb = load_generator(bundle, "cpu")
    assert type(ldm) is Generator and type(mb) is MonaiBundleGenerator
    assert mb.preprocess.digest == ldm.preprocess.digest and mb.sha256 == bundle_digest(bundle)
    np.testing.assert_allclose(mb.sample(7, 3, 1, 2), ldm.sample(7, 3, 1, 2), atol=1e-6)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["gate_ldm_weights_sha256"] == ldm.sha256


def test_generate_gates_bundle_samples_end_to_end(runner: CliRunner, bundle: Path, tmp_path: Path) -> None:
    if not DEFAULT_INDEX_DIR.is_dir():
        pytest.skip(f"shipped index missing: {DEFAULT_INDEX_DIR}")
    args = ["generate", "--generator", str(bundle), "--n", "2", "--policy", "permissive"]
    result = runner.invoke(main, [*args, "--batch-size", "2", "--ddim-steps", "2", "--json", "s.json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["exported"] == 2
    manifest = json.loads((tmp_path / summary["bundle"] / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert bundle_digest(bundle) in text and "MONAI bundle latent diffusion" in text
    records = [json.loads(line) for line in (tmp_path / "gate-out" / "audit.jsonl").read_text().splitlines()]
    assert len(records) == summary["candidates"] and all(r["verdict"] != "error" for r in records)
    verify = runner.invoke(
        main,
        ["verify-bundle", summary["bundle"], "--policy", "permissive", "--audit-log", "gate-out/audit.jsonl"],
    )
    assert verify.exit_code == 0, verify.output


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"a": "$__import__('os').system('true')"}, r"inference.json.a: .* is an expression or macro"),
        ({"a": ["%other.json#net"]}, r"inference.json.a\[0\]: .* is an expression or macro"),
        (
            {"net": {"_target_": "os.system", "command": "true"}},
            r"_target_ 'os.system' is not a MONAI network",
        ),
        ({"net": {"_target_": "monai.bundle.run"}}, r"_target_ 'monai.bundle.run' is not a MONAI network"),
        (
            {"net": {"_target_": "monai.networks.nets.UNet", "_mode_": "callable"}},
            r"key _mode_ is not allowed",
        ),
        ({"net": {"_requires_": "@x"}}, r"key _requires_ is not allowed"),
    ],
)
def test_config_that_runs_code_is_refused(config: dict, message: str) -> None:
    with pytest.raises(IntegrityError, match=message):
        check_config_safe(config)


def test_unsafe_or_broken_bundle_fails_closed(runner: CliRunner, bundle: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    cfg = json.loads((bad / INFERENCE_CONFIG).read_text())
    cfg["scale_factor"] = "$1.0"
    (bad / INFERENCE_CONFIG).write_text(json.dumps(cfg))
    result = runner.invoke(main, ["generate", "--n", "1", "--generator", str(bad)])
    assert result.exit_code == 3
    assert "inference.json.scale_factor: '$1.0' is an expression or macro; gate runs no code" in result.stderr
    assert not (tmp_path / "gate-out").exists()
    shutil.rmtree(bad)
    shutil.copytree(bundle, bad)
    (bad / "models" / "model.pt").write_bytes((bad / "models" / "autoencoder.pt").read_bytes())
    with pytest.raises(IntegrityError, match=r"model.pt: weights do not fit the bundle's network"):
        MonaiBundleGenerator(bad, device="cpu")


def test_unknown_folder_and_existing_out(runner: CliRunner, bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = runner.invoke(main, ["generate", "--n", "1", "--generator", "empty"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "gate: error: --generator empty: no generator plug-in recognises this folder (tried ldm, "
        "monai-bundle); expected generator.json + weights.npz (gate LDM) or configs/inference.json + "
        "models/*.pt (MONAI bundle)"
    )
    again = runner.invoke(main, ["ldm", "export-bundle", "--out", str(bundle)])
    assert again.exit_code == 2 and f"{bundle} exists; choose a new folder" in again.stderr


class ToyGenerator:
    """A third-party plug-in: accepts a folder holding toy.txt."""

    @classmethod
    def accepts(cls, path: Path) -> bool:
        return (path / "toy.txt").is_file()

    def __init__(self, path: Path, device: str = "auto") -> None:
        self.path, self.device = path, device


def test_third_party_plugin_is_found_through_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toy = EntryPoint("toy", f"{__name__}:ToyGenerator", ENTRY_POINT_GROUP)
    shadow = EntryPoint("ldm", f"{__name__}:ToyGenerator", ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins_module, "entry_points", lambda group: [toy, shadow])
    assert [p.name for p in plugins()] == ["ldm", "monai-bundle", "toy"]  # a plug-in cannot replace ldm
    (tmp_path / "toy.txt").write_text("x")
    loaded = load_generator(tmp_path, "cpu")
    assert isinstance(loaded, ToyGenerator) and loaded.device == "cpu"
    with pytest.raises(UsageError, match=r"tried ldm, monai-bundle, toy"):
        load_generator(tmp_path / "..", "cpu")
