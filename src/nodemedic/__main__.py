"""`python -m nodemedic`: the command line (cli.py sets the exit status)."""

from nodemedic.cli import run

run()
