"""The README's generated parts stay equal to the code, and its two commands stay what CI runs."""

from __future__ import annotations

from conftest import REPO
from evapipe.config import reference_markdown


def test_config_reference_is_current():
    text = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    body = text.split(start, 1)[1].split(end, 1)[0]
    assert body.strip() == reference_markdown().strip(), "run: python tests/test_readme.py to regenerate"


def test_two_commands_and_ci_agree():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    assert "make test" in (REPO / ".ci" / "run").read_text()


if __name__ == "__main__":  # regenerate the README's config reference
    path = REPO / "README.md"
    text = path.read_text()
    head, rest = text.split("<!-- config-reference:start -->\n", 1)
    _, tail = rest.split("<!-- config-reference:end -->", 1)
    path.write_text(f"{head}<!-- config-reference:start -->\n{reference_markdown()}\n<!-- config-reference:end -->{tail}")
