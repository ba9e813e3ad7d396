"""SHiRA: Bhardwaj et al. 2024, "Sparse High Rank Adapters", arXiv 2406.13175. Matches PEFT's SHiRA.

Train a fixed, sparse subset of W's entries directly; the rest of W never changes:
    k = r·(d_in + d_out) entries (as many as a rank-r LoRA has numbers), chosen at random (SHiRA-Rand)
    ΔW = scatter(values at idx) (d_out, d_in);   y' = y + x ΔWᵀ
    values: (k,) zeros, trainable        idx: (k,) sorted flat indices o·d_in + i, frozen
The mask is PEFT's: the first k of torch.randperm(d_out·d_in) under a CPU generator seeded with `seed`, the same
seed for every layer (so layers of one shape share one pattern, as in PEFT). It is not stored: `group_setup`
rebuilds it on attach and on load from (seed, d_out, d_in, r), once per shape, as a non-persistent int64 buffer,
so a file holds only the k values per layer. That relies on torch's CPU randperm being reproducible, which it is
for a given torch version (PEFT relies on the same).
ΔW is sparse but of high rank, so there is no LoRA export. It is applied as a dense (d_out, d_in) matrix built
per call and one more matmul per token, as PEFT does (a sparse kernel at 1-3% density is not faster on GPUs).
Identity at init is exact: the values start at zero, and get a gradient at step 0.
Hook-only (never reads W): works on quantized layers. Merge: W' = W + ΔW. Trainable params per layer: k.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RankConfig
from ..errors import ConfigError
from ..variant import ParamSpec, register


@dataclass
class SHiRAConfig(RankConfig):
    r: int = 32
    seed: int = 42


def sparse_count(d_in: int, d_out: int, cfg) -> int:
    return cfg.r * (d_in + d_out)


def random_indices(d_in: int, d_out: int, cfg) -> torch.Tensor:
    """PEFT's random mask as sorted flat indices into the (d_out, d_in) weight."""
    generator = torch.Generator().manual_seed(cfg.seed)
    return torch.randperm(d_out * d_in, generator=generator)[: sparse_count(d_in, d_out, cfg)].sort().values


def dense_delta(a, values: torch.Tensor) -> torch.Tensor:
    flat = values.new_zeros(a.d_out * a.d_in).index_put((a.lora_index,), values)
    return flat.view(a.d_out, a.d_in)


@register
class SHiRA:
    name = "shira"
    config = SHiRAConfig
    paper = ("Bhardwaj+ 2024", "https://arxiv.org/abs/2406.13175")
    layer_kinds = ("linear",)
    params_per_layer = "r·(d_in + d_out) (entries of W)"
    bench = {"r": 32, "lr": {"qwen": 3e-4, "stories": 3e-3, "tiny": 1e-2}}

    @staticmethod
    def peft(cfg, targets):
        import peft

        return peft.ShiraConfig(r=cfg.r, random_seed=cfg.seed, target_modules=list(targets)), "ShiraConfig"

    @staticmethod
    def check(d_in, d_out, cfg):
        if sparse_count(d_in, d_out, cfg) > d_in * d_out:
            raise ConfigError(f"shira: r={cfg.r} asks for r·(d_in + d_out) = {sparse_count(d_in, d_out, cfg)} entries "
                              f"of a {d_in}->{d_out} layer, which has {d_in * d_out}; pass r <= "
                              f"{d_in * d_out // (d_in + d_out)}, or exclude that layer")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_values": ParamSpec((sparse_count(d_in, d_out, cfg),), "zeros")}

    @staticmethod
    def group_setup(model, adapters, cfg, loaded):
        masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        for a in adapters:
            device = a.lora_values.device
            key = (a.d_in, a.d_out, a.cfg.r, device)  # a.cfg: the layer's r (rank_pattern)
            if key not in masks:
                masks[key] = random_indices(a.d_in, a.d_out, a.cfg).to(device)
            a.register_buffer("lora_index", masks[key], persistent=False)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        return d_in * d_out  # x ΔWᵀ with the scattered dense ΔW (built per call)

    @staticmethod
    def forward(a, x, y):
        return y + F.linear(x, dense_delta(a, a.lora_values))

    @staticmethod
    def delta_weight(a):
        return dense_delta(a, a.lora_values.float())
