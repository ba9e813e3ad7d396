"""The measurement harness: one model, one batch, the same step for the floor, lora-lite and PEFT.

The frozen-base floor is `Step(base_model)`: every weight frozen, only the input embeddings require grad, so
backward computes every activation gradient and no weight gradient. An adapter row is the very same `Step`
on a model that carries an adapter; its ratio to the floor is the adapter's whole training-time overhead.
Timings are medians of interleaved runs (floor, lora-lite, PEFT, floor, ...), so load on a shared machine
hits every side alike. Peak memory is the step's high-water mark above what was resident before it.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelShape:
    """A Qwen3 architecture built from config (random weights). The defaults are the CPU anchor."""

    hidden: int = 512
    layers: int = 4
    intermediate: int = 1536
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 64
    vocab: int = 4096
    experts: int = 0  # > 0: a Qwen3-MoE, every block's MLP is `experts` experts of width moe_intermediate
    top_k: int = 2
    moe_intermediate: int = 384


QWEN3_0_6B = ModelShape(hidden=1024, layers=28, intermediate=3072, heads=16, kv_heads=8, head_dim=128,
                        vocab=151936)
QWEN3_MOE_SMALL = ModelShape(experts=16)  # the anchor with 16 experts of width 384 per block, 2 active per token


def build_model(shape: ModelShape, dtype: torch.dtype, device: str, seed: int = 0) -> nn.Module:
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=shape.hidden, num_hidden_layers=shape.layers, intermediate_size=shape.intermediate,
                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
                  vocab_size=shape.vocab, max_position_embeddings=4096, tie_word_embeddings=False)
    if shape.experts:
        cfg = transformers.Qwen3MoeConfig(**common, num_experts=shape.experts, num_experts_per_tok=shape.top_k,
                                          moe_intermediate_size=shape.moe_intermediate, decoder_sparse_step=1)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    model = model.to(device=device, dtype=dtype)
    return model.requires_grad_(False).train()


def random_batches(vocab: int, n: int, batch: int, seq: int, device: str, seed: int) -> list[dict]:
    """Random-token batches; labels = input_ids, so gradient-based inits (lora_ga, lora_one) get a loss."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (batch, seq), generator=g).to(device) for _ in range(n)]
    return [{"input_ids": t, "labels": t} for t in ids]


class Step:
    """Forward (no grad) and one training step of `model` on `input_ids`, with the input embeddings as a leaf
    that requires grad. The loss is the mean squared logit, so the lm_head is in the step as it is in training."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor):
        self.model, self.input_ids = model, input_ids
        self.embed = model.get_input_embeddings()
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def clear_grads(self) -> None:
        for p in self.trainable:
            p.grad = None

    @torch.no_grad()
    def forward(self) -> torch.Tensor:
        return self.model(inputs_embeds=self.embed(self.input_ids), use_cache=False).logits

    def train(self) -> torch.Tensor:
        """One forward + backward; returns the embeddings leaf (its .grad is the input gradient)."""
        self.clear_grads()
        x = self.embed(self.input_ids).detach().requires_grad_(True)
        loss = self.model(inputs_embeds=x, use_cache=False).logits.float().square().mean()
        loss.backward()
        return x


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_ms(fn: Callable[[], object], device: str, clock: str = "wall") -> tuple[object, float]:
    """Run fn once; ms on the wall clock, or ("cpu") the CPU time of this process's threads, which a loaded
    machine distorts less because time spent waiting for a core is not counted."""
    _sync(device)
    t0 = CLOCKS[clock]()
    out = fn()
    _sync(device)
    return out, (CLOCKS[clock]() - t0) * 1e3


def interleaved_medians(fns: dict[str, Callable[[], object]], iters: int, warmup: int,
                        device: str, clock: str = "wall") -> dict[str, float]:
    """Median ms of each fn over `iters` rounds; each round runs every fn once, in a rotating order."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(iters):
        for name in names[i % len(names):] + names[:i % len(names)]:
            samples[name].append(timed_ms(fns[name], device, clock)[1])
    return {name: statistics.median(v) for name, v in samples.items()}


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_PRECISE_MMAP_BYTES, _TIMING_MMAP_BYTES = 64 * 1024, 32 * 1024 * 1024  # the latter is glibc's dynamic maximum


def _release_free_memory() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS ≈ live memory


def peak_step_mb(step: Step, device: str, repeats: int = 3) -> float:
    """MB the training step needs above what is resident before it (activations, grads, temporaries).

    CUDA: max_memory_allocated. CPU (Linux, glibc): the RSS high-water mark (see `cpu_peak_mb`).
    Minimum over `repeats`, which filters the remaining noise.
    """
    best = float("inf")
    for _ in range(repeats):
        step.clear_grads()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step.train()
            torch.cuda.synchronize()
            best = min(best, (torch.cuda.max_memory_allocated() - before) / 2**20)
        else:
            best = min(best, cpu_peak_mb(step.train)[1])
    step.clear_grads()
    return best


def cpu_peak_mb(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), MB of CPU RSS high-water mark above the RSS before it), Linux and glibc only.

    Freed heap pages are handed back first (malloc_trim) and the mark is reset through /proc/self/clear_refs.
    While fn runs, every allocation of 64 KB or more gets its own mmap, so freeing a tensor really lowers RSS
    and the mark counts live tensors, not allocator caching.
    """
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, _PRECISE_MMAP_BYTES)
    try:
        _release_free_memory()
        before = _proc_status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        out = fn()
        return out, (_proc_status_kb("VmHWM") - before) / 1024
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _TIMING_MMAP_BYTES)  # large tensors reuse heap memory while timing


def cpu_peak_supported() -> str | None:
    """None if CPU peak memory can be measured here, else the reason it cannot."""
    try:
        _proc_status_kb("VmHWM")
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, AttributeError, RuntimeError) as e:
        return f"CPU peak memory needs Linux /proc/self/clear_refs and glibc ({e})"
    return None


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def environment_line(threads: int, dtype_name: str, device: str, load_before: tuple[float, ...]) -> str:
    """Versions, dtype, device and the load average before and after: the context every cost table states."""
    import os
    import platform

    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import peft

        versions += f", peft {peft.__version__}"
    except ImportError:
        pass
    return (f"{dtype_name} on {device} ({threads} threads, {platform.processor() or platform.machine()}); {versions}; "
            f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after.")
