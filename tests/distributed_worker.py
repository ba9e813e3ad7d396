"""One rank of the multi-process tests in test_distributed.py; started by torchrun or accelerate launch.

For each (mode, variant): build the tiny Qwen (same base on every rank), attach with a rank-dependent seed (so
the random inits differ until broadcast_adapter), wrap (DDP, FSDP2 fully_shard, FSDP1 with use_orig_params, or
accelerate's prepare), train
`steps` SGD steps where every rank sees its shard of a global batch of world·batch rows, and save the adapter
(rank 0 writes <out>/<mode>-<variant>.safetensors). The test compares those files with single-process training.
Then it runs examples/train_distributed.py with EXAMPLE_FLAGS and --fsdp, and last `lora-lite bench` with
BENCH_ARGS (which ends the process group), all in the same launch to pay the start-up once.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_lite as ll  # noqa: E402
from conftest import make_tiny_qwen  # noqa: E402
from lora_lite import distributed as lld  # noqa: E402
from variant_cases import CASES  # noqa: E402

VOCAB, SEQ, LR = 128, 16, 0.5
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_distributed.py"
EXAMPLE_FLAGS = ["--variant", "dora", "--steps", "4", "--lr", "3e-2"]
BENCH_ARGS = ["--preset", "tiny", "--pretrain-steps", "4", "--steps", "3", "--batch-size", "4", "--max-test", "8",
              "--max-valid", "4", "--threads", "1", "--variants", "lora"]


def load_example():
    spec = importlib.util.spec_from_file_location("train_distributed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_config(variant: str):
    return CASES[variant].config("qwen")  # the invariant matrix's small config for the tiny Qwen


def global_batch(step: int, rows: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, SEQ), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}  # no padding: every row has the same number of loss tokens


def calibration_batches(seed: int) -> list[dict[str, torch.Tensor]]:
    """Random-token batches; labels too, so gradient-based inits (lora_ga, lora_one) get a loss."""
    ids = [torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(seed + i)) for i in range(2)]
    return [{"input_ids": t, "labels": t} for t in ids]


def attach(model, variant: str, seed: int) -> None:
    """Random inits draw from `seed`; data-driven ones calibrate on batches drawn from it, so ranks that pass
    different seeds start from different adapters until broadcast_adapter hands them rank 0's."""
    cfg = make_config(variant)
    torch.manual_seed(seed)
    needs_data = getattr(ll.REGISTRY[variant], "requires_calibration", False)
    ll.attach(model, cfg, calibration_data=calibration_batches(seed) if needs_data else None)


def train(model, steps: int, rows: int, shard: bool, backward=None) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(steps):
        batch = global_batch(step, rows)
        loss = model(**(lld.shard_batch(batch) if shard else batch)).loss  # per-token mean on this rank's rows
        (backward or torch.Tensor.backward)(loss)
        opt.step()
        opt.zero_grad()


def shares_across_layers(model) -> bool:
    """Whether one adapter Parameter sits in two decoder blocks (Lily's shared A and experts)."""
    owner = {}
    for i, block in enumerate(model.model.layers):
        for p in block.parameters():
            if owner.setdefault(id(p), i) != i:
                return True
    return False


def run(mode: str, variant: str, steps: int, batch: int, out: Path, accelerator=None) -> None:
    model = make_tiny_qwen(seed=0)
    attach(model, variant, seed=1000 + lld.rank())
    lld.broadcast_adapter(model)
    sums = [None] * lld.world_size()
    torch.distributed.all_gather_object(sums, {k: v.double().sum().item()
                                               for k, v in lld.adapter_state_dict(model).items()})
    assert all(s == sums[0] for s in sums), f"{variant}: adapter differs across ranks after broadcast_adapter"
    rows = batch * lld.world_size()
    if mode == "ddp":
        train(DDP(model), steps, rows, shard=True)
    elif mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        if not shares_across_layers(model):  # tensors several blocks share (Lily) must sit in one FSDP group
            for layer in model.model.layers:
                fully_shard(layer)
        fully_shard(model)
        train(model, steps, rows, shard=True)
    elif mode == "fsdp1":  # hook adapters mix frozen W and trainable lora_* in one module: use_orig_params=True
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = None if shares_across_layers(model) else ModuleWrapPolicy({type(model.model.layers[0])})
        model = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        train(model, steps, rows, shard=True)
        with FSDP.summon_full_params(model, writeback=False):  # outside forward FSDP1 holds flat shards
            lld.save(model, out / f"{mode}-{variant}.safetensors")
        return
    elif mode == "accelerate":
        wrapped = accelerator.prepare(model)
        train(wrapped, steps, rows, shard=True, backward=accelerator.backward)
        model = wrapped
    lld.save(model, out / f"{mode}-{variant}.safetensors")


def expect_error(fn, message: str) -> None:
    try:
        fn()
    except ll.DistributedError as e:
        assert message in str(e), e
    else:
        raise AssertionError(f"no DistributedError ({message!r})")


def check_misuse_is_caught() -> None:
    from torch.distributed.fsdp import fully_shard

    model = make_tiny_qwen(seed=0)
    ll.attach(model, ll.LoRAConfig(r=4 if lld.is_main_process() else 2))
    expect_error(lambda: lld.broadcast_adapter(model), "rank 1 attached a different adapter than rank 0")
    model = make_tiny_qwen(seed=0)
    ll.attach(model, ll.LoRAConfig(r=4))
    expect_error(lambda: lld.broadcast_adapter(DDP(model)), "before DDP/FSDP wrapping")
    fully_shard(model)
    expect_error(lambda: lld.broadcast_adapter(model), "only then fully_shard")


def check_collective_helpers(out: Path) -> None:
    items = list(range(7))
    mine = lld.shard_list(items)
    assert mine == (items[:3] if lld.rank() == 0 else items[3:]), mine
    assert lld.gather_list([x * 10 for x in mine]) == [x * 10 for x in items]
    assert lld.mean_over_ranks(float(lld.rank())) == 0.5
    assert math.isnan(lld.mean_over_ranks(float("nan") if lld.rank() == 1 else 1.0))  # every rank sees rank 1's NaN
    marker = out / "first.txt"
    with lld.main_process_first():
        if lld.is_main_process():
            marker.write_text("rank 0 was here")
        else:
            assert marker.read_text() == "rank 0 was here"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", required=True)
    parser.add_argument("--variants", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    accelerator = None
    if "accelerate" in args.modes:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)  # joins the group accelerate launch set up (env://, gloo)
    assert lld.init_from_env() and lld.world_size() == 2, "run under torchrun / accelerate launch with 2 processes"
    check_misuse_is_caught()
    check_collective_helpers(args.out)
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            run(mode, variant, args.steps, args.batch, args.out, accelerator)
    load_example().main([*EXAMPLE_FLAGS, "--fsdp", "--out", str(args.out / "example-fsdp.safetensors")])
    from lora_lite.bench.cli import main as bench_main

    rc = bench_main([*BENCH_ARGS, "--output-dir", str(args.out / "bench"), "--cache-dir", str(args.out / "cache")])
    assert rc == 0, f"lora-lite bench exited with {rc}"


if __name__ == "__main__":
    main()
