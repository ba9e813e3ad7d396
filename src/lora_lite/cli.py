"""`lora-lite <command>`: the benchmark (`bench`) and the cost report (`cost`).

Each command lives in its own subpackage and is imported only when asked for, so `import lora_lite`
stays torch + safetensors only.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "bench": ("lora_lite.bench.cli", "accuracy benchmark: MetaMathQA/GSM8K protocol and offline presets"),
    "cost": ("lora_lite.cost.cli", "cost report: params, MACs, step time vs the frozen-base floor, memory, init"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"  {name:6s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: lora-lite <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0
    if argv[0] not in COMMANDS:
        print(f"lora-lite: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
