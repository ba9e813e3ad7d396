"""Layer kinds: how a method written for a linear layer sees a layer that is not one.

Every method is written against one picture: input x (..., d_in), output y (..., d_out), weight W (d_out, d_in).
A kind maps another layer onto that picture, so the method's math needs no special cases:

    kind          layers                                    d_in, d_out            W as (d_out, d_in)
    linear        nn.Linear and any module with in_features,  in, out               W
                  out_features and weight (bitsandbytes)
    conv1d_gpt2   transformers' Conv1D (GPT-2 family), whose  nx, nf                Wᵀ (stored (d_in, d_out))
                  weight is stored transposed
    conv          nn.Conv1d / Conv2d / Conv3d, groups=1       C_in·∏kernel, C_out   W.flatten(1)
    embedding     nn.Embedding (a lookup is x_onehot · W)     num_embeddings, dim   Wᵀ
    experts       one 3-D parameter of a transformers-5       per expert            per expert
                  experts module (lora_lite.experts)

What a method touches, per kind (`Adapter` exposes these as `a.weight`, `a.project(x, M)`):
    a.weight            W as (d_out, d_in): a view where the layout allows it (merge and weight-rewriting
                        methods write back through `from_2d`)
    a.project(x, M)     x·Mᵀ for a (k, d_in) matrix M, applied the way the layer applies W: F.linear for linear
                        layers, the layer's own convolution (stride, padding, dilation, padding mode) with M as a
                        k-channel kernel for convs, a lookup of the columns of M for embeddings (times the
                        layer's `embed_scale`, as scaled embeddings such as Gemma 3's apply it). Output (..., k).
    y                   the output in rows layout, features last: a conv's channel axis is moved last (a view)
                        before the method sees it and moved back after.
So LoRA's y + s·(x Aᵀ) Bᵀ becomes y + s·project(x, A) Bᵀ and is a conv LoRA on a conv, an embedding LoRA on an
embedding, with ΔW = s·B A in the 2-D view for merge and export on every kind.

Which kinds a method supports is a fact of its registration (`layer_kinds`, lora_lite.variant); the default is
linear only. A kind's `check` refuses the layouts lora-lite does not model (grouped or transposed convs,
embeddings with max_norm).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError

KIND_NAMES = ("linear", "conv1d_gpt2", "conv", "embedding", "experts")
LINEAR_KINDS = ("linear", "conv1d_gpt2")  # what all-linear means, with experts added for methods that take them


def hf_conv1d_class():
    """transformers' Conv1D, if transformers is loaded (a model that has one has imported it)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_linear_like(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("in_features", "out_features", "weight")) and callable(module)


class Linear:
    name = "linear"

    @staticmethod
    def dims(layer):
        return int(layer.in_features), int(layer.out_features)

    @staticmethod
    def check(layer):
        return None

    @staticmethod
    def as_2d(layer, W):
        return W

    @staticmethod
    def from_2d(layer, W2d):
        return W2d

    @staticmethod
    def project(layer, x, M):
        return F.linear(x, M)

    @staticmethod
    def to_rows(layer, y):
        return y

    @staticmethod
    def from_rows(layer, y):
        return y


class GPT2Conv1D(Linear):
    """y = x W + b with W stored (d_in, d_out): the activations are a linear layer's, only W is transposed."""

    name = "conv1d_gpt2"

    @staticmethod
    def dims(layer):
        return int(layer.weight.shape[0]), int(layer.nf)

    @staticmethod
    def as_2d(layer, W):
        return W.T

    @staticmethod
    def from_2d(layer, W2d):
        return W2d.T


class Conv(Linear):
    """A convolution is a linear map of each input patch (C_in·∏kernel values) to C_out channels."""

    name = "conv"

    @staticmethod
    def dims(layer):
        return int(layer.weight[0].numel()), int(layer.out_channels)

    @staticmethod
    def check(layer):
        if layer.transposed or layer.groups != 1:
            what = "transposed" if layer.transposed else f"grouped (groups={layer.groups})"
            raise UnsupportedLayerError(f"a {what} {type(layer).__name__} is not a linear map of its input patches "
                                        "that lora-lite models; only plain convolutions (groups=1) can be adapted")

    @staticmethod
    def as_2d(layer, W):
        return W.flatten(1)

    @staticmethod
    def from_2d(layer, W2d):
        return W2d.reshape(layer.weight.shape)

    @staticmethod
    def project(layer, x, M):
        kernel = M.reshape(M.shape[0], *layer.weight.shape[1:])
        # the layer's own convolution (stride, padding, dilation, padding_mode) with a k-channel kernel
        return Conv.to_rows(layer, layer._conv_forward(x, kernel, None))

    @staticmethod
    def _channel_dim(layer, t):
        return t.ndim - len(layer.kernel_size) - 1  # 1 for batched inputs, 0 for unbatched ones

    @staticmethod
    def to_rows(layer, y):
        return y.movedim(Conv._channel_dim(layer, y), -1)

    @staticmethod
    def from_rows(layer, y):
        return y.movedim(-1, Conv._channel_dim(layer, y))


class Embedding(Linear):
    """A lookup W[ids] is the linear map one_hot(ids) · W, so W as (d_out, d_in) is Wᵀ."""

    name = "embedding"

    @staticmethod
    def dims(layer):
        return int(layer.num_embeddings), int(layer.embedding_dim)

    @staticmethod
    def check(layer):
        if layer.max_norm is not None:
            raise UnsupportedLayerError("an nn.Embedding with max_norm renormalises its rows in place on every lookup, "
                                        "which no additive adapter reproduces; build it with max_norm=None")

    @staticmethod
    def as_2d(layer, W):
        return W.T

    @staticmethod
    def from_2d(layer, W2d):
        return W2d.T

    @staticmethod
    def project(layer, x, M):
        out = F.embedding(x, M.T, padding_idx=layer.padding_idx)
        scale = embed_scale(layer)
        return out if scale is None else out * scale.to(out.dtype)


def embed_scale(layer: nn.Module) -> torch.Tensor | None:
    """The factor a scaled embedding (Gemma 3's) multiplies its lookup by, as a tensor; None for a plain one."""
    scale = getattr(layer, "embed_scale", None)
    if scale is None:
        return None
    scale = torch.as_tensor(scale, device=layer.weight.device)
    if scale.numel() != 1:
        raise UnsupportedLayerError(f"{type(layer).__name__}.embed_scale has shape {tuple(scale.shape)}; lora-lite "
                                    "understands a scalar scale only")
    return scale.reshape(())


class Experts(Linear):
    """One expert's matrix; lora_lite.experts runs the experts module's forward and slices the adapter per expert."""

    name = "experts"

    @staticmethod
    def dims(layer):
        return int(layer.in_features), int(layer.out_features)

    @staticmethod
    def as_2d(layer, W):  # W: one expert's slice in the parameter's own layout
        return W.T if layer.transposed else W

    @staticmethod
    def from_2d(layer, W2d):
        return W2d.T if layer.transposed else W2d


KINDS: dict[str, type[Linear]] = {k.name: k for k in (Linear, GPT2Conv1D, Conv, Embedding, Experts)}
assert tuple(KINDS) == KIND_NAMES


def kind_of(module: nn.Module) -> str | None:
    """The kind of a module lora-lite can adapt, or None."""
    from .experts import ExpertsParameter  # experts builds on this module

    if isinstance(module, ExpertsParameter):
        return "experts"
    conv1d = hf_conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d_gpt2"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if is_linear_like(module):
        return "linear"
    return None
