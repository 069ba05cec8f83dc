"""`python -m probekd` runs the CLI."""

from probekd.cli import main

main()
