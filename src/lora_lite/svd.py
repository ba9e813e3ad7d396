"""Top-r SVD of a weight, shared by every SVD-based variant (pissa, lora_xs, the antipasto family), and the
bottom-r one (milora).

method="full" runs torch.linalg.svd in fp32 and keeps the top r: exact, O(d_out·d_in·min(d)).
method="lowrank" runs torch.svd_lowrank(q=r + oversample, niter): a randomized range finder,
O(d_out·d_in·r·(niter+1)). It is seeded from the weight's shape so init is reproducible on one machine.
The default and its measured speed/accuracy trade-off are in docs/svd.md (scripts/svd_init_bench.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import RankConfig
from .errors import ConfigError
from .variant import check_rank

SVD_METHODS = ("full", "lowrank")
DEFAULT_SVD = "lowrank"
DEFAULT_NITER = 4


@dataclass
class SVDInitConfig(RankConfig):
    """Fields shared by configs whose init takes a top-r SVD of W.

    svd    "full" (exact) or "lowrank" (torch.svd_lowrank, faster on large layers; see docs/svd.md).
    niter  power iterations of "lowrank"; more is slower and closer to "full". Unused by "full".
    Variants check both with check_svd_options (or check_svd_init) in their `check`, before the model is touched.
    """

    svd: str = DEFAULT_SVD
    niter: int = DEFAULT_NITER


def check_svd_options(cfg) -> None:
    """For a variant's `check`: refuse a bad svd/niter before attach touches the model."""
    if cfg.svd not in SVD_METHODS:
        raise ConfigError(f"{cfg.variant}: svd={cfg.svd!r} is not one of {SVD_METHODS}")
    if cfg.niter < 0:
        raise ConfigError(f"{cfg.variant}: niter={cfg.niter} must be >= 0 (power iterations of svd='lowrank')")


def check_svd_init(d_in, d_out, cfg) -> None:
    """The `check` of a variant that keeps a top-r SVD of W: valid svd/niter and r <= min(d_in, d_out)."""
    check_svd_options(cfg)
    check_rank(d_in, d_out, cfg)


@torch.no_grad()
def top_r_svd(W: torch.Tensor, r: int, method: str = DEFAULT_SVD, niter: int = DEFAULT_NITER, oversample: int = 8):
    """Return U (d_out, r), S (r,), Vh (r, d_in) in fp32 with W ≈ U diag(S) Vh."""
    if method not in SVD_METHODS:
        raise ConfigError(f"svd={method!r} is not one of {SVD_METHODS}")
    W = W.detach().to(torch.float32)
    if method == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r].contiguous(), S[:r].contiguous(), Vh[:r].contiguous()
    q = min(r + oversample, *W.shape)
    with torch.random.fork_rng(devices=[W.device] if W.device.type == "cuda" else []):
        torch.manual_seed(W.shape[0] * 1_000_003 + W.shape[1])
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
    return U[:, :r].contiguous(), S[:r].contiguous(), V[:, :r].T.contiguous()


@torch.no_grad()
def bottom_r_svd(W: torch.Tensor, r: int):
    """The r smallest singular triplets of W, U (d_out, r), S (r,) (descending, the tail of the spectrum), Vh (r, d_in),
    in fp32. Always the exact SVD: a randomized range finder only finds the top of the spectrum."""
    U, S, Vh = torch.linalg.svd(W.detach().to(torch.float32), full_matrices=False)
    return U[:, -r:].contiguous(), S[-r:].contiguous(), Vh[-r:].contiguous()
