"""Full vs randomized (lowrank) top-r SVD for SVD-based inits: time and accuracy. Prints a markdown table.

    PYTHONPATH=src python scripts/svd_init_bench.py [--threads 1] [--big 4096] [--skip-big]

Times are CPU seconds of this process (time.process_time), not wall time: on a shared machine wall time
mostly measures the neighbours, CPU time of a 1-thread run does not.

Rows:
  stories260K   every linear layer of the pretrained model, r=16 (summed time, worst-layer errors), and the
                identity of a whole-model pissa attach (max |logits' - logits|)
  4096² gauss   a random N(0, 1) 4096×4096 layer (flat spectrum: the hardest case for a range finder), r=32, 256
  4096² decay   the same size with singular values σ_i = i^-0.5 (the slow decay of real weights), r=32, 256
The full SVD is timed once per weight (its cost does not depend on r) and cut to each r.
Columns:
  cpu s         CPU seconds of the SVD (median of --repeats; the big full SVD runs once), summed over layers
  recon         ‖W − U S Vh‖_F / ‖W‖_F, the top-r reconstruction error
  excess        recon / recon(full) − 1: how much worse than the optimal rank-r approximation
  energy        captured Σ S_r² / Σ S_r(full)² (1 = the same top-r spectrum as full)
  identity      max |W_res + U S Vh − W| after the runtime's one rounding (fp32 weights)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from lora_lite.svd import top_r_svd

METHODS = [("full", 0), ("lowrank", 0), ("lowrank", 1), ("lowrank", 2), ("lowrank", 4), ("lowrank", 8)]


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return statistics.median(times), out


def errors(W, U, S, Vh, S_full):
    approx = (U * S) @ Vh
    recon = ((W - approx).norm() / W.norm()).item()
    energy = (S.square().sum() / S_full.square().sum()).item()
    w_res = W - approx  # what the runtime stores (fp32 weight: no extra rounding beyond fp32)
    identity = (w_res + approx - W).abs().max().item()
    return recon, energy, identity


def bench_layers(name, weights, ranks, repeats):
    """One row per (r, method); the full SVD is computed (and timed) once per weight and cut to each r."""
    rows = []
    full_time, full = 0.0, []
    for W in weights:
        t, out = timed(lambda W=W: torch.linalg.svd(W.float(), full_matrices=False), 1 if W.numel() > 4e6 else repeats)
        full_time += t
        full.append(out)
    for r in ranks:
        for method, niter in METHODS:
            total, worst = 0.0, [0.0, 0.0, 1.0, 0.0]
            for W, (Uf, Sf, Vf) in zip(weights, full, strict=True):
                if method == "full":
                    t, (U, S, Vh) = full_time / len(weights), (Uf[:, :r], Sf[:r], Vf[:r])
                else:
                    t, (U, S, Vh) = timed(lambda W=W, r=r, m=method, k=niter: top_r_svd(W, r, m, k), repeats)
                total += t
                best = errors(W, Uf[:, :r], Sf[:r], Vf[:r], Sf[:r])[0]
                recon, energy, ident = errors(W, U, S, Vh, Sf[:r])
                excess = recon / best - 1 if best > 0 else 0.0
                worst = [max(worst[0], recon), max(worst[1], excess), min(worst[2], energy), max(worst[3], ident)]
            label = "full" if method == "full" else f"lowrank niter={niter}"
            rows.append((name, r, label, total, *worst))
    return rows


def pissa_identity(model, batch, svd, niter, r):
    import lora_lite as ll

    with torch.no_grad():
        y0 = model(**batch).logits
    m = copy.deepcopy(model)
    t0 = time.process_time()
    ll.attach(m, ll.PiSSAConfig(r=r, svd=svd, niter=niter))
    attach_s = time.process_time() - t0
    with torch.no_grad():
        y1 = m(**batch).logits
    return attach_s, (y1 - y0).abs().max().item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--big", type=int, default=4096)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lite.shared_data import stories260k_dir

    model = AutoModelForCausalLM.from_pretrained(stories260k_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(stories260k_dir())
    batch = dict(tok(["Natalia sold clips to 48 of her friends in April, and then half as many in May."],
                     return_tensors="pt"))
    weights = [m.weight.detach() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    rows = bench_layers(f"stories260K ({len(weights)} layers)", weights, [16], args.repeats)
    if not args.skip_big:
        g = torch.Generator().manual_seed(0)
        n = args.big
        gauss = torch.randn(n, n, generator=g)
        Q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        Q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        decay = (Q1 * torch.arange(1, n + 1, dtype=torch.float32).pow(-0.5)) @ Q2.T
        rows += bench_layers(f"{n}² gauss", [gauss], [32, 256], args.repeats)
        rows += bench_layers(f"{n}² decay", [decay], [32, 256], args.repeats)

    print("\n| layer | r | svd | cpu s | recon | excess vs full | energy | identity |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r, label, t, recon, excess, energy, ident in rows:
        print(f"| {name} | {r} | {label} | {t:.3f} | {recon:.4f} | {excess:.2e} | {energy:.5f} | {ident:.1e} |")

    print("\n| stories260K pissa r=16, all linear | attach cpu s | max |logits' − logits| |")
    print("|---|---|---|")
    for method, niter in METHODS:
        label = "full" if method == "full" else f"lowrank niter={niter}"
        attach_s, ident = pissa_identity(model, batch, method, niter, 16)
        print(f"| {label} | {attach_s:.3f} | {ident:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
