"""The README's first command on a stock machine: ``scripts/bootstrap.py`` run by the
distribution's own Python (Debian's ``/usr/bin/python3``, marked EXTERNALLY-MANAGED by PEP 668)
from a clean copy of the checkout, with a PATH holding no other Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _clean_copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_symlink() or src.is_file():  # symlinks stay symlinks (smc/events/schemas)
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode(), follow_symlinks=False)


@pytest.mark.slow
def test_bootstrap_with_the_system_python(tmp_path: Path) -> None:
    if not SYSTEM_PYTHON.exists() or shutil.which("git") is None:
        pytest.skip("needs /usr/bin/python3 and git")
    checkout = tmp_path / "smc"
    checkout.mkdir()
    _clean_copy(checkout)
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": "/usr/bin:/bin",
        **{k: v for k, v in os.environ.items() if k.startswith("PIP_")},
    }
    managed = Path(sysconfig.get_paths()["stdlib"]).name  # e.g. python3.11
    marker = Path("/usr/lib") / managed / "EXTERNALLY-MANAGED"
    plain = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "-e", str(checkout)],
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
    )
    if marker.exists():
        # what the README's command works around: the plain install is refused
        assert plain.returncode != 0 and "externally-managed" in plain.stderr
    done = subprocess.run(
        [str(SYSTEM_PYTHON), "scripts/bootstrap.py", "--version"],
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "smc 0.1.0"
    assert (checkout / ".venv" / "bin" / "smc").exists()
    # the second run reuses the environment (no install) and passes arguments through
    again = subprocess.run(
        [
            str(SYSTEM_PYTHON),
            "scripts/bootstrap.py",
            "policy",
            "check",
            "--from",
            "a/b",
            "--to",
            "c/d",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
        timeout=120,
    )
    assert "installing" not in again.stderr
    assert again.returncode == 1 and "no event log at smc.db" in again.stderr
    assert not (checkout / "smc.db").exists()
