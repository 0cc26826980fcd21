"""Export a trained encoder to one self-contained ONNX file, prove it, describe it.

The export writes ``encoder.onnx`` (weights embedded, dynamic batch axis), ``encoder.json``
(:class:`gate.embed.EncoderManifest` with the sha256 and the preprocessing), ``model_card.md``
and ``model_card.json``. Before anything is written the ONNX graph is run with onnxruntime on
real preprocessed volumes and compared with torch eager (MONAI ``convert_to_onnx(verify=True)``
style); a difference above :data:`PARITY_TOLERANCE` aborts the export. Files are built in a
temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from gate.digest import sha256_bytes
from gate.embed import MANIFEST_FILE, ONNX_FILE, EncoderManifest
from gate.errors import IntegrityError, UsageError
from gate.preprocess import PreprocessConfig

PARITY_TOLERANCE = 1e-4
"""Maximum absolute difference allowed between torch and onnxruntime embedding components.
Both run float32; the measured difference on unit vectors is ~1e-7, and 1e-4 is still far
below any similarity threshold resolution (thresholds differ in the 3rd decimal)."""

OPSET = 17
"""ONNX opset: supported by every onnxruntime >= 1.14 (CPU and CUDA)."""

INPUT_NAME = "volume"
OUTPUT_NAME = "embedding"


def scalar_prelu_as_leaky_relu(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every single-slope PReLU replaced by the identical LeakyReLU.

    MONAI's residual units use ``nn.PReLU()`` with one learned slope; once trained, that is
    exactly ``LeakyReLU(slope)``. onnxruntime runs PRelu as a broadcast kernel (~20% of the
    CPU time of this encoder) but fuses LeakyRelu into the preceding Conv. The parity check
    compares the export with the *original* model, so the substitution is proven, not assumed.
    """
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.PReLU) and child.weight.numel() == 1:
                setattr(module, child_name, nn.LeakyReLU(negative_slope=float(child.weight.detach())))
    return model


def onnx_bytes(model: nn.Module, grid: tuple[int, int, int]) -> bytes:
    """Serialise ``model`` to ONNX with a dynamic batch axis, weights embedded.

    Args:
        model: maps (N, 1, X, Y, Z) float32 to (N, D).
        grid: (X, Y, Z).

    Returns:
        The ONNX model bytes (checked by ``onnx.checker``).

    """
    model = scalar_prelu_as_leaky_relu(model.eval().cpu()).eval()
    example = torch.zeros((2, 1, *grid), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def parity(model: nn.Module, data: bytes, grids: np.ndarray) -> float:
    """Largest |torch - onnxruntime| over the embeddings of ``grids`` (batch of all, and of 1).

    Args:
        model: the torch model that was exported.
        data: its ONNX bytes.
        grids: (N, 1, X, Y, Z) float32 real preprocessed volumes.

    Returns:
        Maximum absolute difference over all components.

    """
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(grids, dtype=np.float32)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    got = session.run(None, {INPUT_NAME: x})[0]
    one = session.run(None, {INPUT_NAME: x[:1]})[0]
    if got.shape != ref.shape:
        return float("inf")
    return float(max(np.abs(got - ref).max(), np.abs(one - ref[:1]).max()))


def export_encoder(
    model: nn.Module,
    grid: tuple[int, int, int],
    out_dir: Path,
    parity_grids: np.ndarray,
    preprocess: PreprocessConfig,
    objective: str,
    dim: int,
    architecture: dict[str, Any],
    training: dict[str, Any],
    benchmark: dict[str, Any] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    overwrite: bool = False,
) -> EncoderManifest:
    """Export, verify, and write the model folder.

    Args:
        model: trained torch encoder.
        grid: input grid (X, Y, Z).
        out_dir: target folder (``encoder.onnx``, ``encoder.json``, ``model_card.md/json``).
        parity_grids: (N, 1, X, Y, Z) real preprocessed volumes for the parity check, N >= 1.
        preprocess: the preprocessing the model was trained with.
        objective: training objective (for the manifest and card).
        dim: embedding size.
        architecture: spec as a dict.
        training: data digest, epochs, seed, history summary...
        benchmark: optional detection benchmark summary for the model card.
        tolerance: parity tolerance (max abs difference).
        overwrite: replace an existing model folder.

    Returns:
        The written manifest.

    Raises:
        UsageError: ``out_dir`` exists and ``overwrite`` is false, or no parity volumes.
        IntegrityError: parity failed (nothing is written).

    """
    if len(parity_grids) < 1:
        raise UsageError("the parity check needs at least one real volume; pass --data")
    if out_dir.exists() and not overwrite:
        raise UsageError(f"{out_dir} exists; pass --force to replace it")
    data = onnx_bytes(model, grid)
    diff = parity(model, data, parity_grids)
    if not diff <= tolerance:
        raise IntegrityError(
            f"ONNX parity check failed: max |torch - onnxruntime| = {diff:.3g} > tolerance "
            f"{tolerance:.3g} on {len(parity_grids)} volumes; nothing was written"
        )
    manifest = EncoderManifest(
        onnx_sha256=sha256_bytes(data),
        dim=dim,
        objective=objective,
        preprocess=preprocess,
        preprocess_digest=preprocess.digest,
        input_name=INPUT_NAME,
        output_name=OUTPUT_NAME,
        architecture=architecture,
        training=training,
        parity={
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "n_volumes": len(parity_grids),
            "provider": "CPUExecutionProvider",
        },
        versions={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "opset": str(OPSET),
        },
    )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the model folder is shipped and read by others
    try:
        (tmp / ONNX_FILE).write_bytes(data)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
        card = model_card(manifest, len(data), benchmark)
        (tmp / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "model_card.md").write_text(model_card_markdown(card))
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            if old.exists():
                shutil.rmtree(old)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


DATA_CREDIT = (
    "MSD Task04 Hippocampus (Medical Segmentation Decathlon, Vanderbilt University Medical "
    "Center), CC-BY-SA 4.0. Simpson AL et al., arXiv:1902.09063 (2019); Antonelli M et al., "
    "Nature Communications 13, 4128 (2022)."
)


def model_card(
    manifest: EncoderManifest, size_bytes: int, benchmark: dict[str, Any] | None
) -> dict[str, Any]:
    """The model card as data."""
    return {
        "name": "gate 3D encoder",
        "onnx_sha256": manifest.onnx_sha256,
        "onnx_bytes": size_bytes,
        "objective": manifest.objective,
        "embedding_dim": manifest.dim,
        "architecture": manifest.architecture,
        "preprocess": manifest.preprocess.model_dump(mode="json"),
        "preprocess_digest": manifest.preprocess_digest,
        "training": manifest.training,
        "parity": manifest.parity,
        "versions": manifest.versions,
        "benchmark": benchmark,
        "data_credit": DATA_CREDIT if manifest.training.get("data_is_msd_hippocampus") else None,
        "intended_use": "Nearest-training-patient search for the gate privacy check of synthetic "
        "3D volumes on the same kind of data (brain MRI hippocampus crops, 1 mm, 32x48x32 grid). "
        "Not a diagnostic model; similarity scores are meaningful only relative to the "
        "calibration stored with an index built with this exact encoder.",
    }


def model_card_markdown(card: dict[str, Any]) -> str:
    """Render :func:`model_card` as markdown."""
    t = card["training"]
    lines = [
        f"# {card['name']}",
        "",
        f"- ONNX sha256: `{card['onnx_sha256']}` ({card['onnx_bytes'] / 1e6:.2f} MB, weights embedded, "
        "dynamic batch axis)",
        f"- Objective: `{card['objective']}`; embedding dim {card['embedding_dim']} (unit norm, float32)",
        f"- Architecture: MONAI Regressor {card['architecture']} + L2 normalisation",
        f"- Preprocessing digest: `{card['preprocess_digest']}` ({card['preprocess']})",
        f"- Training data: {t.get('data_name', '?')} ({t.get('n_volumes', '?')} volumes), "
        f"data digest `{t.get('data_digest', '?')}`",
        f"- Epochs {t.get('epochs', '?')}, seed {t.get('seed', '?')}, batch {t.get('batch_size', '?')}, "
        f"lr {t.get('lr', '?')}",
        f"- Parity torch vs onnxruntime: max abs diff {card['parity']['max_abs_diff']:.2e} "
        f"(tolerance {card['parity']['tolerance']:.0e}) on {card['parity']['n_volumes']} real volumes",
        f"- Versions: {card['versions']}",
        "",
        "## Intended use",
        "",
        card["intended_use"],
        "",
    ]
    if card.get("benchmark"):
        b = card["benchmark"]
        lines += ["## Detection benchmark", "", str(b.get("note", "")), "", str(b.get("markdown", b)), ""]
    if card.get("data_credit"):
        lines += ["## Data", "", card["data_credit"], ""]
    return "\n".join(lines)
