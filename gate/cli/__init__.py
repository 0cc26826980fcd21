"""The ``gate`` command line: one group, lazily loaded sub-commands, one exit-code mapping.

Sub-commands live in their own modules under ``gate.cli`` and are imported only when invoked,
so ``gate check`` never imports torch or MONAI. Every :class:`~gate.errors.GateError` becomes
one line on stderr and its exit code; any other exception is an internal error (exit 4).
This package is the only place in gate that prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
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
}
"""Command name -> (module, attribute). Modules are imported on first use only."""


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

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn gate errors into one stderr line and their exit code."""
        try:
            return super().invoke(ctx)
        except GateError as err:
            click.echo(f"gate: error: {err}", err=True)
            ctx.exit(int(err.exit_code))
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("gate: interrupted; nothing was exported", err=True)
            ctx.exit(int(ExitCode.INTERNAL))
        except Exception as err:
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


@click.group(cls=GateGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gate")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and show tracebacks.")
def main(verbose: bool) -> None:
    """gate: the privacy gate for synthetic 3D medical images.

    Exit codes: 0 ok, 1 policy violations found, 2 usage error, 3 input or integrity error,
    4 internal error (nothing was exported).
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
