"""``python -m smc.cli``: the same as the ``smc`` command."""

from smc.cli import main

main()
