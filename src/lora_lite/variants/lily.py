"""Lily: Zhong et al. 2024, "Low-Rank Interconnected Adaptation across Layers", arXiv 2407.09946.
Matches PEFT's Lily (mixing="batch").

A low-dimension projector A is shared by a few neighbouring layers and a pool of high-dimension projectors
(experts) B_e by every layer of a group; a per-layer router mixes the experts from the data:
    h = x Aᵀ                        A: (r, d_in) kaiming      shared by `stride_a` consecutive layers of a group
    p = softmax(h Gᵀ)               G: (num_b, r) kaiming     per layer (the router)
    B: (num_b, r, d_out) zeros      shared by every layer of the group
    mixing="batch":  w = mean of p over every token of the batch (num_b,);  y' = y + scaling · h (Σ_e w_e B_e)
    mixing="token":  each token its own mix;                           y' = y + scaling · Σ_e p_e (h B_e)
A group is the layers with the same name (q_proj, down_proj, ...) and shape, in model order, as in PEFT.
Sharing is one Parameter tied into each layer's Adapter: `group_setup` ties them on attach and again on load
(the file holds each layer's copy; load refuses a file whose copies differ), and deepcopy, pickle and dtype
moves keep the tie because they keep object identity. The optimizer sees each shared tensor once.
"batch" is the paper's code and PEFT's: one mixture per forward, so a row's output depends on the other rows
(padding included) and, in a causal LM, on later tokens; per_row refuses it. "token" is causal and
batch-independent, at num_b·r·d_out MACs per token instead of r·d_out; PEFT has no equivalent of it.
Identity at init is exact: B = 0. B trains from step 0, A and G from step 1. Not mergeable in either mode
(the mixture depends on the input), as in PEFT. Hook-only: works on quantized layers.
Trainable params per group of L layers: ⌈L/stride_a⌉·r·d_in + num_b·r·d_out + L·num_b·r.
"""

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RankConfig
from ..errors import CheckpointError, ConfigError
from ..variant import ParamSpec, register

_MIXING = ("batch", "token")


@dataclass
class LilyConfig(RankConfig):
    r: int = 32
    stride_a: int = 1
    num_b: int = 2
    scaling: float = 1.0
    mixing: str = "batch"


def layer_groups(model, adapters) -> dict[tuple[str, int, int, int], list]:
    """{(layer name, d_in, d_out, r): its adapters in model order}: the layers that share B (and A in strides).
    r is the layer's own (rank_pattern): layers of another rank form a group of their own."""
    position = {id(m): (i, name) for i, (name, m) in enumerate(model.named_modules(remove_duplicate=False))}
    groups: dict[tuple[str, int, int, int], list] = {}
    for a in sorted(adapters, key=lambda a: position[id(a.base)][0]):
        groups.setdefault((position[id(a.base)][1].rsplit(".", 1)[-1], a.d_in, a.d_out, a.cfg.r), []).append(a)
    return groups


def _tie(a, tname: str, leader, loaded: bool) -> None:
    shared = getattr(leader, tname)
    if a is leader:
        return
    if loaded and not torch.equal(getattr(a, tname), shared):
        raise CheckpointError(f"lily: the file holds different values of the shared {tname} on two layers of one "
                              "group; it was edited or written by another tool. Re-save it with lora_lite.save")
    a.register_parameter(tname, shared)


@register
class Lily:
    name = "lily"
    config = LilyConfig
    paper = ("Zhong+ 2024", "https://arxiv.org/abs/2407.09946")
    layer_kinds = ("linear",)
    params_per_layer = "r·d_in/stride_a + num_b·r + num_b·r·d_out/L (A, B shared in a group of L layers)"
    bench = {"r": 32, "lr": {"qwen": 1e-4, "stories": 3e-3, "tiny": 1e-2}, "knobs": {"stride_a": 2, "num_b": 2}}

    @staticmethod
    def peft(cfg, targets):
        if cfg.mixing != "batch":
            return None
        import peft

        # PEFT groups layers by the target suffix it matched, so it is given suffixes (and the layer indices)
        suffixes = sorted({t.rsplit(".", 1)[-1] for t in targets})
        indices = sorted({int(m.group(1)) for t in targets if (m := re.search(r"\.layers\.(\d+)\.", t))})
        extra = {"layers_to_transform": indices} if indices else {}
        return (peft.LilyConfig(r=cfg.r, stride_A=cfg.stride_a, num_B=cfg.num_b, scaling=cfg.scaling,
                                target_modules=suffixes, **extra), "LilyConfig")

    @staticmethod
    def check(d_in, d_out, cfg):
        if cfg.mixing not in _MIXING:
            raise ConfigError(f"lily: mixing={cfg.mixing!r} is not one of {_MIXING}")
        if cfg.stride_a < 1:
            raise ConfigError(f"lily: stride_a={cfg.stride_a} must be >= 1 (1: every layer has its own A)")
        if cfg.num_b < 2:
            raise ConfigError(f"lily: num_b={cfg.num_b} must be >= 2; with one expert the router gets no gradient")

    @staticmethod
    def couples_rows(cfg):
        return cfg.mixing == "batch"

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_router": ParamSpec((cfg.num_b, cfg.r), "kaiming"),
                "lora_B": ParamSpec((cfg.num_b, cfg.r, d_out), "zeros")}

    @staticmethod
    def group_setup(model, adapters, cfg, loaded):
        for layers in layer_groups(model, adapters).values():
            for i, a in enumerate(layers):
                _tie(a, "lora_B", layers[0], loaded)
                _tie(a, "lora_A", layers[i - i % cfg.stride_a], loaded)

    @staticmethod
    def added_macs(d_in, d_out, cfg):
        routed = cfg.r * d_in + cfg.num_b * cfg.r + d_out  # x Aᵀ, the router, · scaling
        if cfg.mixing == "batch":
            return routed + cfg.r * d_out  # h · B_mix (mixing the experts is per call)
        return routed + cfg.num_b * cfg.r + cfg.num_b * cfg.r * d_out  # p ⊗ h, · [B_1; ..; B_n]

    @staticmethod
    def forward(a, x, y):
        h = F.linear(x, a.lora_A)
        # Routing runs in the stored precision (fp32): the router learns from how the experts differ, and right
        # after B = 0 they differ by far less than bf16 resolves, so in bf16 its gradient would round to zero.
        router = a.master.lora_router
        p = F.softmax(F.linear(h.to(router.dtype), router), dim=-1)
        if a.cfg.mixing == "batch":
            w = p.reshape(-1, p.shape[-1]).mean(dim=0)
            delta = h @ torch.einsum("e,eio->io", w, a.master.lora_B).to(h.dtype)
        else:  # Σ_e p_e (h B_e) as one matmul over the stacked experts: (..., num_b·r) @ (num_b·r, d_out)
            delta = (p.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2).to(h.dtype) @ a.lora_B.flatten(0, 1)
        return y + delta * a.cfg.scaling
