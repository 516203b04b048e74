"""Fused modules: ConvBNReLU2d, BasicBlock, Bottleneck.

The blocks subclass torchvision's and keep its submodules (conv1, bn1, ..., downsample),
so parameters, buffers, state_dict keys and initialization are torchvision's. Only
`forward` differs: each conv + norm (+ residual) (+ ReLU) unit runs as one fused op,
reading every hyperparameter from the submodules at call time. A user who swaps a
submodule (a 3x3 stem, GroupNorm, SiLU) gets that submodule's own behaviour for the
affected unit, unfused but correct. SyncBatchNorm (torch's or resnet_fused's) stays fused,
with statistics synchronized across its process group (distributed.py).
"""

from __future__ import annotations

import torch
import torchvision.models.resnet as tv_resnet
from torch import Tensor, nn

from . import ops, recompute
from ._batchnorm import batch_norm_args

__all__ = ["ConvBNReLU2d", "BasicBlock", "Bottleneck", "conv_bn_act", "set_recompute_bn_relu"]

_is_fx_symbolic_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", None) or (
    lambda: torch.fx._symbolic_trace.is_fx_tracing() and not torch.compiler.is_compiling())  # torch < 2.7


def records_graph() -> bool:
    """Whether a tracer is recording this forward for another runtime: torch.jit.trace, FX
    symbolic tracing (create_feature_extractor) or ONNX export (both exporters). The fused
    modules then run module by module, as torchvision's, so the recorded graph holds standard
    ops only and matches torchvision's node for node (the same FX node names, the same ONNX
    operators). torch.jit.script does the same (the blocks' `torch.jit.is_scripting()`
    branch). torch.compile and torch.export keep the fused ops; an exported program
    decomposes them with `resnet_fused.decompositions()`."""
    # The TorchScript-based ONNX exporter traces with torch.jit; the torch.export-based one
    # traces as torch.export does (is_compiling), so its flag is asked only then: asking costs
    # two imports a call (~2 us per block).
    if torch.compiler.is_compiling():
        return torch.onnx.is_in_onnx_export()
    # torch.jit.is_tracing without its is_scripting test (a scripted block never gets here).
    return torch._C._is_tracing() or _is_fx_symbolic_tracing()


def _fusable_conv(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def conv_bn_act(
    conv: nn.Module, norm: nn.Module, x: Tensor, residual: Tensor | None = None, act: nn.Module | None = None,
    norm_kind: type | None = None,
) -> Tensor:
    """act(norm(conv(x)) [+ residual]) as one fused op when conv is an nn.Conv2d with zero
    padding, norm an nn.BatchNorm2d or FrozenBatchNorm2d and act ReLU/None/Identity;
    otherwise the same computation module by module. norm_kind: run norm as that type's forward
    (fuse's adapters: nn.BatchNorm2d for the normalization of timm's BatchNormAct2d)."""
    relu = type(act) is nn.ReLU
    bn = batch_norm_args(norm, norm_kind) if _fusable_conv(conv) else None
    if bn is None:
        y = conv(x)
        return _add_act(norm(y) if norm_kind is None else norm_kind.forward(norm, y), residual, act)
    conv_params = conv._parameters  # not through nn.Module.__getattr__: ~1 us a tensor, per unit per call
    y = ops.conv_bn_unit(x, conv_params["weight"], bn, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation, groups=conv.groups, bias=conv_params["bias"], residual=residual,
                         relu=relu)
    if act is not None and not relu and type(act) is not nn.Identity:
        y = act(y)
    return y


def _add_act(y: Tensor, residual: Tensor | None, act: nn.Module | None) -> Tensor:
    """act(y [+ residual]), unfused but for add + ReLU."""
    if residual is not None:
        if type(act) is nn.ReLU and y.dtype == residual.dtype:
            return ops.add_relu(y, residual)
        y = y + residual
    return act(y) if act is not None else y


_RELU = nn.ReLU()  # the activation ConvBNReLU2d passes to conv_bn_act (stateless: one for all)


class ConvBNReLU2d(nn.Module):
    """Conv2d -> BatchNorm2d (-> + residual) -> ReLU as one fused unit.

    `conv` and `bn` are ordinary nn.Conv2d / nn.BatchNorm2d submodules (state_dict keys
    `conv.weight`, `bn.running_mean`, ...); `relu=False` gives conv + BN only.
    forward(x, residual=None).
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
        bias: bool = False, relu: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory)
        self.relu = relu

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> "ConvBNReLU2d":
        """Wrap existing modules (sharing their parameters and buffers)."""
        unit = cls.__new__(cls)
        nn.Module.__init__(unit)
        unit.conv, unit.bn, unit.relu = conv, bn, relu
        return unit

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        modules = self._modules  # not nn.Module.__getattr__: ~1 us a submodule, per unit per call
        return conv_bn_act(modules["conv"], modules["bn"], x, residual, _RELU if self.relu else None)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


def _identity(downsample: nn.Module | None, x: Tensor) -> Tensor:
    if downsample is None:
        return x
    if type(downsample) is nn.Sequential and len(downsample) == 2:
        return conv_bn_act(downsample[0], downsample[1], x)
    return downsample(x)


def _chain(block: nn.Module, units: list[tuple[nn.Module, nn.Module]]) -> bool:
    """Whether a block's units run as a recompute chain (recompute.py): asked for
    (recompute_bn_relu), in training, every conv fusable, every norm a training-mode
    nn.BatchNorm2d, the activation nn.ReLU."""
    return (block.recompute_bn_relu and type(block.relu) is nn.ReLU
            and all(_fusable_conv(conv) and recompute.eligible_norm(norm) for conv, norm in units))


def recompute_stem(conv: nn.Module, norm: nn.Module, act: nn.Module, pool: nn.Module) -> bool:
    """Whether a ResNet stem (conv, norm, ReLU, max pooling) runs as a recompute chain."""
    return (type(act) is nn.ReLU and _fusable_conv(conv) and recompute.eligible_norm(norm)
            and recompute.eligible_pool(pool))


def set_recompute_bn_relu(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Training keeps only each block's pre-BatchNorm activations (z) and its output, and
    recomputes BatchNorm + ReLU of the inner units (and the stem's, with its max pooling) in
    backward (recompute.py), with the same results. Applies to every fused block and ResNet of
    `model`; returns it. Eval is unaffected."""
    for m in model.modules():
        if hasattr(type(m), "recompute_bn_relu"):  # the fused blocks and models.ResNet
            m.recompute_bn_relu = enabled
    return model


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock (same constructor, submodules, state_dict), fused forward.
    Scripted or recorded for another runtime (records_graph), it runs torchvision's forward."""

    recompute_bn_relu: bool = False  # set_recompute_bn_relu

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
            if not records_graph():
                m = self._modules  # not nn.Module.__getattr__: ~1 us a submodule, per block per call
                conv1, bn1, conv2, bn2, relu = m["conv1"], m["bn1"], m["conv2"], m["bn2"], m["relu"]
                if self.recompute_bn_relu and _chain(self, [(conv1, bn1), (conv2, bn2)]):
                    pre = recompute.conv_stats(conv1, bn1, x)
                    pre = recompute.bn_act_conv_stats(pre, conv2, bn2)
                    return recompute.bn_act(pre, _identity(self.downsample, x))
                out = conv_bn_act(conv1, bn1, x, act=relu)
                return conv_bn_act(conv2, bn2, out, residual=_identity(self.downsample, x), act=relu)
        # torchvision's forward, statement for statement (the same FX nodes and names).
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck (same constructor, submodules, state_dict), fused forward.
    Scripted or recorded for another runtime (records_graph), it runs torchvision's forward."""

    recompute_bn_relu: bool = False  # set_recompute_bn_relu

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():  # TorchScript compiles no statement of this branch
            if not records_graph():
                m = self._modules  # not nn.Module.__getattr__: ~1 us a submodule, per block per call
                conv1, bn1, conv2, bn2, conv3, bn3, relu = (m["conv1"], m["bn1"], m["conv2"], m["bn2"], m["conv3"],
                                                            m["bn3"], m["relu"])
                if self.recompute_bn_relu and _chain(self, [(conv1, bn1), (conv2, bn2), (conv3, bn3)]):
                    pre = recompute.conv_stats(conv1, bn1, x)
                    pre = recompute.bn_act_conv_stats(pre, conv2, bn2)
                    pre = recompute.bn_act_conv_stats(pre, conv3, bn3)
                    return recompute.bn_act(pre, _identity(self.downsample, x))
                out = conv_bn_act(conv1, bn1, x, act=relu)
                out = conv_bn_act(conv2, bn2, out, act=relu)
                return conv_bn_act(conv3, bn3, out, residual=_identity(self.downsample, x), act=relu)
        # torchvision's forward, statement for statement (the same FX nodes and names).
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out
