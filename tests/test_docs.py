"""The repository documents itself: code, tests and benchmarks cite docs/ inside it, never files outside."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = ("../shared", "shared/reference")
CITATION = re.compile(r"docs/(\w+\.md)(?: section (\d+))?")


def _checked_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for folder in ("src", "tests", "benchmarks", "docs"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md"))
    return [p for p in files if p != Path(__file__).resolve()]


def test_no_file_refers_outside_the_repository():
    offenders = [
        f"{path.relative_to(ROOT)} ({outside})"
        for path in _checked_files()
        for outside in OUTSIDE
        if outside in path.read_text(encoding="utf-8")
    ]
    assert not offenders, f"cite docs/ instead of files outside the repository: {', '.join(offenders)}"


def _sections(page: str) -> set[str] | None:
    """The numbers of the `## N.` sections of docs/<page>, or None when there is no such page."""
    doc = ROOT / "docs" / page
    if not doc.is_file():
        return None
    return set(re.findall(r"^## (\d+)\.", doc.read_text(encoding="utf-8"), re.MULTILINE))


def test_every_docs_citation_names_an_existing_page_and_section():
    broken = [
        f"{path.relative_to(ROOT)}: {citation[0]}"
        for path in _checked_files()
        for citation in CITATION.finditer(path.read_text(encoding="utf-8"))
        if _sections(citation[1]) is None or (citation[2] and citation[2] not in _sections(citation[1]))
    ]
    assert not broken, f"citations of missing pages or sections: {', '.join(broken)}"
