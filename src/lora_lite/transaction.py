"""What attach() may change on a model, recorded so a failed attach can put every bit of it back.

attach rolls back its own work through runtime._rollback (tensors, hooks, weights rewritten by base_delta).
This snapshot catches the rest, including what a variant's init or group_init did on its own before raising:
hooks it registered (forward, pre, backward, state-dict), attributes, parameters, buffers and submodules it
added, train/eval flags and requires_grad flags. It records names and flags only, never tensor data, so
taking it costs a walk over the modules. Weights are covered by the variant contract: only base_delta
rewrites W, and the runtime snapshots W for that.
"""

from __future__ import annotations

from torch import nn

_CONTAINERS = ("_parameters", "_buffers", "_modules")


class ModelSnapshot:
    def __init__(self, model: nn.Module):
        self.modules = [(m, _keys(m), m.training) for m in model.modules()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        """Remove everything added since the snapshot and reset the flags. Never touches tensor data."""
        for module, keys, training in self.modules:
            for dict_name, before in keys.items():
                container = module.__dict__.get(dict_name)
                if isinstance(container, dict):
                    for key in [k for k in container if k not in before]:
                        del container[key]
            for attr in [a for a in module.__dict__ if a not in keys["__dict__"]]:
                delattr(module, attr)
            module._non_persistent_buffers_set &= set(module._buffers)
            module.training = training
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)


def _keys(module: nn.Module) -> dict[str, set]:
    """Key sets of the module's attribute dict, its parameter/buffer/submodule dicts and every hook dict."""
    keys = {"__dict__": set(module.__dict__)}
    for name, value in module.__dict__.items():
        if isinstance(value, dict) and (name in _CONTAINERS or "hook" in name):
            keys[name] = set(value)
    return keys
