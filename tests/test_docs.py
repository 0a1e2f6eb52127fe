"""The repository carries its own documentation and license: every relative link in the README
and docs/ resolves inside the repository, nothing points outside it, and the package metadata
names the license file."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def markdown_files() -> list[Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "examples").rglob("*.md")),
    ]


def test_relative_links_resolve_inside_the_repository() -> None:
    checked = 0
    for md in markdown_files():
        for target in LINK.findall(md.read_text()):
            if "://" in target:
                continue
            path = (md.parent / target).resolve()
            assert path.is_relative_to(ROOT), f"{md.name} links outside the repository: {target}"
            assert path.exists(), f"{md.name} links to a missing file: {target}"
            checked += 1
    assert checked >= 2


def test_no_document_points_outside_the_repository() -> None:
    texts = [p.read_text() for p in markdown_files()]
    texts += [p.read_text() for p in (ROOT / "smc").rglob("*.py")]
    assert not [t for t in texts if "../shared" in t or "DESIGN.md" in t]
    assert "docs/design.md" in (ROOT / "README.md").read_text()


def test_license_file_is_apache_2_and_named_in_the_metadata() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    meta = importlib.metadata.metadata("smc")
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
