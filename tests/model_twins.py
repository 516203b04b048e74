"""Whole models: a torchvision model and its fused twin with identical weights, a fused model
with randomized BatchNorm, and their inputs and state."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import resnet_fused

from random_bn import randomize_model_bn

MODEL_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)


def scale_residual_branches(model: nn.Module, factor: float) -> nn.Module:
    """Multiplies the weight of the last BatchNorm of every residual branch (bn2 of a
    BasicBlock, bn3 of a Bottleneck) by `factor`, as zero_init_residual does with 0 and as
    trained ResNets keep their branches small. With unit-scale branches (randomize_model_bn)
    a deep ResNet's gradients explode at initialization: measured for resnet152, float64,
    |grad| / |param| of conv1.weight is 1800, so one SGD step at lr 1e-3 moves conv1 by
    1.8x its norm and the next step amplifies float64 rounding to 1e-8, in torchvision itself."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torchvision.models.resnet.Bottleneck):
                m.bn3.weight.mul_(factor)
            elif isinstance(m, torchvision.models.resnet.BasicBlock):
                m.bn2.weight.mul_(factor)
    return model


def model_twins(name: str, dtype: torch.dtype = torch.float32, residual_scale: float = 1.0, **kwargs):
    """(torchvision model, fused model) of builder `name` with identical weights and randomized
    BatchNorm parameters and statistics (randomize_model_bn, residual branches scaled by
    `residual_scale`), both in `dtype`."""
    tv = randomize_model_bn(getattr(torchvision.models, name)(**kwargs))
    if residual_scale != 1.0:
        scale_residual_branches(tv, residual_scale)
    fused = getattr(resnet_fused, name)(**kwargs)
    fused.load_state_dict(tv.state_dict(), strict=True)
    return tv.to(dtype), fused.to(dtype)


def fused_model(name: str, dtype: torch.dtype, device, num_classes: int = 10) -> nn.Module:
    """Fused `name` with randomized BatchNorm parameters and statistics, channels_last."""
    model = randomize_model_bn(getattr(resnet_fused, name)(num_classes=num_classes))
    return model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def images(batch: int, hw: int, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.randn(batch, 3, hw, hw, device=device)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def float_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating-point entries of the state_dict: parameters and running statistics."""
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]
