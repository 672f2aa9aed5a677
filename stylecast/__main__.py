"""`python -m stylecast` runs the CLI."""

from .cli import main

main()
