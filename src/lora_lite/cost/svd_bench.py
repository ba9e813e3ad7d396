"""Full vs randomized top-r SVD on one square layer: the init cost of PiSSA and the other SVD-based variants.

The test matrix has a decaying spectrum (a rank-4r product with 1/k column scales, plus a little noise), like a
trained weight and unlike a Gaussian one, so the error of the lowrank top-r singular values means something.
"""

from __future__ import annotations

import time

import torch

from ..svd import top_r_svd


def decaying_matrix(size: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    left = torch.randn(size, 4 * rank, generator=g) / torch.arange(1, 4 * rank + 1, dtype=torch.float32)
    return left @ torch.randn(4 * rank, size, generator=g) / size**0.5 + 1e-3 * torch.randn(size, size, generator=g)


def svd_init_times(size: int, r: int, niter: int, seed: int = 0) -> dict[str, float]:
    """Wall ms of top_r_svd(method="full") and ("lowrank", niter) on one size×size fp32 matrix."""
    W = decaying_matrix(size, r, seed)
    out = {}
    for method in ("full", "lowrank"):
        t0 = time.perf_counter()
        _, S, _ = top_r_svd(W, r, method, niter)
        out[f"{method}_ms"] = (time.perf_counter() - t0) * 1e3
        out[f"{method}_S"] = S
    out["speedup"] = out["full_ms"] / out["lowrank_ms"]
    out["top_r_rel_err"] = float(((out.pop("lowrank_S") - out["full_S"]).abs() / out.pop("full_S")).max())
    return out
