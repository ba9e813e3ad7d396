"""Saves are atomic: a failure at any point of a write leaves the previous file byte-identical and no temp file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite import io


def _adapted_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    ll.attach(model, ll.LoRAConfig(r=2))
    with torch.no_grad():
        model[0].lora_adapters.default.lora_B.normal_()
    return model


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "adapter.safetensors"
    ll.save(_adapted_model(0), path)
    return path, path.read_bytes()


def test_save_replaces_and_keeps_the_mode(saved):
    path, old = saved
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
    path.chmod(0o600)
    ll.save(_adapted_model(1), path)
    assert path.read_bytes() != old
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert _listing(path.parent) == [path.name]


@pytest.mark.parametrize("target,exc", [
    ("os.replace", OSError("disk vanished")),        # everything written, the rename fails
    ("os.fsync", OSError("I/O error")),              # the flush to disk fails
    ("os.fsync", KeyboardInterrupt()),               # Ctrl-C during the write
    ("save_file", OSError("No space left on device")),
])
def test_failed_save_leaves_the_old_file(saved, monkeypatch, target, exc):
    path, old = saved
    real_save_file = io.save_file

    def fail(*args, **kwargs):
        if target == "save_file":  # write half a file first, like a full disk would
            real_save_file(*args, **kwargs)
            with open(args[1], "r+b") as f:
                f.truncate(100)
        raise exc

    if target == "save_file":
        monkeypatch.setattr(io, "save_file", fail)
    else:
        monkeypatch.setattr(target, fail)
    expected = ll.CheckpointError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected):
        ll.save(_adapted_model(1), path)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _listing(path.parent) == [path.name]
    ll.load(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)), path)


def test_atomic_write_bytes_failure_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    io.atomic_write_json(path, {"accuracy": 0.5})
    old = path.read_bytes()

    class HalfWritten(OSError):
        pass

    real_open = open

    def half_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode and str(file).endswith(".tmp"):
            real_write = f.write

            def write(data):
                real_write(data[: len(data) // 2])
                raise HalfWritten("device full")
            f.write = write
        return f

    monkeypatch.setattr("builtins.open", half_open)
    with pytest.raises(HalfWritten):
        io.atomic_write_bytes(path, b"x" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert _listing(tmp_path) == ["results.json"]
    with pytest.raises(ValueError):  # NaN is refused before anything is written
        io.atomic_write_json(path, {"accuracy": float("nan")})
    assert path.read_bytes() == old
    io.atomic_write_text(tmp_path / "sub" / "log.txt", "done\n")
    assert (tmp_path / "sub" / "log.txt").read_text() == "done\n"


def test_save_refuses_a_directory(tmp_path):
    with pytest.raises(ll.CheckpointError, match="is a directory"):
        ll.save(_adapted_model(), tmp_path)


CHILD = textwrap.dedent("""
    import os, sys, time
    import torch
    from torch import nn
    import lora_lite as ll
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    ll.attach(model, ll.LoRAConfig(r=2))
    def stall(fd):  # the new bytes are in the temp file; now wait to be killed
        print("writing", flush=True)
        time.sleep(60)
    os.fsync = stall
    ll.save(model, sys.argv[1])
""")


def test_killed_during_save_leaves_the_old_file(saved):
    path, old = saved
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline() == b"writing\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert path.read_bytes() == old
    leftovers = [n for n in _listing(path.parent) if n != path.name]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".{path.name}.") and leftovers[0].endswith(".tmp")
