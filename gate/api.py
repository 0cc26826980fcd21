"""The Python API: load an index and a policy once, then check files or arrays as ``gate check`` does.

One :class:`Gate` holds the verified encoder, the loaded index and the policy; every
:meth:`Gate.check` / :meth:`Gate.check_arrays` call runs :func:`gate.engine.judge` (the body of
``gate check``) and appends one audit record per candidate to the audit log, then hands back the
:class:`~gate.values.Decision` s and those records. Needs numpy, onnxruntime and hnswlib only (no
torch, no MONAI)::

    from gate.api import Gate

    g = Gate(index_dir="gate/models/index", policy="strict", audit_log="gate-out/audit.jsonl")
    result = g.check(["candidates/"])
    for source, decision in zip(result.sources, result.decisions):
        print(source, decision.verdict.value, decision.similarity)

An input that cannot be read or judged is an entry of :attr:`CheckResult.errors` (and an error
record), never skipped: :attr:`CheckResult.passed` is True only when every candidate was decided
and passed (fail closed, as ``gate check`` exits 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gate.audit import AuditLog, AuditRecord, new_run_id
from gate.engine import Item, judge, judge_items
from gate.engine.local import LocalEngine
from gate.errors import InputError, UsageError
from gate.index import DEFAULT_INDEX_DIR
from gate.index_manifest import EmbeddingModel
from gate.policy import LoadedPolicy, load_policy
from gate.shards import Searcher
from gate.values import Decision, Neighbours, Verdict, Volume
from gate.volume import DEFAULT_MAX_VOXELS, ReadOptions

ARRAY_PATIENT_ID = "candidate"
"""The pseudonymous id of an array candidate: a candidate's own id is never searched or recorded."""


@dataclass(frozen=True)
class CheckResult:
    """What one check decided, in input order.

    Attributes:
        run_id: the audit run id of this check.
        sources: per decided candidate, where it came from (a path, or ``array[i]``).
        decisions: per decided candidate.
        neighbours: per decided candidate, its k nearest training patients.
        errors: the inputs that could not be read or judged (one error record each).
        records: the audit records this check appended, in log order (errors first).

    """

    run_id: str
    sources: list[str]
    decisions: list[Decision]
    neighbours: list[Neighbours]
    errors: list[InputError]
    records: list[AuditRecord]

    @property
    def passed(self) -> bool:
        """True when every input was decided and every decision passed."""
        return not self.errors and all(d.verdict is Verdict.PASS for d in self.decisions)


class Gate:
    """An index, its encoder and a policy, loaded and verified once.

    Args:
        index_dir: index folder (default: the shipped index).
        policy: shipped policy name (strict, standard, permissive) or a ``.yaml`` path.
        audit_log: the audit log every check appends to (created on first check).
        encoder_dir: the index's encoder when it moved (default: the one the index records).
        device: onnxruntime device (``auto``, ``cpu``, ``cuda``; cuda is checked).
        read_options: how files are read and pseudonymised (default: the key of
            ``$GATE_ID_KEY_FILE`` or ``~/.config/gate/pseudonym.key``, as ``gate check``).

    Raises:
        PolicyError: the policy cannot be loaded.
        IntegrityError: the index or encoder does not match what it claims.

    """

    def __init__(
        self,
        index_dir: str | Path = DEFAULT_INDEX_DIR,
        policy: str | Path = "strict",
        *,
        audit_log: str | Path,
        encoder_dir: str | Path | None = None,
        device: str = "auto",
        read_options: ReadOptions | None = None,
    ) -> None:
        from gate.cli.index import encoder_for_index, load_encoder
        from gate.cli.options import read_options as cli_read_options

        self.policy: LoadedPolicy = load_policy(str(policy))
        index_path = Path(index_dir)
        found = encoder_for_index(Path(encoder_dir) if encoder_dir is not None else None, index_path)
        self.encoder: EmbeddingModel = load_encoder(found, device)
        self._engine = LocalEngine(self.encoder)
        self.index: Searcher = self._engine.open_index(index_path)
        self.audit = AuditLog(Path(audit_log))
        self.read_options = read_options or cli_read_options(None, None, None, DEFAULT_MAX_VOXELS)

    def check(self, paths: Sequence[str | Path]) -> CheckResult:
        """Check volume files or folders (NIfTI, DICOM series, NumPy), as ``gate check PATHS``.

        Args:
            paths: files or folders.

        Returns:
            The decisions and the audit records of this run.

        """
        from gate.cli.check import _problem

        run_id = new_run_id()
        start = len(self.audit.appended)
        judged = judge(
            self._engine,
            self.index,
            [Path(p) for p in paths],
            self.read_options,
            self.policy,
            self.audit,
            run_id,
            _problem,
        )
        return self._result(run_id, start, judged.items, judged.decisions, judged.neighbours, judged.errors)

    def check_arrays(
        self,
        arrays: Sequence[np.ndarray],
        spacing: tuple[float, float, float] | None = None,
        affine: np.ndarray | None = None,
    ) -> CheckResult:
        """Check in-memory volumes, e.g. a generator's samples, without writing them to disk.

        Each array is validated as a file's voxels are (numeric, 3D, finite, not constant, at
        most ``read_options.max_voxels``); one that fails is an error of the result, not skipped.

        Args:
            arrays: (X, Y, Z) voxel arrays, any real numeric dtype (converted to float32).
            spacing: voxel size along X, Y, Z in mm, when ``affine`` is not given.
            affine: (4, 4) voxel-to-world (RAS+, mm) matrix shared by all arrays; its column
                norms are the spacing (as for a NIfTI file).

        Returns:
            The decisions and the audit records of this run.

        Raises:
            UsageError: neither or both of ``spacing`` and ``affine`` given, or a bad affine.

        """
        from gate.cli.check import _problem
        from gate.digest import sha256_voxels
        from gate.volume import _validate

        geometry = _geometry(spacing, affine)
        items: list[Item] = []
        errors: list[InputError] = []
        for i, arr in enumerate(arrays):
            source = f"array[{i}]"
            try:
                data = _validate(Path(source), np.asarray(arr), self.read_options.max_voxels)
            except InputError as err:
                errors.append(err)
                continue
            vol = Volume(data, geometry[0], geometry[1], source, ARRAY_PATIENT_ID)
            items.append(Item(source, sha256_voxels(vol.data), vol))
        run_id = new_run_id()
        start = len(self.audit.appended)
        judged = judge_items(
            self._engine, self.index, items, errors, self.policy, self.audit, run_id, _problem
        )
        return self._result(run_id, start, judged.items, judged.decisions, judged.neighbours, judged.errors)

    def _result(
        self,
        run_id: str,
        start: int,
        items: Sequence[Item],
        decisions: list[Decision],
        neighbours: list[Neighbours],
        errors: list[InputError],
    ) -> CheckResult:
        wanted = set(self.audit.appended[start:])
        records = [r for r in self.audit.records() if r.hash in wanted]
        return CheckResult(run_id, [it.source for it in items], decisions, neighbours, errors, records)


def _geometry(
    spacing: tuple[float, float, float] | None, affine: np.ndarray | None
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The (affine, spacing) of array candidates from exactly one of the two."""
    if (spacing is None) == (affine is None):
        raise UsageError("check_arrays: give exactly one of spacing (mm per voxel) or affine (4x4)")
    if affine is not None:
        aff = np.asarray(affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.isfinite(aff).all():
            raise UsageError(f"check_arrays: affine must be a finite 4x4 matrix; got shape {aff.shape}")
        sp = tuple(float(s) for s in np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    else:
        sp = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
        if len(sp) != 3:
            raise UsageError(f"check_arrays: spacing must be 3 values in mm; got {spacing}")
        aff = np.diag([*sp, 1.0])
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise UsageError(f"check_arrays: voxel spacing must be positive and finite; got {sp}")
    return aff, sp  # type: ignore[return-value]
