"""The package cites papers, not files a user of the repository cannot open: no docstring or comment
in ``longtail/`` points at the seed files beside the checkout (``../shared/seeds/*``), PDFs or the
design notes outside the repository (``DESIGN.md``). A citation names authors, year and the
equation or section instead."""
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "longtail"
# seeds/ folders, PDFs, the design notes beside the repo, paths into ../shared, and the seed files'
# names ("003_c38ed24e8c8e66ce.txt") or numbers ("seed 003", "seeds 003 and 004")
FORBIDDEN = re.compile(r"seeds/|\.pdf\b|DESIGN\.md|\.\./shared|\b\d{3}_[0-9a-f]{16}\b|\bseeds? 0\d\d\b",
                       re.IGNORECASE)


def offending_lines(text: str) -> list[str]:
    return [f"{number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
            if FORBIDDEN.search(line)]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sources_cite_papers_not_files_outside_the_repository(path):
    assert offending_lines(path.read_text(encoding="utf-8")) == []


def test_the_pattern_catches_each_kind_of_file_citation():
    for text in ('"""As in seed 003_c38ed24e8c8e66ce.txt, eq. 4."""', "# see ../shared/DESIGN.md",
                 '"""(DESIGN.md, "Data")"""', "# the slides in ../shared/seeds/000.txt",
                 '"""the baselines of seeds 003 and 004"""', '"""paper.pdf, eq. 2"""', "# Seed 001, Table 2"):
        assert offending_lines(text), text
    for text in ('"""Jin et al., CVPR 2023, eq. 4."""', "# seed 0 and seed 1 of the study",
                 '"""seeded from (seed, epoch)"""', "data.root=../data/cifar10"):
        assert not offending_lines(text), text
