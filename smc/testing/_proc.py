"""Child processes of the test harnesses that die with the process that started them.

Role: wraps a command with util-linux ``setpriv --pdeathsig KILL`` (when present) instead of a
``preexec_fn``: a ``preexec_fn`` runs Python in the forked child, which can crash when other
threads (gRPC, asyncio workers) hold locks at fork time; ``setpriv`` sets the parent-death
signal after ``exec`` without running Python in the child.
Concurrency: pure function.
"""

from __future__ import annotations

import shutil
import sys

__all__ = ["die_with_parent"]


def die_with_parent(argv: list[str]) -> list[str]:
    """``argv`` run so the child gets SIGKILL when its parent dies (Linux, util-linux)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return argv
    return [setpriv, "--pdeathsig", "KILL", "--", *argv]
