"""The README and the docs site stay true to the code: the generated config reference, the two commands and what CI
runs, the front page's links, the public API page, and every file, import and command the pages name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import REPO
from evapipe.core.config import reference_markdown

CONFIGS_PAGE = REPO / "docs" / "configs.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def pages() -> list[Path]:
    """The README, every docs page and the benchmarks' README: everything a user reads."""
    return [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def code_blocks(language: str) -> list[tuple[Path, str]]:
    return [(page, m.group(2)) for page in pages() for m in FENCE.finditer(page.read_text()) if m.group(1) == language]


def test_config_reference_is_current():
    body = CONFIGS_PAGE.read_text().split(START, 1)[1].split(END, 1)[0]
    assert body.strip() == reference_markdown().strip(), "run: python tests/unit/test_readme.py to regenerate"


def test_two_commands_and_ci_agree():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci and "make docs" in ci
    assert "mkdocs build --strict" in (REPO / "Makefile").read_text()  # CI's docs build fails on a broken link


def test_readme_is_a_front_page_whose_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250, "the README is the front page; the rest belongs in docs/"
    links = [target for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in target]
    assert links, "the front page links into the docs"
    missing = [target for target in links if not (REPO / target).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_public_api_page_documents_every_export():
    import evapipe

    page = (REPO / "docs" / "reference" / "index.md").read_text()
    documented = {path.rsplit(".", 1)[1] for path in re.findall(r"^::: (\S+)", page, re.M)}
    assert documented == set(evapipe.__all__) - {"__version__"}


def test_files_the_pages_name_exist():
    named = {
        (page.name, path.rstrip("."))
        for page in pages()
        for path in re.findall(r"\b((?:tests|benchmarks|configs|examples|jobs)/[\w.\-/]*\w)", page.read_text())
    }
    missing = sorted((where, path) for where, path in named if not (REPO / path).exists())
    assert not missing, f"pages name files that do not exist (page, path): {missing}"


def _defines(module: Path, name: str) -> bool:
    """Whether a module binds `name` at its top level (a def, a class, an assignment or an import)."""
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def test_python_snippets_import_what_exists():
    """Checked on the source, without importing torch: every `from evapipe... import name` a snippet shows."""
    import evapipe

    wrong = []
    for page, code in code_blocks("python"):
        for module, names in re.findall(r"^from (evapipe[\w.]*) import ([\w, ]+)$", code, re.M):
            for name in (n.strip() for n in names.split(",")):
                if module == "evapipe":
                    ok = name in evapipe.__all__
                else:
                    path = REPO / Path(*module.split("."))
                    file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
                    ok = file.is_file() and _defines(file, name)
                if not ok:
                    wrong.append(f"{page.name}: from {module} import {name}")
    assert not wrong, wrong


def test_commands_the_pages_show_exist():
    from evapipe.cli import main

    shown = {
        (page.name, command)
        for page, code in code_blocks("bash") + code_blocks("text")
        for command in re.findall(r"^(?:\$ )?evapipe ([a-z][\w-]*)", code, re.M)
    }
    unknown = sorted((where, command) for where, command in shown if command not in main.commands)
    assert not unknown, f"pages show evapipe commands that do not exist: {unknown}"


if __name__ == "__main__":  # regenerate the config reference in docs/configs.md
    text = CONFIGS_PAGE.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    CONFIGS_PAGE.write_text(f"{head}{START}{reference_markdown()}\n{END}{tail}")
