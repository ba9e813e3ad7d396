"""Multi-process training (torchrun, accelerate launch) with hook adapters: the few pieces a loop needs.

Hooks live on the layers, so DDP's and FSDP2's wrappers call them unchanged; DDP only sees (and all-reduces)
the trainable `lora_*` parameters, and every one of them is used in each forward, so the default
find_unused_parameters=False is right. The recipe, identical on every rank:

    from lora_lite import distributed as lld
    lld.init_from_env()                               # joins the group torchrun / accelerate describe
    model = load_base().to(lld.device())              # the same base weights on every rank
    ll.attach(model, cfg, calibration_data=calib)     # the same calibration batches on every rank
    lld.broadcast_adapter(model)                      # rank 0's init wins: random and data-driven inits agree
    model = lld.wrap_ddp(model)                       # or fully_shard(...) (FSDP2)
    for batch in batches:                             # the global batch, identical on every rank
        loss = model(**lld.shard_batch(batch)).loss   # this rank's rows; DDP averages gradients
        ...
    lld.save(model, "adapter.safetensors")            # every rank calls it, rank 0 writes

Without an initialised process group every helper acts as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import DistributedError
from .io import entry_info, file_key, write_adapter
from .runtime import adapter_layers, adapters_by_name, apply_residual, iter_adapters, stored_shape


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def local_rank() -> int:
    """This process's index on its node, as set by torchrun / accelerate (LOCAL_RANK); 0 without a launcher."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """The GPU this rank owns (cuda:LOCAL_RANK) when CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that torchrun / accelerate launch describe in RANK, WORLD_SIZE, MASTER_ADDR, ...

    backend None picks nccl with CUDA, gloo without. Returns True when this is one of several processes; with
    WORLD_SIZE unset or 1 no group is created and False is returned. Calling it twice is harmless.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; start the script "
                               "with `torchrun --nproc_per_node N script.py` or `accelerate launch`")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, init_method="env://")
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. builds and caches a file), then the other ranks run it (and find the cache)."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def mean_over_ranks(value: torch.Tensor | float) -> float:
    """The mean of a scalar over all ranks (a NaN on any rank makes it NaN everywhere, so every rank sees it)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to(torch.float64).reshape(()).clone()
    else:
        t = torch.tensor(float(value), dtype=torch.float64, device=device() if is_distributed() else "cpu")
    if is_distributed():
        dist.all_reduce(t)
        t /= world_size()
    return t.item()


def global_token_mean(loss: torch.Tensor, n_tokens: torch.Tensor | int) -> torch.Tensor:
    """Rescale this rank's per-token mean `loss` (over its `n_tokens` label tokens) so that DDP's average of the
    ranks' gradients is the gradient of the per-token mean over every rank's tokens, as one process would compute
    it on the whole batch. Without it, shards with more padding weigh their tokens more. Identity in one process."""
    if not is_distributed():
        return loss
    n_local = torch.as_tensor(n_tokens, dtype=torch.float64, device=loss.device).detach().clone()
    n_total = n_local.clone()
    dist.all_reduce(n_total)
    return loss * (n_local * world_size() / n_total).to(loss.dtype)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DDP(model) on this rank's device when a process group is up; the model itself otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def shard_list(items: list) -> list:
    """This rank's contiguous slice of `items` (sizes differ by at most one); gather_list undoes it, in order."""
    n, r, w = len(items), rank(), world_size()
    return items[r * n // w:(r + 1) * n // w]


def gather_list(local: list) -> list:
    """Concatenate every rank's list in rank order, on every rank (any picklable items)."""
    if not is_distributed():
        return list(local)
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(local))
    return [item for part in parts for item in part]


def shard_batch(batch, rank: int | None = None, world: int | None = None):
    """Rows [rank·n/world, (rank+1)·n/world) of every tensor in `batch` (a tensor, or a dict/list/tuple of them).

    Every tensor is split along dim 0, which must be the same n everywhere and divisible by world: equal shards
    with a per-rank mean loss give, after DDP's gradient average, exactly the gradient of the global mean.
    Scalars and strings pass through unchanged.
    """
    rank = (dist.get_rank() if is_distributed() else 0) if rank is None else rank
    world = world_size() if world is None else world
    rows = {int(t.shape[0]) for t in _tensors(batch)}
    if len(rows) != 1:
        raise DistributedError(f"shard_batch needs tensors that share their first (batch) dimension; found sizes "
                               f"{sorted(rows) or 'none (no tensor in the batch)'}")
    n = rows.pop()
    if n % world:
        raise DistributedError(f"a batch of {n} rows cannot be split evenly over {world} ranks; use a global batch "
                               f"size that is a multiple of the world size (e.g. {world * max(1, n // world)})")
    per_rank = n // world
    return _map_tensors(batch, lambda t: t[rank * per_rank:(rank + 1) * per_rank])


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise DistributedError(f"shard_batch cannot split a {type(obj).__name__}; pass tensors, or dicts/lists of them")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel / FSDP1 / DeepSpeed (.module) or torch.compile (._orig_mod) wrappers:
    unwrapped for as long as the inner module holds every adapter the wrapper does."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) or len(iter_adapters(inner)) != len(iter_adapters(model)):
            return model
        model = inner


@torch.no_grad()
def broadcast_adapter(model: nn.Module, src: int = 0) -> None:
    """Copy every `lora_*` tensor of every adapter (parameters and buffers, so data-driven init results too) from
    rank `src` to all.

    Call it after attach and before wrapping, on every rank. Weight-rewriting methods (PiSSA, ...) then rewrite W
    from the received tensors, so W agrees too (given the same base weights). DDP(model) also broadcasts all
    parameters and buffers from rank 0 when it is built; FSDP2, DeepSpeed and unwrapped evaluation do not.
    """
    if not is_distributed():
        return
    if unwrap(model) is not model:
        raise DistributedError(f"broadcast_adapter got a {type(model).__name__} wrapper; call it on the bare model "
                               "after attach and before DDP/FSDP wrapping (the wrapper only manages tensors that "
                               "exist when it is built)")
    adapters = [(lname, a) for name in adapters_by_name(model) for lname, a in adapter_layers(model, name).items()]
    signature = [(lname, a.name, tname, tuple(getattr(a, tname).shape), str(getattr(a, tname).dtype))
                 for lname, a in adapters for tname in a.tensor_names]
    signatures = [None] * world_size()
    dist.all_gather_object(signatures, signature)
    for r, other in enumerate(signatures):
        if other != signatures[src]:
            diff = sorted(set(other) ^ set(signatures[src]))[:3]
            raise DistributedError(f"rank {r} attached a different adapter than rank {src} (first differences: "
                                   f"{diff}); attach the same config with the same calibration data on every rank")
    for _, a in adapters:
        for tname in a.tensor_names:
            t = getattr(a, tname)
            if _is_dtensor(t) or _is_dtensor(a.base.weight):
                raise DistributedError("broadcast_adapter found sharded (DTensor) weights; attach, then call it, "
                                       "and only then fully_shard the model (FSDP2 only manages tensors that exist "
                                       "when it shards the module)")
            dist.broadcast(t.data, src)
        if a.residual_applied:
            apply_residual(a)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # by name: its module moved between torch releases


def adapter_entries(model: nn.Module, name: str | None = None) -> dict:
    """{adapter name: (config, targets, full CPU tensors keyed `<layer>.<lora tensor>`, info)} for one adapter (None: all),
    as io.write_adapter takes it. Collective under FSDP2: call on all ranks."""
    model = unwrap(model)
    groups = adapters_by_name(model)
    out = {}
    for n in [name] if name is not None else groups:
        layers, tensors = adapter_layers(model, n), {}
        for lname, a in layers.items():
            specs = a.variant.param_specs(a.d_in, a.d_out, a.cfg)
            for tname in a.tensor_names:
                t = getattr(a, tname).detach()
                if _is_dtensor(t):
                    t = t.full_tensor()
                want = stored_shape(a.base, specs[tname].shape)
                if tuple(t.shape) != want:
                    raise DistributedError(f"{lname}.{tname} has shape {tuple(t.shape)}, expected {want}: "
                                           "it is a flattened FSDP1 shard. Call save inside "
                                           "FSDP.summon_full_params(model, writeback=False), or use FSDP2 (fully_shard)")
                # copy=True: a tensor several layers share (Lily) is written once per layer, never aliased
                tensors[f"{lname}.{tname}"] = t.to("cpu", copy=True).contiguous()
        info, extra_tensors = entry_info(model, n, layers)
        out[n] = (groups[n][0].attached_cfg, list(layers), tensors | extra_tensors, info)
    return out


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """Full CPU copies of the adapter tensors, keyed as save() writes them. Collective under FSDP2."""
    return {file_key(key, n): t for n, (_, _, tensors, _) in adapter_entries(model, name).items()
            for key, t in tensors.items()}


def save(model: nn.Module, path: str | os.PathLike, src: int = 0, name: str | None = None) -> Path:
    """lora_lite.save for a model under DDP, FSDP2 or none: every rank calls it, rank `src` writes the file,
    and every rank returns once the file is complete."""
    entries = adapter_entries(model, name)
    path = Path(path)
    if rank() == src:
        write_adapter(path, entries)
    barrier()
    return path
