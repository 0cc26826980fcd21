"""Pickle-free storage of network and optimiser state as ``.npz`` archives.

``torch.save`` writes pickles; the house rule is no pickle on disk. A state dict is a flat
mapping of names to tensors, so it fits ``numpy.savez`` (loaded with ``allow_pickle=False``).
Optimiser state (Adam moments per parameter index) is flattened to ``opt/<idx>/<key>`` arrays
plus its JSON-able hyper-parameters stored as a UTF-8 byte array. Every write goes to a temp
name and is renamed into place, so an interrupted run never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gate.errors import IntegrityError

META_KEY = "__meta__"
"""Key of the UTF-8 JSON blob (epoch counters, losses, optimiser hyper-parameters)."""


def module_arrays(
    prefix: str, module: torch.nn.Module, dtype: np.dtype | None = None
) -> dict[str, np.ndarray]:
    """Flatten a module's state dict to ``prefix/name`` numpy arrays (optionally cast)."""
    out = {}
    for name, tensor in module.state_dict().items():
        arr = tensor.detach().cpu().numpy()
        if dtype is not None and arr.dtype.kind == "f":
            arr = arr.astype(dtype)
        out[f"{prefix}/{name}"] = arr
    return out


def load_module(prefix: str, module: torch.nn.Module, arrays: dict[str, np.ndarray], source: str) -> None:
    """Load ``prefix/name`` arrays into a module, float arrays cast to the parameter dtype.

    Raises:
        IntegrityError: missing or unexpected keys, or shape mismatches.

    """
    own = module.state_dict()
    found = {k[len(prefix) + 1 :]: v for k, v in arrays.items() if k.startswith(prefix + "/")}
    missing = sorted(set(own) - set(found))
    extra = sorted(set(found) - set(own))
    if missing or extra:
        raise IntegrityError(
            f"{source}: weights for {prefix!r} do not fit the network in the config "
            f"(missing {missing[:3]}, unexpected {extra[:3]}); retrain or use the matching config"
        )
    state = {}
    for name, ref in own.items():
        arr = found[name]
        if tuple(arr.shape) != tuple(ref.shape):
            raise IntegrityError(
                f"{source}: {prefix}/{name} has shape {arr.shape}, expected {tuple(ref.shape)}"
            )
        state[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(ref.dtype)
    module.load_state_dict(state)


def optimizer_arrays(prefix: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, np.ndarray], Any]:
    """Flatten an optimiser's per-parameter tensors; return them and its JSON-able param groups."""
    sd = optimizer.state_dict()
    arrays = {}
    for idx, slot in sd["state"].items():
        for key, value in slot.items():
            arrays[f"{prefix}/{idx}/{key}"] = torch.as_tensor(value).detach().cpu().numpy()
    return arrays, sd["param_groups"]


def load_optimizer(
    prefix: str, optimizer: torch.optim.Optimizer, arrays: dict[str, np.ndarray], groups: Any
) -> None:
    """Restore an optimiser flattened by :func:`optimizer_arrays`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, arr in arrays.items():
        if not key.startswith(prefix + "/"):
            continue
        _, idx, name = key.split("/", 2)
        state.setdefault(int(idx), {})[name] = torch.from_numpy(np.array(arr))
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_npz(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> None:
    """Write arrays (and an optional JSON meta blob) atomically: temp file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    if meta is not None:
        payload[META_KEY] = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        np.savez(fh, **payload)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def load_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read an archive written by :func:`save_npz` without unpickling anything.

    Raises:
        IntegrityError: unreadable archive.

    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{path}: unreadable weights archive ({err})") from err
    meta_arr = arrays.pop(META_KEY, None)
    meta = json.loads(meta_arr.tobytes().decode("utf-8")) if meta_arr is not None else {}
    return arrays, meta
