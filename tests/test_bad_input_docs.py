"""docs/bad-input.md holds a table per surface, and every test a row names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
SURFACES = ["Command line", "Configs", "Data", "Judge endpoint", "Annotation API"]
NAMED_TEST = re.compile(r"`(tests/test_\w+\.py)::(test_\w+)`")


def test_every_surface_has_a_table_and_every_row_names_a_test():
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    assert [section.splitlines()[0] for section in sections] == SURFACES
    for section in sections:
        rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Input")]
        rows = [row for row in rows if not row.startswith("| ---")]
        assert rows, section.splitlines()[0]
        for row in rows:
            assert NAMED_TEST.search(row), row


def test_every_named_test_exists():
    root = DOC.parents[1]
    named = NAMED_TEST.findall(DOC.read_text(encoding="utf-8"))
    assert len(named) > 20
    for module, name in named:
        tree = ast.parse((root / module).read_text(encoding="utf-8"))
        functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
        assert name in functions, f"{module}::{name}"
