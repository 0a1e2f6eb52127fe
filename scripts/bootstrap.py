#!/usr/bin/env python3
"""Run ``smc`` from a checkout with any Python >= 3.11, the distribution's own included.

Debian and Ubuntu mark their system Python as externally managed (PEP 668): ``pip install``
into it is refused. This script makes a virtual environment in ``.venv`` beside this checkout
(once), installs SMC into it in editable mode (``--test`` adds the test extra), and then runs
``smc`` from it with the remaining arguments::

    python3 scripts/bootstrap.py demo                   # .venv made on first use, then `smc demo`
    python3 scripts/bootstrap.py --test --install-only  # what scripts/test.sh does

When the ``venv`` module cannot install pip (Debian without ``python3-venv``: no ``ensurepip``),
the environment is made without pip and the distribution's pip (``python3-pip``) installs into
it with ``pip --python``; with neither, it says which package to install and exits 1.
A re-run installs again only when ``pyproject.toml`` changed (or the extra set grew).
Standard library only; the environment is kept with ``--venv DIR`` elsewhere if wanted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIN_PYTHON = (3, 11)


def _fail(message: str) -> None:
    print(f"bootstrap: error: {message}", file=sys.stderr)
    sys.exit(1)


def _bin(env: Path, name: str) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin") / name


def _has_module(python: str | Path, module: str) -> bool:
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def _make_env(env: Path) -> None:
    """Create ``env`` with pip when ``ensurepip`` exists, else without (see module doc)."""
    with_pip = _has_module(sys.executable, "ensurepip")
    print(f"bootstrap: creating {env} with {sys.executable}", file=sys.stderr)
    try:
        venv.EnvBuilder(with_pip=with_pip, upgrade_deps=False).create(env)
    except (OSError, subprocess.CalledProcessError) as exc:
        _fail(f"cannot create the virtual environment {env}: {exc}")


def _pip(env: Path) -> list[str]:
    """The command that runs pip for ``env``."""
    python = _bin(env, "python")
    if _has_module(python, "pip"):
        return [str(python), "-m", "pip"]
    if _has_module(sys.executable, "pip"):
        # The distribution's pip installs into the environment (not into the system Python).
        return [sys.executable, "-m", "pip", "--python", str(python)]
    _fail(
        "this Python has neither ensurepip nor pip, so no virtual environment can get packages; "
        "install one of them (Debian/Ubuntu: apt-get install python3-venv) and run again"
    )
    raise AssertionError  # unreachable


def _stamp(extras: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest} {extras}\n"


def ensure(env: Path, *, test: bool) -> Path:
    """Make ``env`` (when missing) and install SMC into it; returns its Python."""
    if sys.version_info < MIN_PYTHON:
        _fail(f"SMC needs Python >= 3.11; {sys.executable} is {sys.version.split()[0]}")
    python = _bin(env, "python")
    if not python.exists():
        _make_env(env)
    extras = "[test]" if test else ""
    marker = env / ".smc-installed"
    done = marker.read_text() if marker.exists() else ""
    if done in (_stamp(extras), _stamp("[test]")):
        return python
    print(f"bootstrap: installing SMC{extras} into {env}", file=sys.stderr)
    cmd = [*_pip(env), "install", "-q", "--disable-pip-version-check", "-e", f"{ROOT}{extras}"]
    if subprocess.run(cmd).returncode != 0:
        _fail(f"pip could not install SMC into {env} (see its output above)")
    marker.write_text(_stamp(extras))
    return python


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python3 scripts/bootstrap.py",
        allow_abbrev=False,
        description="Make .venv (once), install SMC into it, then run `smc ARGS...` from it.",
    )
    parser.add_argument("--venv", default=str(ROOT / ".venv"), help="environment (./.venv)")
    parser.add_argument("--test", action="store_true", help="install the test extra too")
    parser.add_argument("--install-only", action="store_true", help="install, run nothing")
    # bootstrap's own options come first; everything from the first other word is smc's
    n = 0
    while n < len(argv) and argv[n].split("=")[0] in (
        "--venv",
        "--test",
        "--install-only",
        "-h",
        "--help",
    ):
        n += 2 if argv[n] == "--venv" else 1
    opts = parser.parse_args(argv[:n])
    rest = argv[n:]
    python = ensure(Path(opts.venv).resolve(), test=opts.test)
    if opts.install_only:
        print(python)
        return
    smc = _bin(python.parent.parent, "smc")
    os.execv(str(smc), [str(smc), *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
