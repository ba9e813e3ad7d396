"""`--mode probe`: the prototype's quick real-model proof, per variant (seed_spec §5.5).

1. Train a few steps, then nudge the first entry of every trainable adapter tensor by +0.25 and require the
   logits to move (> 1e-7), then restore them: the adapter is wired into the forward. (After training, not
   before: SingLoRA's ramp keeps its adapter out of the forward at step 0 by design.)
2. Save, load into a fresh copy of the base, and require every saved tensor to come back bit-equal and the
   logits to match within --reload-tol.
"""

from __future__ import annotations

import copy
import json
import shutil

import torch

import lora_lite as ll

from ..errors import LoraLiteError
from ..io import atomic_write_bytes
from .train import TrainSettings, attach_or_resume, train, trainable_named


def perturb_effect(model, batch) -> tuple[str, float]:
    """Nudge the first entry of every trainable tensor (one alone may sit behind a partner that starts at zero)."""
    params = [p for _, p in trainable_named(model)]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        before = model(**batch).logits.float()
        for p in params:
            p.view(-1)[0] += 0.25
        after = model(**batch).logits.float()
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)
    return f"the first entry of all {len(params)} trainable tensors", (after - before).abs().max().item()


def probe_one(bench, vs, stop, reload_tol: float, label: str) -> dict:
    run_dir = bench.opt.output_dir / f"probe__{bench.run_id(vs, 0)}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a probe always starts fresh
    batches, _ = bench.train_batches(0)
    variant = ll.REGISTRY[vs.cfg.variant]
    data_driven = getattr(variant, "requires_calibration", False) or hasattr(variant, "group_init")
    # labels too: gradient-based inits (lora_ga, lora_one) start from the training loss's gradient
    calibration = ([{k: b[k].to(bench.opt.device) for k in ("input_ids", "attention_mask", "labels")}
                    for b in batches[:4]] if data_driven else None)
    model = copy.deepcopy(bench.model)
    torch.manual_seed(0)
    attach_or_resume(model, vs.cfg, run_dir, calibration)
    inputs = {k: batches[0][k].to(bench.opt.device) for k in ("input_ids", "attention_mask", "position_ids")}
    stats = train(model, batches, TrainSettings(steps=bench.p.steps, lr=vs.lr, grad_accum=bench.p.grad_accum),
                  run_dir, stop=stop, label=f"{label}: train")
    model.eval()
    name, moved = perturb_effect(model, inputs)
    if not moved > 1e-7:
        raise LoraLiteError(f"probe {vs.cfg.variant}: nudging {name} by 0.25 moved the logits by {moved:g}; the "
                            "adapter is not in the forward pass")
    path = ll.save(model, run_dir / "adapter.safetensors")
    with torch.no_grad():
        trained = model(**inputs).logits.float()
    fresh = copy.deepcopy(bench.model)
    ll.load(fresh, path)
    (_, _, saved, _), = ll.io.read_adapter_file(path).values()
    reloaded_layers = ll.runtime.adapter_layers(fresh)
    mismatched = [k for k, t in saved.items()
                  if not torch.equal(getattr(reloaded_layers[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]).cpu(), t)]
    if mismatched:
        raise LoraLiteError(f"probe {vs.cfg.variant}: reloaded tensors differ from the file: {mismatched[:5]}")
    with torch.no_grad():
        reloaded = fresh(**inputs).logits.float()
    drift = (reloaded - trained).abs().max().item()
    if not drift < reload_tol:
        raise LoraLiteError(f"probe {vs.cfg.variant}: reloaded logits differ by {drift:g} > reload_tol {reload_tol}")
    result = {"variant": vs.cfg.variant, "perturbed": name, "perturb_logit_delta": moved, "saved_tensors": len(saved),
              "reload_max_logit_diff": drift, "losses": stats["losses"], "status": "ok"}
    atomic_write_bytes(run_dir / "result.json", json.dumps(result, indent=1).encode())
    return result


def run_probes(bench, methods, stop, reload_tol: float) -> int:
    for k, method in enumerate(methods, 1):
        label = f"[{k}/{len(methods)}] probe {method.variant}"
        r = probe_one(bench, method.settings, stop, reload_tol, label)
        print(f"{label}: perturb {r['perturbed']} moved logits {r['perturb_logit_delta']:.3g}; "
              f"{r['saved_tensors']} tensors reloaded bit-equal; reload |Δlogit| {r['reload_max_logit_diff']:.2g}; "
              f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", flush=True)
    return 0
