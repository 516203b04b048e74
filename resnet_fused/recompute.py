"""Training that keeps only the pre-BatchNorm activations (z) for backward.

Eager PyTorch (and the plain fused units) keep, per conv + BatchNorm + ReLU unit, both z (the
conv output, which BatchNorm's backward needs) and y = relu(bn(z)) (the ReLU mask, and the
next convolution's input for its weight gradient). Inside a ResNet block y's only consumer is
the next convolution, so y can be recomputed from z and the unit's (mean, var, weight, bias)
when the backward needs it. A block then keeps z1, z2, z3 and its output instead of also y1
and y2 (Bottleneck; BasicBlock: z1, z2 and its output instead of also y1). The stem's
activation feeds a max pooling, whose backward needs only the argmax: it keeps z and
recomputes both (bn_act_max_pool). Measured (batch 8, 128 px, float32): 0.791x eager's
activation bytes for resnet50, 0.647x for resnet18 (tests/test_recompute.py).

A block's units, chained (Bottleneck: three convolutions; BasicBlock: two):

  conv_stats(x)                        z1 and its batch statistics (x is the block input,
                                       kept anyway: the previous block's output)
  bn_act_conv_stats(z1 ...)            y1 = relu(bn1(z1)) (not kept), z2 = conv2(y1), stats
  ...
  bn_act(z3 ..., identity)             the block output relu(bn3(z3) + identity), kept once
                                       for its two consumers (the next block and its residual)

Each link is an autograd.Function over the backends' ops: bn_act_conv_bn_stats (the conv with
the previous unit's BatchNorm + ReLU applied as it loads its input, and z's statistics),
bn_act_conv_backward (its dgrad masked by that ReLU with BatchNorm backward's two sums, and
its wgrad against relu(bn(z_in)), all recomputed from z_in) and the building blocks
SyncBatchNorm uses (conv_bn_stats, bn_apply, bn_apply_backward_reduce, bn_apply_backward,
conv_bn_eval_backward), so every backend runs it. Every recomputation repeats the forward's arithmetic (the reference composes
bn_apply; the Triton kernels repeat bn_apply's kernel math). The previous unit's BatchNorm
backward is folded into bn_act_conv_stats's backward, so the statistics are non-differentiable
outputs whose gradient is part of that formula.

Where the transform runs: on Triton inside the convolutions (the forward's operand load, the
dgrad epilogue's mask and BatchNorm sums, wgrad's operand load), so relu(bn(z)) is never
written and the masked gradient is not read again for the sums; the CUDA backend's ops go
through temporaries.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import _library
from ._batchnorm import affine_or_default, check_values_per_channel, step_momentum, update_running_stats
from ._utils import stat_dtype
from .backends import select_ops

__all__ = ["PreActivation", "conv_stats", "bn_act_conv_stats", "bn_act", "bn_act_max_pool", "eligible_norm",
           "eligible_pool"]


class PreActivation(NamedTuple):
    """A unit's conv output z with what its BatchNorm-apply + ReLU needs: the batch mean and
    biased variance of z (float32, or float64 for float64 z), the affine parameters, eps."""

    z: Tensor
    mean: Tensor
    var: Tensor
    bn_weight: Tensor
    bn_bias: Tensor
    eps: float


def eligible_norm(norm: nn.Module) -> bool:
    """A norm the chain reproduces: an nn.BatchNorm2d (exact type) in training mode. Frozen,
    synchronized, evaluating or user-defined norms run their unit as usual."""
    return type(norm) is nn.BatchNorm2d and norm.training


def _conv_args(conv: nn.Conv2d) -> tuple:
    return list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups


def _bn_params(bn: nn.BatchNorm2d, like: Tensor) -> tuple[Tensor, Tensor]:
    return affine_or_default(bn.weight, bn.bias, bn.num_features, stat_dtype(like.dtype), like.device)


def _count(z: Tensor) -> int:
    return z.numel() // z.size(1) if z.size(1) else 0


def _update_running_stats(bn: nn.BatchNorm2d, z: Tensor, mean: Tensor, var: Tensor) -> None:
    """nn.BatchNorm2d.forward's bookkeeping in training for a batch z: the error for one value
    per channel, the step's momentum, the running statistics."""
    count = _count(z)
    check_values_per_channel(count, z.shape)
    momentum = step_momentum(bn)
    if bn.track_running_stats and bn.running_mean is not None and count > 0:
        update_running_stats(bn.running_mean, bn.running_var, mean, var, count, momentum)


def _cast(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x, weight, bias) as the fused unit's autocast rule casts them (no-op outside autocast)."""
    dtype = _library.autocast_dtype(x.device.type) if _library.autocast_active() else None
    if dtype is None:
        return x, conv.weight, conv.bias
    return _library.autocast_cast(dtype, x, conv.weight, conv.bias)


def _conv_grads(grad_z: Tensor, x: Tensor, weight: Tensor, conv_args: tuple, need_x: bool, need_w: bool):
    """dgrad and wgrad of conv(x, weight) for grad_z (the backend's conv_bn_eval_backward with a
    unit scale and no activation)."""
    if not (need_x or need_w):
        return None, None
    ones = torch.ones(weight.size(0), dtype=stat_dtype(x.dtype), device=x.device)
    args = (grad_z, x, weight, ones, None, *conv_args, False, [need_x, need_w, False, False, False])
    grads = select_ops("conv_bn_eval_backward", *args).conv_bn_eval_backward(*args)
    return (grads[0] if need_x else None), (grads[1] if need_w else None)


class _BnNeeds(NamedTuple):
    """Which of BatchNorm (+ ReLU) backward's gradients are asked for."""

    dz: bool
    residual: bool
    bn_weight: bool
    bn_bias: bool


def _bn_backward(grad_y: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, var: Tensor, bn_weight: Tensor,
                 eps: float, relu: bool, need: _BnNeeds, sums: tuple | None = None):
    """Training BatchNorm (+ ReLU) backward through the batch statistics: (dz, grad_residual,
    grad_bn_weight, grad_bn_bias), each None where `need` says so. sums: (sum g, sum g (z -
    mean)) when the caller already has them (bn_act_conv_backward's), else a reduce pass."""
    if sums is None:
        ops = select_ops("bn_apply_backward_reduce", grad_y, z, y, mean, relu)
        sums = ops.bn_apply_backward_reduce(grad_y, z, y, mean, relu)
    sum_g, sum_g_zc = sums
    dz = grad_residual = None
    if need.dz or need.residual:
        args = (grad_y, z, y, mean, var, bn_weight, sum_g, sum_g_zc, _count(z), eps, relu, [need.dz, need.residual])
        dz, grad_residual = select_ops("bn_apply_backward", *args).bn_apply_backward(*args)
    invstd = torch.rsqrt(var + eps)
    grad_bw = (sum_g_zc * invstd).to(bn_weight.dtype) if need.bn_weight else None
    grad_bb = sum_g.to(bn_weight.dtype) if need.bn_bias else None
    return (dz if need.dz else None), (grad_residual if need.residual else None), grad_bw, grad_bb


def _bn_apply(z: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
              eps: float, relu: bool) -> Tensor:
    args = (z, mean, var, bn_weight, bn_bias, residual, eps, relu)
    return select_ops("bn_apply", *args).bn_apply(*args)


def _named_inputs(name: str, fields: str) -> type:
    """A Function's inputs by name (its forward's parameters after ctx), each defaulting to
    None: `Inputs(*ctx.needs_input_grad)` is the gradient mask by name, `tuple(Inputs(x=grad_x))`
    the backward's return, None for every input not named (a plain tuple: torch.compile's
    tracing of the backward reads a namedtuple as one value)."""
    names = fields.split()
    return collections.namedtuple(name, names, defaults=(None,) * len(names))


_ConvStatsInputs = _named_inputs("_ConvStatsInputs", "x weight bias conv_args")


class _ConvStats(torch.autograd.Function):
    """(z, mean, var) = conv(x) (+ bias) and z's batch statistics. Keeps x and the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, conv_args):
        ops = select_ops("conv_bn_stats", x, weight, bias, *conv_args)
        z, mean, var = ops.conv_bn_stats(x, weight, bias, *conv_args)
        ctx.save_for_backward(x, weight)
        ctx.conv_args, ctx.has_bias = conv_args, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        x, weight = ctx.saved_tensors
        need = _ConvStatsInputs(*ctx.needs_input_grad)
        grad_x, grad_w = _conv_grads(grad_z, x, weight, ctx.conv_args, need.x, need.weight)
        grad_bias = grad_z.sum((0, 2, 3)).to(weight.dtype) if ctx.has_bias and need.bias else None
        return tuple(_ConvStatsInputs(x=grad_x, weight=grad_w, bias=grad_bias))


_BnActConvStatsInputs = _named_inputs(
    "_BnActConvStatsInputs", "z_in mean_in var_in bn_weight_in bn_bias_in weight bias eps relu conv_args")


class _BnActConvStats(torch.autograd.Function):
    """y_in = act(bn(z_in)) with z_in's batch statistics, then (z, mean, var) = conv(y_in)
    (+ bias) and z's statistics (the op bn_act_conv_bn_stats: the Triton kernel applies the
    BatchNorm + ReLU as it loads z_in, so y_in is never written). Keeps z_in (not y_in) and
    the weight."""

    @staticmethod
    def forward(ctx, z_in, mean_in, var_in, bn_weight_in, bn_bias_in, weight, bias, eps, relu, conv_args):
        args = (z_in, mean_in, var_in, bn_weight_in, bn_bias_in, eps, relu, weight, bias, *conv_args)
        z, mean, var = select_ops("bn_act_conv_bn_stats", *args).bn_act_conv_bn_stats(*args)
        ctx.save_for_backward(z_in, mean_in, var_in, bn_weight_in, bn_bias_in, weight)
        ctx.eps, ctx.relu, ctx.conv_args, ctx.has_bias = eps, relu, conv_args, bias is not None
        ctx.mark_non_differentiable(mean, var)
        return z, mean, var

    @staticmethod
    def backward(ctx, grad_z, _grad_mean, _grad_var):
        z_in, mean_in, var_in, bn_weight_in, bn_bias_in, weight = ctx.saved_tensors
        need = _BnActConvStatsInputs(*ctx.needs_input_grad)
        need_in = need.z_in or need.bn_weight_in or need.bn_bias_in
        # g: the gradient of bn(z_in) (dgrad masked by the ReLU) with BatchNorm backward's two
        # sums, and grad_w against relu(bn(z_in)), all recomputed from z_in (Triton: in the dgrad
        # epilogue and the wgrad prologue).
        args = (grad_z, z_in, mean_in, var_in, bn_weight_in, bn_bias_in, ctx.eps, ctx.relu, weight, *ctx.conv_args,
                [need_in, need.weight])
        g, grad_w, sum_g, sum_g_zc = select_ops("bn_act_conv_backward", *args).bn_act_conv_backward(*args)
        grads = _BnActConvStatsInputs(
            weight=grad_w if need.weight else None,
            bias=grad_z.sum((0, 2, 3)).to(weight.dtype) if ctx.has_bias and need.bias else None)
        if need_in:
            dz_in, _, grad_bw, grad_bb = _bn_backward(
                g, z_in, None, mean_in, var_in, bn_weight_in, ctx.eps, False,
                _BnNeeds(dz=need.z_in, residual=False, bn_weight=need.bn_weight_in, bn_bias=need.bn_bias_in),
                (sum_g, sum_g_zc))
            grads = grads._replace(z_in=dz_in, bn_weight_in=grad_bw, bn_bias_in=grad_bb)
        return tuple(grads)


_BnActInputs = _named_inputs("_BnActInputs", "z mean var bn_weight bn_bias residual eps relu")


class _BnAct(torch.autograd.Function):
    """y = act(bn(z) [+ residual]) with z's batch statistics. Keeps z and y (for the ReLU mask;
    y is the block output, which its consumers keep anyway)."""

    @staticmethod
    def forward(ctx, z, mean, var, bn_weight, bn_bias, residual, eps, relu):
        y = _bn_apply(z, mean, var, bn_weight, bn_bias, residual, eps, relu)
        ctx.save_for_backward(z, y if relu else None, mean, var, bn_weight)
        ctx.eps, ctx.relu, ctx.has_residual = eps, relu, residual is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, y, mean, var, bn_weight = ctx.saved_tensors
        need = _BnActInputs(*ctx.needs_input_grad)
        dz, grad_residual, grad_bw, grad_bb = _bn_backward(
            grad_y, z, y, mean, var, bn_weight, ctx.eps, ctx.relu,
            _BnNeeds(dz=need.z, residual=ctx.has_residual and need.residual, bn_weight=need.bn_weight,
                     bn_bias=need.bn_bias))
        return tuple(_BnActInputs(z=dz, bn_weight=grad_bw, bn_bias=grad_bb, residual=grad_residual))


_BnActMaxPoolInputs = _named_inputs("_BnActMaxPoolInputs", "z mean var bn_weight bn_bias eps relu pool")


class _BnActMaxPool(torch.autograd.Function):
    """max_pool(act(bn(z))) with z's batch statistics: the stem. Keeps z only: the backward
    recomputes act(bn(z)) and the pooling's argmax (the same values, so the same indices),
    where eager keeps the activation (8 MiB for a batch of 8 at 128 px) and int64 indices."""

    @staticmethod
    def forward(ctx, z, mean, var, bn_weight, bn_bias, eps, relu, pool):
        y = _bn_apply(z, mean, var, bn_weight, bn_bias, None, eps, relu)
        out = torch.ops.aten.max_pool2d_with_indices(y, *pool)[0]
        ctx.save_for_backward(z, mean, var, bn_weight, bn_bias)
        ctx.eps, ctx.relu, ctx.pool = eps, relu, pool
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, mean, var, bn_weight, bn_bias = ctx.saved_tensors
        need = _BnActMaxPoolInputs(*ctx.needs_input_grad)
        y = _bn_apply(z, mean, var, bn_weight, bn_bias, None, ctx.eps, ctx.relu)
        indices = torch.ops.aten.max_pool2d_with_indices(y, *ctx.pool)[1]
        grad_y = torch.ops.aten.max_pool2d_with_indices_backward(grad_out, y, *ctx.pool, indices)
        dz, _, grad_bw, grad_bb = _bn_backward(
            grad_y, z, y if ctx.relu else None, mean, var, bn_weight, ctx.eps, ctx.relu,
            _BnNeeds(dz=need.z, residual=False, bn_weight=need.bn_weight, bn_bias=need.bn_bias))
        return tuple(_BnActMaxPoolInputs(z=dz, bn_weight=grad_bw, bn_bias=grad_bb))


def conv_stats(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: Tensor) -> PreActivation:
    """The first unit of a chain: z = conv(x) and its batch statistics; updates bn's running
    statistics as bn(z) in training would."""
    x, weight, bias = _cast(conv, x)
    z, mean, var = _ConvStats.apply(x, weight, bias, _conv_args(conv))
    _update_running_stats(bn, z, mean, var)
    bn_weight, bn_bias = _bn_params(bn, z)
    return PreActivation(z, mean, var, bn_weight, bn_bias, bn.eps)


def bn_act_conv_stats(pre: PreActivation, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> PreActivation:
    """The next unit: z = conv(act(bn(pre.z))) and its batch statistics, keeping pre.z but not
    act(bn(pre.z)); updates bn's running statistics."""
    z_in, weight, bias = _cast(conv, pre.z)
    z, mean, var = _BnActConvStats.apply(z_in, pre.mean, pre.var, pre.bn_weight, pre.bn_bias, weight, bias, pre.eps,
                                         relu, _conv_args(conv))
    _update_running_stats(bn, z, mean, var)
    bn_weight, bn_bias = _bn_params(bn, z)
    return PreActivation(z, mean, var, bn_weight, bn_bias, bn.eps)


def eligible_pool(pool: nn.Module) -> bool:
    """An nn.MaxPool2d (exact type) without return_indices: the stem's pooling."""
    return type(pool) is nn.MaxPool2d and not pool.return_indices


def bn_act_max_pool(pre: PreActivation, pool: nn.MaxPool2d, relu: bool = True) -> Tensor:
    """pool(act(bn(pre.z))), keeping pre.z only (the stem: conv_stats then this)."""
    def pair(v):
        return [v, v] if isinstance(v, int) else list(v)

    args = (pair(pool.kernel_size), pair(pool.stride if pool.stride is not None else pool.kernel_size),
            pair(pool.padding), pair(pool.dilation), bool(pool.ceil_mode))
    return _BnActMaxPool.apply(pre.z, pre.mean, pre.var, pre.bn_weight, pre.bn_bias, pre.eps, relu, args)


def bn_act(pre: PreActivation, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """The chain's output: act(bn(pre.z) [+ residual])."""
    if residual is not None and residual.dtype != pre.z.dtype and _library.autocast_dtype(pre.z.device.type):
        residual = residual.to(pre.z.dtype)  # as the fused unit's autocast rule
    return _BnAct.apply(pre.z, pre.mean, pre.var, pre.bn_weight, pre.bn_bias, residual, pre.eps, relu)
