"""gate.embed: the onnxruntime encoder runtime (no torch here: the model is built with onnx.helper)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gate.digest import sha256_file
from gate.embed import CPU, CUDA, DEFAULT_ENCODER_DIR, Encoder, EncoderManifest, choose_providers
from gate.errors import IntegrityError, ProviderError, UsageError
from gate.preprocess import PreprocessConfig
from gate.values import Volume

GRID = (8, 8, 8)
DIM = 6


def _projection_onnx(path: Path, seed: int = 0) -> np.ndarray:
    """(N,1,8,8,8) -> flatten -> @W -> L2 normalise, as a real ONNX graph."""
    w = np.random.default_rng(seed).standard_normal((int(np.prod(GRID)), DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["volume"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["h"]),
        helper.make_node("ReduceL2", ["h"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["h", "norm"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "proj",
        [helper.make_tensor_value_info("volume", TensorProto.FLOAT, ["batch", 1, *GRID])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", DIM])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return w


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "enc"
    d.mkdir()
    _projection_onnx(d / "encoder.onnx")
    cfg = PreprocessConfig(grid=GRID)
    manifest = EncoderManifest(
        onnx_sha256=sha256_file(d / "encoder.onnx"),
        dim=DIM,
        objective="test",
        preprocess=cfg,
        preprocess_digest=cfg.digest,
    )
    (d / "encoder.json").write_text(json.dumps(manifest.model_dump(mode="json")))
    return d


def _volume(seed: int, shape: tuple[int, int, int] = (10, 9, 8)) -> Volume:
    data = np.random.default_rng(seed).random(shape).astype(np.float32)
    return Volume(data=data, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), source=f"v{seed}", patient_id="p-0")


def test_unit_norm_float32(model_dir: Path) -> None:
    enc = Encoder(model_dir, device="cpu")
    out = enc.embed_array(np.random.default_rng(1).random((5, 1, *GRID)).astype(np.float64))
    assert out.dtype == np.float32 and out.shape == (5, DIM)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert enc.provider == CPU
    assert enc.sha256 == sha256_file(model_dir / "encoder.onnx")


def test_embed_volumes_carries_digest(model_dir: Path) -> None:
    enc = Encoder(model_dir, device="cpu")
    embs = enc.embed([_volume(0), _volume(1, (6, 7, 8))])
    assert [e.source for e in embs] == ["v0", "v1"]
    assert all(e.encoder_sha256 == enc.sha256 and e.vector.shape == (DIM,) for e in embs)
    assert float(embs[0].vector @ embs[1].vector) < 0.999


def test_batch_size_does_not_change_result(model_dir: Path) -> None:
    enc = Encoder(model_dir, device="cpu")
    x = np.random.default_rng(2).random((40, 1, *GRID)).astype(np.float32)
    np.testing.assert_allclose(enc.embed_array(x)[:3], enc.embed_array(x[:3]), atol=1e-6)


def test_sha_mismatch_is_integrity_error(model_dir: Path) -> None:
    _projection_onnx(model_dir / "encoder.onnx", seed=9)  # replaced weights, old manifest
    with pytest.raises(
        IntegrityError,
        match=r"encoder\.onnx: sha256 [0-9a-f]{12}… does not match encoder\.json "
        r"\([0-9a-f]{12}…\); the model was modified or replaced, re-export it$",
    ):
        Encoder(model_dir, device="cpu")


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match=r"encoder\.json: expected an encoder manifest; found no file"):
        Encoder(tmp_path, device="cpu")


def test_preprocess_digest_mismatch(model_dir: Path) -> None:
    m = json.loads((model_dir / "encoder.json").read_text())
    m["preprocess"]["grid"] = [16, 16, 16]
    (model_dir / "encoder.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match=r"invalid encoder manifest .*re-export the encoder"):
        Encoder(model_dir, device="cpu")


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_missing_is_provider_error(model_dir: Path) -> None:
    avail = ", ".join(ort.get_available_providers())
    expected = (
        f"device 'cuda' requested but onnxruntime offers no CUDAExecutionProvider (available: {avail}); "
        "install onnxruntime-gpu with a working CUDA, or use --device cpu"
    )
    with pytest.raises(ProviderError, match=f"^{re.escape(expected)}$"):
        Encoder(model_dir, device="cuda")


def test_choose_providers() -> None:
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("cuda", [CUDA, CPU]) == [CUDA]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    with pytest.raises(UsageError, match="device must be one of auto, cpu, cuda; got 'tpu'"):
        choose_providers("tpu", [CPU])  # type: ignore[arg-type]


def test_wrong_input_shape(model_dir: Path) -> None:
    enc = Encoder(model_dir, device="cpu")
    with pytest.raises(
        UsageError, match=r"encoder input must be \(N, 1, 8, 8, 8\) preprocessed grids; got \(2, 1, 8, 8, 9\)"
    ):
        enc.embed_array(np.zeros((2, 1, 8, 8, 9), np.float32))
    bad = np.zeros((1, 1, *GRID), np.float32)
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(UsageError, match="encoder input contains NaN or infinite values"):
        enc.embed_array(bad)


def test_embed_module_does_not_import_torch() -> None:
    code = "import sys, gate.embed; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_shipped_encoder_loads() -> None:
    if not (DEFAULT_ENCODER_DIR / "encoder.json").is_file():
        pytest.skip("no shipped encoder yet")
    enc = Encoder(device="cpu")
    assert enc.dim == 128 and enc.preprocess == PreprocessConfig()
    assert enc.manifest.parity["max_abs_diff"] <= enc.manifest.parity["tolerance"]
    x = np.random.default_rng(0).random((3, 1, *enc.preprocess.grid)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(enc.embed_array(x), axis=1), 1.0, atol=1e-5)


def test_shipped_encoder_gives_a_volume_the_same_embedding_whatever_it_is_batched_with() -> None:
    """Bitwise: alone, in a batch of 2 or 5, or at the end of a 33-volume run (32 + 1)."""
    if not (DEFAULT_ENCODER_DIR / "encoder.json").is_file():
        pytest.skip("no shipped encoder yet")
    enc = Encoder(device="cpu")
    x = np.random.default_rng(3).random((33, 1, *enc.preprocess.grid)).astype(np.float32)
    alone = enc.embed_array(x[32:])
    np.testing.assert_array_equal(enc.embed_array(x[[32, 0]])[:1], alone)
    np.testing.assert_array_equal(enc.embed_array(x[[1, 2, 3, 4, 32]])[4:], alone)
    np.testing.assert_array_equal(enc.embed_array(x)[32:], alone)


def test_run_batch_bounds_voxels_per_call() -> None:
    from gate.embed import EMBED_BATCH, MIN_RUN_BATCH, run_batch

    assert run_batch((32, 48, 32)) == EMBED_BATCH
    assert run_batch((64, 64, 48)) == 8
    assert run_batch((128, 128, 80)) == MIN_RUN_BATCH  # never one alone (same embedding in any batch)
