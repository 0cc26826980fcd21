"""The lean install: index build, check and verify-bundle run with torch and MONAI unimportable.

Each command runs in a subprocess whose ``sitecustomize`` puts a ``sys.meta_path`` finder first
that raises ``ModuleNotFoundError`` for torch, monai, onnx and onnxscript (what a
``pip install 'gate[cpu]'`` machine has), so a module-level import of any of them on these
paths fails the test. The encoder is a real (tiny, untrained) ONNX model, as in production.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gate.index import TrainingIndex
from tests.bundle_helpers import Training, candidate, release_policy_text, run_pipeline, write_policy
from tests.conftest import TEST_KEY
from tests.test_check import export_tiny_onnx_encoder
from tests.volumes import make_blob, write_nifti

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys

class _NoTrainExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "monai", "onnx", "onnxscript"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
        return None

sys.meta_path.insert(0, _NoTrainExtra())
"""


def lean_gate(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m gate ARGS`` with the train extra unimportable."""
    block = tmp / "block"
    block.mkdir(exist_ok=True)
    (block / "sitecustomize.py").write_text(BLOCKER)
    key = tmp / "key"
    key.write_text(TEST_KEY.hex())
    env = os.environ | {"PYTHONPATH": f"{block}{os.pathsep}{ROOT}", "GATE_ID_KEY_FILE": str(key)}
    env.pop("GATE_AUDIT_LOG", None)
    return subprocess.run(
        [sys.executable, "-m", "gate", *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def lean_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lean")
    enc = export_tiny_onnx_encoder(root / "enc", 0)
    train = root / "train"
    train.mkdir()
    for i in range(6):
        write_nifti(train / f"case_{i:03d}.nii.gz", make_blob((16, 16, 16), seed=i))
    built = lean_gate(root, "index", "build", "--data", str(train), "--encoder", str(enc), "--out", "idx")
    assert built.returncode == 0, built.stderr
    return {"root": root, "enc": enc, "train": train, "index": root / "idx"}


def test_blocker_blocks(tmp_path: Path) -> None:
    result = lean_gate(tmp_path, "generate", "--n", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "gate: error: `gate generate` needs torch, which the lean install leaves out: "
        "pip install torch==2.13.0 && pip install 'gate[cpu,train]'"
    )


def test_check_runs_without_torch(lean_world: dict[str, Path]) -> None:
    root, train = lean_world["root"], lean_world["train"]
    copy = lean_gate(
        root, "check", str(train / "case_002.nii.gz"), "--index", "idx", "--audit-log", "a.jsonl"
    )
    assert copy.returncode == 1, copy.stdout + copy.stderr
    assert "checked 1: 0 pass, 0 flag, 1 reject" in copy.stdout
    audit = lean_gate(root, "audit", "verify", "--log", "a.jsonl")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_verify_bundle_runs_without_torch(lean_world: dict[str, Path]) -> None:
    from gate.embed import Encoder

    root = lean_world["root"]
    encoder = Encoder(lean_world["enc"], device="cpu")
    index = TrainingIndex.load(lean_world["index"], encoder)
    training = Training(lean_world["train"], lean_world["index"], encoder, index, [], [])  # type: ignore[arg-type]
    # smooth synthetic blobs look alike to the tiny encoder once searched under shifted views too
    policy = write_policy(
        root / "pol", "release", release_policy_text(0.995, 0.999, verified=(0.9995, 0.9999))
    )
    cands = [(f"s-{i:03d}", 100 + i, candidate(100 + i)) for i in range(6)]
    bundle, verdicts = run_pipeline(training, policy, root / "bundle", root / "bundle.jsonl", cands)
    n_pass = sum(v == "pass" for v in verdicts.values())
    assert n_pass > 0, verdicts
    args = ["verify-bundle", str(bundle), "--index", "idx", "--policy", str(root / "pol" / "release.yaml")]
    result = lean_gate(root, *args, "--audit-log", str(root / "bundle.jsonl"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"publishable: {n_pass} sample(s) pass under policy release" in result.stdout


def test_base_dependencies_leave_out_the_train_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[\[=<>]", d)[0].strip() for d in project["dependencies"]}
    train = {re.split(r"[\[=<>]", d)[0].strip() for d in project["optional-dependencies"]["train"]}
    assert train == {"torch", "monai", "onnx", "onnxscript"}
    assert not base & train
    assert "torch==2.13.0" in project["optional-dependencies"]["train"]


def test_import_gate_stays_light() -> None:
    code = (
        "import sys, gate; print(sorted(m for m in ('numpy', 'onnxruntime', 'hnswlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
