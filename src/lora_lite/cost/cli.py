"""`lora-lite cost`: a markdown cost table for every registered variant, beside the frozen-base floor and PEFT.

    lora-lite cost --compare-peft --out cost_cpu.md              # the CPU anchor (the defaults)
    lora-lite cost --preset qwen3-0.6b --device cuda --dtype bfloat16 --compare-peft
    lora-lite cost --variants lora hra pissa:svd=lowrank          # a subset; name:field=value sets config fields
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from ..bench.presets import OPTION_ROWS
from ..config import ALL_LINEAR, config_class
from ..errors import ConfigError
from .macs import added_macs, linear_macs
from .measure import (
    QWEN3_0_6B,
    ModelShape,
    Step,
    build_model,
    cpu_peak_supported,
    interleaved_medians,
    peak_step_mb,
    random_batches,
    timed_ms,
    trainable_params,
)

PRESETS = {"anchor": ModelShape(), "qwen3-0.6b": QWEN3_0_6B}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# pissa defaults to the randomized SVD; the exact one is the other row PEFT has (init_lora_weights="pissa").
# OPTION_ROWS (rsLoRA) are the benchmark's rows for options of a method.
EXTRA_ROWS = ("pissa:svd=full", *OPTION_ROWS)


def default_variants() -> list[str]:
    import lora_lite

    return sorted(lora_lite.REGISTRY) + list(EXTRA_ROWS)


def parse_variant(spec: str, r: int, alpha: float | None, targets: tuple[str, ...]):
    """'name' or 'name:field=value,field=value' -> that variant's config, targeting `targets` at rank r."""
    name, _, rest = spec.partition(":")
    cls = config_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict = {"target_names": targets}
    if "r" in fields:  # methods without a rank (IA3, RoAd) have their own size
        kwargs["r"] = r
    if alpha is not None and "alpha" in fields:
        kwargs["alpha"] = alpha
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ConfigError(f"variant spec {spec!r}: {item!r} is not field=value with a field of {cls.__name__} "
                              f"({sorted(fields)})")
        kwargs[key] = _typed(getattr(cls, key, None), value, spec)
    return cls(**kwargs)


def _typed(default, value: str, spec: str):
    """The string from a variant spec, as the type of the field's default."""
    if isinstance(default, bool):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"variant spec {spec!r}: {value!r} must be true or false")
        return value.lower() == "true"
    return type(default)(value) if isinstance(default, (int, float)) else value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-lite cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to report; 'name:field=value,...' sets config fields "
                        f"(default: every registered variant plus {', '.join(EXTRA_ROWS)})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="anchor",
                   help="model shape: 'anchor' (hidden 512, 4 layers, inter 1536, 8/4 heads) or 'qwen3-0.6b'")
    for field in dataclasses.fields(ModelShape):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=int, default=None,
                       help=f"override the preset's {field.name}")
    p.add_argument("--r", type=int, default=32, help="rank for every variant (default 32)")
    p.add_argument("--alpha", type=float, default=None, help="alpha for every variant (default: the config's)")
    p.add_argument("--targets", nargs="+", default=[ALL_LINEAR],
                   help="target_names regexes (default all-linear: the seven linear types of each layer)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and adapter dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default), or process CPU time: steadier on a loaded CPU machine, CPU only")
    p.add_argument("--iters", type=int, default=7, help="timed rounds per row; medians are reported (default 7)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing (default 1)")
    p.add_argument("--mem-repeats", type=int, default=3, help="peak-memory measurements per side; min is kept")
    p.add_argument("--calib-batches", type=int, default=2,
                   help="random-token calibration batches for variants that require calibration")
    p.add_argument("--compare-peft", action="store_true", help="also build and time PEFT's equivalent adapter")
    p.add_argument("--svd-size", type=int, default=4096,
                   help="time full vs lowrank top-r SVD on one size×size layer; 0 skips it (default 4096)")
    p.add_argument("--svd-niter", type=int, default=4, help="power iterations for the lowrank SVD (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    return p


def file_mb(save_fn) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = save_fn(Path(d))
        return path.stat().st_size / 1e6


def measure_row(base, cfg, floor: Step, ids, calib, args):
    """Attach `cfg` (and PEFT's twin) to copies of `base`; time them interleaved with the floor."""
    import lora_lite as ll
    from lora_lite.target import find_targets

    from .peft_map import build_peft_model

    ours_model = copy.deepcopy(base)
    calibration = calib if getattr(ll.REGISTRY[cfg.variant], "requires_calibration", False) else None
    _, init_ms = timed_ms(lambda: ll.attach(ours_model, cfg, calibration_data=calibration), args.device)
    ours = Step(ours_model, ids)
    row = {"variant": cfg.variant + _knobs(cfg), "init_ms": init_ms, "params": trainable_params(ours_model),
           "macs": added_macs(ours_model, cfg),
           "file_mb": file_mb(lambda d: ll.save(ours_model, d / "adapter.safetensors"))}
    fns = {"floor_fwd": floor.forward, "floor_step": floor.train, "fwd": ours.forward, "step": ours.train}
    peft_step = None
    if args.compare_peft:
        names = [n for n, _, _ in find_targets(base, cfg)]
        peft_base = copy.deepcopy(base)
        (peft_model, label), peft_init = timed_ms(lambda: build_peft_model(peft_base, cfg, names), args.device)
        row["peft_label"] = label
        if peft_model is not None:
            peft_step = Step(peft_model, ids)
            row.update(peft_init_ms=peft_init, peft_params=trainable_params(peft_model),
                       peft_file_mb=file_mb(lambda d: _peft_save(peft_model, d)))
            fns.update(peft_fwd=peft_step.forward, peft_step=peft_step.train)
    med = interleaved_medians(fns, args.iters, args.warmup, args.device, args.clock)
    row.update(med)
    row["ratio"] = med["step"] / med["floor_step"]
    row["peak_mb"] = peak_step_mb(ours, args.device, args.mem_repeats) if args.mem else None
    if peft_step is not None:
        row["peft_ratio"] = med["peft_step"] / med["floor_step"]
        row["peft_peak_mb"] = peak_step_mb(peft_step, args.device, args.mem_repeats) if args.mem else None
    return row


def _knobs(cfg) -> str:
    defaults = type(cfg)()
    changed = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
               if f.name not in ("r", "alpha", "target_names") and getattr(cfg, f.name) != getattr(defaults, f.name)]
    return f" ({', '.join(changed)})" if changed else ""


def _peft_save(peft_model, d: Path) -> Path:
    peft_model.save_pretrained(d)
    return d / "adapter_model.safetensors"


def _fmt(x, spec=".0f") -> str:
    return "–" if x is None else format(x, spec)


def render(rows, floor, header: list[str], compare_peft: bool) -> str:
    cols = ["variant", "trainable", "file MB", "+MACs/tok", "init ms", "fwd ms", "step ms", "step ÷ floor",
            "peak MB"]
    if compare_peft:
        cols += ["PEFT equivalent", "PEFT trainable", "PEFT init ms", "PEFT step ms", "PEFT step ÷ floor",
                 "PEFT ÷ ours", "PEFT peak MB"]
    lines = header + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines.append("| *floor (frozen base, input-embedding grad only)* | 0 | – | 0 | – | "
                 f"{floor['fwd']:.1f} | {floor['step']:.1f} | 1.00 | {_fmt(floor['peak_mb'])} |"
                 + (" – |" * 7 if compare_peft else ""))
    for r in rows:
        cells = [r["variant"], f"{r['params']:,}", f"{r['file_mb']:.2f}", f"{r['macs'] / 1e3:,.0f}K",
                 f"{r['init_ms']:.0f}", f"{r['fwd']:.1f}", f"{r['step']:.1f}", f"**{r['ratio']:.2f}**",
                 _fmt(r["peak_mb"])]
        if compare_peft:
            has = "peft_step" in r
            cells += [r.get("peft_label", "–"), f"{r['peft_params']:,}" if has else "–",
                      _fmt(r.get("peft_init_ms")), _fmt(r.get("peft_step"), ".1f"),
                      _fmt(r.get("peft_ratio"), ".2f"),
                      f"**{r['peft_ratio'] / r['ratio']:.2f}×**" if has else "–", _fmt(r.get("peft_peak_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.clock == "cpu" and not args.device == "cpu":
        parser.error("--clock cpu times CPU work only; use the wall clock on a GPU")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    shape = dataclasses.replace(PRESETS[args.preset], **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(ModelShape) if getattr(args, f.name) is not None})
    dtype = DTYPES[args.dtype]
    targets = tuple(args.targets)
    cfgs = [parse_variant(s, args.r, args.alpha, targets) for s in (args.variants or default_variants())]
    mem_problem = None if args.device.startswith("cuda") else cpu_peak_supported()
    args.mem = mem_problem is None

    base = build_model(shape, dtype, args.device, args.seed)
    batches = random_batches(shape.vocab, 1 + args.calib_batches, args.batch, args.seq, args.device, args.seed)
    ids, calib = batches[0]["input_ids"], batches[1:]
    floor = Step(base, ids)
    _warm_up_imports(base, args)
    # Measured first: it also pays the process's one-off allocations, which would otherwise land on row one.
    floor_peak = peak_step_mb(floor, args.device, args.mem_repeats) if args.mem else None
    load_before = os.getloadavg()
    rows = []
    for cfg in cfgs:
        rows.append(measure_row(base, cfg, floor, ids, calib, args))
        print(f"# measured {rows[-1]['variant']}: step ÷ floor {rows[-1]['ratio']:.2f}"
              + (f", PEFT {rows[-1]['peft_ratio']:.2f}" if "peft_ratio" in rows[-1] else ""), file=sys.stderr, flush=True)
        gc.collect()
    floor_row = {"fwd": _median([r["floor_fwd"] for r in rows]), "step": _median([r["floor_step"] for r in rows]),
                 "peak_mb": floor_peak}
    header = _header(args, shape, base, load_before, mem_problem)
    report = render(rows, floor_row, header, args.compare_peft)
    if args.svd_size:
        report += "\n\n" + _svd_section(args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def _warm_up_imports(base, args) -> None:
    """One untimed attach (and PEFT wrap) so no row's init time pays for first-call imports."""
    import lora_lite as ll

    model = copy.deepcopy(base)
    ll.attach(model, ll.LoRAConfig(r=2))
    ll.detach(model)
    if args.compare_peft:
        import peft

        peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["q_proj"]))


def _median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def _header(args, shape, base, load_before, mem_problem) -> list[str]:
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.compare_peft:
        import peft

        versions += f", peft {peft.__version__}"
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    mem = ("CUDA max_memory_allocated above the pre-step level" if args.device.startswith("cuda") else
           "CPU RSS high-water mark above the pre-step RSS" if mem_problem is None else f"not measured: {mem_problem}")
    return [
        f"Qwen3 from config: hidden {shape.hidden}, {shape.layers} layers, intermediate {shape.intermediate}, "
        f"{shape.heads} heads / {shape.kv_heads} kv heads, head_dim {shape.head_dim}, vocab {shape.vocab}; "
        f"batch {args.batch} × {args.seq} tokens; r={args.r}, targets {' '.join(args.targets)}; {args.dtype} on "
        f"{args.device} ({args.threads} threads, {platform.processor() or platform.machine()}).",
        f"{versions}; {load}. Medians of {args.iters} interleaved rounds after {args.warmup} warm-up rounds, "
        f"{args.clock} clock.",
        f"Frozen linears: {linear_macs(base) / 1e6:.2f}M MACs/token. Step = forward + backward of the mean "
        "squared logit; the floor is the same step with no adapter. Peak MB: " + mem + ".",
    ]


def _svd_section(args) -> str:
    from .svd_bench import svd_init_times

    t = svd_init_times(args.svd_size, args.r, args.svd_niter, args.seed)
    return (f"Top-{args.r} SVD of one {args.svd_size}×{args.svd_size} fp32 layer: full {t['full_ms']:.0f} ms, "
            f"lowrank (niter={args.svd_niter}) {t['lowrank_ms']:.0f} ms, **{t['speedup']:.1f}× faster**; "
            f"max relative error of the top-{args.r} singular values {t['top_r_rel_err']:.1e}.")
