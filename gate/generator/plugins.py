"""Generators as plug-ins: the ``gate.generators`` entry-point group.

A plug-in is a class registered under the entry-point group :data:`ENTRY_POINT_GROUP` (in the
plug-in package's ``pyproject.toml``)::

    [project.entry-points."gate.generators"]
    my-model = "my_package.gate_plugin:MyGenerator"

The class has a classmethod ``accepts(path: Path) -> bool`` (does this folder hold my format?,
decided from file names only, without importing torch) and is built as ``cls(path,
device=device)``. The instance provides what :func:`gate.pipeline.run_generate` uses:

- ``name`` (str, recorded in the bundle), ``sha256`` (digest of the model's files, recorded in
  the bundle and the audit log), ``preprocess`` (:class:`gate.preprocess.PreprocessConfig`: the
  grid and intensity convention of its samples, which must be the encoder's);
- ``sample(seed, start, count, ddim_steps) -> float32 (count, 1, X, Y, Z)`` in [0, 1], sample
  ``i`` reproducible from ``(seed, i)``;
- ``volumes(array, seed, start) -> list[Volume]``.

gate registers two: ``ldm`` (gate's own format: ``generator.json`` + ``weights.npz``,
:class:`gate.generator.sample.Generator`) and ``monai-bundle`` (a MONAI bundle folder,
:class:`gate.generator.monai_bundle.MonaiBundleGenerator`). :func:`load_generator` asks each, in
that order and then the third-party ones by name, and loads the first that accepts the folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gate.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

    from gate.preprocess import PreprocessConfig
    from gate.values import Volume

ENTRY_POINT_GROUP = "gate.generators"
"""The entry-point group generator plug-ins register under."""

BUILTIN: dict[str, str] = {
    "ldm": "gate.generator.sample:Generator",
    "monai-bundle": "gate.generator.monai_bundle:MonaiBundleGenerator",
}
"""gate's own generators (also registered as entry points; listed here so a source checkout that
was never pip-installed finds them too). They come first and cannot be replaced by a plug-in."""


class CandidateGenerator(Protocol):
    """What :func:`gate.pipeline.run_generate` needs of a loaded generator (any plug-in)."""

    name: str
    sha256: str
    preprocess: PreprocessConfig

    def sample(self, seed: int, start: int, count: int, ddim_steps: int | None = None) -> np.ndarray:
        """float32 (count, 1, X, Y, Z) in [0, 1]; sample ``i`` reproducible from ``(seed, i)``."""
        ...

    def volumes(self, array: np.ndarray, seed: int, start: int) -> list[Volume]:
        """Wrap :meth:`sample` output as volumes on the preprocess grid."""
        ...


@dataclass(frozen=True)
class Plugin:
    """One registered generator format.

    Attributes:
        name: the entry-point name (``ldm``, ``monai-bundle``, ...).
        target: ``module:Class``.

    """

    name: str
    target: str

    def load_class(self) -> Any:
        """Import the class (its module imports torch only when it needs it)."""
        import importlib

        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


def plugins() -> list[Plugin]:
    """The built-in generators (``ldm``, ``monai-bundle``), then the installed plug-ins by name."""
    found = [Plugin(name, target) for name, target in BUILTIN.items()]
    extra = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}
    return found + [Plugin(name, extra[name]) for name in sorted(extra)]


def load_generator(path: Path, device: str = "auto") -> CandidateGenerator:
    """Load the generator in folder ``path`` with the first plug-in that accepts it.

    Args:
        path: a generator folder (gate LDM, MONAI bundle, or a plug-in's format).
        device: ``cpu``, ``cuda`` (refused when unavailable) or ``auto``.

    Returns:
        The loaded generator (see the module docstring for its interface).

    Raises:
        UsageError: no plug-in recognises the folder.
        IntegrityError: the plug-in that recognised it found it broken (raised by the plug-in).

    """
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--generator {path}: not a folder; expected a generator folder")
    for plugin in plugins():
        cls = plugin.load_class()
        if cls.accepts(path):
            return cls(path, device=device)
    names = ", ".join(p.name for p in plugins())
    raise UsageError(
        f"--generator {path}: no generator plug-in recognises this folder (tried {names}); expected "
        "generator.json + weights.npz (gate LDM) or configs/inference.json + models/*.pt (MONAI bundle)"
    )
