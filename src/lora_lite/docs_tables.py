"""The README's method table, built from the registry: `python -m lora_lite.docs_tables` rewrites it in place.

tests/test_docs_tables.py fails when README.md's table differs from what the registry gives, so a newly
registered method shows up in the README by running this command, never by typing a row.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .variant import REGISTRY, layer_kinds, rewrites_weight

START, END = "<!-- methods:start (python -m lora_lite.docs_tables) -->", "<!-- methods:end -->"


def quantized_support(method: type) -> str:
    if rewrites_weight(method):
        return "no (rewrites W)"
    return "no (reads dense W)" if getattr(method, "needs_dense_weight", False) else "yes"


def peft_label(method: type) -> str:
    equivalent = getattr(method, "peft", None)
    if equivalent is None:
        return "–"
    return f"`{equivalent(method.config(), ['q_proj'])[1]}`"


def method_table() -> str:
    rows = ["| name | config | paper | trainable params per layer (d_in → d_out) | layer kinds | on 4/8-bit bases | PEFT |",
            "|---|---|---|---|---|---|---|"]
    for name in sorted(REGISTRY):
        m = REGISTRY[name]
        label, url = m.paper
        rows.append(f"| `{name}` | `{m.config.__name__}` | [{label}]({url}) | {m.params_per_layer} | "
                    f"{', '.join(layer_kinds(m))} | {quantized_support(m)} | {peft_label(m)} |")
    return "\n".join(rows)


def with_table(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{method_table()}\n{END}{tail}"


def main() -> int:
    readme = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("README.md")
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"{readme} needs the markers {START!r} and {END!r} around the method table", file=sys.stderr)
        return 1
    readme.write_text(with_table(text))
    print(f"{readme}: method table rewritten ({len(REGISTRY)} methods)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
