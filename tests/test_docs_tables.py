"""README.md's method table is what the registry says (rebuild it with `python -m lora_lite.docs_tables`)."""

from pathlib import Path

import lora_lite as ll
from lora_lite.docs_tables import END, START, method_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_table_is_generated_from_the_registry():
    text = README.read_text()
    table = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == method_table(), "README.md's method table is stale: run `python -m lora_lite.docs_tables`"
    assert all(f"| `{name}` |" in table for name in ll.REGISTRY)
