"""Train a hook adapter on several processes: DDP by default, FSDP2 (fully_shard) with --fsdp.

    torchrun --nproc_per_node 2 examples/train_distributed.py                       # CPU: gloo, GPUs: nccl
    accelerate launch --multi_gpu --num_processes 2 examples/train_distributed.py --fsdp
    python examples/train_distributed.py                                            # a single process works too

Every rank builds the same base, attaches the same adapter and runs the same loop over the same global batches;
shard_batch hands each rank its rows, the wrapper averages gradients, and rank 0 writes the adapter file.
Runs offline on a tiny Llama built from a config; pass --model with a local path or hub id for a real model.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import lora_lite as ll
from lora_lite import distributed as lld
from lora_lite.config import config_class

VOCAB = 256


def base_model(name: str | None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if name:
        return AutoModelForCausalLM.from_pretrained(name)  # the same checkpoint on every rank
    torch.manual_seed(0)  # a random base must be the same on every rank too
    config = LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB)
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model path or hub id (default: a tiny offline Llama)")
    parser.add_argument("--variant", default="lora", help="any registered variant, e.g. lora, dora, pissa")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="global batch; a multiple of the number of processes")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    parser.add_argument("--out", default="adapter.safetensors")
    args = parser.parse_args(argv)

    if not lld.init_from_env() and args.fsdp:
        parser.error("--fsdp shards over several processes: start this script with torchrun or accelerate launch")
    device = lld.device()
    model = base_model(args.model).to(device)
    ll.attach(model, config_class(args.variant)(r=args.r, target_names=(r"q_proj$", r"v_proj$")))
    lld.broadcast_adapter(model)  # rank 0's random init on every rank (DDP would also do it; FSDP2 would not)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:  # one unit per decoder layer: hooks and weights are unsharded together
            fully_shard(layer)
        fully_shard(model)
        train_model = model
    else:
        train_model = lld.wrap_ddp(model)  # DDP with several processes, the model itself with one
    optimizer = torch.optim.AdamW([p for p in train_model.parameters() if p.requires_grad], lr=args.lr)

    # One global batch, the same on every rank (as in the README quickstart); a real loop would draw a new one per
    # step, seeded identically on every rank, or use a DistributedSampler instead of shard_batch.
    ids = torch.randint(0, VOCAB, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {k: v.to(device) for k, v in lld.shard_batch({"input_ids": ids, "labels": ids}).items()}
    for step in range(args.steps):
        loss = train_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in (0, args.steps - 1):
            mean = loss.detach().clone()
            if lld.is_distributed():
                dist.all_reduce(mean)  # the global mean loss, for logging only
                mean /= lld.world_size()
            if lld.is_main_process():
                print(f"step {step:3d}  loss {mean.item():.3f}")

    lld.save(train_model, args.out)  # every rank calls it (FSDP2 gathers the shards); rank 0 writes
    if lld.is_main_process():
        print(f"saved {args.out} from {lld.world_size()} process(es), {'FSDP2' if args.fsdp else 'DDP'}")


if __name__ == "__main__":
    main()
    if lld.is_distributed():
        dist.destroy_process_group()
