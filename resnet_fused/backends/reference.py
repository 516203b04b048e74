"""Pure-PyTorch reference implementation of every resnet_fused op.

This is the oracle the fused backends are tested against and the path taken by
inputs a fused kernel does not cover. It runs on any device and dtype PyTorch's
own convolution supports. The arithmetic mirrors what a fused kernel does: the
convolution in the input dtype, BatchNorm/residual/ReLU on the float32 (float64
for float64 inputs) value, one rounding to the output dtype at the end.

The op semantics (shared by every backend) are documented in `_library.py`.
The ops are registered in the `resnet_fused` namespace (torch.ops.resnet_fused.*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _library
from .._utils import CHANNEL_DIMS as _CHANNEL_DIMS
from .._utils import memory_format, or_unasked, relu_backward, stat_dtype, unasked

_STAT_DTYPES = (torch.float32, torch.float64)  # where x's dtype is stat_dtype's

NAME = "reference"
NAMESPACE = "resnet_fused"


def _channel(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups) -> Tensor:
    fmt = memory_format(x)
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return z.contiguous(memory_format=fmt)


def _conv_grads(
    grad_z: Tensor, x: Tensor, weight: Tensor, stride, padding, dilation, groups, need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    if not (need_x or need_w):
        return None, None
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_z, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
    )
    if grad_x is not None:
        grad_x = grad_x.contiguous(memory_format=memory_format(x))
    if grad_w is not None:
        grad_w = grad_w.contiguous(memory_format=memory_format(weight))
    return grad_x, grad_w


def conv_bn_eval(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
) -> Tensor:
    acc = stat_dtype(x.dtype)
    # Functional ops only (this is also the ops' decomposition, which must be functional); no
    # conversion where the dtype already is acc (each is ~1 us of host time per eval call).
    # The conv in x's dtype, BatchNorm on its acc value, one rounding at the end.
    z = F.conv2d(x, weight, None, stride, padding, dilation, groups)
    y = _as(z, acc) * _channel(_as(scale, acc)) + _channel(_as(shift, acc))
    if residual is not None:
        y = y + _as(residual, acc)
    if relu:
        y = torch.relu(y)
    return _as(y, x.dtype).contiguous(memory_format=memory_format(x))


def conv_bn_eval_eager(
    x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor | None, bn_bias: Tensor | None,
    running_mean: Tensor, running_var: Tensor, eps: float, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool, plain: bool,
) -> Tensor:
    """Eval with frozen statistics as eager's modules compute it, for the plain-eager calls the
    reference runs (ops._conv_bn): nn.Conv2d's convolution, then nn.BatchNorm2d's F.batch_norm
    (plain: FrozenBatchNorm2d's arithmetic), then torchvision's in-place residual add and ReLU.
    The same kernels on the same operands give the upstream model's bits, with grad mode on or
    off, and nothing is kept between calls: whatever writes the parameters or the statistics
    (an optimizer, a CUDA graph replay, a NumPy view) is read by the next call.
    resnet_fused.freeze folds the statistics into the convolution instead, on the user's
    promise that they do not change."""
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if plain:  # FrozenBatchNorm2d.forward, operation for operation
        scale = bn_weight.reshape(1, -1, 1, 1) * (running_var.reshape(1, -1, 1, 1) + eps).rsqrt()
        y = z * scale + (bn_bias.reshape(1, -1, 1, 1) - running_mean.reshape(1, -1, 1, 1) * scale)
    else:
        y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None:
        y += residual
    return torch.relu_(y) if relu else y


def conv_bn_eval_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, scale: Tensor, y: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_scale, need_shift, need_residual = output_mask
    acc = stat_dtype(x.dtype)
    g = grad_y.to(acc)
    if relu:
        g = relu_backward(g, y)
    # dL/dconv = g * scale. The weight gradient is linear in that, so one wgrad of
    # the unscaled g gives both dL/dw (times scale) and dL/dscale = sum(g * conv(x, w))
    # = sum over the filter of wgrad(x, g) * w: no need to keep or recompute conv(x, w).
    grad_x, _ = _conv_grads(
        (g * _channel(scale.to(acc))).to(x.dtype), x, weight, stride, padding, dilation, groups, need_x, False
    )
    _, wgrad_unscaled = _conv_grads(g.to(x.dtype), x, weight, stride, padding, dilation, groups, False,
                                    need_w or need_scale)
    grad_w = grad_scale = None
    if wgrad_unscaled is not None:
        wgrad_acc = wgrad_unscaled.to(acc)
        if need_w:
            grad_w = (wgrad_acc * scale.to(acc).view(-1, 1, 1, 1)).to(weight.dtype)
            grad_w = grad_w.contiguous(memory_format=memory_format(weight))
        if need_scale:
            grad_scale = (wgrad_acc * weight.to(acc)).sum(dim=(1, 2, 3)).to(scale.dtype)
    grad_shift = g.sum(dim=_CHANNEL_DIMS).to(scale.dtype) if need_shift else None
    grad_residual = g.to(x.dtype).contiguous(memory_format=memory_format(x)) if need_residual else None
    return or_unasked((grad_x, grad_w, grad_scale, grad_shift, grad_residual), x)


def conv_bn_train(
    x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's composition, as decompositions() gives it to torch.export (traced, so every
    op has a meta kernel and nothing works in place); the registered kernel is
    _conv_bn_train_kernel."""
    z = _conv(x, weight, bias, stride, padding, dilation, groups)
    acc = stat_dtype(x.dtype)
    if x.dtype == acc and z.numel():
        # aten's BatchNorm kernel, as eager runs it (statistics and normalization in one call);
        # the biased variance two-pass, as that kernel computes it.
        y, mean, _ = torch.native_batch_norm(z, _as(bn_weight, acc), _as(bn_bias, acc), None, None, True, 0.0, eps)
        var = (z - _channel(mean)).square().mean(dim=_CHANNEL_DIMS)
    else:
        z_acc = _as(z, acc)
        # Two-pass statistics on the float32 value: exact enough to serve as the oracle for the
        # kernels' merged partials.
        mean = z_acc.mean(dim=_CHANNEL_DIMS)
        centred = z_acc - _channel(mean)
        var = centred.square().mean(dim=_CHANNEL_DIMS)
        y = centred * _channel(_as(bn_weight, acc) * torch.rsqrt(var + eps)) + _channel(_as(bn_bias, acc))
    if residual is not None:
        y = y + _as(residual, acc)
    if relu:
        y = torch.relu(y)
    return _as(y, x.dtype).contiguous(memory_format=memory_format(x)), z, mean, var


def _conv_bn_train_kernel(
    x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """conv_bn_train as the registered CPU/CUDA kernel and the calls without the dispatcher run
    it, never traced, where x has the statistics dtype: the batch statistics in one pass as
    training BatchNorm computes them (batch_norm_update_stats: mean and biased variance; it
    has no meta kernel, hence conv_bn_train for tracing), the normalization with them, the
    residual and ReLU in place on that fresh output. On resnet50's 1x1 256->64 @24 (batch 4,
    one CPU thread) the two-pass variance cost 0.62 ms, more than the BatchNorm (0.45 ms);
    the statistics pass costs 0.18 ms."""
    if x.dtype != stat_dtype(x.dtype) or x.is_meta:  # meta: a direct call on meta tensors
        return conv_bn_train(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                             relu)
    z = _conv(x, weight, bias, stride, padding, dilation, groups)
    if not z.numel():  # an empty batch: no statistics pass (conv_bn_train's NaN statistics)
        return conv_bn_train(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps,
                             relu)
    mean, var = torch.batch_norm_update_stats(z, None, None, 0.0)
    y = torch.batch_norm(z, _as(bn_weight, x.dtype), _as(bn_bias, x.dtype), mean, var, False, 0.0, eps, False)
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return y.contiguous(memory_format=memory_format(x)), z, mean, var


def _conv_bn_train_graph(
    function, x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor,
    residual: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """conv_bn_train for calls without the dispatcher with grad mode on (_library.direct_ops's
    with_grad), where x and the BatchNorm parameters have the statistics dtype and the batch is
    not empty: eager's own autograd graph (aten's convolution and native_batch_norm, the
    residual add and ReLU in place), whose backward nodes are C++, with _conv_bn_train_kernel's
    output and conv_bn_train_backward's gradients (aten's BatchNorm backward on the same
    statistics; the variance one rounding apart); double backward raises as the op's does.
    `function`: the autograd.Function over the op's formula, which runs every other call, and
    wherever saved-tensor hooks watch (activation checkpointing; _library.saved_tensors_watched).
    On a 2x8x4x4 unit (benchmarks/host_overhead.py, one CPU thread) a training step cost
    1.33-1.40x eager's through the Function, 1.15-1.28x as this graph: the Function's Python
    forward and backward, not the kernels, made the difference."""
    dtype = x.dtype
    if dtype not in _STAT_DTYPES or bn_weight.dtype is not dtype or bn_bias.dtype is not dtype or x.is_meta \
            or not x.numel() or _library.saved_tensors_watched():
        return function(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu)
    z = _conv(x, weight, bias, stride, padding, dilation, groups)
    # The statistics from the normalizing pass itself: with momentum 1 its running-statistics
    # update writes the batch mean and unbiased variance into these buffers (a separate
    # statistics pass cost as much as the BatchNorm: 1.5 ms on 4x64x48x48, one CPU thread).
    # Fresh per call: the BatchNorm's backward node saves them, so they must not be rewritten.
    mean, unbiased = torch.zeros(2, z.size(1), dtype=dtype, device=z.device).unbind()
    y = torch.native_batch_norm(z, bn_weight, bn_bias, mean, unbiased, True, 1.0, eps)[0]
    count = z.numel() // z.size(1)
    var = unbiased * ((count - 1) / count)  # the op's biased variance (count > 1: ops checked)
    y = _library.once_differentiable(y, "conv_bn_train_backward")
    if residual is not None:
        y.add_(residual)
    if relu:
        y.relu_()
    return y.contiguous(memory_format=memory_format(x)), z.detach(), mean, var


def conv_bn_train_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, var: Tensor,
    bn_weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float,
    relu: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_bias, need_bn_weight, need_bn_bias, need_residual = output_mask
    acc = stat_dtype(x.dtype)
    g = _as(grad_y, acc)
    if relu:
        g = relu_backward(g, y)
    invstd = torch.reciprocal(torch.sqrt(var + eps))  # 1 / sqrt(var + eps), as aten's BatchNorm saves it
    need_z = need_x or need_w or need_bias
    if x.dtype == acc and z.numel():  # aten's BatchNorm backward, one kernel, as eager runs it
        grad_z, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            g, z, _as(bn_weight, acc), None, None, mean, invstd, True, eps, [need_z, need_bn_weight, need_bn_bias])
    else:
        count = z.numel() // z.size(1)
        x_hat = (_as(z, acc) - _channel(mean)) * _channel(invstd)
        sum_g = g.sum(dim=_CHANNEL_DIMS)
        sum_g_xhat = (g * x_hat).sum(dim=_CHANNEL_DIMS)
        grad_z = _channel(_as(bn_weight, acc) * invstd) * (
            g - _channel(sum_g / count) - x_hat * _channel(sum_g_xhat / count))
        grad_bn_weight, grad_bn_bias = sum_g_xhat, sum_g
    grad_x = grad_w = grad_bias = None
    if need_z:
        grad_x, grad_w = _conv_grads(_as(grad_z, x.dtype), x, weight, stride, padding, dilation, groups, need_x,
                                     need_w)
        grad_bias = grad_z.sum(dim=_CHANNEL_DIMS).to(weight.dtype) if need_bias else None
    grad_bn_weight = grad_bn_weight.to(bn_weight.dtype) if need_bn_weight else None
    grad_bn_bias = grad_bn_bias.to(bn_weight.dtype) if need_bn_bias else None
    grad_residual = g.to(x.dtype).contiguous(memory_format=memory_format(x)) if need_residual else None
    return or_unasked((grad_x, grad_w, grad_bias, grad_bn_weight, grad_bn_bias, grad_residual), x)


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    acc = stat_dtype(x.dtype)
    return torch.relu(x.to(acc) + residual.to(acc)).to(x.dtype).contiguous(memory_format=memory_format(x))


# ---------------------------------------------------------------------------------------
# Building blocks of the synchronized BatchNorm path (see _library.py).


def conv_bn_stats(
    x: Tensor, weight: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    z = _conv(x, weight, bias, stride, padding, dilation, groups)
    z_acc = z.to(stat_dtype(x.dtype))
    mean = z_acc.mean(dim=_CHANNEL_DIMS)
    var = (z_acc - _channel(mean)).square().mean(dim=_CHANNEL_DIMS)
    return z, mean, var


def bn_apply(
    z: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
    eps: float, relu: bool,
) -> Tensor:
    acc = stat_dtype(z.dtype)
    scale = bn_weight.to(acc) * torch.rsqrt(var.to(acc) + eps)
    y = (z.to(acc) - _channel(mean.to(acc))) * _channel(scale) + _channel(bn_bias.to(acc))
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(z.dtype).contiguous(memory_format=memory_format(z))


def _masked_grad(grad_y: Tensor, y: Tensor | None, relu: bool, acc: torch.dtype) -> Tensor:
    g = grad_y.to(acc)
    return relu_backward(g, y) if relu else g


def bn_apply_backward_reduce(
    grad_y: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, relu: bool
) -> tuple[Tensor, Tensor]:
    acc = stat_dtype(z.dtype)
    g = _masked_grad(grad_y, y, relu, acc)
    return g.sum(dim=_CHANNEL_DIMS), (g * (z.to(acc) - _channel(mean.to(acc)))).sum(dim=_CHANNEL_DIMS)


def bn_apply_backward(
    grad_y: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, var: Tensor, bn_weight: Tensor, sum_g: Tensor,
    sum_g_zc: Tensor, count: int, eps: float, relu: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    need_dz, need_residual = output_mask
    acc = stat_dtype(z.dtype)
    g = _masked_grad(grad_y, y, relu, acc)
    fmt = memory_format(z)
    dz = grad_residual = None
    if need_dz:
        invstd = torch.rsqrt(var.to(acc) + eps)
        x_hat = (z.to(acc) - _channel(mean.to(acc))) * _channel(invstd)
        mean_g = sum_g.to(acc) / count
        mean_g_xhat = sum_g_zc.to(acc) * invstd / count
        dz = _channel(bn_weight.to(acc) * invstd) * (g - _channel(mean_g) - x_hat * _channel(mean_g_xhat))
        dz = dz.to(z.dtype).contiguous(memory_format=fmt)
    if need_residual:
        grad_residual = g.to(z.dtype).contiguous(memory_format=fmt)
    return or_unasked((dz, grad_residual), z)


def bn_act_conv_bn_stats(
    z_in: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float, relu: bool,
    weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    y_in = bn_apply(z_in, mean, var, bn_weight, bn_bias, None, eps, relu)
    return conv_bn_stats(y_in, weight, bias, stride, padding, dilation, groups)


def bn_act_conv_backward(
    grad_z: Tensor, z_in: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float,
    relu: bool, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    need_g, need_w = output_mask
    y_in = bn_apply(z_in, mean, var, bn_weight, bn_bias, None, eps, relu)
    ones = torch.ones(weight.size(0), dtype=stat_dtype(z_in.dtype), device=z_in.device)
    grad_y_in, grad_w, *_ = conv_bn_eval_backward(grad_z, y_in, weight, ones, None, stride, padding, dilation,
                                                  groups, False, [need_g, need_w, False, False, False])
    if not need_g:
        return grad_y_in, grad_w, unasked(mean), unasked(mean)
    if relu:
        grad_y_in = relu_backward(grad_y_in, y_in)
    sum_g, sum_g_zc = bn_apply_backward_reduce(grad_y_in, z_in, None, mean, False)
    return grad_y_in, grad_w, sum_g, sum_g_zc


def unavailable_reason() -> str | None:
    return None  # runs wherever PyTorch runs


def unsupported_reason(op_name: str, *op_args) -> str | None:
    return None  # every input PyTorch's own convolution accepts



# The registered kernels: each op's composition, but conv_bn_train's (decompositions() takes
# the compositions, which tracing needs).
_IMPLS = {**{name: globals()[name] for name in _library.OP_NAMES}, "conv_bn_train": _conv_bn_train_kernel}
_lib = _library.define_library(NAMESPACE, _IMPLS)
DIRECT, DIRECT_WITH_GRAD = _library.direct_ops(_IMPLS, NAMESPACE, with_grad={"conv_bn_train": _conv_bn_train_graph})
