"""How the invariant matrix (tests/test_invariants.py) exercises each method: one `Case` per registered name.

A method without an entry in CASES gets `default_case`: its config with r=4 (if it has a rank), lr 1e-2, and
GSM8K calibration batches if it requires them. So a new method is in the matrix as soon as it is registered;
an entry here is needed only when those defaults do not suit it, e.g.
    "road": Case(lambda kind: ll.RoadConfig(group_size=road_group_size(kind)), lr=3e-2),

Model kinds are "qwen" (tiny Qwen3 from a config, attention_bias=True, dims 64/32/128) and "stories" (the real
pretrained stories260K Llama, dims 64/32/172, tied embeddings). Config factories take the kind so that shape
knobs (RoAd's group_size) divide every target's dims on both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

import lora_lite as ll
from conftest import gsm8k_rows, stories_tokenizer


@dataclass(frozen=True)
class Case:
    """config     model kind -> the method's config under test (small r so every layer admits it).
    lr, optimizer what makes the loss drop within test_invariants.TRAIN_STEPS steps on a fixed GSM8K batch.
    reload_atol   max |logits| difference after save -> load onto a fresh model (0.0 means bit-exact).
    trained_state frozen tensors that training advances, and the value they have once trained (SingLoRA's step
                  counter): tests/deploy_cases.perturb sets them along with the noise it adds to trainable ones."""

    config: Callable[[str], ll.AdapterConfig]
    lr: float = 1e-2
    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW
    reload_atol: float = 0.0
    trained_state: dict[str, float] = dataclasses.field(default_factory=dict)


def road_group_size(kind: str) -> int:
    # gcd of every target's d_out: qwen 64/32/128 -> 32, stories 64/32/172 -> 4
    return 8 if kind == "qwen" else 4


EXPLICIT: dict[str, Case] = {
    "lora": Case(lambda kind: ll.LoRAConfig(r=4, alpha=8)),
    "pissa": Case(lambda kind: ll.PiSSAConfig(r=4, alpha=8)),
    "dora": Case(lambda kind: ll.DoRAConfig(r=4, alpha=8)),
    "delora": Case(lambda kind: ll.DeLoRAConfig(r=4, lambda0=1.0), lr=3e-2),
    "ia3": Case(lambda kind: ll.IA3Config(), lr=0.1),
    "ia3_ff": Case(lambda kind: ll.IA3FFConfig(), lr=0.3),
    "road": Case(lambda kind: ll.RoadConfig(group_size=road_group_size(kind)), lr=3e-2),
    "eva": Case(lambda kind: ll.EVAConfig(r=4, alpha=8)),
    "lora_xs": Case(lambda kind: ll.LoRAXSConfig(r=8)),
    "antipasto": Case(lambda kind: ll.AntiPaSTOConfig(r=8)),
    "antipasto_gain": Case(lambda kind: ll.AntiPaSTOGainConfig(r=8), lr=3e-2),
    # the strengths start at 0 and c only gets a gradient once they move, so they need a large first step
    "antipasto_ablate": Case(lambda kind: ll.AntiPaSTOAblateConfig(r=8), lr=0.3),
    "antipasto_corda": Case(lambda kind: ll.AntiPaSTOCorDAConfig(r=8), lr=3e-2),
    "antipasto_asvd": Case(lambda kind: ll.AntiPaSTOASVDConfig(r=8), lr=3e-2),
    "antipasto_dplr": Case(lambda kind: ll.AntiPaSTODPLRConfig(r=8)),
    # methods-2: Lily .. BOFT
    # A shared by both layers, B by each group. SGD: Adam would give every expert the same first step (it is
    # scale-invariant and their gradients differ only by the mixture weight), so the router has no gradient
    "lily": Case(lambda kind: ll.LilyConfig(r=4, stride_a=2), lr=0.2, optimizer=torch.optim.SGD),
    "hira": Case(lambda kind: ll.HiRAConfig(r=4), lr=0.1),  # ΔW = W ⊙ BA is as small as W's entries
    "gralora": Case(lambda kind: ll.GraLoRAConfig(r=4, alpha=8, k=2)),  # s = 2, as the lora case
    "abba": Case(lambda kind: ll.ABBAConfig(r=2, alpha=2.0)),
    # a short ramp so the loss moves within the matrix's steps; trained means past the ramp (u = 1)
    "singlora": Case(lambda kind: ll.SingLoRAConfig(r=4, alpha=8, ramp_steps=2), trained_state={"lora_step": 2.0}),
    "loha": Case(lambda kind: ll.LoHaConfig(r=4, alpha=8)),
    "lokr": Case(lambda kind: ll.LoKrConfig(r=4, alpha=8)),
    "oft": Case(lambda kind: ll.OFTConfig(block_size=road_group_size(kind))),  # divides every d_in too
    # two butterfly factors: b·2 must divide every d_in (stories' down_proj reads 172 = 4·43)
    "boft": Case(lambda kind: ll.BOFTConfig(block_size=4 if kind == "qwen" else 2, butterfly_factor=2)),
    # methods-1 (issue 15, first half). Their factors start large (OLoRA: R's rows, at W's scale; LoRA-GA:
    # orthonormal vectors), so the matrix's perturbation moves s·B A far; s = 1 keeps it trained-sized
    "olora": Case(lambda kind: ll.OLoRAConfig(r=4, alpha=4)),
    "lora_ga": Case(lambda kind: ll.LoRAGAConfig(r=4, alpha=4)),
}


def default_case(name: str) -> Case:
    cls = ll.REGISTRY[name].config
    small = {"r": 4} if "r" in {f.name for f in dataclasses.fields(cls)} else {}
    return Case(lambda kind: cls(**small))


CASES: dict[str, Case] = {name: EXPLICIT.get(name) or default_case(name) for name in sorted(ll.REGISTRY)}


def needs_calibration(name: str) -> bool:
    return getattr(ll.REGISTRY[name], "requires_calibration", False)


def attach_case(model: nn.Module, name: str, kind: str, adapter: str = "default", cfg=None) -> None:
    """Attach method `name` as the matrix configures it (with calibration batches when it needs them)."""
    calib = gsm8k_batches(model) if needs_calibration(name) else None
    ll.attach(model, cfg or CASES[name].config(kind), name=adapter, calibration_data=calib)


def gsm8k_batches(model: nn.Module, n_batches: int = 2, batch_size: int = 4, max_length: int = 40,
                  split: str = "train") -> list[dict[str, torch.Tensor]]:
    """GSM8K questions through the stories260K tokenizer, left-padded: [{input_ids, attention_mask, labels}, ...]
    (labels = input_ids with -100 on padding, so gradient-based inits get the model's next-token loss).

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
        ids, mask = enc["input_ids"] % vocab, enc["attention_mask"]
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches
