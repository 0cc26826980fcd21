"""The ``gate`` command line: one group, lazily loaded sub-commands, one exit-code mapping.

Sub-commands live in their own modules under ``gate.cli`` and are imported only when invoked,
so ``gate check`` never imports torch or MONAI. Every :class:`~gate.errors.GateError` and every
click usage error becomes one line on stderr (``gate: error: ...``) and its exit code; any other
exception is an internal error (exit 4). A reader that closes stdout early (``gate audit show |
head``) ends the command quietly with :data:`~gate.errors.ExitCode.PIPE` (141, as a Unix tool
killed by SIGPIPE): the output is incomplete, so it is never 0. This package is the only place in
gate that prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import click

from gate import __version__
from gate.errors import ExitCode, GateError

LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("gate.cli.info", "info"),
    "inspect": ("gate.cli.info", "inspect"),
    "encoder": ("gate.cli.encoder", "encoder"),
    "eval": ("gate.cli.encoder", "eval_command"),
    "index": ("gate.cli.index", "index"),
    "check": ("gate.cli.check", "check"),
    "audit": ("gate.cli.audit", "audit"),
    "verify-bundle": ("gate.cli.audit", "verify_bundle"),
    "ldm": ("gate.cli.generate", "ldm"),
    "generate": ("gate.cli.generate", "generate"),
    "keys": ("gate.cli.keys", "keys"),
}
"""Command name -> (module, attribute). Modules are imported on first use only."""

TRAIN_MODULES = frozenset({"torch", "monai", "onnx", "onnxscript"})
"""Top-level modules of the ``gate[train]`` extra: a command that imports one without it installed
says which extra to install (exit 2) instead of an internal error."""


class GateGroup(click.Group):
    """A click group that loads sub-commands lazily and maps errors to exit codes."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Names of the commands whose module is installed."""
        names = []
        for name, (module, _) in LAZY_COMMANDS.items():
            if importlib.util.find_spec(module) is not None:
                names.append(name)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """Import and return one sub-command, or None if unknown."""
        if cmd_name not in LAZY_COMMANDS:
            return None
        module, attr = LAZY_COMMANDS[cmd_name]
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr)

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; usage errors become one ``gate: error:`` line and exit 2.

        Click's own report of a usage error is a multi-line block (usage, hint, blank line,
        ``Error: ...``); gate's README promises one line, so the group runs click in
        non-standalone mode and prints click's errors itself.
        """
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.UsageError as err:
            where = f" (see `{err.ctx.command_path} -h`)" if err.ctx is not None else ""
            click.echo(f"gate: error: {_one_line(err.format_message())}{where}", err=True)
            sys.exit(int(ExitCode.USAGE))
        except click.ClickException as err:
            click.echo(f"gate: error: {_one_line(err.format_message())}", err=True)
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("gate: aborted; nothing was exported", err=True)
            sys.exit(int(ExitCode.INTERNAL))
        except BrokenPipeError:
            _quiet_stdout()
            sys.exit(int(ExitCode.PIPE))
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn gate errors into one stderr line and their exit code."""
        try:
            try:
                return super().invoke(ctx)
            finally:
                sys.stdout.flush()  # a closed pipe shows here for short outputs
        except BrokenPipeError:
            _quiet_stdout()
            ctx.exit(int(ExitCode.PIPE))
        except GateError as err:
            click.echo(f"gate: error: {err}", err=True)
            ctx.exit(int(err.exit_code))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("gate: interrupted; nothing was exported", err=True)
            ctx.exit(int(ExitCode.INTERNAL))
        except Exception as err:
            if isinstance(err, ImportError) and (err.name or "").split(".")[0] in TRAIN_MODULES:
                command = " ".join(filter(None, [ctx.command_path, ctx.invoked_subcommand]))
                click.echo(
                    f"gate: error: `{command}` needs {err.name.split('.')[0]}, which the lean install "
                    "leaves out: pip install torch==2.13.0 && pip install 'gate[cpu,train]'",
                    err=True,
                )
                ctx.exit(int(ExitCode.USAGE))
            logging.getLogger("gate").debug("internal error", exc_info=True)
            click.echo(
                f"gate: internal error: {type(err).__name__}: {err} (nothing was exported; "
                "rerun with -v for a traceback)",
                err=True,
            )
            if ctx.find_root().params.get("verbose"):
                import traceback

                traceback.print_exc()
            ctx.exit(int(ExitCode.INTERNAL))


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # not a real file (e.g. click's test runner)
        pass


@click.group("gate", cls=GateGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gate")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and show tracebacks.")
def main(verbose: bool) -> None:
    """gate: the privacy gate for synthetic 3D medical images.

    Exit codes: 0 ok, 1 policy violations found, 2 usage error, 3 input or integrity error,
    4 internal error (nothing was exported), 5 flagged for review (`gate check`), 141 stdout
    closed early (output incomplete).
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
