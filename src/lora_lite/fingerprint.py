"""Base fingerprints: a few fp32 statistics of a layer's weight, stored with adapters whose data derive from it.

Methods with `needs_dense_weight` (PiSSA's A0/B0, the SVD-basis family's U/S/Vh or P, LoRA-XS's basis, DoRA's
magnitudes) store values computed from W, so their file only means something on that W. save() records, per
adapted layer, the fingerprint of the layer's original weight (the true base, not a residual a method wrote):
    [rms, z_1, ..., z_4]    rms = ‖W‖_F / √(d_out·d_in),   z_k = u_kᵀ W v_k / rms
u_k (d_out,) and v_k (d_in,) are fixed ±1 probes scaled to unit length, built by integer hashing (identical on
every machine and torch version). For any W, z_k is O(1); two unrelated bases give z that differ by O(1).

load() recomputes it on the target model and refuses a layer whose rms differs by more than TOLERANCE
(relative) or any z by more than TOLERANCE. Rounding the same base to bf16 moves z by about 1e-3 (‖ε‖/‖W‖ ≈
2⁻⁹/√3; at most 5e-3 over every layer of stories260K), so the same weights in any float dtype pass; for a
different base of the same shape, z_new − z_old is about N(0, 2), so all four probes of one layer agree to
0.05 by chance with probability below 1e-6, and an adapter on several layers is refused if any one of them
differs. Cost: four matrix-vector products per layer and one fp32 copy of W when W is 16-bit.
"""

from __future__ import annotations

import math

import torch

N_PROBES = 4
SIZE = 1 + N_PROBES
TOLERANCE = 0.05


def _probes(n: int, device) -> torch.Tensor:
    """(n, N_PROBES) fp32 ±1/√n, from a 32-bit integer hash of (index, probe): deterministic everywhere."""
    mask = 0xFFFFFFFF
    i = torch.arange(n, dtype=torch.int64)[:, None]
    k = torch.arange(1, N_PROBES + 1, dtype=torch.int64)[None, :]
    x = (i * 0x9E3779B1 + k * 0x85EBCA77) & mask
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & mask
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & mask
    x = x ^ (x >> 16)
    signs = 1.0 - 2.0 * (x & 1).to(torch.float32)
    return (signs / math.sqrt(n)).to(device)


@torch.no_grad()
def of_weight(weight: torch.Tensor) -> list[float]:
    """[rms, z_1, ..., z_4] of a (d_out, d_in) weight, computed in fp32."""
    W = weight.detach().float()
    d_out, d_in = W.shape
    rms = float(torch.linalg.vector_norm(W)) / math.sqrt(d_out * d_in)
    projections = (_probes(d_out, W.device) * (W @ _probes(d_in, W.device))).sum(0)
    z = [0.0] * N_PROBES if rms == 0 else [float(p) / rms for p in projections]
    return [rms, *z]


def matches(stored: list[float], current: list[float]) -> bool:
    rms_ok = abs(current[0] - stored[0]) <= TOLERANCE * abs(stored[0])
    return rms_ok and all(abs(c - s) <= TOLERANCE for c, s in zip(current[1:], stored[1:], strict=True))


def describe(stored: list[float], current: list[float]) -> str:
    return (f"rms {current[0]:.4g} vs {stored[0]:.4g} stored, probes "
            f"{[round(c, 3) for c in current[1:]]} vs {[round(s, 3) for s in stored[1:]]}")
