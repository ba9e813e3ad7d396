"""Each method on each layer kind it declares (its registration's `layer_kinds`), on tiny models that have that kind:
GPT-2 (Conv1D), a ResNet (Conv2d), a Conv1d net, a Gemma 3 scaled embedding, Qwen3-MoE expert parameters.

For every (method, kind) pair the registry declares: identity at init, every trainable tensor gets a gradient,
save -> load is bit-identical, merge gives the hooked outputs, detach restores the base bit for bit. Where PEFT
has the same layer (LoRA, DoRA, IA3 on Conv1D, Conv1d/2d and embeddings), outputs match PEFT's on the same values.
Pairs the registry does not declare are refused with a message that names the method, the layer and its kinds.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_lite as ll
from families import BY_NAME, VOCAB
from lora_lite.runtime import adapter_layers
from lora_lite.variant import layer_kinds
from model_state import assert_unchanged, fingerprint

peft = pytest.importorskip("peft")
RTOL = 1e-5


class ConvNet(nn.Module):
    """Conv1d layers over (batch, channels, length), one with stride, padding and dilation."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 8, 3, stride=2, padding=2, dilation=2)
        self.eval()

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


def _gemma():
    """Gemma 3 (a scaled embedding) with an output head of its own: merging into a tied one is refused."""
    model = BY_NAME["gemma3"].build()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _batch(kind):
    g = torch.Generator().manual_seed(2)
    if kind == "conv1d_net":
        return {"x": torch.randn(2, 4, 12, generator=g)}
    if kind == "conv":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=g)}


# kind -> (base model, the config fields that select layers of that kind, a model input, output of a forward)
MODELS = {
    "conv1d_gpt2": (BY_NAME["gpt2"].build, dict(target_names=(r"\.(c_attn|c_fc|c_proj)$",))),
    "conv": (BY_NAME["resnet_conv2d"].build, dict(target_names=(r"\.convolution$",))),
    "conv1d_net": (ConvNet, dict(target_names=(r"^conv\d$",))),
    "embedding": (_gemma, dict(target_names=(r"embed_tokens$", r"q_proj$"), exclude_names=())),
    "experts": (BY_NAME["qwen3_moe"].build, dict(target_names=(r"q_proj$",),
                                                 target_parameters=(r"experts\.(gate_up|down)_proj$",))),
}
LAYER_KIND = {"conv1d_net": "conv"}  # which registered kind each model exercises


def output(model, name):
    out = model(**_batch(name))
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def config(method: str, model_name: str) -> ll.AdapterConfig:
    cls = ll.REGISTRY[method].config
    fields = {f for f in cls.__dataclass_fields__}
    kw = {k: v for k, v in MODELS[model_name][1].items() if k in fields}
    if "r" in fields:
        kw["r"] = 2
    if method == "ia3":
        kw.setdefault("target_names", MODELS[model_name][1]["target_names"])
    return cls(**kw)


PAIRS = [pytest.param(m, name, id=f"{m}-{name}") for m in sorted(ll.REGISTRY) for name in MODELS
         if LAYER_KIND.get(name, name) in layer_kinds(ll.REGISTRY[m]) and LAYER_KIND.get(name, name) != "linear"]


def test_lora_dora_ia3_pissa_cover_conv1d_and_conv2d_and_lora_embeddings_and_experts():
    pairs = {(p.values[0], LAYER_KIND.get(p.values[1], p.values[1])) for p in PAIRS}
    for method in ("lora", "dora", "ia3", "pissa"):
        assert {(method, "conv1d_gpt2"), (method, "conv")} <= pairs
    assert {("lora", "embedding"), ("lora", "experts")} <= pairs


def attached(method, name, base, in_place=False):
    model = base if in_place else copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ll.errors.SkippedLayersWarning)
        ll.attach(model, config(method, name))
    kinds = {a.kind for a in adapter_layers(model).values()}
    assert LAYER_KIND.get(name, name) in kinds
    return model


@pytest.mark.parametrize("method,name", PAIRS)
def test_method_on_layer_kind(method, name, tmp_path):
    base = MODELS[name][0]()
    with torch.no_grad():
        y_base = output(base, name)
    model = copy.deepcopy(base)
    before = fingerprint(model)
    attached(method, name, model, in_place=True)
    with torch.no_grad():
        err = ((output(model, name) - y_base).abs().max() / y_base.abs().max()).item()
    assert err <= 1e-5, f"identity at init off by {err:.3g}"

    # trained in eval mode: BatchNorm statistics are base state, and must not move
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=3e-2)
    reached = set()
    for _ in range(3):
        output(model, name).square().mean().backward()
        reached |= {n for n, p in params.items() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
        opt.zero_grad()
    assert reached == set(params), f"no gradient reached {sorted(set(params) - reached)[:4]}"
    with torch.no_grad():
        hooked = output(model, name)
    assert (hooked - y_base).abs().max() > 1e-4

    ll.save(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    ll.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(output(fresh, name), hooked)
        ll.merge(fresh)
        merged = output(fresh, name)
    assert ((merged - hooked).abs().max() / hooked.abs().max()).item() <= RTOL
    ll.detach(model)
    assert_unchanged(model, before)


# PEFT's LoRA, DoRA and IA3 on the same layers. Not compared: experts (tests/test_architectures.py does), PEFT's
# IA3 and DoRA have no Conv1d layer, and its conv LoRA drops the dilation of the net's second conv (it crashes).
PEFT_SAME = [p for p in PAIRS if p.values[0] in ("lora", "dora", "ia3") and p.values[1] != "experts"
             and not (p.values[1] == "conv1d_net" and p.values[0] != "lora")]
PEFT_TARGETS = {"conv1d_net": (r"^conv1$",)}


@pytest.mark.parametrize("method,name", PEFT_SAME)
def test_matches_peft_on_layer_kind(method, name):
    base = MODELS[name][0]()
    ours = copy.deepcopy(base)
    cfg = config(method, name)
    cfg.target_names = PEFT_TARGETS.get(name, cfg.target_names)
    ll.attach(ours, cfg)
    targets = list(adapter_layers(ours))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in adapter_layers(ours).values():
            for t in a.tensor_names:
                tensor = getattr(a, t)
                noise = torch.randn(tensor.shape, generator=g)
                tensor.copy_(1 + 0.3 * noise if t in ("lora_g", "lora_m") else noise * (0.3 if t == "lora_A" else 0.05))
                if t == "lora_m":
                    tensor.mul_(torch.linalg.vector_norm(a.weight, dim=1))
    fan = any(a.kind == "conv1d_gpt2" for a in adapter_layers(ours).values())
    if method == "ia3":
        cfg = peft.IA3Config(target_modules=targets, feedforward_modules=[], fan_in_fan_out=fan)
    else:
        cfg = peft.LoraConfig(r=2, lora_alpha=ours_cfg(ours).alpha, target_modules=targets, use_dora=method == "dora",
                              fan_in_fan_out=fan)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    named = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()}
    with torch.no_grad():
        for lname, a in adapter_layers(ours).items():
            layer = named[lname]
            if method == "ia3":
                layer.ia3_l["default"].copy_(a.lora_g.reshape(layer.ia3_l["default"].shape))
                continue
            if a.kind == "embedding":
                layer.lora_embedding_A["default"].copy_(a.lora_A)
                layer.lora_embedding_B["default"].copy_(a.lora_B)
            else:
                for ours_t, theirs_t in ((a.lora_A, layer.lora_A["default"].weight), (a.lora_B, layer.lora_B["default"].weight)):
                    theirs_t.copy_(ours_t.reshape(theirs_t.shape))
            if method == "dora":
                m = layer.lora_magnitude_vector["default"].weight
                m.copy_(a.lora_m.reshape(m.shape))
    with torch.no_grad():
        y_ours, y_theirs, y_base = output(ours, name), output(theirs, name), output(base, name)
    assert (y_ours - y_base).abs().max() > 1e-3, "the adapter is at identity: the comparison is vacuous"
    err = ((y_ours - y_theirs).abs().max() / y_theirs.abs().max()).item()
    assert err <= RTOL, f"{method} on {name}: outputs differ from PEFT's by {err:.3g}"


def ours_cfg(model):
    return ll.runtime.adapter_config(model)


# every method with a kind it does not declare, with the first such kind
UNDECLARED = {m: next(k for k in ("conv1d_gpt2", "conv", "embedding") if k not in layer_kinds(v))
              for m, v in sorted(ll.REGISTRY.items()) if not {"conv1d_gpt2", "conv", "embedding"} <= set(layer_kinds(v))}


def test_some_methods_are_linear_only():
    assert "hra" in UNDECLARED and "lora" not in UNDECLARED


@pytest.mark.parametrize("method", sorted(UNDECLARED))
def test_a_kind_the_method_does_not_declare_is_refused_by_name(method):
    """Named explicitly, a layer of an undeclared kind is refused naming the method, the layer and its kinds."""
    kind = UNDECLARED[method]
    base = MODELS[kind][0]()
    before = fingerprint(base)
    cls = ll.REGISTRY[method].config
    kw = {k: v for k, v in MODELS[kind][1].items() if k in cls.__dataclass_fields__}
    kw["target_names"] = kw["target_names"][:1]
    if "r" in cls.__dataclass_fields__:
        kw["r"] = 2
    with pytest.raises(ll.UnsupportedLayerError, match=rf"method '{method}' supports layer kinds \(.*'linear'.*\), "
                                                        rf"but '.*' is a .* \(kind '{kind}'\)"):
        ll.attach(base, cls(**kw), calibration_data=[_batch(kind)])
    assert_unchanged(base, before)


def test_all_linear_skips_conv1d_for_a_linear_only_method_and_says_so():
    gpt2 = BY_NAME["gpt2"].build()
    method = next(m for m in sorted(ll.REGISTRY) if "conv1d_gpt2" not in layer_kinds(ll.REGISTRY[m])
                  and not getattr(ll.REGISTRY[m], "requires_calibration", False))
    with pytest.raises(ll.TargetError, match=r"all-linear left out: 8 layer\(s\) .*supports layer kinds \('linear',\)"):
        ll.attach(gpt2, ll.REGISTRY[method].config())


def test_grouped_convolutions_and_max_norm_embeddings_are_refused():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ll.UnsupportedLayerError, match=r"'0': a grouped \(groups=2\) Conv2d"):
        ll.attach(net, ll.LoRAConfig(r=2, target_names=(r"^0$",)))
    emb = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(ll.UnsupportedLayerError, match="max_norm"):
        ll.attach(emb, ll.LoRAConfig(r=2, target_names=(r"^0$",), exclude_names=()))
    assert not list(net.modules())[1]._forward_hooks and "lora_adapters" not in net[0]._modules


def test_merging_into_a_tied_embedding_is_refused():
    gemma = BY_NAME["gemma3"].build()  # lm_head.weight is embed_tokens.weight
    ll.attach(gemma, ll.LoRAConfig(r=2, target_names=(r"embed_tokens$",), exclude_names=()))
    before = {n: p.detach().clone() for n, p in gemma.named_parameters()}
    with pytest.raises(ll.AttachStateError, match=r"\['model.embed_tokens'\], which \['lm_head'\] hold too"):
        ll.merge(gemma)
    assert all(torch.equal(p, before[n]) for n, p in gemma.named_parameters())
    with pytest.raises(ll.AttachStateError, match="tied weights"):
        ll.attach(gemma, ll.PiSSAConfig(r=2, target_names=(r"lm_head$",), exclude_names=()), name="pissa")
