"""How many adapter entries a bf16 base actually updates: stories260K in bf16, each method's matrix config, 10
AdamW steps at lr 1e-4, then the share of each trainable tensor's entries that changed.

    python scripts/bf16_update_coverage.py [--dtype float32|bfloat16]   # --dtype: the adapters' storage dtype

With fp32 master tensors (the default) every entry that gets a gradient moves; with bf16 storage most updates of
1e-4 round away (bf16 spacing near 0.1 is ~5e-4).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import lora_lite as ll  # noqa: E402
from conftest import load_stories260k  # noqa: E402
from variant_cases import CASES, attach_case  # noqa: E402


def coverage(name: str, storage: torch.dtype | None) -> dict[str, float]:
    model = load_stories260k(torch.bfloat16)
    cfg = CASES[name].config("stories")
    cfg.dtype = storage
    attach_case(model, name, "stories", cfg=cfg)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-4)
    batch = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(10):
        model(batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    changed, total = defaultdict(int), defaultdict(int)
    for n, p in params.items():
        kind = n.rsplit(".", 1)[-1]
        changed[kind] += int((p.detach() != before[n]).sum())
        total[kind] += p.numel()
    return {kind: changed[kind] / total[kind] for kind in total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="adapter storage (default fp32)")
    args = ap.parse_args()
    storage = None if args.dtype is None else getattr(torch, args.dtype)
    print(f"| method | changed entries after 10 AdamW steps (lr 1e-4, bf16 stories260K, {args.dtype or 'fp32'} adapters) |")
    print("|---|---|")
    for name in sorted(ll.REGISTRY):
        shares = coverage(name, storage)
        print(f"| {name} | " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sorted(shares.items())) + " |")


if __name__ == "__main__":
    main()
