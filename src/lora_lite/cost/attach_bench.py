"""Attach and load at scale: lora-lite's `attach` / `load` beside PEFT's `get_peft_model` /
`PeftModel.from_pretrained` on one large model, wall time and peak CPU RSS of each.

Every measurement starts from its own deep copy of the base, made before the clock starts, so each side pays
exactly its own work: finding the targets, creating and initialising the adapter tensors (PiSSA: one top-r
SVD per layer and the residual written into W), or reading a file. Sides run in interleaved rounds; wall
times are medians, peak RSS the minimum over rounds (measure.cpu_peak_mb). The files loaded are the ones the
first round's attach wrote (`lora_lite.save` / `save_pretrained`), and PEFT loads with is_trainable=True, as
ours does.
"""

from __future__ import annotations

import copy
import gc
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from .measure import cpu_peak_mb, timed_ms

SIDES = ("attach", "peft_attach", "load", "peft_load")


def _sides(cfg: AdapterConfig, target_names: list[str], folder: Path) -> dict[str, Callable[[nn.Module], object]]:
    import peft

    import lora_lite as ll

    from .peft_map import peft_config

    ours_file, peft_dir = folder / "adapter.safetensors", folder / "peft"
    peft_cfg, _ = peft_config(cfg, target_names)

    def attach(model):
        ll.attach(model, cfg)
        if not ours_file.exists():
            ll.save(model, ours_file)

    def peft_attach(model):
        wrapped = peft.get_peft_model(model, copy.deepcopy(peft_cfg))
        if not peft_dir.exists():
            wrapped.save_pretrained(peft_dir)

    return {"attach": attach, "peft_attach": peft_attach,
            "load": lambda model: ll.load(model, ours_file),
            "peft_load": lambda model: peft.PeftModel.from_pretrained(model, peft_dir, is_trainable=True)}


def _measure(side: Callable[[nn.Module], object], base: nn.Module) -> tuple[float, float]:
    """Wall ms and peak MB of `side` on a fresh copy of `base` (the copy is made before either is measured)."""
    model = copy.deepcopy(base)
    (_, ms), mb = cpu_peak_mb(lambda: timed_ms(lambda: side(model), "cpu"))
    model = None  # the copy (and whatever the side wrapped it in) is freed before the next measurement
    gc.collect()
    return ms, mb


def attach_load_row(base: nn.Module, cfg: AdapterConfig, rounds: int) -> dict:
    """{side: ms} and {side_mb: peak MB} for the four SIDES of one config, `rounds` interleaved rounds each.
    The saving done by the first round's attach is inside its measurement, so round one is not timed."""
    from ..target import find_targets
    from .peft_map import peft_config

    if peft_config(cfg, []) is None:
        raise ConfigError(f"{cfg.variant} has no PEFT equivalent to compare attach and load against")
    names = [n for n, _, _ in find_targets(base, cfg)]
    times: dict[str, list[float]] = {s: [] for s in SIDES}
    peaks: dict[str, list[float]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory() as d:
        sides = _sides(cfg, names, Path(d))
        for i in range(rounds + 1):
            order = list(SIDES) if i == 0 else SIDES[i % 4:] + SIDES[:i % 4]  # attach writes the files first
            for side in order:
                ms, mb = _measure(sides[side], base)
                if i:
                    times[side].append(ms)
                    peaks[side].append(mb)
    row = {"variant": cfg.variant, "layers": len(names), "label": peft_config(cfg, names)[1]}
    row.update({s: statistics.median(times[s]) for s in SIDES})
    row.update({f"{s}_mb": min(peaks[s]) for s in SIDES})
    return row


def render_attach(rows: list[dict], header: list[str]) -> str:
    cols = ["variant", "layers", "attach ms", "peak MB", "PEFT equivalent", "get_peft_model ms", "peak MB",
            "PEFT ÷ ours", "load ms", "peak MB", "from_pretrained ms", "peak MB", "PEFT ÷ ours"]
    lines = header + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["variant"], str(r["layers"]), f"{r['attach']:.0f}", f"{r['attach_mb']:.0f}", r["label"],
            f"{r['peft_attach']:.0f}", f"{r['peft_attach_mb']:.0f}", f"**{r['peft_attach'] / r['attach']:.1f}×**",
            f"{r['load']:.0f}", f"{r['load_mb']:.0f}", f"{r['peft_load']:.0f}", f"{r['peft_load_mb']:.0f}",
            f"**{r['peft_load'] / r['load']:.1f}×**"]) + " |")
    return "\n".join(lines)


def attach_table(base: nn.Module, shape, cfgs: list[AdapterConfig], args) -> str:
    """The markdown attach/load table for `cfgs` on `base` (the `lora-lite cost --table attach` report)."""
    import os

    from .measure import environment_line

    load_before = os.getloadavg()
    rows = [attach_load_row(base, cfg, args.attach_rounds) for cfg in cfgs]
    params = sum(p.numel() for p in base.parameters())
    header = [
        f"Attach and load at scale: Qwen3 from config, hidden {shape.hidden}, {shape.layers} layers, intermediate "
        f"{shape.intermediate}, {shape.heads}/{shape.kv_heads} heads, vocab {shape.vocab} ({params / 1e6:.0f}M "
        f"parameters); r={args.r}, targets {' '.join(args.targets)}. "
        + environment_line(args.threads, args.dtype, "cpu", load_before),
        f"Medians of {args.attach_rounds} interleaved rounds (after one that writes the files), wall clock; peak MB: "
        "CPU RSS high-water mark above the RSS before the call, minimum over rounds. Each call gets its own copy "
        "of the base, made outside the measurement.",
    ]
    return render_attach(rows, header)
