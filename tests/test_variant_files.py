"""Each variant stays one screen: at most MAX_LINES lines, docstring included; the docstring cites its paper (arXiv or OpenReview)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lora_lite

MAX_LINES = 160
VARIANT_FILES = sorted(p for p in (Path(lora_lite.__file__).parent / "variants").glob("*.py") if p.name != "__init__.py")


def test_variant_files_are_found():
    assert len(VARIANT_FILES) >= 8


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda p: p.name)
def test_variant_file_is_short_and_documented(path):
    text = path.read_text()
    n = len(text.splitlines())
    assert n <= MAX_LINES, f"{path.name} has {n} lines (limit {MAX_LINES}); move shared code to a helper module"
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{path.name} has no module docstring"
    if path.name.startswith("_"):
        return  # a private helper shared by variants: short and documented, but it is no paper of its own
    # an arXiv id, or the OpenReview forum of a paper that has none (HiRA, ICLR 2025)
    cited = re.search(r"arXiv\s*:?\s*\d{4}\.\d{4,5}|openreview\.net/forum\?id=\w+", doc)
    assert cited, f"{path.name}'s docstring cites no arXiv id or OpenReview forum"
