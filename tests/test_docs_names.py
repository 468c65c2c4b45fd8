"""Every public name (``aon_func.__all__``) is documented in ``docs/``: it appears there as code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import aon_func

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _code_in_docs() -> str:
    """The code of every Markdown page under ``docs/``: fenced blocks and inline ``code`` spans."""
    chunks = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text(encoding="utf-8")
        fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
        prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
        chunks += fenced + re.findall(r"`([^`\n]+)`", prose)
    return "\n".join(chunks)


def test_docs_exist() -> None:
    assert (DOCS / "algorithm.md").is_file()


@pytest.mark.parametrize("name", sorted(aon_func.__all__))
def test_public_name_is_documented(name: str) -> None:
    code = _code_in_docs()
    assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", code), (
        f"aon_func.{name} is public (in __all__) but appears in no code span or block under docs/"
    )
