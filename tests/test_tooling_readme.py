"""The Python snippets of the README and of the reference pages in docs/ run as written: every name a snippet uses
is imported or defined by it or by a snippet above it on the same page, and the snippets that need no Hub download
are run (the publish example twice)."""

import ast
import builtins
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PAGE_SNIPPETS = {page: re.findall(r"```python\n(.*?)```", page.read_text(), re.S) for page in PAGES}
SNIPPETS = [code for page in PAGES for code in PAGE_SNIPPETS[page]]
PAGE_OF = {code: page for page in PAGES for code in PAGE_SNIPPETS[page]}


def bound_and_used(code: str) -> tuple[set[str], set[str]]:
    """Names a snippet binds (imports, assignments, definitions) and names it reads."""
    bound, used = set(), set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound, used


def unbound_names(code: str, earlier: set[str]) -> set[str]:
    bound, used = bound_and_used(code)
    return used - bound - earlier - set(dir(builtins))


def runnable(code: str) -> bool:
    """Needs nothing from the Hub and nothing from an earlier snippet."""
    return "from_pretrained" not in code and not unbound_names(code, set())


def test_every_snippet_has_its_imports():
    assert len(SNIPPETS) >= 5
    assert PAGE_SNIPPETS[ROOT / "README.md"], "the README has Python snippets"
    for page in PAGES:
        earlier = set()  # a page is read on its own: its snippets may use only what the page's earlier ones define
        for number, code in enumerate(PAGE_SNIPPETS[page]):
            assert not unbound_names(code, earlier), (
                f"{page.relative_to(ROOT)} snippet {number} uses undefined names:\n{code}")
            earlier |= bound_and_used(code)[0]


@pytest.mark.parametrize("code", [code for code in SNIPPETS if runnable(code)],
                         ids=lambda code: code.strip().splitlines()[-1][:40])
def test_snippets_without_downloads_run(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # they write their folders (training output, publish plan) into the working dir
    runs = 2 if "publish(" in code else 1  # the publish example can be run twice
    for _ in range(runs):
        exec(compile(code, str(PAGE_OF[code]), "exec"), {"__name__": "__readme__"})


def test_the_runnable_snippets_are_the_expected_ones():
    # Training, evaluation and publishing need no download; a change that makes one of them depend on the Hub (or
    # on an earlier snippet) would silently stop it from being run above.
    kinds = {kind for code in SNIPPETS if runnable(code) for kind in ("trainer.train()", "log_likelihood(", "publish(")
             if kind in code}
    assert kinds == {"trainer.train()", "log_likelihood(", "publish("}
