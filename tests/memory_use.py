"""Peak resident memory of a call (Linux: /proc/self/clear_refs resets the high-water mark VmHWM)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

CLEAR_REFS = Path("/proc/self/clear_refs")


def require_rss_tracking() -> None:
    """Skip where the peak cannot be measured (not Linux); under CI=true that is a failure, never a skip."""
    if CLEAR_REFS.exists():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("CI=true but /proc/self/clear_refs is missing: the memory bound cannot be checked")
    pytest.skip("peak-memory checks need Linux's /proc/self/clear_refs")


def rss(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_growth(fn) -> int:
    """Bytes by which the process's peak RSS rose above its RSS at the start while fn() ran (also if it raised)."""
    CLEAR_REFS.write_text("5")
    start = rss("VmRSS")
    try:
        fn()
    finally:
        growth = rss("VmHWM") - start
    return growth
