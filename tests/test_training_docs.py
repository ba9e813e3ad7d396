"""docs/training.md runs as written: its setup block, then every other block in order as one script, and the
accelerate block after the setup in a second script (accelerate allows one mixed-precision setting per process,
and the Trainer blocks have already set theirs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def run(script: str, tmp_path: Path, name: str) -> str:
    path = tmp_path / f"docs_{name}.py"  # a prefix, or "accelerate.py" would shadow the package
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def test_training_page_runs_as_written(tmp_path):
    setup, *blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    accelerate = [b for b in blocks if "Accelerator(" in b]
    rest = [b for b in blocks if "Accelerator(" not in b]
    assert len(accelerate) == 1 and rest

    out = run("\n".join([setup, *rest]), tmp_path, "training")
    checkpoint = re.search(r"checkpoint-4: (.*)", out).group(1)
    assert "'adapter.safetensors'" in checkpoint and "model.safetensors" not in checkpoint
    assert "resumed run equals the uninterrupted one: True" in out
    assert "rebuilt from base + adapter directory: True" in out
    assert "refused: " in out and (tmp_path / "merged" / "model.safetensors").is_file()
    for trainer in ("sft", "dpo"):
        losses = [float(v) for v in re.findall(r"[\d.]+", re.search(rf"{trainer} losses: (.*)", out).group(1))]
        assert len(losses) == 4 and all(map(lambda v: v == v, losses)), out
    assert "graphs: 1 breaks: 0" in out

    out = run("\n".join([setup, *accelerate]), tmp_path, "accelerate")
    assert "accelerate mixed precision: bf16" in out
