"""One exception hierarchy for gate, and the exit code each error maps to.

An exception means "could not decide": whoever catches it must not export anything (fail
closed). A rejection is a value (:class:`gate.values.Decision`), never an exception.

Messages say what was expected, what was found and what to do next. Third-party errors are
wrapped with ``raise ... from err`` so the original traceback survives in logs.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """Process exit codes of the ``gate`` command, defined in this one place.

    Attributes:
        OK: everything passed.
        VIOLATION: the run completed and at least one candidate violates the policy.
        USAGE: bad command line, unknown policy name, invalid policy or config file.
        INPUT: unreadable / invalid input volume or integrity failure (index, model, bundle).
        INTERNAL: an unexpected error inside gate (a bug); nothing was exported.
        FLAGGED: ``gate check``: no candidate was rejected but at least one was flagged for
            review (a flagged sample is never exported; ``--allow-flag`` accepts flags).
        PIPE: stdout was closed before the command finished (``gate audit show | head``);
            128 + SIGPIPE, as for any Unix tool killed by a closed pipe; the output is incomplete.

    """

    OK = 0
    VIOLATION = 1
    USAGE = 2
    INPUT = 3
    INTERNAL = 4
    FLAGGED = 5
    PIPE = 141


class GateError(Exception):
    """Base class of every error gate raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(GateError):
    """The user asked for something that does not exist or is malformed (policy, config)."""

    exit_code = ExitCode.USAGE


class PolicyError(UsageError):
    """A policy file is invalid or a policy name is unknown."""


class InputError(GateError):
    """An input volume cannot be read or fails validation.

    The message is always one line: ``<path>: <problem>``.
    """

    exit_code = ExitCode.INPUT

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DomainError(InputError):
    """A candidate lies outside the domain its index can judge (field of view, spacing, shape).

    Exit 3 like any input that cannot be decided: the candidate is never judged on a fraction of
    its voxels (:mod:`gate.domain`).
    """


class IntegrityError(GateError):
    """An artefact (model, index, manifest, bundle, audit log) does not match what it claims."""

    exit_code = ExitCode.INPUT


class ProviderError(GateError):
    """An onnxruntime execution provider was requested but is not available."""

    exit_code = ExitCode.INPUT


class WorkerError(GateError):
    """A distributed worker (a Ray actor or node) died and its retries ran out; nothing was exported."""

    exit_code = ExitCode.INTERNAL
