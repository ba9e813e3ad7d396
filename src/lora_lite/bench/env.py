"""What a result depends on besides its settings: library versions, the code's commit and dirty flag, the device.

`environment()` is recorded in every result.json and results.json; `identity()` is the part of it that changes
the numbers a run produces (torch and transformers versions, the device kind), which goes into every run id and
the tiny base's cache key, so results from another environment are never reused as if they were this one's.
`fingerprint(path)` identifies a local data file or model folder by content (files) or by config and sizes
(model folders, whose weights are too large to hash on every session).
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux names the CPU model here; platform.processor() often says only "x86_64"
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def identity(device: str) -> dict:
    """The environment that changes a run's numbers: part of every run id and of the tiny base's cache key."""
    kind = "cuda:" + device_name(device) if device.startswith("cuda") else "cpu"
    return {"torch": torch.__version__, "transformers": _version("transformers"), "device": kind}


@functools.cache
def git_state() -> dict:
    """The commit of the lora-lite checkout and whether tracked files differ from it."""
    here = Path(__file__).parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown (not a git checkout, or git is missing)", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def environment(device: str, threads: int | None) -> dict:
    return {**identity(device), **git_state(), "lora_lite": _version("lora-lite"), "python": sys.version.split()[0],
            "datasets": _version("datasets"), "device_name": device_name(device), "platform": platform.platform(),
            "torch_threads": threads if threads is not None else torch.get_num_threads()}


@functools.cache
def fingerprint(source: str) -> str:
    """sha1 of a local file's bytes; of a folder's config.json and file sizes; the id itself for a hub id."""
    path = Path(source).expanduser()
    h = hashlib.sha1()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha1:" + h.hexdigest()[:16]
    if path.is_dir():
        entries = sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*") if p.is_file())
        h.update(json.dumps(entries).encode())
        for name in ("config.json", "train.jsonl", "test.jsonl"):
            if (path / name).is_file():
                h.update((path / name).read_bytes())
        return "dir-sha1:" + h.hexdigest()[:16]
    return "hub:" + source


def settings_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
