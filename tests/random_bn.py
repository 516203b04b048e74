"""Randomized BatchNorm: nn.BatchNorm2d modules, and torchvision's FrozenBatchNorm2d buffers,
given non-default parameters and running statistics."""

from __future__ import annotations

import torch
from torch import nn


def randomize_bn(bn: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-default affine parameters and running statistics, so no term is trivially 0 or 1."""
    with torch.no_grad():
        c = bn.num_features
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=generator) - 0.5)
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def randomize_model_bn(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_bn(module)
    return model


def randomize_frozen_bn(model: nn.Module, seed: int = 5) -> nn.Module:
    """randomize_bn for every torchvision FrozenBatchNorm2d of `model` (its buffers)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5), m.bias.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model
