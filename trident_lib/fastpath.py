"""The opt-in CPU fast path: bf16 autocast and channels-last, with BatchNorm folded into its convolution.

Exactness is traded for speed within a stated tolerance (see bench/bench_features.py): for most
encoders plain bf16 keeps every patch's features within cosine 0.999 of fp32. Encoders whose first layers
amplify rounding (EfficientNet's depthwise stem) list modules to keep in fp32 in their spec
(``fast_fp32_modules``). The fast variant is built once per encoder and cached on it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class _FP32(nn.Module):
    """Runs the wrapped module in fp32 inside a bf16 autocast region."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            return self.module(x.float())


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.data = conv.weight.data * scale.reshape(-1, 1, 1, 1)
    bias = conv.bias.data if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a Conv2d (in registration order) into it, in place.
    timm's BatchNormAct2d keeps its activation."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for prev, name in zip(names, names[1:]):
            conv, bn = parent._modules[prev], parent._modules[name]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                _fold(conv, bn)
                act = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
                parent._modules[name] = nn.Sequential(*act) if act else nn.Identity()
    return model


def _keep_fp32(model: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        parent._modules[child] = _FP32(parent._modules[child])


def fast_cpu_variant(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` prepared for the fast path (cached on the encoder)."""
    cached = getattr(encoder, "_fast_cpu_variant", None)
    if cached is not None:
        return cached
    spec = getattr(encoder, "spec", None)
    probe_size = getattr(spec, "size", 224)
    fast = copy.deepcopy(encoder).eval()
    inner = getattr(fast, "model", fast)
    reference = copy.deepcopy(inner)
    fold_batchnorm(inner)
    probe = torch.rand(2, 3, probe_size, probe_size)
    with torch.inference_mode():
        try:
            same = torch.allclose(reference(probe), inner(probe), rtol=1e-3, atol=1e-4)
        except Exception:  # noqa: BLE001  a model whose folding changes its graph: keep it unfolded
            same = False
    if not same:  # registration order did not match forward order somewhere: do not fold
        inner = reference
        if hasattr(fast, "model"):
            fast.model = inner
        else:
            fast = inner
    _keep_fp32(inner, getattr(spec, "fast_fp32_modules", ()))
    fast = fast.to(memory_format=torch.channels_last)
    object.__setattr__(encoder, "_fast_cpu_variant", fast)  # not a registered submodule
    return fast
