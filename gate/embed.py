"""The encoder runtime: onnxruntime only (never torch), explicit providers, verified model.

This module is the only place in gate that creates an ``onnxruntime.InferenceSession``. The
model folder holds ``encoder.onnx`` and ``encoder.json`` (:class:`EncoderManifest`); the ONNX
bytes are hashed and checked against the manifest before the session is built from those same
bytes. onnxruntime silently falls back to CPU when a CUDA provider cannot start, so the
provider actually used is read back from ``session.get_providers()`` and a request for CUDA
that ends on CPU is an error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnxruntime as ort
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gate.digest import sha256_bytes
from gate.errors import IntegrityError, ProviderError, UsageError
from gate.preprocess import DEFAULT_GRID_VOXELS, PreprocessConfig, grid_voxels, preprocess_batch
from gate.values import Embedding, Volume

log = logging.getLogger(__name__)

DEFAULT_ENCODER_DIR: Path = Path(__file__).resolve().parent / "models" / "encoder"
"""The shipped default encoder (trained on msd_hippocampus, see its model_card.md)."""

ONNX_FILE = "encoder.onnx"
MANIFEST_FILE = "encoder.json"
MANIFEST_FORMAT = 1

EMBED_BATCH = 32
"""Volumes per onnxruntime call: 32 x 32x48x32 float32 = 6 MiB of input; larger batches gain
nothing measurable on CPU (see bench/embed_speed.py)."""

EMBED_BATCH_VOXELS = EMBED_BATCH * DEFAULT_GRID_VOXELS
"""Input voxels per onnxruntime call (32 grids of the default 32x48x32): larger grids run fewer
per call (:func:`run_batch`). At 128x128x80, 32 per call held 3.2 GB for 5 candidates in
`gate check` (bench/large_volumes.py, 2026-12-03); the activations grow with the batch."""

MIN_RUN_BATCH = 2
"""No onnxruntime call runs fewer volumes than this: a lone volume is run beside a copy of itself.
onnxruntime 1.32 (CPU) gives a volume embedded alone an embedding up to 4.5e-8 away from the same
volume in any batch of 2-32 (identical to each other, whatever the companions), so the same
candidate's cosine depended on how many others were judged with it (a report differed between
chunkings in the 1e-7 digit). The extra copy costs one embedding (0.66 ms at 32x48x32)."""

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

Device = Literal["auto", "cpu", "cuda"]


def run_batch(grid: Sequence[int]) -> int:
    """Grids of shape ``grid`` per onnxruntime call.

    :data:`EMBED_BATCH` within :data:`EMBED_BATCH_VOXELS`, never fewer than :data:`MIN_RUN_BATCH`.
    """
    return max(MIN_RUN_BATCH, min(EMBED_BATCH, EMBED_BATCH_VOXELS // grid_voxels(grid)))


class EncoderManifest(BaseModel):
    """What ``encoder.json`` says about ``encoder.onnx``.

    Attributes:
        format: manifest format version.
        onnx_file: file name of the model beside the manifest.
        onnx_sha256: sha256 of the ONNX bytes.
        dim: embedding size D.
        objective: training objective (``contrastive`` or ``ssim``; ``untrained`` for baselines).
        preprocess: the preprocessing the model expects.
        preprocess_digest: ``preprocess.digest`` (checked on load).
        input_name: ONNX input, shape (N, 1, X, Y, Z) float32.
        output_name: ONNX output, shape (N, D) float32 unit rows.
        architecture: the encoder spec (grid, channels, dim, residual units).
        training: data digest, number of volumes, epochs, seed, augmentation, history summary.
        parity: torch vs onnxruntime check at export (max_abs_diff, tolerance, n_volumes).
        versions: library versions at export.

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = MANIFEST_FORMAT
    onnx_file: str = ONNX_FILE
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dim: int = Field(ge=2)
    objective: str
    preprocess: PreprocessConfig
    preprocess_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str = "volume"
    output_name: str = "embedding"
    architecture: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    parity: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _digest_matches(self) -> EncoderManifest:
        if self.preprocess.digest != self.preprocess_digest:
            raise ValueError(
                f"preprocess_digest {self.preprocess_digest[:12]}… does not match the stored "
                f"preprocess config (digest {self.preprocess.digest[:12]}…)"
            )
        return self


def read_manifest(model_dir: Path) -> EncoderManifest:
    """Load and validate ``encoder.json``.

    Raises:
        IntegrityError: missing, unreadable or invalid manifest.

    """
    path = model_dir / MANIFEST_FILE
    if not path.is_file():
        raise IntegrityError(
            f"{path}: expected an encoder manifest; found no file; export one with `gate encoder export`"
        )
    try:
        return EncoderManifest.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as err:
        first = str(err).splitlines()[0]
        raise IntegrityError(f"{path}: invalid encoder manifest ({first}); re-export the encoder") from err


def choose_providers(device: Device, available: list[str]) -> list[str]:
    """Execution providers to ask onnxruntime for, in priority order.

    Args:
        device: ``cpu``; ``cuda`` (must be available); ``auto`` (CUDA then CPU when offered).
        available: ``onnxruntime.get_available_providers()``.

    Raises:
        ProviderError: ``cuda`` requested but not offered.
        UsageError: unknown device.

    """
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise ProviderError(
                f"device 'cuda' requested but onnxruntime offers no {CUDA} "
                f"(available: {', '.join(available)}); install onnxruntime-gpu with a working "
                "CUDA, or use --device cpu"
            )
        return [CUDA]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise UsageError(f"device must be one of auto, cpu, cuda; got {device!r}")


class Encoder:
    """A verified ONNX encoder: preprocessed grids or volumes in, unit embeddings out.

    Attributes:
        sha256: sha256 of the ONNX file (stamped on every :class:`Embedding`).
        dim: embedding size D.
        preprocess: preprocessing the model expects (use it before :meth:`embed_array`).
        provider: execution provider actually running the model.
        manifest: the validated manifest.

    """

    def __init__(
        self, model_dir: Path = DEFAULT_ENCODER_DIR, device: Device = "auto", threads: int | None = None
    ) -> None:
        """Verify and load ``model_dir/encoder.onnx``.

        Args:
            model_dir: folder with ``encoder.onnx`` and ``encoder.json``.
            device: ``auto`` (CUDA then CPU, if onnxruntime-gpu offers CUDA), ``cpu`` or ``cuda``.
            threads: onnxruntime intra-op CPU threads (default: onnxruntime's choice).

        Raises:
            IntegrityError: missing files, invalid manifest, or ONNX sha256 mismatch.
            ProviderError: ``cuda`` requested but unavailable, or onnxruntime fell back to CPU.

        """
        model_dir = Path(model_dir)
        providers = choose_providers(device, ort.get_available_providers())
        manifest = read_manifest(model_dir)
        onnx_path = model_dir / manifest.onnx_file
        if not onnx_path.is_file():
            raise IntegrityError(
                f"{onnx_path}: expected the encoder model named in {MANIFEST_FILE}; found no file"
            )
        data = onnx_path.read_bytes()
        digest = sha256_bytes(data)
        if digest != manifest.onnx_sha256:
            raise IntegrityError(
                f"{onnx_path}: sha256 {digest[:12]}… does not match {MANIFEST_FILE} "
                f"({manifest.onnx_sha256[:12]}…); the model was modified or replaced, re-export it"
            )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise UsageError(f"threads must be >= 1; got {threads}")
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise IntegrityError(f"{onnx_path}: onnxruntime cannot load the model: {err}") from err
        used = self._session.get_providers()
        if device == "cuda" and (not used or used[0] != CUDA):
            raise ProviderError(
                f"device 'cuda' requested but onnxruntime started {used[0] if used else 'nothing'} "
                "(CUDA failed to initialise); fix the CUDA install or use --device cpu"
            )
        self.provider: str = used[0]
        self.manifest = manifest
        self.sha256: str = digest
        self.dim: int = manifest.dim
        self.preprocess: PreprocessConfig = manifest.preprocess
        self._input = manifest.input_name
        inputs = [i.name for i in self._session.get_inputs()]
        if inputs != [self._input]:
            raise IntegrityError(f"{onnx_path}: expected one input '{self._input}'; found {inputs}")
        log.info("encoder %s… on %s", digest[:12], self.provider)

    def embed_array(self, batch: np.ndarray) -> np.ndarray:
        """Embed preprocessed grids.

        Args:
            batch: (N, 1, X, Y, Z) on ``self.preprocess.grid``, finite, any float dtype.

        Returns:
            (N, D) float32, unit rows.

        Raises:
            UsageError: wrong shape or non-finite values.
            IntegrityError: the model returned a wrong shape or non-finite values.

        """
        grid = tuple(self.preprocess.grid)
        if batch.ndim != 5 or batch.shape[1] != 1 or tuple(batch.shape[2:]) != grid:
            raise UsageError(
                f"encoder input must be (N, 1, {grid[0]}, {grid[1]}, {grid[2]}) preprocessed grids; "
                f"got {batch.shape}; preprocess with the encoder's PreprocessConfig first"
            )
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if not np.isfinite(x).all():
            raise UsageError("encoder input contains NaN or infinite values")
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        step = run_batch(grid)
        parts = [self._run(x[i : i + step]) for i in range(0, len(x), step)]
        out = np.concatenate(parts).astype(np.float32, copy=False)
        if out.shape != (len(x), self.dim) or not np.isfinite(out).all():
            raise IntegrityError(
                f"encoder returned shape {out.shape} (finite: {bool(np.isfinite(out).all())}); "
                f"expected ({len(x)}, {self.dim}) finite"
            )
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        """One onnxruntime call on (n, 1, X, Y, Z), padded to :data:`MIN_RUN_BATCH` by repeats."""
        n = len(x)
        if n < MIN_RUN_BATCH:
            x = np.concatenate([x] * -(-MIN_RUN_BATCH // n))[:MIN_RUN_BATCH]
        return np.asarray(self._session.run(None, {self._input: x})[0])[:n]

    def embed(self, volumes: list[Volume]) -> list[Embedding]:
        """Preprocess and embed volumes (in batches of :data:`EMBED_BATCH`).

        Args:
            volumes: as read from disk, any shape.

        Returns:
            One :class:`Embedding` per volume, in order.

        """
        out: list[Embedding] = []
        for i in range(0, len(volumes), EMBED_BATCH):
            chunk = volumes[i : i + EMBED_BATCH]
            vectors = self.embed_array(preprocess_batch(chunk, self.preprocess))
            out.extend(
                Embedding(vector=v, encoder_sha256=self.sha256, source=vol.source)
                for v, vol in zip(vectors, chunk, strict=True)
            )
        return out
