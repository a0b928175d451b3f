"""Every relative link in README.md and docs/*.md names a file of the repository: a renamed or uncommitted results
file breaks the page that cites it, and nothing else would notice."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target) or [text](target#anchor)


def broken_links(page: Path) -> list[str]:
    out = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        if not (page.parent / target).exists():
            out.append(target)
    return out


def test_every_relative_link_in_the_docs_resolves() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = {str(p.relative_to(ROOT)): b for p in pages if (b := broken_links(p))}
    assert not broken, f"links to files that are not in the repository: {broken}"


def test_broken_links_finds_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "there.json").write_text("{}")
    page = tmp_path / "p.md"
    page.write_text("[a](there.json) [b](gone.md#x) [c](https://example.com/y) [d](there.json#top)")
    assert broken_links(page) == ["gone.md"]
