"""`lora-lite cost`: a markdown cost table for every registered variant, beside the frozen-base floor and PEFT.

    lora-lite cost --compare-peft --out cost_cpu.md              # the CPU anchor shape, with PEFT's twins
    lora-lite cost --preset qwen3-0.6b --device cuda --dtype bfloat16 --compare-peft
    lora-lite cost --variants lora hra pissa:svd=lowrank,niter=2  # a subset; name:field=value,... sets config fields
    lora-lite cost --table attach                                # attach/load vs get_peft_model/from_pretrained
    lora-lite cost --table moe --preset qwen3-moe                # LoRA on MoE expert parameters vs PEFT's

Bad values are refused in one line (exit 2) before anything is built or measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

import torch

from ..bench.presets import OPTION_ROWS
from ..cli_args import (
    CliParser,
    check_output_file,
    nonnegative_int,
    parse_knob,
    positive_float,
    positive_int,
    split_knob,
    usage_error,
)
from ..config import ALL_LINEAR, config_class
from ..errors import ConfigError, LoraLiteError
from .macs import added_macs, ideal_step_ratio, linear_macs
from .measure import (
    QWEN3_0_6B,
    QWEN3_MOE_SMALL,
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

PRESETS = {"anchor": ModelShape(), "qwen3-0.6b": QWEN3_0_6B, "qwen3-moe": QWEN3_MOE_SMALL}
TABLES = ("steps", "attach", "moe")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# pissa defaults to the randomized SVD; the exact one is the other row PEFT has (init_lora_weights="pissa").
# OPTION_ROWS (rsLoRA) are the benchmark's rows for options of a method.
EXTRA_ROWS = ("pissa:svd=full", *OPTION_ROWS)


def default_variants() -> list[str]:
    import lora_lite

    return sorted(lora_lite.REGISTRY) + list(EXTRA_ROWS)


_KNOB_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")  # a comma that starts the next field=value


def parse_variant(spec: str, r: int, alpha: float | None, targets: tuple[str, ...]):
    """'name' or 'name:field=value,field=value' -> that variant's config, targeting `targets` at rank r.
    Values are typed by the field's annotation, the same rule as `lora-lite bench --set` (cli_args.parse_knob);
    a list-valued field takes commas too (`layers=0,1`)."""
    name, _, rest = spec.partition(":")
    cls = config_class(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict = {"target_names": targets}
    if "r" in fields:  # methods without a rank (IA3, RoAd) have their own size
        kwargs["r"] = r
    if alpha is not None and "alpha" in fields:
        kwargs["alpha"] = alpha
    for item in filter(None, _KNOB_SPLIT.split(rest)):
        key, value = split_knob(item, f"variant spec {spec!r}")
        kwargs[key] = parse_knob(cls, key, value, f"variant spec {spec!r}")
    return cls(**kwargs)


PROG = "lora-lite cost"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", choices=TABLES, default="steps",
                   help="steps: the step-cost table (default); attach: attach/load time and peak RSS against "
                        "get_peft_model / PeftModel.from_pretrained (default variants lora, pissa); moe: LoRA on the "
                        "expert parameters of an MoE preset against PEFT's target_parameters")
    p.add_argument("--attach-rounds", type=positive_int, default=3, help="timed rounds of --table attach (default 3)")
    p.add_argument("--variants", nargs="+", default=None,
                   help="variants to report; 'name:field=value,...' sets config fields "
                        f"(default: every registered variant plus {', '.join(EXTRA_ROWS)})")
    p.add_argument("--preset", choices=sorted(PRESETS), default="anchor",
                   help="model shape: 'anchor' (hidden 512, 4 layers, inter 1536, 8/4 heads), 'qwen3-0.6b', or "
                        "'qwen3-moe' (the anchor with 16 experts of width 384 per block, 2 active; --table moe)")
    for field in dataclasses.fields(ModelShape):
        p.add_argument(f"--{field.name.replace('_', '-')}", type=positive_int, default=None,
                       help=f"override the preset's {field.name}")
    p.add_argument("--r", type=positive_int, default=32, help="rank for every variant (default 32)")
    p.add_argument("--alpha", type=positive_float, default=None, help="alpha for every variant (default: the config's)")
    p.add_argument("--targets", nargs="+", default=[ALL_LINEAR],
                   help="target_names regexes (default all-linear: the seven linear types of each layer)")
    p.add_argument("--batch", type=positive_int, default=2, help="batch size (default 2)")
    p.add_argument("--seq", type=positive_int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model and adapter dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall clock (default), or process CPU time: steadier on a loaded CPU machine, CPU only")
    p.add_argument("--iters", type=positive_int, default=7, help="timed rounds per row; medians are reported (default 7)")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed rounds before timing (default 1)")
    p.add_argument("--mem-repeats", type=positive_int, default=3, help="peak-memory measurements per side; min is kept")
    p.add_argument("--calib-batches", type=positive_int, default=2,
                   help="random-token calibration batches for variants that require calibration")
    p.add_argument("--compare-peft", action="store_true", help="also build and time PEFT's equivalent adapter")
    p.add_argument("--svd-size", type=nonnegative_int, default=4096,
                   help="time full vs lowrank top-r SVD on one size×size layer; 0 skips it (default 4096)")
    p.add_argument("--svd-niter", type=nonnegative_int, default=None,
                   help="power iterations for the lowrank SVD (default 4)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for weights and tokens")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown report to this file")
    return p


def resolve(args) -> tuple[ModelShape, list]:
    """The model shape and the variant configs, or a ConfigError naming the flag: nothing is built yet."""
    if args.clock == "cpu" and args.device != "cpu":
        raise ConfigError("--clock cpu times CPU work only; use the wall clock on a GPU")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        raise ConfigError(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    if args.table == "attach" and args.device != "cpu":
        raise ConfigError("--table attach measures CPU RSS; run it with --device cpu")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device} but CUDA is not available here; pass --device cpu")
    if args.svd_niter is not None and not args.svd_size:
        raise ConfigError("--svd-niter shapes the SVD timing, which --svd-size 0 skips; drop one of them")
    args.svd_niter = 4 if args.svd_niter is None else args.svd_niter
    shape = dataclasses.replace(PRESETS[args.preset], **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(ModelShape) if getattr(args, f.name) is not None})
    if shape.heads % shape.kv_heads:
        raise ConfigError(f"--heads {shape.heads} must be a multiple of --kv-heads {shape.kv_heads}")
    if (args.table == "moe") != bool(shape.experts):
        raise ConfigError("--table moe needs an MoE shape (--preset qwen3-moe or --experts N), and only it takes one")
    if args.out is not None:
        check_output_file(args.out, "--out")
    try:
        variants = args.variants or (["lora", "pissa"] if args.table == "attach" else default_variants())
        cfgs = [parse_variant(s, args.r, args.alpha, tuple(args.targets)) for s in variants]
    except LoraLiteError as e:
        raise ConfigError(f"--variants: {e}") from None
    return shape, cfgs


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
           "macs": added_macs(ours_model, cfg), "ideal": ideal_step_ratio(base, cfg, args.batch, args.seq),
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


def floor_noise(rows) -> float | None:
    """How far the floor's median step wandered across the rows of this run, as a fraction of its median
    (half the max - min range). The floor is the same computation in every row, so this is the run's timing
    noise; None with fewer than 3 rows, where it cannot be told from chance."""
    floors = [r["floor_step"] for r in rows]
    if len(floors) < 3:
        return None
    return (max(floors) - min(floors)) / 2 / _median(floors)


def _ratio_cell(ratio: float, noise: float | None) -> str:
    if noise is not None and abs(ratio - 1.0) <= noise:
        return f"{ratio:.2f} (tie)"
    if ratio < 1.0:
        return f"{ratio:.2f} (below floor: noise)"
    return f"**{ratio:.2f}**"


def _peft_vs_ours(peft_ratio: float, ours: float, noise: float | None) -> str:
    rel = peft_ratio / ours
    # both ratios carry the floor noise; their quotient carries about sqrt(2) times it
    if noise is not None and abs(rel - 1.0) <= noise * 2 ** 0.5:
        return f"{rel:.2f}× (tie)"
    return f"**{rel:.2f}×**"


def render(rows, floor_peak, header: list[str], compare_peft: bool) -> str:
    """The table. Each row shows the floor step it was timed beside, so step ms ÷ floor ms is its ratio."""
    noise = floor_noise(rows)
    cols = ["variant", "trainable", "file MB", "+MACs/tok", "init ms", "fwd ms", "step ms", "floor step ms",
            "step ÷ floor", "ideal", "÷ ideal", "peak MB"]
    if compare_peft:
        cols += ["PEFT equivalent", "PEFT trainable", "PEFT init ms", "PEFT step ms", "PEFT step ÷ floor",
                 "PEFT ÷ ideal", "PEFT ÷ ours", "PEFT peak MB"]
    floors = [r["floor_step"] for r in rows]
    if noise is None:
        noise_line = (f"Timing noise: not estimated ({len(rows)} row(s); it needs 3), so no ratio is marked as a "
                      "tie.")
    else:
        noise_line = (f"Timing noise: the floor's median step ranged {min(floors):.1f}–{max(floors):.1f} ms across "
                      f"the rows (±{100 * noise:.0f}%); a ratio within that of 1.00 is a tie with the floor, and "
                      "PEFT ÷ ours within √2 times that is a tie. A step below the floor is noise: an adapter only "
                      "adds work.")
    floor_line = ("Each row's floor step ms is the floor timed interleaved with that row, and step ÷ floor is "
                  "step ms ÷ that; the floor row shows the median over the rows.")
    lines = header + [floor_line, noise_line, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines.append("| *floor (frozen base, input-embedding grad only)* | 0 | – | 0 | – | "
                 f"{_median([r['floor_fwd'] for r in rows]):.1f} | {_median(floors):.1f} | – | 1.00 | 1.00 | – | "
                 f"{_fmt(floor_peak)} |" + (" – |" * 8 if compare_peft else ""))
    for r in rows:
        cells = [r["variant"], f"{r['params']:,}", f"{r['file_mb']:.2f}", f"{r['macs'] / 1e3:,.0f}K",
                 f"{r['init_ms']:.0f}", f"{r['fwd']:.1f}", f"{r['step']:.1f}", f"{r['floor_step']:.1f}",
                 _ratio_cell(r["ratio"], noise), f"{r['ideal']:.3f}", f"{r['ratio'] / r['ideal']:.2f}",
                 _fmt(r["peak_mb"])]
        if compare_peft:
            has = "peft_step" in r
            cells += [r.get("peft_label", "–"), f"{r['peft_params']:,}" if has else "–",
                      _fmt(r.get("peft_init_ms")), _fmt(r.get("peft_step"), ".1f"),
                      _ratio_cell(r["peft_ratio"], noise) if has else "–",
                      _fmt(r["peft_ratio"] / r["ideal"] if has else None, ".2f"),
                      _peft_vs_ours(r["peft_ratio"], r["ratio"], noise) if has else "–", _fmt(r.get("peft_peak_mb"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepare(argv: list[str] | None) -> tuple | int:
    """(args, shape, configs) from the command line, or the exit status of a one-line refusal."""
    args = build_parser().parse_args(argv)
    try:
        shape, cfgs = resolve(args)
    except LoraLiteError as e:
        return usage_error(PROG, e)
    return args, shape, cfgs


def main(argv: list[str] | None = None) -> int:
    prepared = prepare(argv)
    if isinstance(prepared, int):
        return prepared
    args, shape, cfgs = prepared
    try:
        return _measure_and_report(args, shape, cfgs)
    except LoraLiteError as e:
        print(f"{PROG}: {' '.join(str(e).split())}", file=sys.stderr)
        return 1


def _measure_and_report(args, shape: ModelShape, cfgs: list) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        report = _measure(args, shape, cfgs)
    finally:
        torch.set_num_threads(previous_threads)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")
    return 0


def _measure(args, shape: ModelShape, cfgs: list) -> str:
    dtype = DTYPES[args.dtype]
    mem_problem = None if args.device.startswith("cuda") else cpu_peak_supported()
    args.mem = mem_problem is None

    base = build_model(shape, dtype, args.device, args.seed)
    if args.table != "steps":
        return _other_table(args, shape, base, cfgs)
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
    header = _header(args, shape, base, load_before, mem_problem)
    report = render(rows, floor_peak, header, args.compare_peft)
    if args.svd_size:
        report += "\n\n" + _svd_section(args)
    return report


def _other_table(args, shape, base, cfgs) -> str:
    """--table attach / moe: sections with their own measurements (attach_bench.py, moe_bench.py)."""
    if args.table == "attach":
        from .attach_bench import attach_table

        return attach_table(base, shape, cfgs, args)
    from .moe_bench import moe_table

    ids = random_batches(shape.vocab, 1, args.batch, args.seq, args.device, args.seed)[0]["input_ids"]
    return moe_table(base, shape, ids, args)


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
