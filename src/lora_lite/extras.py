"""Modules trained whole (`modules_to_save`) and trainable embedding rows (`trainable_token_indices`).

Both belong to a named adapter (they are fields of its config), are saved in its file, restored by load, undone
by detach, switched with it by set_active / disabled, and exported to / imported from PEFT.

modules_to_save. A matched module (a classifier head, `score`, `lm_head`) trains in place: its own parameters
are unfrozen and the optimizer updates them, and a `SavedModule` in the module's `lora_saved` attribute (a dict
by adapter name, outside the module tree: a child module would be run by an nn.Sequential head) keeps a CPU copy
of the original values. Switching the adapter off stashes the trained values on the CPU and puts the
originals back; switching it on reverses that; detach puts the originals back bit for bit; merge keeps the
trained values. Nothing is copied per forward and the model's state-dict keys are unchanged. A module belongs to
one adapter at a time, and cannot also carry a weight-rewriting adapter.

trainable_token_indices. The input embedding's rows for those ids train: a `TokenRows` in the embedding's
`lora_tokens` holds `rows` (n_ids, dim), starting as the original rows (stored in fp32 unless cfg.dtype says
otherwise), and an output hook replaces the lookup of those ids by `rows` (times the layer's embed_scale, as
Gemma 3's scaled embedding applies it). When the output head's weight is the embedding's (tied), a second
TokenRows on the head shares `rows` and replaces those ids' logits by x·rowsᵀ (+ bias). Only the rows are
saved. Two adapters may train rows of one embedding if their ids are disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AttachStateError, CheckpointError, TargetError, UnsupportedLayerError
from .layer_kinds import embed_scale
from .target import INTERNAL, saved_module_names

SAVED, TOKENS = "lora_saved", "lora_tokens"
assert SAVED in INTERNAL and TOKENS in INTERNAL


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's parameters, without any lora-lite tensors hanging below it."""
    return {n: p for n, p in module.named_parameters() if not any(s in n.split(".") for s in INTERNAL)}


class SavedModule:
    """Records that adapter `name` trains `base` whole: the original values (CPU) and, while off, the trained ones.
    Holds no device tensors, so it lives outside the module tree (deepcopy and pickle still carry it)."""

    def __init__(self, name: str, module: nn.Module, order: int):
        self.name, self.order, self.active, self.base = name, order, True, module
        self.original = {n: p.detach().to("cpu", copy=True) for n, p in own_parameters(module).items()}
        self.stash: dict[str, torch.Tensor] | None = None

    def trained_values(self) -> dict[str, torch.Tensor]:
        if self.stash is not None:
            return dict(self.stash)
        return {n: p.detach().to("cpu", copy=True) for n, p in own_parameters(self.base).items()}

    def __repr__(self) -> str:
        return f"SavedModule(modules_to_save of {self.name!r}, active={self.active})"


class TokenRows(nn.Module):
    """Trainable rows of an embedding (`source` None) or, on a tied output head, the same rows read as logits."""

    def __init__(self, name: str, layer: nn.Module, ids: tuple[int, ...], order: int, dtype: torch.dtype,
                 source: TokenRows | None = None):
        super().__init__()
        self.name, self.order, self.active = name, order, True
        device = layer.weight.device
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        if source is None:
            lookup = torch.full((layer.weight.shape[0],), -1, dtype=torch.long, device=device)
            lookup[self.ids] = torch.arange(len(ids), device=device)
            self.register_buffer("lookup", lookup, persistent=False)
            self.rows = nn.Parameter(layer.weight.detach()[self.ids].to(dtype, copy=True))
        self.__dict__["source"] = source
        self.__dict__["base"] = layer

    @property
    def tied(self) -> bool:
        return self.source is not None

    def apply(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.tied:  # logits of the trained ids from the trained rows
            rows = self.source.rows.to(y.dtype)
            bias = getattr(self.base, "bias", None)
            cols = F.linear(x.to(y.dtype), rows, None if bias is None else bias[self.ids])
            return y.index_copy(-1, self.ids, cols)
        pos = self.lookup[x]
        new = self.rows.to(y.dtype)[pos.clamp_min(0)]
        scale = embed_scale(self.base)
        if scale is not None:
            new = new * scale.to(y.dtype)
        return torch.where((pos >= 0)[..., None], new, y)

    def extra_repr(self) -> str:
        what = "tied head of" if self.tied else "embedding rows of"
        return f"{what} {self.name!r}, {self.ids.numel()} ids, active={self.active}"


def _token_hook(layer, args, y):
    for t in layer.lora_tokens.values():
        if t.active:
            y = t.apply(args[0], y)
    return y


def _sync_token_hook(layer: nn.Module) -> None:
    needed = TOKENS in layer._modules
    present = [k for k, h in layer._forward_hooks.items() if h is _token_hook]
    if needed and not present:
        layer.register_forward_hook(_token_hook)
    elif not needed:
        for k in present:
            del layer._forward_hooks[k]


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class ExtrasPlan:
    """What an adapter trains besides its target layers: modules trained whole, and embedding rows."""

    saved: list[tuple[str, nn.Module]] = field(default_factory=list)
    embedding: tuple[str, nn.Module] | None = None
    tied_head: tuple[str, nn.Module] | None = None
    ids: tuple[int, ...] = ()

    def metadata(self) -> dict:
        """What the file records (exact module names: load never runs the config's regexes)."""
        out = {}
        if self.saved:
            out["modules_to_save"] = [n for n, _ in self.saved]
        if self.embedding is not None:
            out["token_rows"] = {"embedding": self.embedding[0],
                                 "tied_head": None if self.tied_head is None else self.tied_head[0]}
        return out


def plan(model: nn.Module, cfg, name: str, target_layers: list[nn.Module]) -> ExtrasPlan:
    """Resolve and check cfg.modules_to_save and cfg.trainable_token_indices. Touches nothing."""
    names = dict(model.named_modules())
    saved = [(n, names[n]) for n in saved_module_names(model, cfg)]
    embedding = tied = None
    if cfg.trainable_token_indices:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if not isinstance(emb, nn.Embedding):
            raise TargetError(f"trainable_token_indices needs the model's input embedding (get_input_embeddings()) to "
                              f"be an nn.Embedding; found {type(emb).__name__}")
        embedding = (_name_of(model, emb), emb)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(head, "weight", None) is emb.weight:
            tied = (_name_of(model, head), head)
    result = ExtrasPlan(saved, embedding, tied, tuple(cfg.trainable_token_indices))
    check(result, name, target_layers)
    return result


def plan_from_file(model: nn.Module, cfg, name: str, meta: dict, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   target_layers: list[nn.Module], path) -> ExtrasPlan:
    """The plan a file records, resolved by exact names and checked against its tensors' {key: (dtype, shape)}
    (from the header: no data read). Touches nothing."""

    def module(lname, what):
        try:
            m = model.get_submodule(lname)
        except AttributeError:
            m = None
        if m is None or m is model:
            raise CheckpointError(f"{str(path)!r} trains {what} {lname!r}, which this model does not have; load it "
                                  "onto the base model it was trained on")
        return m

    saved = [(n, module(n, "module")) for n in meta.get("modules_to_save", [])]
    rows = meta.get("token_rows")
    embedding = tied = None
    if rows is not None:
        embedding = (rows["embedding"], module(rows["embedding"], "embedding rows of"))
        if rows["tied_head"] is not None:
            tied = (rows["tied_head"], module(rows["tied_head"], "the tied head"))
        emb = embedding[1]
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied_here = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
        if not isinstance(emb, nn.Embedding) or (tied is not None) != tied_here or (tied and tied[1] is not head):
            raise CheckpointError(f"{str(path)!r} trains rows of {rows['embedding']!r} (tied head "
                                  f"{rows['tied_head']!r}), but in this model that is not an nn.Embedding whose "
                                  f"output head {'is' if tied_here else 'is not'} tied to it that way; load it onto "
                                  "the base model it was trained on")
    ids = tuple(cfg.trainable_token_indices)
    if (embedding is None) != (not ids):
        raise CheckpointError(f"{str(path)!r}: trainable_token_indices={ids} but token rows "
                              f"{'missing' if embedding is None else 'present'}; re-save the adapter")
    result = ExtrasPlan(saved, embedding, tied, ids)
    try:
        check(result, name, target_layers)
    except (TargetError, UnsupportedLayerError, AttachStateError) as e:
        raise CheckpointError(f"{str(path)!r} does not fit this model: {e}") from None
    expected = expected_tensors(result)
    missing, unexpected = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{str(path)!r}: adapter {name!r} has extra tensors that do not match its config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}; re-save it")
    for key, shape in expected.items():
        if tuple(specs[key][1]) != shape:
            raise CheckpointError(f"{key} has shape {tuple(specs[key][1])} in {str(path)!r} but this model "
                                  f"needs {shape}; the adapter was trained on a different base model")
    return result


def check(p: ExtrasPlan, name: str, target_layers: list[nn.Module]) -> None:
    targets = {id(m) for m in target_layers}
    for lname, m in p.saved:
        params = own_parameters(m)
        if not params:
            raise TargetError(f"modules_to_save: {lname!r} has no parameters to train")
        if any(not p_.dtype.is_floating_point or type(p_) not in (torch.Tensor, nn.Parameter) for p_ in params.values()):
            raise UnsupportedLayerError(f"modules_to_save: {lname!r} holds quantized weights; train a float copy "
                                        "(load the base unquantized)")
        if any(b.is_floating_point() for b in m.buffers()):
            raise UnsupportedLayerError(f"modules_to_save: {lname!r} has floating buffers (e.g. BatchNorm statistics), "
                                        "which training would change and detach could not restore; pick a module "
                                        "without them")
        owners = [s.name for s in _holders(m, SAVED)]
        if owners:
            raise AttachStateError(f"modules_to_save: {lname!r} is already trained whole by adapter {owners[0]!r}; "
                                   "a module belongs to one adapter at a time")
        for sub in m.modules():
            rewriting = [a.name for a in getattr(sub, "lora_adapters", {}).values() if hasattr(a.variant, "base_delta")]
            if rewriting:
                raise AttachStateError(f"modules_to_save: {lname!r} carries {rewriting[0]!r}, which rewrites its "
                                       "weight; detach it or leave the module out")
    if p.embedding is None:
        return
    lname, emb = p.embedding
    if any(i >= emb.num_embeddings for i in p.ids):
        raise TargetError(f"trainable_token_indices has ids up to {max(p.ids)} but {lname!r} has "
                          f"{emb.num_embeddings} rows; resize the embedding first (model.resize_token_embeddings)")
    if id(emb) in targets or any(id(emb) in {id(x) for x in m.modules()} for _, m in p.saved):
        raise TargetError(f"{lname!r} is adapted by this adapter already; train rows of it or adapt it, not both")
    for other in _holders(emb, TOKENS):
        overlap = sorted(set(other.ids.tolist()) & set(p.ids))
        if overlap:
            raise AttachStateError(f"adapter {other.name!r} already trains rows {overlap[:5]} of {lname!r}; give "
                                   f"{name!r} disjoint trainable_token_indices")


def expected_tensors(p: ExtrasPlan) -> dict[str, tuple[int, ...]]:
    """{`<module>.<SAVED>.<parameter>` or `<embedding>.<TOKENS>.rows`: shape} as keyed in files (without the name)."""
    out = {f"{lname}.{SAVED}.{n}": tuple(t.shape) for lname, m in p.saved for n, t in own_parameters(m).items()}
    if p.embedding is not None:
        lname, emb = p.embedding
        out[f"{lname}.{TOKENS}.rows"] = (len(p.ids), emb.embedding_dim)
    return out


def _holders(module: nn.Module, container: str) -> list:
    if container == SAVED:
        return list(module.__dict__.get(SAVED, {}).values())
    return list(module._modules[container].values()) if container in module._modules else []


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


# ---------------------------------------------------------------------------------------------- lifecycle


def _add(module: nn.Module, container: str, name: str, holder: nn.Module) -> None:
    if container not in module._modules:
        module.add_module(container, nn.ModuleDict())
    module._modules[container][name] = holder


@torch.no_grad()
def install(p: ExtrasPlan, name: str, order: int, dtype_of, tensors: dict[str, torch.Tensor] | None) -> list:
    """Add the plan's holders (inside attach/load's transaction); file values are written when `tensors` is given."""
    added = []
    for lname, m in p.saved:
        s = SavedModule(name, m, order)
        m.__dict__.setdefault(SAVED, {})[name] = s
        added.append(s)
        for n, param in own_parameters(m).items():
            if tensors is not None:
                param.copy_(tensors[f"{lname}.{SAVED}.{n}"])
            param.requires_grad_(True)
    if p.embedding is not None:
        lname, emb = p.embedding
        rows = TokenRows(name, emb, p.ids, order, dtype_of(emb))
        if tensors is not None:
            rows.rows.copy_(tensors[f"{lname}.{TOKENS}.rows"])
        _add(emb, TOKENS, name, rows)
        added.append(rows)
        _sync_token_hook(emb)
        if p.tied_head is not None:
            head = p.tied_head[1]
            tied = TokenRows(name, head, p.ids, order, dtype_of(head), source=rows)
            _add(head, TOKENS, name, tied)
            added.append(tied)
            _sync_token_hook(head)
    return added


def trained_parameters(e) -> list[nn.Parameter]:
    """The parameters a holder trains: a SavedModule's module's own, a TokenRows' rows (none for a tied head)."""
    if isinstance(e, SavedModule):
        return list(own_parameters(e.base).values())
    return [] if e.tied else [e.rows]


def iter_extras(model: nn.Module) -> list:
    out = []
    for m in model.modules():
        out += m.__dict__.get(SAVED, {}).values()
        if isinstance(m, TokenRows):
            out.append(m)
    return sorted(out, key=lambda e: e.order)


@torch.no_grad()
def set_activity(e, on: bool) -> None:
    if isinstance(e, SavedModule) and on != e.active:
        params = own_parameters(e.base)
        if on:
            for n, param in params.items():
                param.copy_(e.stash[n])
            e.stash = None
        else:
            e.stash = {n: param.detach().to("cpu", copy=True) for n, param in params.items()}
            for n, param in params.items():
                param.copy_(e.original[n])
    e.active = on


@torch.no_grad()
def remove(holders: list, keep_values: bool = False) -> None:
    """Take holders off their modules; a SavedModule puts the original values back unless `keep_values` (merge)."""
    for e in reversed(holders):
        module = e.base
        container = SAVED if isinstance(e, SavedModule) else TOKENS
        if isinstance(e, SavedModule):
            if keep_values:
                set_activity(e, True)
            elif e.active:
                for n, param in own_parameters(module).items():
                    param.copy_(e.original[n])
            for param in own_parameters(module).values():
                param.requires_grad_(False)
        if container == SAVED:
            holder = module.__dict__.get(SAVED, {})
            if holder.get(e.name) is e:
                del holder[e.name]
                if not holder:
                    del module.__dict__[SAVED]
            continue
        holder = module._modules.get(container)
        if holder is not None and holder._modules.get(e.name) is e:
            del holder[e.name]
            if not len(holder):
                del module._modules[container]
        _sync_token_hook(module)


def snapshot(holders: list) -> list:
    """What remove(holders) changes on their modules, for restore(): each module's lora_saved dict and lora_tokens
    container (with their entries) and its parameters' requires_grad flags. Values are not included: remove's
    writes go through set_activity, which the caller undoes."""
    out, seen = [], set()
    for e in holders:
        module = e.base
        if id(module) in seen:
            continue
        seen.add(id(module))
        saved, tokens = module.__dict__.get(SAVED), module._modules.get(TOKENS)
        out.append((module, None if saved is None else dict(saved), tokens,
                    None if tokens is None else list(tokens._modules.items()),
                    [(p, p.requires_grad) for p in own_parameters(module).values()]))
    return out


def restore(state: list) -> None:
    """Put back what snapshot() recorded (an interrupted merge)."""
    for module, saved, tokens, items, flags in state:
        if saved is None:
            module.__dict__.pop(SAVED, None)
        else:
            module.__dict__[SAVED] = saved
        if tokens is None:
            module._modules.pop(TOKENS, None)
        else:
            tokens._modules.clear()
            tokens._modules.update(items)
            module._modules[TOKENS] = tokens
        _sync_token_hook(module)
        for p, flag in flags:
            p.requires_grad_(flag)


def entry(model: nn.Module, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, CPU tensors keyed as in expected_tensors) of adapter `name`'s extras, for save."""
    names = {id(m): n for n, m in model.named_modules()}
    holders = [e for e in iter_extras(model) if e.name == name]
    saved = [e for e in holders if isinstance(e, SavedModule)]
    rows = [e for e in holders if isinstance(e, TokenRows) and not e.tied]
    tied = [e for e in holders if isinstance(e, TokenRows) and e.tied]
    p = ExtrasPlan([(names[id(s.base)], s.base) for s in saved],
                   (names[id(rows[0].base)], rows[0].base) if rows else None,
                   (names[id(tied[0].base)], tied[0].base) if tied else None,
                   tuple(rows[0].ids.tolist()) if rows else ())
    tensors = {f"{names[id(s.base)]}.{SAVED}.{n}": t.contiguous() for s in saved for n, t in s.trained_values().items()}
    for r in rows:
        tensors[f"{names[id(r.base)]}.{TOKENS}.rows"] = r.rows.detach().to("cpu").contiguous()
    return p.metadata(), tensors


def merge_tokens(rows: TokenRows) -> None:
    """Write trained rows into the embedding weight (the tied head reads the same weight)."""
    with torch.no_grad():
        W = rows.base.weight
        W[rows.ids] = rows.rows.detach().to(W.dtype)
