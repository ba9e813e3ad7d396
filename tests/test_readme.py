"""The README quickstart must run as written and print equal reloaded outputs."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_offline_and_reloads_exactly(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = next(b for b in blocks if "ll.attach" in b and "ll.load" in b)
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "reloaded outputs equal: True" in out.stdout
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0], out.stdout
    assert (tmp_path / "adapter.safetensors").is_file()


def test_several_adapters_section_runs_after_the_quickstart(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = next(b for b in blocks if "ll.attach" in b and "ll.load" in b)
    several = next(b for b in blocks if "ll.per_row" in b)
    script = tmp_path / "several.py"
    script.write_text(quickstart + "\n" + several + "\nprint('adapters:', ll.adapter_names(model))\n")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "adapters: ['math', 'math_07']" in out.stdout


def test_lora_family_options_section_runs_after_the_quickstart(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    quickstart = next(b for b in blocks if "ll.attach" in b and "ll.load" in b)
    prelude = quickstart.split("\nmodel = base_model()")[0]  # the imports and base_model(), not the training
    options = next(b for b in blocks if "ll.lora_plus_groups" in b)
    script = tmp_path / "options.py"
    script.write_text(prelude + "\nbatch = torch.randint(0, 256, (4, 32))\n" + options)
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "lr per group: [0.0002, 0.0032] lora_ga layers: 14" in out.stdout
