"""The drop-in ResNet family: torchvision's builders, signatures and state_dicts, fused forward."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from typing import Any, Optional

import torch
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn
from torchvision.models._api import BUILTIN_MODELS, WeightsEnum, register_model
from torchvision.models._utils import IntermediateLayerGetter, handle_legacy_interface
from torchvision.ops.misc import FrozenBatchNorm2d

from . import recompute
from .nn import BasicBlock, Bottleneck, conv_bn_act, records_graph, recompute_stem, set_recompute_bn_relu
from .distributed import SyncBatchNorm

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "from_torchvision", "to_torchvision", "FusedIntermediateLayerGetter",
]


class ResNet(tv_resnet.ResNet):
    """torchvision.models.ResNet (same constructor, modules, init and state_dict) whose
    stem and blocks run fused. Build it through the `resnet*` functions below.

    recompute_bn_relu: training keeps only each block's pre-BatchNorm activations and its
    output, recomputing the inner BatchNorm + ReLU in backward (nn.set_recompute_bn_relu)."""

    recompute_bn_relu: bool = False  # nn.set_recompute_bn_relu

    def __init__(self, *args: Any, recompute_bn_relu: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if recompute_bn_relu:
            set_recompute_bn_relu(self)

    def _forward_impl(self, x: Tensor) -> Tensor:
        fused_stem = False
        pooled = False
        if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
            fused_stem = not records_graph()
            if fused_stem and self.recompute_bn_relu and recompute_stem(self.conv1, self.bn1, self.relu, self.maxpool):
                pre = recompute.conv_stats(self.conv1, self.bn1, x)
                x = recompute.bn_act_max_pool(pre, self.maxpool)
                pooled = True
            elif fused_stem:
                x = conv_bn_act(self.conv1, self.bn1, x, act=self.relu)
        if not fused_stem:  # torchvision's stem
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.relu(x)
        if not pooled:
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _fused_unit_at(modules: list, i: int, returned) -> tuple[nn.Module, nn.Module, nn.Module | None] | None:
    """(conv, norm, relu-or-None) when modules[i:] start with nn.Conv2d, a BatchNorm and
    optionally nn.ReLU, none of whose outputs but the last is returned, else None."""
    if i + 1 >= len(modules) or type(modules[i][1]) is not nn.Conv2d or modules[i][0] in returned:
        return None
    if not isinstance(modules[i + 1][1], (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
        return None
    has_relu = (i + 2 < len(modules) and type(modules[i + 2][1]) is nn.ReLU and modules[i + 1][0] not in returned)
    return modules[i][1], modules[i + 1][1], modules[i + 2][1] if has_relu else None


class FusedIntermediateLayerGetter(IntermediateLayerGetter):
    """torchvision's IntermediateLayerGetter (the ResNet body of its detection and segmentation
    models: conv1, bn1, relu, maxpool, layer1..4 as separate children) whose stem runs as
    one fused unit: any child nn.Conv2d followed by a BatchNorm (and nn.ReLU) whose
    intermediate outputs are not returned. Same children and state_dict."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
            if not records_graph():
                return self._fused_forward(x)
        # torchvision's forward, statement for statement.
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out_name = self.return_layers[name]
                out[out_name] = x
        return out

    def _fused_forward(self, x: Tensor) -> dict[str, Tensor]:
        out = OrderedDict()
        modules = list(self.items())
        i = 0
        while i < len(modules):
            unit = _fused_unit_at(modules, i, self.return_layers)
            if unit is None:
                x = modules[i][1](x)
                step = 1
            else:
                conv, norm, relu = unit
                # conv_bn_act runs non-fusable pairs (a BatchNorm2d subclass, ...) module by module.
                x = conv_bn_act(conv, norm, x, act=relu)
                step = 2 if relu is None else 3
            i += step
            name = modules[i - 1][0]
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


# torchvision class -> fused class. The fused classes add no state, so converting is a
# class swap that keeps every parameter and buffer object.
_TO_FUSED = {
    tv_resnet.ResNet: ResNet, tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck,
    IntermediateLayerGetter: FusedIntermediateLayerGetter,
}
_TO_TORCHVISION = {fused: tv for tv, fused in _TO_FUSED.items()}


def _swap_classes(model: nn.Module, mapping: dict, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in model.modules():
        new_cls = mapping.get(type(module))
        if new_cls is not None:
            module.__class__ = new_cls
    return model


def from_torchvision(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fused version of a torchvision ResNet (or of any model containing torchvision
    ResNet modules or blocks), with identical weights and buffers. Copies unless inplace.

    Converts torchvision's classes only (ResNet, BasicBlock, Bottleneck,
    IntermediateLayerGetter); to_torchvision converts them back. For other models (timm's
    and transformers' ResNets, or when unsure what a model contains) use resnet_fused.fuse,
    which converts these classes too and reports what it fused (docs/fuse.md)."""
    return _swap_classes(model, _TO_FUSED, inplace)


def to_torchvision(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Plain torchvision modules again (for ONNX, torch.export, or sharing), identical weights."""
    return _swap_classes(model, _TO_TORCHVISION, inplace)


_TO_TORCHVISION[SyncBatchNorm] = nn.SyncBatchNorm  # to_torchvision gives torch's own class back


def _load_weights(model: nn.Module, weights: WeightsEnum, progress: bool) -> None:
    """Load `weights` through torchvision (torch hub cache), with an actionable error offline."""
    url = weights.url
    filename = os.path.basename(url)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
    try:
        state_dict = weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as exc:
        if os.path.exists(cached):
            raise
        raise RuntimeError(
            f"Could not load {weights}: {filename} is not in the torch hub cache and downloading it failed "
            f"({type(exc).__name__}: {exc}). Download {url} and put it at {cached} "
            f"(the directory comes from torch.hub.get_dir(); set TORCH_HOME to move it)."
        ) from exc
    model.load_state_dict(state_dict)


def _resnet(block, layers: list[int], weights_enum, weights, progress: bool, defaults: dict, **kwargs: Any) -> ResNet:
    weights = weights_enum.verify(weights)
    for key, value in defaults.items():
        tv_resnet._ovewrite_named_param(kwargs, key, value)
    if weights is not None:
        tv_resnet._ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        _load_weights(model, weights, progress)
    return model


REGISTRY_PREFIX = "resnet_fused."  # torchvision.models.get_model("resnet_fused.resnet50", ...)


def _builder(name: str, block, layers: list[int], weights_enum, **defaults):
    def build(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
        return _resnet(block, layers, weights_enum, weights, progress, defaults, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"Fused {name}: same arguments as torchvision.models.{name} (weights: {weights_enum.__name__} "
        "member or its name, progress, num_classes, zero_init_residual, groups, width_per_group, "
        "replace_stride_with_dilation, norm_layer; the legacy pretrained=, with torchvision's "
        "warning) and the same state_dict."
    )
    # torchvision's annotations (real objects: get_model_weights reads them), its legacy
    # `pretrained=` handling, and an entry in its model registry under REGISTRY_PREFIX + name.
    build.__annotations__ = dict(weights=Optional[weights_enum], progress=bool, kwargs=Any, **{"return": ResNet})
    build = handle_legacy_interface(weights=("pretrained", weights_enum.IMAGENET1K_V1))(build)
    if REGISTRY_PREFIX + name not in BUILTIN_MODELS:  # (a re-import must not fail)
        build = register_model(REGISTRY_PREFIX + name)(build)
    return build


resnet18 = _builder("resnet18", BasicBlock, [2, 2, 2, 2], tv_resnet.ResNet18_Weights)
resnet34 = _builder("resnet34", BasicBlock, [3, 4, 6, 3], tv_resnet.ResNet34_Weights)
resnet50 = _builder("resnet50", Bottleneck, [3, 4, 6, 3], tv_resnet.ResNet50_Weights)
resnet101 = _builder("resnet101", Bottleneck, [3, 4, 23, 3], tv_resnet.ResNet101_Weights)
resnet152 = _builder("resnet152", Bottleneck, [3, 8, 36, 3], tv_resnet.ResNet152_Weights)
resnext50_32x4d = _builder(
    "resnext50_32x4d", Bottleneck, [3, 4, 6, 3], tv_resnet.ResNeXt50_32X4D_Weights, groups=32, width_per_group=4
)
resnext101_32x8d = _builder(
    "resnext101_32x8d", Bottleneck, [3, 4, 23, 3], tv_resnet.ResNeXt101_32X8D_Weights, groups=32, width_per_group=8
)
resnext101_64x4d = _builder(
    "resnext101_64x4d", Bottleneck, [3, 4, 23, 3], tv_resnet.ResNeXt101_64X4D_Weights, groups=64, width_per_group=4
)
wide_resnet50_2 = _builder(
    "wide_resnet50_2", Bottleneck, [3, 4, 6, 3], tv_resnet.Wide_ResNet50_2_Weights, width_per_group=128
)
wide_resnet101_2 = _builder(
    "wide_resnet101_2", Bottleneck, [3, 4, 23, 3], tv_resnet.Wide_ResNet101_2_Weights, width_per_group=128
)
