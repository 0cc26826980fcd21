"""Gate policies: YAML files validated into pydantic models, found by name or path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gate.errors import PolicyError


def policy_names() -> list[str]:
    """Names of the policies shipped in ``gate.policies`` (file stems), sorted."""
    root = resources.files("gate.policies")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def policy_path(name_or_path: str) -> Path:
    """Resolve ``strict`` (a shipped policy) or ``path/to/policy.yaml`` to a file.

    Raises:
        PolicyError: neither a shipped policy name nor an existing file; lists the names.
    """
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    if name_or_path in policy_names():
        return Path(str(resources.files("gate.policies") / f"{name_or_path}.yaml"))
    raise PolicyError(
        f"unknown policy {name_or_path!r}: expected one of {', '.join(policy_names())} "
        "or a path to a .yaml file"
    )
