"""LoRA on the expert parameters of a Qwen3-MoE: the floor, PEFT's `target_parameters`, and lora-lite's
expert path, timed in the same interleaved rounds as the step table.

transformers 5 stores a block's experts as two 3-D parameters, `mlp.experts.gate_up_proj` (E, 2·I, H) and
`mlp.experts.down_proj` (E, H, I), so no nn.Linear exists to hook. PEFT's `target_parameters` wraps them and
adds the per-expert ΔW = s·B_e A_e to the weight on every forward. lora-lite's `target_parameters` puts an
adapter with a leading expert dim on each parameter (lora_lite.experts) and runs x A_eᵀ B_eᵀ per expert beside
the frozen x W_eᵀ, never forming W + ΔW. Both sides get the same r and alpha on exactly these parameters.
"""

from __future__ import annotations

import copy

from torch import nn

from .measure import Step, interleaved_medians, peak_step_mb

EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
OURS, PEFT = "lora-lite LoRAConfig(target_parameters=experts)", "PEFT LoraConfig(target_parameters=experts)"


def lora_lite_experts_config(r: int, alpha: float | None):
    """lora-lite's LoRA on exactly the expert parameters: target_names matches no linear layer (the experts
    modules hold no nn.Linear), target_parameters names the 3-D parameters as PEFT's target_parameters does."""
    import re

    import lora_lite as ll

    kwargs = {} if alpha is None else {"alpha": alpha}
    return ll.LoRAConfig(r=r, target_names=(r"\.mlp\.experts$",),
                         target_parameters=tuple(re.escape(p) + "$" for p in EXPERT_PARAMETERS), **kwargs)


def peft_experts_model(base: nn.Module, r: int, alpha: float | None):
    import peft

    import lora_lite as ll

    alpha = ll.LoRAConfig(r=r).alpha if alpha is None else alpha  # the same scale as lora-lite's default
    pcfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=[],
                           target_parameters=list(EXPERT_PARAMETERS))
    return peft.get_peft_model(copy.deepcopy(base), pcfg)


def moe_rows(base: nn.Module, ids, args) -> list[dict]:
    """The floor, PEFT's target_parameters LoRA and lora-lite's expert LoRA, timed interleaved."""
    import lora_lite as ll

    from .measure import trainable_params

    ours = copy.deepcopy(base)
    ll.attach(ours, lora_lite_experts_config(args.r, args.alpha))
    steps = {"floor": Step(base, ids), PEFT: Step(peft_experts_model(base, args.r, args.alpha), ids),
             OURS: Step(ours, ids)}
    med = interleaved_medians({k: s.train for k, s in steps.items()}, args.iters, args.warmup, args.device,
                              args.clock)
    return [{"side": k, "trainable": trainable_params(s.model), "step": med[k], "ratio": med[k] / med["floor"],
             "peak_mb": peak_step_mb(s, args.device, args.mem_repeats) if args.mem else None}
            for k, s in steps.items()]


def render_moe(rows: list[dict], header: list[str]) -> str:
    lines = header + ["", "| side | trainable | step ms | step ÷ floor | peak MB |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "–" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        lines.append(f"| {r['side']} | {r['trainable']:,} | {r['step']:.1f} | **{r['ratio']:.2f}** | {peak} |")
    return "\n".join(lines)


def moe_table(base: nn.Module, shape, ids, args) -> str:
    """The markdown MoE table (the `lora-lite cost --table moe` report)."""
    import os

    from .measure import environment_line

    load_before = os.getloadavg()
    rows = moe_rows(base, ids, args)
    header = [
        f"LoRA on MoE experts: Qwen3-MoE from config, hidden {shape.hidden}, {shape.layers} layers, {shape.experts} "
        f"experts of width {shape.moe_intermediate} per block, {shape.top_k} active per token, {shape.heads}/"
        f"{shape.kv_heads} heads, vocab {shape.vocab}; batch {args.batch} × {args.seq} tokens; r={args.r} on "
        f"{' and '.join(EXPERT_PARAMETERS)} only. " + environment_line(args.threads, args.dtype, args.device, load_before),
        f"Medians of {args.iters} interleaved rounds after {args.warmup} warm-up rounds, {args.clock} clock. The floor "
        "is the same step with no adapter; peak MB as in the step table.",
    ]
    return render_moe(rows, header)
