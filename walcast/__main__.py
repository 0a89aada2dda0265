"""`python -m walcast ...`: the same as the `walcast` command."""

from walcast.cli import main

main()
