"""docs/adding_a_variant.md, followed literally: its worked example saved as the file it names, in a copy of
the source tree, passes the whole invariant matrix and is exported, benchmarked and costed without another edit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding_a_variant.md"


def worked_example() -> tuple[str, str]:
    """(relative path the page says to save it as, the code)."""
    text = DOC.read_text().split("## Worked example", 1)[1]
    path = re.search(r"Save this as\s+`(src/lora_lite/variants/\w+\.py)`", text).group(1)
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    return path, code


@pytest.mark.slow
def test_the_worked_example_passes_the_matrix(tmp_path):
    path, code = worked_example()
    shutil.copytree(ROOT / "src", tmp_path / "src")
    shutil.copytree(ROOT / "tests", tmp_path / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / path).write_text(code)
    name = re.search(r'name = "(\w+)"', code).group(1)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "LORA_LITE_SHARED": os.environ.get(
        "LORA_LITE_SHARED", str(ROOT.parent / "shared"))}
    check = (f"import lora_lite as ll; m = ll.REGISTRY[{name!r}]; assert ll.{type_name(code)} is m.config; "
             "from lora_lite.bench.presets import defaults_row; assert defaults_row(m.name) is m.bench; "
             "from lora_lite.docs_tables import method_table; assert f'| `{m.name}` |' in method_table(); "
             "from lora_lite.cost.macs import layer_added_macs; assert layer_added_macs(m, 64, 32, m.config(r=4)) > 0")
    subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, check=True)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_invariants.py",
                           "-k", name], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"(\d+) passed", proc.stdout) and "failed" not in proc.stdout
    assert int(re.search(r"(\d+) passed", proc.stdout).group(1)) >= 40  # every column, 2 dtypes x 2 models


def type_name(code: str) -> str:
    return re.search(r"class (\w+Config)\(", code).group(1)
