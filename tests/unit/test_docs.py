"""What the code cites must be in the repository: every `docs/*.md` a comment names exists,
with the section it names, and nothing cites a design file the repository does not hold."""
import re
from pathlib import Path

from paths import ROOT as REPO

ROOT = Path(REPO)
SOURCES = sorted(p for folder in ("gptbench", "tests", "launch") for p in (ROOT / folder).rglob("*.py"))
# "docs/deepspeed-notes.md" optionally followed by ", <Section name>" (possibly after "#  ").
CITATION = re.compile(r"(docs/[\w-]+\.md)(?:,\s*(?:#\s*)?([A-Z][\w\- ]*[\w-]))?")


def cited() -> list[tuple[Path, str, str | None]]:
    found = []
    for path in SOURCES:
        text = re.sub(r"\n\s*#\s*", " ", path.read_text(encoding="utf-8"))  # join wrapped comments
        found += [(path, doc, section) for doc, section in CITATION.findall(text)]
    return found


def test_no_source_cites_a_file_outside_the_repository():
    outside = "DESIGN" + ".md"
    assert [p.relative_to(ROOT) for p in SOURCES if outside in p.read_text(encoding="utf-8")] == []


def test_every_cited_doc_and_section_exists():
    citations = cited()
    assert citations, "no source cites docs/"
    for path, doc, section in citations:
        target = ROOT / doc
        assert target.is_file(), f"{path.relative_to(ROOT)} cites {doc}, which does not exist"
        if section:
            headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), re.MULTILINE)
            assert section in headings, f"{path.relative_to(ROOT)} cites {doc}, {section!r}; headings: {headings}"
