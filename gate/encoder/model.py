"""The 3D encoder: a small MONAI residual regressor whose output is an L2-normalised embedding.

The network is :class:`monai.networks.nets.Regressor` (residual conv units, instance norm, PReLU,
four stride-2 stages, flatten, one linear layer) followed by L2 normalisation, so the exported
ONNX graph already returns unit vectors. There is no separate SimCLR projection head: the loss
is applied to the exported embedding itself, because the gate compares exactly that vector and
we want *it* (not a hidden layer) to be invariant to the structure-preserving augmentations.
The flatten (rather than global pooling) keeps a coarse 2x3x2 spatial layout, which helps tell
one patient's anatomy from another's.
"""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.nets import Regressor
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

DEFAULT_CHANNELS: tuple[int, ...] = (16, 32, 64, 128)
"""Feature channels per stage. 16-32-64-128 with one residual unit per stage is 0.78 M
parameters (3.1 MB of float32 ONNX) and embeds a 32x48x32 volume in ~2 ms on one CPU core;
8-16-32-64 trained visibly worse in a first try, wider stages cost size for no gain here."""

DEFAULT_DIM = 128
"""Embedding size: plenty for 261-10^5 training volumes; 512 B per indexed volume."""

STRIDE = 2
"""Every stage halves each axis: the input grid must be divisible by 2**len(channels)."""


class EncoderSpec(BaseModel):
    """Architecture as data (stored in the manifest and the checkpoint).

    Attributes:
        grid: input grid (X, Y, Z) in voxels; each divisible by 2**len(channels).
        channels: feature channels per stage.
        dim: embedding size D.
        num_res_units: residual units per stage.
        pooling: ``flatten`` keeps the coarse spatial layout before the linear layer (default);
            ``mean`` averages over space first (more translation-invariant, less layout).

    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: tuple[int, int, int]
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    dim: int = DEFAULT_DIM
    num_res_units: int = 1
    pooling: Literal["flatten", "mean"] = "flatten"

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"channels must be a non-empty tuple of positive ints; got {v}")
        return v

    @field_validator("dim")
    @classmethod
    def _dim(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"dim must be >= 2; got {v}")
        return v

    def model_post_init(self, _context: object) -> None:
        """Check the grid against the number of stride-2 stages."""
        factor = STRIDE ** len(self.channels)
        if any(g % factor for g in self.grid):
            raise ValueError(
                f"every grid size must be divisible by {factor} (= 2**{len(self.channels)} stages); "
                f"got grid {self.grid}"
            )


class Encoder3D(nn.Module):
    """Volume -> unit-norm embedding.

    Input ``(N, 1, X, Y, Z)`` float32 in [0, 1] (the output of :func:`gate.preprocess.preprocess`);
    output ``(N, D)`` float32 with L2 norm 1.
    """

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.net = Regressor(
            in_shape=(1, *spec.grid),
            out_shape=(spec.dim,),
            channels=spec.channels,
            strides=(STRIDE,) * len(spec.channels),
            num_res_units=spec.num_res_units,
        )
        if spec.pooling == "mean":
            self.net.final = nn.Sequential(
                nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(spec.channels[-1], spec.dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch.

        Args:
            x: (N, 1, X, Y, Z) float32.

        Returns:
            (N, D) float32, unit rows.

        """
        h = self.net(x)
        return h / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(1e-12)


def build_encoder(spec: EncoderSpec, seed: int) -> Encoder3D:
    """A freshly initialised encoder; the same seed gives the same weights.

    Args:
        spec: architecture.
        seed: torch seed for the initialisation.

    Returns:
        The model in eval mode on CPU.

    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = Encoder3D(spec)
    torch.random.set_rng_state(gen_state)
    return model.eval()
