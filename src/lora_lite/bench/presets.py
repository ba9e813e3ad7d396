"""Presets (where model and data come from, how long to train) and the per-variant defaults table.

A method's benchmark settings live in its registration (`bench` in its file; lora_lite.variant): its learning
rate per preset, r, alpha (a number, or "r" for alpha = r) and, when they differ from the preset's, its targets
and config knobs (`knobs`, and `preset_knobs` for what one preset's model needs on top). Bench code reads them only through `defaults_row`. A registered method with no `bench` still
runs: it gets its config class's r/alpha/targets and LoRA's lr, and `variant_settings` says so. Presets cap r at
`max_r` for their small models, scaling alpha to keep alpha/r.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ALL_LINEAR, AdapterConfig, config_class
from ..errors import ConfigError
from ..shared_data import gsm8k_file, stories260k_dir
from ..variant import variant_named


@dataclass(frozen=True)
class ReferenceTiming:
    """Seconds for the preset's defaults on a 2-core CPU with 2 torch threads, for the plan's ETA. Measured on
    the project's shared 2-core machine (other sessions' niced jobs running beside it) with
    `lora-lite bench --threads 2` (tiny, all 16 methods: 5 min 9 s in all) and
    `lora-lite bench --preset stories --variants lora pissa dora --threads 2` (2 min 28 s); train_s and eval_s
    are the means over those runs of result.json's train_time_s and of the rest of wall_time_s. Single
    methods range from 0.5x (IA3) to 3.5x (DoRA on tiny) of the mean."""
    pretrain_s: float     # the tiny base's pre-training, once per cache dir
    session_s: float      # loading model and data, scoring the untrained base
    train_s: float        # one run's training at the preset's steps x batch
    eval_s: float         # one run's scoring (valid + test + forgetting)


@dataclass(frozen=True)
class Preset:
    name: str
    model: str                      # hub id or local dir; "tiny" builds and pre-trains the embedded model
    train_data: str                 # hub id, .jsonl, or folder with train.jsonl; "tiny" generates
    eval_data: str                  # GSM8K-style: train split gives valid, test split gives test
    eval_config: str | None
    metric: str                     # "em" (exact match %, higher is better) or "nll" (nats/token, lower)
    steps: int
    batch_size: int
    grad_accum: int
    max_seq_length: int             # longer examples are left out (counted in the log and result.json)
    max_new_tokens: int
    batch_size_eval: int
    targets: tuple[str, ...]
    max_test: int | None = None
    max_valid: int = 50
    max_r: int | None = None
    dtype: str = "float32"          # the base model's dtype (adapters keep fp32 master tensors unless --set dtype=)
    forget_data: str = "self"       # "self": text the base samples itself; else hub id / .jsonl with "text"
    forget_n: int = 32
    forget_len: int = 96
    checkpoint_every: int = 0
    timing: ReferenceTiming | None = None


PRESETS = {
    "tiny": Preset("tiny", model="tiny", train_data="tiny", eval_data="tiny", eval_config=None, metric="em",
                   steps=150, batch_size=16, grad_accum=1, max_seq_length=128, max_new_tokens=16,
                   batch_size_eval=200, targets=(ALL_LINEAR,), max_test=200, max_r=8, forget_len=64,
                   timing=ReferenceTiming(pretrain_s=45.0, session_s=3.0, train_s=8.6, eval_s=0.8)),
    "stories": Preset("stories", model=str(stories260k_dir()), train_data=str(gsm8k_file("train")),
                      eval_data=str(gsm8k_file("train").parent), eval_config=None, metric="nll", steps=60,
                      batch_size=8, grad_accum=1, max_seq_length=512, max_new_tokens=64, batch_size_eval=64,
                      targets=(r"down_proj$",), max_test=200, max_r=8,
                      timing=ReferenceTiming(pretrain_s=0.0, session_s=15.0, train_s=26.0, eval_s=9.0)),
    "qwen": Preset("qwen", model="Qwen/Qwen3.5-0.8B-Base", train_data="meta-math/MetaMathQA",
                   eval_data="openai/gsm8k", eval_config="main", metric="em", steps=2500, batch_size=2,
                   grad_accum=4, max_seq_length=512, max_new_tokens=300, batch_size_eval=16,
                   targets=(r"down_proj$",), dtype="bfloat16", forget_data="Salesforce/wikitext:wikitext-2-raw-v1",
                   checkpoint_every=250),
}

# Rows for an option of a registered method rather than a method of its own, as "name:field=value,...":
# `lora-lite bench` and `lora-lite cost` run them beside every registered method, with the method's row of
# defaults (the rsLoRA row is the lora row, same r, alpha and lr, with s = alpha/√r instead of alpha/r).
OPTION_ROWS = ("lora:use_rslora=true",)


def split_spec(spec: str) -> tuple[str, list[str]]:
    """'lora:use_rslora=true,alpha=8' -> ('lora', ['use_rslora=true', 'alpha=8'])."""
    name, _, rest = spec.partition(":")
    return name, [item for item in rest.split(",") if item]


def defaults_row(variant: str) -> dict | None:
    """The method's benchmark defaults, as registered in its own file (`bench = {...}`); None if it has none."""
    return getattr(variant_named(variant), "bench", None)


@dataclass(frozen=True)
class VariantSettings:
    cfg: AdapterConfig
    lr: float
    default_lr: float
    default_r: int | None
    notes: tuple[str, ...]
    label: str = ""  # the row's name: the method, or its spec with options ("lora:use_rslora=true")

    def at_lr(self, lr: float) -> VariantSettings:
        return dataclasses.replace(self, lr=lr)


def variant_settings(variant: str, preset: Preset, *, lr: float | None = None, r: int | None = None,
                     alpha: float | None = None, targets: tuple[str, ...] | None = None,
                     knobs: dict | None = None) -> VariantSettings:
    """The adapter config and lr for one variant under one preset, after command-line overrides."""
    cls = config_class(variant)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    row, notes = defaults_row(variant), []
    if row is None:
        row = {"lr": defaults_row("lora")["lr"]}
        notes.append(f"{variant} registers no benchmark defaults: using {cls.__name__}'s defaults and LoRA's lr "
                     f"for preset {preset.name!r}")
    default_lr = row["lr"][preset.name] if preset.name in row["lr"] else row["lr"]["qwen"]
    class_targets = fields["target_names"].default
    if targets is None:
        targets = row.get("targets") or (class_targets if class_targets not in (ALL_LINEAR, ()) else preset.targets)
    kwargs = {"target_names": tuple(targets), **row.get("knobs", {}),
              **row.get("preset_knobs", {}).get(preset.name, {}), **(knobs or {})}
    default_r = None
    if "r" in fields:
        table_r = row.get("r", fields["r"].default)
        default_r = min(table_r, preset.max_r) if preset.max_r else table_r
        kwargs["r"] = r if r is not None else default_r
        if "alpha" in fields and alpha is None:
            table_alpha = row.get("alpha", fields["alpha"].default)
            alpha = float(kwargs["r"]) if table_alpha in ("r", None) else float(table_alpha) * kwargs["r"] / table_r
    elif r is not None:
        notes.append(f"{variant} has no rank: --r does not apply to it")
    if "alpha" in fields:
        kwargs["alpha"] = alpha
    elif alpha is not None:
        notes.append(f"{variant} has no alpha: --alpha does not apply to it")
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ConfigError(f"{variant}: unknown config fields {unknown} (from --set or the defaults table); "
                          f"{cls.__name__} has {sorted(f for f in fields if f != 'variant')}")
    return VariantSettings(cfg=cls(**kwargs), lr=lr if lr is not None else default_lr, default_lr=default_lr,
                           default_r=default_r, notes=tuple(notes), label=variant)


def lr_grid(center: float, points: int, decades: float) -> list[float]:
    """`points` log-spaced learning rates spanning center·10^(±decades)."""
    if points < 2:
        return [center]
    return [lr_grid_point(center, points, decades, i) for i in range(points)]


def lr_grid_point(center: float, points: int, decades: float, i: int) -> float:
    """Point i of that grid, to 3 significant digits; i < 0 or i >= points continue it past its ends."""
    step = 2 * decades / (points - 1)
    return float(f"{center * 10 ** (-decades + i * step):.3g}")
