"""Hand-built models for tests that need exact control over layer types: a structural linear-like layer that is
not an nn.Linear (as bitsandbytes layers are not), and a two-block toy with named projections."""

from __future__ import annotations

import torch
from torch import nn


class LinearLike(nn.Module):
    """Has in_features, out_features and weight, computes x Wᵀ + b, but is not an nn.Linear."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(0.1 * torch.randn(d_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class Block(nn.Module):
    def __init__(self, d: int, ff: int, linear: type[nn.Module]):
        super().__init__()
        self.q_proj, self.o_proj = linear(d, d), linear(d, d)
        self.up_proj, self.down_proj = linear(d, ff), linear(ff, d)

    def forward(self, x):
        x = x + self.o_proj(torch.tanh(self.q_proj(x)))
        return x + self.down_proj(torch.relu(self.up_proj(x)))


class ToyModel(nn.Module):
    """x (batch, tokens, d) -> (batch, tokens, d) through blocks named `layers.<i>.{q,o,up,down}_proj`."""

    def __init__(self, d: int = 16, ff: int = 32, n_layers: int = 2, linear: type[nn.Module] = LinearLike,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList(Block(d, ff, linear) for _ in range(n_layers))

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x
