"""The README and docs/ say what the code does: their Python blocks run, their links resolve.

Every ```python block of README.md and docs/*.md runs, in a fresh namespace and with the
repository root as the working directory, on the embedded default checkpoint on CPU. A block
that needs what a test cannot have (a running server, a Ray cluster, a GPU) says so on the line
before its fence, `<!-- not run: REASON -->`, and is skipped with that reason. Relative links
(to files, to docs pages and their headings) must resolve, every repository path a page names
in backticks must exist, and nothing may point into `../shared`, which users' clones lack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.+?)\s*-->$")
FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
TOP_LEVEL = tuple(p.name for p in ROOT.iterdir() if not p.name.startswith("."))


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    lang: str
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of a page, with the `not run` marker on the line before its fence."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start = opening.group(1), i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence)), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{start + 1}: the fence opened here is never closed"
        marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
        blocks.append(Block(page, start + 1, end + 1, opening.group(2).lower(), "\n".join(lines[start + 1:end]) + "\n",
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


def outside_fences(page: Path) -> list[str]:
    """The page's lines that are not in a fenced block."""
    fenced = {n for b in fenced_blocks(page) for n in range(b.line, b.end + 1)}
    return [line for n, line in enumerate(page.read_text().splitlines(), 1) if n not in fenced]


def prose(page: Path) -> str:
    """A page without its fenced blocks and inline code spans: where its links are."""
    return re.sub(r"`[^`\n]*`", "", "\n".join(outside_fences(page)))


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces to hyphens."""
    headings = [line.lstrip("#").strip() for line in outside_fences(page) if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


PYTHON_BLOCKS = [b for page in PAGES for b in fenced_blocks(page) if b.lang in ("python", "py")]


def test_the_pages_have_python_blocks_that_run():
    assert (ROOT / "docs").is_dir() and len(PAGES) > 1, "README.md and docs/*.md are the pages"
    assert [b for b in PYTHON_BLOCKS if b.page.name == "README.md" and b.skip_reason is None], \
        "the README's Python quick start must be a block that runs"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.skip(reason=b.skip_reason)]
                                                if b.skip_reason else []) for b in PYTHON_BLOCKS])
def test_python_block_runs(block: Block, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace = {"__name__": "__docs__"}
    try:
        exec(compile(block.code, block.id, "exec"), namespace)
    finally:  # a block that leaves a model running must not leave its engine thread to the next test
        for value in namespace.values():
            if type(value).__name__ == "PoEModel" and value.loop.failure() is None:
                value.shutdown()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_and_headings_that_exist(page: Path):
    broken = []
    for target in LINK.findall(prose(page)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_repository_paths_in_backticks_exist(page: Path):
    """`coordinator/core/engine.py`, `tests/test_recovery.py::test_...`, `cluster_configs/`: a
    path into one of the repository's top-level folders or files must be there (and a test named
    after `::` must be defined in its file)."""
    missing = []
    for span in re.findall(r"`([^`\s]+)`", page.read_text()):
        path, _, test = span.partition("::")
        if path.split("/")[0] not in TOP_LEVEL or "*" in path or "{" in path:
            continue
        if not (ROOT / path).exists():
            missing.append(span)
        elif test and f"def {test}(" not in (ROOT / path).read_text():
            missing.append(span)
    assert not missing, f"{page.relative_to(ROOT)} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page: Path):
    text = page.read_text()
    assert "../shared" not in text and "POE_SPEC" not in text, \
        f"{page.relative_to(ROOT)} points to ../shared, which users' clones do not have"
