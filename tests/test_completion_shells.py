"""``smc completion zsh|fish`` in the real shells (Debian's zsh and fish, installed when
missing): each script loads without a word on stderr, the way users install it (sourced, and
from zsh's fpath / fish's completions folder), and a real completion of ``smc ge<TAB>``,
``smc get s<TAB>``, options and option values offers SMC's subcommands, kinds and choices.

zsh completes only inside its line editor, so the zsh side drives an interactive zsh through
its own pseudo-terminal module (zsh/zpty), presses TAB, and records what the completion
system is handed (``compadd`` wrapped, then called as usual). fish answers ``complete -C``.
bash is covered in tests/test_cli_kubectl.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smc.testing._apt import ensure_commands

ZSH_DRIVER = r"""
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "PS1=''; PS2=''"
if [[ $1 == */_smc ]]; then  # installed in fpath, autoloaded by compinit
  zpty -w z "fpath=(${(q)1:h} \$fpath); autoload -Uz compinit && compinit -u -D"
else                         # sourced after compinit
  zpty -w z "autoload -Uz compinit && compinit -u -D; source ${(q)1}"
fi
zpty -w z "HITS=${(q)3}"
zpty -w z 'compadd () { local -a h; builtin compadd -O h "$@"; print -rl -- $h >> $HITS; builtin compadd "$@" }'
zpty -w z 'print -r -- RE''ADY'
zpty -r -m z out '*READY*' || exit 4
zpty -w -n z "$2"$'\t'
zpty -w z $'\C-u''print -r -- DO''NE'
zpty -r -m z out '*DONE*' || exit 5
zpty -d z
"""

CASES = {
    "smc ge": {"get"},
    "smc get s": {"services", "splits"},
    "smc get svc --out": {"--output"},
    "smc get svc -o ": {"table", "json", "yaml", "name"},
    "smc audit v": {"verify"},
}


@pytest.fixture(scope="module")
def shells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    paths = ensure_commands({"zsh": "zsh", "fish": "fish"})
    base = tmp_path_factory.mktemp("shells")
    shim = base / "bin"
    shim.mkdir()
    (shim / "smc").write_text(f'#!/bin/sh\nexec {sys.executable} -m smc.cli "$@"\n')
    (shim / "smc").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "HOME": str(base)}
    scripts = {}
    for shell in ("zsh", "fish"):
        done = subprocess.run(
            [str(shim / "smc"), "completion", shell], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0 and not done.stderr, done.stderr
        scripts[shell] = done.stdout
    return {"paths": paths, "base": base, "env": env, "scripts": scripts}


def test_zsh_script_loads_and_completes(shells: dict[str, object], tmp_path: Path) -> None:
    paths, env, scripts = shells["paths"], shells["env"], shells["scripts"]
    assert isinstance(paths, dict) and isinstance(env, dict) and isinstance(scripts, dict)
    zsh = str(paths["zsh"])
    sourced = tmp_path / "smc.zsh"
    sourced.write_text(scripts["zsh"])
    (tmp_path / "fpath").mkdir()
    autoloaded = tmp_path / "fpath" / "_smc"
    autoloaded.write_text(scripts["zsh"])
    loads = subprocess.run(
        [zsh, "-f", "-c", f"autoload -Uz compinit && compinit -u -D && source {sourced}"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert loads.returncode == 0 and loads.stderr == "" and loads.stdout == ""
    driver = tmp_path / "drive.zsh"
    driver.write_text(ZSH_DRIVER)
    for script in (sourced, autoloaded):
        for line, expected in CASES.items():
            hits = tmp_path / "hits"
            hits.unlink(missing_ok=True)
            done = subprocess.run(
                [zsh, "-f", str(driver), str(script), line, str(hits)],
                capture_output=True, text=True, env=env, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, (script.name, line, done.stdout, done.stderr)
            offered = set(hits.read_text().split()) if hits.exists() else set()
            assert expected <= offered, (script.name, line, offered)
            assert "Traceback" not in done.stdout + done.stderr


def test_fish_script_loads_and_completes(shells: dict[str, object]) -> None:
    paths, base, env, scripts = shells["paths"], shells["base"], shells["env"], shells["scripts"]
    assert isinstance(paths, dict) and isinstance(env, dict) and isinstance(scripts, dict)
    assert isinstance(base, Path)
    fish = str(paths["fish"])
    # installed where fish looks for completions: loaded on first use, nothing sourced
    folder = base / "config" / "fish" / "completions"
    folder.mkdir(parents=True)
    (folder / "smc.fish").write_text(scripts["fish"])
    fenv = {**env, "XDG_CONFIG_HOME": str(base / "config")}
    syntax = subprocess.run([fish, "-n", str(folder / "smc.fish")], capture_output=True, text=True)
    assert syntax.returncode == 0 and syntax.stderr == ""
    for line, expected in CASES.items():
        done = subprocess.run(
            [fish, "-c", f"complete -C {line!r}"],
            capture_output=True, text=True, env=fenv, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and done.stderr == "", (line, done.stderr[:2000])
        offered = {row.split("\t")[0] for row in done.stdout.splitlines()}
        assert expected <= offered, (line, done.stdout)
    # descriptions travel as fish's second column
    done = subprocess.run(
        [fish, "-c", "complete -C 'smc ge'"], capture_output=True, text=True, env=fenv
    )
    assert any(r.startswith("get\tList mesh resources") for r in done.stdout.splitlines())
