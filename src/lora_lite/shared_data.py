"""Where the offline test/benchmark assets live (`../shared` beside the repo by default).

Set LORA_LITE_SHARED to point elsewhere. Nothing in the core library needs these files; the tests and the
offline benchmark presets do.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "LORA_LITE_SHARED"
_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared"


def shared_dir() -> Path:
    return Path(os.environ.get(SHARED_ENV, _DEFAULT))


def stories260k_dir() -> Path:
    return shared_dir() / "models" / "stories260k"


def gsm8k_file(split: str) -> Path:
    return shared_dir() / "data" / "gsm8k" / f"{split}.jsonl"
