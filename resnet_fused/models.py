"""The drop-in ResNet family: torchvision's builders, signatures and state_dicts, fused forward."""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn
from torchvision.models._api import WeightsEnum

from .nn import BasicBlock, Bottleneck, conv_bn_act

__all__ = [
    "ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "from_torchvision", "to_torchvision", "convert_sync_batchnorm", "SyncBatchNorm",
]


class ResNet(tv_resnet.ResNet):
    """torchvision.models.ResNet (same constructor, modules, init and state_dict) whose
    stem and blocks run fused. Build it through the `resnet*` functions below."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = conv_bn_act(self.conv1, self.bn1, x, act=self.relu)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# torchvision class -> fused class. The fused classes add no state, so converting is a
# class swap that keeps every parameter and buffer object.
_TO_FUSED = {tv_resnet.ResNet: ResNet, tv_resnet.BasicBlock: BasicBlock, tv_resnet.Bottleneck: Bottleneck}
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
    ResNet modules or blocks), with identical weights and buffers. Copies unless inplace."""
    return _swap_classes(model, _TO_FUSED, inplace)


def to_torchvision(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Plain torchvision modules again (for ONNX, torch.export, or sharing), identical weights."""
    return _swap_classes(model, _TO_TORCHVISION, inplace)


# torch.nn.SyncBatchNorm runs its synchronized path on these device types only (it raises
# ValueError for others, CPU included).
def _torch_sync_devices() -> tuple[str, ...]:
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the backward sums the gradients the same way (each
    process's loss depends on every process's input through the reduced sum)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce_batch_norm(bn: nn.SyncBatchNorm, x: Tensor, momentum: float, group) -> Tensor:
    """Training-mode BatchNorm over the union of every process's batch: the count, the
    per-channel sum and then the sum of squared deviations from the global mean are
    all-reduced (differentiably, so the backward all-reduces the gradients of those sums).
    Uneven and empty per-process batches are handled by the all-reduced count."""
    import torch.distributed as dist

    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() // x.size(1)], dtype=torch.int64, device=x.device)
    dist.all_reduce(count, group=group)
    total = int(count.item())
    if total <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {total} across all processes")
    xa = x.to(acc)
    mean = _AllReduceSum.apply(xa.sum(dims), group) / total
    centered = xa - mean.view(shape)
    var = _AllReduceSum.apply(centered.square().sum(dims), group) / total
    y = centered * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.to(acc).view(shape) + bn.bias.to(acc).view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.running_mean.mul_(1 - momentum).add_(mean.to(bn.running_mean.dtype), alpha=momentum)
            unbiased = var * (total / (total - 1))
            bn.running_var.mul_(1 - momentum).add_(unbiased.to(bn.running_var.dtype), alpha=momentum)
    return y.to(x.dtype)


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm (same state, same results) that also synchronizes on devices
    torch's implementation rejects, CPU with the gloo backend included: there it all-reduces
    the per-channel sum, count and squared deviations itself. On CUDA it is torch's.

    Not fused: a block whose norm is a SyncBatchNorm runs that unit module by module.
    torch's DistributedDataParallel refuses any SyncBatchNorm in a CPU module ("SyncBatchNorm
    layers only work with GPU modules"); on CPU, average the gradients yourself (all_reduce)."""

    def forward(self, input: Tensor) -> Tensor:
        import torch.distributed as dist

        if (
            not self.training
            or input.device.type in _torch_sync_devices()
            or not (dist.is_available() and dist.is_initialized())
        ):
            return super().forward(input)  # torch's: its own sync, or no sync (no device check then)
        group = self.process_group if self.process_group else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            # torch.nn.SyncBatchNorm's fallback for one process (F.batch_norm), without the
            # device check it applies first.
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        momentum = 0.0 if self.momentum is None else self.momentum  # as torch.nn.SyncBatchNorm.forward
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum = 1.0 / self.num_batches_tracked.item()
        return _all_reduce_batch_norm(self, input, momentum, group)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm*d in `module` by a `resnet_fused.SyncBatchNorm` (in place, like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm, whose result it returns), so batch
    statistics are reduced over `process_group` (default: the whole world), in forward and
    backward, with uneven per-process batches.

    OPEN WORK: the synchronized units are NOT fused. A block whose norm is a SyncBatchNorm runs
    that conv + norm (+ residual) + ReLU unit module by module (correct, at unfused speed);
    a fused SyncBatchNorm (sum, sum of squares and count all-reduced inside the fused op)
    does not exist yet. Units in eval mode run as torch.nn.SyncBatchNorm does (running
    statistics, no communication). On CUDA the statistics are torch.nn.SyncBatchNorm's; on
    other devices (CPU with gloo) they are all-reduced by `SyncBatchNorm` above."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm
    return module


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
    if "pretrained" in kwargs:
        raise TypeError("pretrained= is torchvision's legacy argument; use weights='IMAGENET1K_V1' (or the enum)")
    weights = weights_enum.verify(weights)
    for key, value in defaults.items():
        tv_resnet._ovewrite_named_param(kwargs, key, value)
    if weights is not None:
        tv_resnet._ovewrite_named_param(kwargs, "num_classes", len(weights.meta["categories"]))
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        _load_weights(model, weights, progress)
    return model


def _builder(name: str, block, layers: list[int], weights_enum, **defaults):
    def build(*, weights=None, progress: bool = True, **kwargs: Any) -> ResNet:
        return _resnet(block, layers, weights_enum, weights, progress, defaults, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"Fused {name}: same arguments as torchvision.models.{name} (weights: {weights_enum.__name__} "
        "member or its name, progress, num_classes, zero_init_residual, groups, width_per_group, "
        "replace_stride_with_dilation, norm_layer) and the same state_dict."
    )
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
