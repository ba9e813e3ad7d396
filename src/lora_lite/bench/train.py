"""The training loop: AdamW (wd 0.1), grad clip 1.0, cosine schedule, checkpoints, resume, Ctrl-C, NaN guard.

Checkpoints live in `run_dir/checkpoint/step-XXXXXX/` (adapter.safetensors via lora_lite.save, optimizer
moments in optimizer.safetensors, step/losses/RNG in state.json). `checkpoint/latest.json` names the newest
one and is replaced atomically after that folder is complete, so a crash at any moment leaves a consistent
checkpoint. A rerun with the same run_dir loads it and continues; micro-batches are fixed up front and the
lr is a pure function of the step, so a resumed run ends with the same adapter as an uninterrupted one.
state.json holds the run's settings key: a checkpoint is resumed only by the settings that wrote it. Ctrl-C
and SIGTERM (what SLURM and `docker stop` send) both stop at the next step boundary and write a checkpoint.
Every file of a checkpoint is checked on resume; a damaged one is a CheckpointError that names the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

import lora_lite as ll

from .. import distributed as lld
from ..errors import CheckpointError, LoraLiteError
from ..io import atomic_write_bytes


class DivergedError(LoraLiteError, FloatingPointError):
    """The training loss (or gradient norm) became NaN or inf."""


class Interrupted(LoraLiteError, KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training at a step boundary, after writing a checkpoint."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def cosine_factor(step: int, total: int, warmup: int = 0) -> float:
    """0.5 (1 + cos(pi min(step, total) / total)), after an optional linear warmup (the protocol uses none)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


class StopFlag:
    """Set by the SIGINT / SIGTERM handler (or a test); the loop checks it between optimizer steps."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.is_set = False
        self.signum: int = signal.SIGINT

    def set(self, signum: int = signal.SIGINT) -> None:
        self.is_set, self.signum = True, signum

    def install(self) -> dict:
        """Handle Ctrl-C and SIGTERM; returns the previous handlers for `restore`."""
        def handler(signum, frame):
            if self.is_set:  # a second signal stops at once
                raise KeyboardInterrupt
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: finishing this step and writing a checkpoint (again to abort at once)", flush=True)
            self.set(signum)
        return {s: signal.signal(s, handler) for s in self.SIGNALS}

    @staticmethod
    def restore(previous: dict) -> None:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class TrainSettings:
    steps: int
    lr: float
    grad_accum: int = 1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # 0: only on Ctrl-C / SIGTERM


def trainable_named(model) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise LoraLiteError("no trainable parameters after attach; the variant trains nothing on these targets")
    leaked = [n for n, _ in named if "lora_" not in n.rsplit(".", 1)[-1]]
    if leaked:
        raise LoraLiteError(f"base parameters are trainable after attach: {leaked[:5]}; attach must freeze the base")
    return named


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{what} {path} is unreadable ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a {type(data).__name__}, not a JSON object; {fix}")
    return data


def _restart_fix(run_dir: Path) -> str:
    return f"delete {Path(run_dir) / 'checkpoint'} to restart this run from step 0"


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoint" / "latest.json"
    if not pointer.is_file():
        return None
    fix = _restart_fix(run_dir)
    name = _read_json(pointer, "checkpoint pointer", fix).get("dir")
    if not isinstance(name, str) or "/" in name or not (pointer.parent / name).is_dir():
        raise CheckpointError(f"checkpoint pointer {pointer} names {name!r}, which is not a checkpoint folder "
                              f"beside it; {fix}")
    return pointer.parent / name


def read_state(ckpt: Path, run_dir: Path, settings_key: str | None, steps: int | None = None) -> dict:
    """state.json of a checkpoint, checked: a step in range, one loss per step, the RNG state, our settings."""
    fix = _restart_fix(run_dir)
    state = _read_json(ckpt / "state.json", "checkpoint state", fix)
    step, losses, rng = state.get("step"), state.get("losses"), state.get("torch_rng")
    if not (isinstance(step, int) and step >= 1 and (steps is None or step < steps)):
        raise CheckpointError(f"checkpoint state {ckpt / 'state.json'} has step {step!r}, not a step between 1 and "
                              f"the run's {steps} steps; {fix}")
    if not (isinstance(losses, list) and len(losses) == step and all(isinstance(v, (int, float)) for v in losses)):
        raise CheckpointError(f"checkpoint state {ckpt / 'state.json'} must hold one loss per step ({step}); {fix}")
    if not (isinstance(rng, list) and rng and all(isinstance(v, int) and 0 <= v < 256 for v in rng)):
        raise CheckpointError(f"checkpoint state {ckpt / 'state.json'} has no valid torch RNG state; {fix}")
    if settings_key is not None and state.get("settings_key") != settings_key:
        raise CheckpointError(f"checkpoint {ckpt} was written by other settings (key {state.get('settings_key')!r}, "
                              f"this run's is {settings_key!r}); {fix}")
    return state


def attach_or_resume(model, cfg, run_dir: Path, calibration_data, log=print, settings_key: str | None = None,
                     steps: int | None = None) -> int:
    """Attach a fresh adapter (step 0), or load the latest checkpoint in run_dir; returns the start step."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        ll.attach(model, cfg, calibration_data=calibration_data)  # the same calibration batches on every rank
        lld.broadcast_adapter(model)  # ...and rank 0's result, bit for bit, under torchrun / accelerate
        if lld.is_main_process():
            ll.save(model, Path(run_dir) / "adapter_init.safetensors")
        return 0
    step = read_state(ckpt, run_dir, settings_key, steps)["step"]
    ll.load(model, ckpt / "adapter.safetensors")
    log(f"resuming from {ckpt} (step {step})")
    return step


def save_checkpoint(model, opt, run_dir: Path, step: int, losses: list[float], settings_key: str | None) -> Path:
    root = Path(run_dir) / "checkpoint"
    ckpt = root / f"step-{step:06d}"
    ll.save(model, ckpt / "adapter.safetensors")
    state = opt.state_dict()["state"]
    moments = {f"{i}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
               for i, s in state.items() for k, v in s.items()}
    atomic_write_bytes(ckpt / "optimizer.safetensors", safetensors_bytes(moments))
    meta = {"step": step, "losses": losses, "torch_rng": torch.get_rng_state().tolist(), "settings_key": settings_key}
    atomic_write_bytes(ckpt / "state.json", json.dumps(meta).encode())
    atomic_write_bytes(root / "latest.json", json.dumps({"dir": ckpt.name, "step": step}).encode())
    for old in root.glob("step-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt


_MOMENTS = ("exp_avg", "exp_avg_sq", "step")


def _restore(opt, ckpt: Path, run_dir: Path, settings_key: str | None, steps: int) -> list[float]:
    """The optimizer moments and RNG of a checkpoint; every parameter needs its AdamW state, with its shape."""
    from safetensors import SafetensorError

    fix = _restart_fix(run_dir)
    path = ckpt / "optimizer.safetensors"
    try:
        moments = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"optimizer state {path} is unreadable ({e}); {fix}") from None
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict] = {}
    for i, p in enumerate(params):
        got = {k: moments.get(f"{i}.{k}") for k in _MOMENTS}
        missing = [k for k, v in got.items() if v is None]
        if missing or got["exp_avg"].shape != p.shape or got["exp_avg_sq"].shape != p.shape:
            have = len({key.split(".", 1)[0] for key in moments})
            raise CheckpointError(f"optimizer state {path} does not fit this run's {len(params)} adapter tensors "
                                  f"(it holds moments for {have}; tensor {i} lacks {missing or 'its shape'}); {fix}")
        state[i] = {k: v.to(p.device) if k != "step" else v for k, v in got.items()}
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    meta = read_state(ckpt, run_dir, settings_key, steps)
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta["losses"]


def train(model, batches: list[dict], s: TrainSettings, run_dir: Path, start_step: int = 0,
          stop: StopFlag | None = None, on_step=None, label: str = "train", settings_key: str | None = None) -> dict:
    """Run optimizer steps start_step..s.steps over `batches` (s.steps * s.grad_accum micro-batches)."""
    from tqdm.auto import tqdm

    if len(batches) < s.steps * s.grad_accum:
        raise LoraLiteError(f"{len(batches)} micro-batches for {s.steps} steps x grad_accum {s.grad_accum}")
    named = trainable_named(model)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    losses: list[float] = []
    ckpt = latest_checkpoint(run_dir)
    if start_step:
        losses = _restore(opt, ckpt, run_dir, settings_key, s.steps)
    device = params[0].device
    stop = stop or StopFlag()
    first_grad_norm, start = None, time.perf_counter()
    model.train()
    # Several processes: DDP averages the gradients; every rank takes its shard of each micro-batch.
    forward = lld.wrap_ddp(model)
    bar = tqdm(range(start_step, s.steps), initial=start_step, total=s.steps, desc=label, unit="step",
               mininterval=2.0, disable=not lld.is_main_process())
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = s.lr * cosine_factor(step, s.steps)
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        micro = batches[step * s.grad_accum:(step + 1) * s.grad_accum]
        for i, b in enumerate(micro):
            b = {k: v.to(device) for k, v in lld.shard_batch(b).items()}
            loss = lld.global_token_mean(forward(**b).loss, (b["labels"][:, 1:] != -100).sum())
            loss_value = lld.mean_over_ranks(loss)  # the whole micro-batch's loss; NaN on any rank reaches all
            if not math.isfinite(loss_value):
                _diverged(run_dir, step, f"loss is {loss_value}", s.lr)
            # DDP all-reduces once per optimizer step, on the last micro-batch's backward.
            sync = contextlib.nullcontext() if forward is model or i == len(micro) - 1 else forward.no_sync()
            with sync:
                (loss / s.grad_accum).backward()
            step_loss += loss_value / s.grad_accum
        grad_norm = sum(p.grad.norm().item() for p in params if p.grad is not None)
        if not first_grad_norm and step < start_step + 2:  # within two steps, as the invariant matrix asks:
            first_grad_norm = grad_norm                      # SingLoRA's ramp gives A no gradient at step 0
        total = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        if not torch.isfinite(total):
            _diverged(run_dir, step, f"gradient norm is {total.item()}", s.lr)
        opt.step()
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", refresh=False)
        done = step + 1
        if on_step is not None:
            on_step(done, stop)
        if s.checkpoint_every and done % s.checkpoint_every == 0 and done < s.steps and lld.is_main_process():
            save_checkpoint(model, opt, run_dir, done, losses, settings_key)
        if lld.mean_over_ranks(float(stop.is_set)) > 0 and done < s.steps:  # every rank stops at the same step
            if lld.is_main_process():
                save_checkpoint(model, opt, run_dir, done, losses, settings_key)
            lld.barrier()
            bar.close()
            path = latest_checkpoint(run_dir)
            raise Interrupted(f"stopped at step {done}/{s.steps}; checkpoint {path}. Rerun the same command "
                              "(same output dir) to resume", stop.signum)
    bar.close()
    model.eval()
    leaks = sum(1 for n, p in model.named_parameters() if p.grad is not None and "lora_" not in n.rsplit(".", 1)[-1])
    return {"losses": losses, "first_grad_norm": first_grad_norm, "base_grad_leaks": leaks,
            "train_time_s": time.perf_counter() - start, "resumed_from_step": start_step}


def _diverged(run_dir, step, what, lr):
    ckpt = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {ckpt}" if ckpt else "no checkpoint was written before it"
    raise DivergedError(f"training diverged at step {step}: {what} (lr={lr:g}). Nothing was saved from this "
                        f"step; {kept}. Lower --lr, or use --lr-sweep to find a stable one")
