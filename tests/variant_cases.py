"""How the invariant matrix (tests/test_invariants.py) exercises each variant: one `Case` per registered name.

Adding a variant to the matrix is one entry in CASES, e.g. for a data-driven init:
    "eva": Case(lambda kind: ll.EVAConfig(r=4), lr=1e-2, identity_tol=EXACT,
                calibration=lambda model: gsm8k_batches(model), grad_from_step1=("lora_A",)), `test_every_registered_variant_has_a_case` fails when a
variant in lora_lite.REGISTRY has none, so nothing escapes the matrix.

Model kinds are "qwen" (tiny Qwen3 from a config, attention_bias=True, dims 64/32/128) and "stories" (the real
pretrained stories260K Llama, dims 64/32/172, tied embeddings). Config factories take the kind so that shape
knobs (RoAd's group_size) divide every target's dims on both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lora_lite as ll
from conftest import gsm8k_rows, stories_tokenizer


@dataclass(frozen=True)
class Case:
    """config          model kind -> the variant config under test (small r so every layer admits it).
    lr, optimizer   what makes the loss drop within test_invariants.TRAIN_STEPS steps on a fixed GSM8K batch.
    identity_tol    max |logits − base logits| / max(1, max |base logits|) right after attach, per model dtype.
    calibration     model -> calibration batches, for variants that initialise from data; None otherwise.
    grad_from_step1 trainable tensors whose gradient is exactly zero at step 0 because a partner starts at
                    zero (A while B = 0); they must get one at step 1. Every other trainable tensor must have a
                    nonzero gradient at step 0.
    reload_atol     max |logits| difference after save -> load onto a fresh model (0.0 means bit-exact).
    """

    config: Callable[[str], ll.AdapterConfig]
    lr: float
    identity_tol: dict[torch.dtype, float]
    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW
    calibration: Callable[[nn.Module], list[dict[str, torch.Tensor]]] | None = None
    grad_from_step1: tuple[str, ...] = ()
    reload_atol: float = 0.0


EXACT = {torch.float32: 0.0, torch.bfloat16: 0.0}


def road_group_size(kind: str) -> int:
    # gcd of every target's d_out: qwen 64/32/128 -> 32, stories 64/32/172 -> 4
    return 8 if kind == "qwen" else 4


CASES: dict[str, Case] = {
    "lora": Case(lambda kind: ll.LoRAConfig(r=4, alpha=8), lr=1e-2, identity_tol=EXACT,
                 grad_from_step1=("lora_A",)),
    # W_res = W − s·B0A0 is rounded once to W's dtype: ~1e-6 of the logit scale in fp32, a few bf16 ulps in bf16
    "pissa": Case(lambda kind: ll.PiSSAConfig(r=4, alpha=8), lr=1e-2,
                  identity_tol={torch.float32: 1e-5, torch.bfloat16: 0.05}),
    "dora": Case(lambda kind: ll.DoRAConfig(r=4, alpha=8), lr=1e-2,
                 identity_tol={torch.float32: 1e-6, torch.bfloat16: 0.0}, grad_from_step1=("lora_A",)),
    "delora": Case(lambda kind: ll.DeLoRAConfig(r=4, lambda0=1.0), lr=3e-2, identity_tol=EXACT,
                   grad_from_step1=("lora_A", "lora_lambda")),
    "ia3": Case(lambda kind: ll.IA3Config(), lr=0.1, identity_tol=EXACT),
    "ia3_ff": Case(lambda kind: ll.IA3FFConfig(), lr=0.3, identity_tol=EXACT),
    # the paired reflections cancel to fp32 rounding; in bf16 the rounded T makes them cancel exactly
    "hra": Case(lambda kind: ll.HRAConfig(r=4), lr=1e-2, identity_tol={torch.float32: 1e-5, torch.bfloat16: 0.0}),
    "road": Case(lambda kind: ll.RoadConfig(group_size=road_group_size(kind)), lr=3e-2, identity_tol=EXACT),
    # SVD basis and data-driven inits. W_res is rounded once to W's dtype (as pissa). antipasto's δs starts at
    # 4e-4 + N(0, 4e-4), antipasto_ablate's α at 0.05 and lora_xs's R at N(0, 1e-5): approximate identity by design.
    "eva": Case(lambda kind: ll.EVAConfig(r=4, alpha=8), lr=1e-2, identity_tol=EXACT,
                calibration=lambda model: gsm8k_batches(model), grad_from_step1=("lora_A",)),
    "lora_xs": Case(lambda kind: ll.LoRAXSConfig(r=8), lr=1e-2,
                    identity_tol={torch.float32: 1e-3, torch.bfloat16: 0.05}),
    "antipasto": Case(lambda kind: ll.AntiPaSTOConfig(r=8), lr=1e-2,
                      identity_tol={torch.float32: 1e-2, torch.bfloat16: 0.05}),
    "antipasto_gain": Case(lambda kind: ll.AntiPaSTOGainConfig(r=8), lr=3e-2,
                           identity_tol={torch.float32: 1e-5, torch.bfloat16: 0.05}),
    # α = sigmoid(a) moves slowly from 0.05 (sigmoid' ≈ 0.05), so the strength logits need a large step
    "antipasto_ablate": Case(lambda kind: ll.AntiPaSTOAblateConfig(r=8), lr=1.0,
                             identity_tol={torch.float32: 0.1, torch.bfloat16: 0.1}),
    "antipasto_corda": Case(lambda kind: ll.AntiPaSTOCorDAConfig(r=8), lr=3e-2,
                            identity_tol={torch.float32: 1e-5, torch.bfloat16: 0.05},
                            calibration=lambda model: gsm8k_batches(model)),
    "antipasto_asvd": Case(lambda kind: ll.AntiPaSTOASVDConfig(r=8), lr=3e-2,
                           identity_tol={torch.float32: 1e-5, torch.bfloat16: 0.05},
                           calibration=lambda model: gsm8k_batches(model)),
    "antipasto_dplr": Case(lambda kind: ll.AntiPaSTODPLRConfig(r=8), lr=1e-2,
                           identity_tol={torch.float32: 1e-5, torch.bfloat16: 0.05}, grad_from_step1=("lora_A",)),
}


def gsm8k_batches(model: nn.Module, n_batches: int = 2, batch_size: int = 4, max_length: int = 40,
                  split: str = "train") -> list[dict[str, torch.Tensor]]:
    """GSM8K questions through the stories260K tokenizer, left-padded: [{input_ids, attention_mask}, ...].

    Rows are taken in file order, so the batches are the same on every run. The tiny Qwen's vocabulary (128) is
    smaller than the tokenizer's (512): its ids are folded modulo the vocabulary, which keeps real text's
    token statistics without an out-of-range embedding lookup.
    """
    tok = stories_tokenizer()
    rows = gsm8k_rows(split, n_batches * batch_size)
    vocab = model.config.vocab_size
    batches = []
    for i in range(n_batches):
        text = [r["question"] for r in rows[i * batch_size:(i + 1) * batch_size]]
        enc = tok(text, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        batches.append({"input_ids": enc["input_ids"] % vocab, "attention_mask": enc["attention_mask"]})
    return batches
