"""``python -m gate``: the same command line as the ``gate`` script."""

from gate.cli import main

main(prog_name="gate")
