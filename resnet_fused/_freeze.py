"""resnet_fused.freeze: BatchNorm folded into the convolution before it, on the user's promise
that the model's tensors no longer change (the convention of torch.jit.freeze and
torch.fx.experimental.optimization.fuse).

The default path computes each eval unit from the tensors as they are at the call, which gives
torchvision's bits and cannot be stale. A frozen model instead runs one convolution with a bias
per unit, and differs from torchvision's by float32 rounding."""

from __future__ import annotations

import copy
import warnings

import torch
import torchvision.models.resnet as tv_resnet
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .nn import ConvBNReLU2d

__all__ = ["freeze"]

# (conv, norm) child names per module type: torchvision's structure, which resnet_fused's
# models and blocks keep (they subclass torchvision's).
_PAIRS: tuple[tuple[type, tuple[tuple[str, str], ...]], ...] = (
    (tv_resnet.Bottleneck, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))),
    (tv_resnet.BasicBlock, (("conv1", "bn1"), ("conv2", "bn2"))),
    (tv_resnet.ResNet, (("conv1", "bn1"),)),
    (IntermediateLayerGetter, (("conv1", "bn1"),)),  # detection and segmentation backbones
    (ConvBNReLU2d, (("conv", "bn"),)),
)


def _foldable(conv: nn.Module | None, norm: nn.Module | None) -> bool:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros":
        return False
    if type(norm) is FrozenBatchNorm2d:
        return True
    return type(norm) is nn.BatchNorm2d and norm.running_mean is not None and norm.num_features == conv.out_channels


@torch.no_grad()
def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    """conv's weight and bias become conv followed by norm's frozen statistics and affine,
    computed in float64 and rounded once to conv's dtype."""
    dtype = conv.weight.dtype
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    centre = -norm.running_mean.double() if conv.bias is None else conv.bias.double() - norm.running_mean.double()
    shift = centre * scale if norm.bias is None else centre * scale + norm.bias.double()
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    requires_grad = conv.weight.requires_grad
    # Elementwise ops keep the weight's memory format (channels_last stays channels_last).
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=requires_grad)
    conv.bias = nn.Parameter(shift.to(dtype), requires_grad=requires_grad)


def freeze(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every BatchNorm of its ResNet units folded into the convolution before it
    (conv weight and bias), the BatchNorm replaced by nn.Identity: one convolution with a bias
    per unit, and no per-call work for the statistics.

    A promise, as torch.jit.freeze's: the folded values are read once, here. Later writes to the
    old BatchNorm tensors (training, load_state_dict, a CUDA graph replay) do not reach the
    frozen model, and its outputs differ from the unfrozen model's within float32 rounding (the
    unfrozen model gives torchvision's bits). For inference only: the model must be in eval
    mode, and the frozen model has no BatchNorm to train.

    Folds the (conv, BatchNorm2d or FrozenBatchNorm2d) pairs of torchvision's and resnet_fused's
    ResNets, blocks (with their downsample), detection backbones and ConvBNReLU2d units; other
    modules are left as they are. inplace=False (the default) folds a deep copy and leaves
    `model` unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {inplace!r}")
    training = [name or "model" for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(f"freeze needs a model in eval mode (call model.eval() first); in training mode: "
                         f"{', '.join(training[:3])}{', ...' if len(training) > 3 else ''}")
    if not inplace:
        model = copy.deepcopy(model)
    folded = 0
    for module in list(model.modules()):
        pairs = next((names for kind, names in _PAIRS if isinstance(module, kind)), ())
        children = module._modules
        for conv_name, norm_name in pairs:
            if _foldable(children.get(conv_name), children.get(norm_name)):
                _fold(children[conv_name], children[norm_name])
                children[norm_name] = nn.Identity()
                folded += 1
        downsample = children.get("downsample") if isinstance(module, (tv_resnet.BasicBlock,
                                                                         tv_resnet.Bottleneck)) else None
        if type(downsample) is nn.Sequential and len(downsample) == 2 and _foldable(downsample[0], downsample[1]):
            _fold(downsample[0], downsample[1])
            downsample[1] = nn.Identity()
            folded += 1
    if not folded:
        warnings.warn(f"resnet_fused.freeze found no (Conv2d, BatchNorm) pair of a ResNet unit to fold in "
                      f"{type(model).__name__}; the model is unchanged", stacklevel=2)
    return model
