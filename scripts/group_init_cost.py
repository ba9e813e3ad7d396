"""Cost of the data-driven inits (eva, antipasto_corda, antipasto_asvd): wall time, CPU time and peak memory of
attach() with calibration data on stories260K. Prints a markdown table.

    PYTHONPATH=src python scripts/group_init_cost.py [--batches 8] [--batch-size 4] [--max-length 256] [--r 16]

Each variant runs in a fresh subprocess (so one run's allocations cannot hide another's peak). Inside it the
model and the batches are loaded first, then the kernel's peak-RSS mark is reset (/proc/self/clear_refs) and
attach() runs; "peak Δ" is the peak resident set during attach minus the resident set just before it, which
counts torch's C++ allocations (tracemalloc would not). "forward" is the floor: the same batches through the
bare model under no_grad. Every linear layer except lm_head is targeted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(variant: str, args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lora_lite as ll
    from lora_lite.calibration import call_model
    from lora_lite.config import config_class
    from lora_lite.shared_data import gsm8k_file, stories260k_dir

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(stories260k_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories260k_dir())
    tok.pad_token, tok.padding_side = tok.unk_token, "left"
    with open(gsm8k_file("train")) as f:
        rows = [json.loads(next(f)) for _ in range(args.batches * args.batch_size)]
    texts = [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]
    batches = [dict(tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=args.max_length)) for i in range(0, len(texts), args.batch_size)]
    tokens = int(sum(b["attention_mask"].sum() for b in batches))

    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM, the peak resident set, to the current RSS
    wall, cpu = time.perf_counter(), time.process_time()
    if variant == "forward":
        with torch.no_grad():
            for b in batches:
                call_model(model, b)
    else:
        ll.attach(model, config_class(variant)(r=args.r), calibration_data=batches)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = rss_kib("VmHWM")
    return {"variant": variant, "wall_s": wall, "cpu_s": cpu, "peak_delta_mib": (peak - base) / 1024,
            "rss_before_mib": base / 1024, "tokens": tokens}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["forward", "eva", "antipasto_corda", "antipasto_asvd"])
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    results = []
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--child", variant, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"stories260K, all linear layers, r={args.r}, {args.batches} batches × {args.batch_size} GSM8K "
          f"question+answer (max_length {args.max_length}, {results[0]['tokens']} non-padding tokens), "
          f"{args.threads} thread(s)\n")
    print("| attach | wall s | cpu s | peak RSS Δ (MiB) | RSS before (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['peak_delta_mib']:.1f} | "
              f"{r['rss_before_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
