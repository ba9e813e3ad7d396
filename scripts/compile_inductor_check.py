"""torch.compile with the default inductor backend against eager: one training step (forward + backward) of a
one-layer tiny Qwen3 per method. Prints the loss and the largest gradient difference.

    python scripts/compile_inductor_check.py [--variants lora pissa hra dora] [--device cpu]

CI checks compile with the aot_eager backend (tests/test_compile.py: bit-identical) because inductor's C++
compile takes minutes on a CPU; this is the manual check behind the inductor figures in docs/training.md.
Data-driven methods (they need calibration batches) are not supported here.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import lora_lite as ll


def tiny_qwen(device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=128, attention_bias=True)
    return Qwen3ForCausalLM(cfg).to(device).train()


def step(forward, model, x):
    model.zero_grad(set_to_none=True)
    loss = forward(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["lora", "pissa", "hra", "dora"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1)).to(args.device)
    print("| method | compile + step s | |Δ loss| | max |Δ grad| |")
    print("|---|---:|---:|---:|")
    for name in args.variants:
        torch._dynamo.reset()
        model = tiny_qwen(args.device)
        ll.attach(model, ll.REGISTRY[name].config())
        with torch.no_grad():  # a trained-looking adapter, so every tensor has a gradient to compare
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        eager_loss, eager_grads = step(model, model, x)
        start = time.perf_counter()
        loss, grads = step(torch.compile(model, fullgraph=True), model, x)
        seconds = time.perf_counter() - start
        worst = max((grads[n] - eager_grads[n]).abs().max().item() for n in eager_grads)
        print(f"| {name} | {seconds:.1f} | {(loss - eager_loss).abs().item():.2e} | {worst:.2e} |")


if __name__ == "__main__":
    main()
