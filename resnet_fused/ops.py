"""Functional API: fused conv + BatchNorm (+ residual) (+ ReLU), and add + ReLU.

A call walks here once: the arguments are checked and autocast (the rule `_library.py`
defines for the ops) applied, the backend picked (`resnet_fused.backends`), the frozen
statistics folded into a scale and shift for a fused eval kernel, the op run, and the running
statistics updated for training. The arithmetic happens in the torch.library ops (schemas in
`_library.py`), but for eval on the reference in plain eager, which is eager's own ops.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import _library
from ._batchnorm import BatchNormArgs, affine_or_default, check_values_per_channel, update_running_stats
from ._utils import conv_output_size, stat_dtype
from .backends import backend_ops, plain_eager, reference, select_backend, select_ops
from .distributed import sync_conv_bn_train

__all__ = ["conv_bn_relu", "conv_bn_unit", "add_relu", "BatchNormArgs", "ConvArgs"]


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_like(name: str, t: Tensor, like: Tensor, dims: int | None = None, same_dtype: bool = True,
                device: torch.device | None = None) -> None:
    """t (a checked tensor) against x: device (x's, passed in when the caller has it), dtype,
    dimensions."""
    device = like.device if device is None else device
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; expected the same device")
    if same_dtype and t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {like.dtype}; expected the same dtype")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def _check_pair(name: str, value, minimum: int) -> list[int]:
    if type(value) is tuple and len(value) == 2:  # nn.Conv2d's own attributes: checked in a few steps
        first, second = value
        if type(first) is int and type(second) is int and first >= minimum and second >= minimum:
            return [first, second]
    pair = list(_pair(value))
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return pair


def _check_number(name: str, value, minimum: float | None = None) -> None:
    kind = type(value)
    if kind is not float and kind is not int and (  # the common case without the ABC check (~1 us)
            isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))):
        raise TypeError(f"{name} must be a real number (int or float), got {value!r}")
    if minimum is not None and not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def _check_groups(groups) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")


def _check_channel_vector(name: str, t, channels: int, x: Tensor, device: torch.device) -> None:
    """A floating-point per-output-channel vector on x's device."""
    _check_tensor(name, t)
    _check_like(name, t, x, dims=1, same_dtype=name == "bias", device=device)  # the conv bias is a conv operand
    if t.numel() != channels:
        raise ValueError(f"{name} must have {channels} elements (one per output channel), got {t.numel()}")


def _sync_group_size(process_group) -> int:
    """Processes in `process_group` (1 for None); a clear error for anything else."""
    if process_group is None:
        return 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {process_group!r}")
    return dist.get_world_size(process_group)


class ConvArgs(NamedTuple):
    """A convolution's checked hyperparameters, in the ops' schema order (`*conv` in a call)."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int


def conv_bn_relu(
    x: Tensor,
    weight: Tensor,
    bn_weight: Tensor | None,
    bn_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    relu: bool = True,
    process_group=None,
) -> Tensor:
    """act(batch_norm(conv2d(x, weight, bias)) [+ residual]), act = ReLU if `relu` else identity.

    Same semantics as nn.Conv2d followed by nn.BatchNorm2d (F.batch_norm with these
    arguments) and ReLU: with `training=True`, or with no running statistics, the
    batch statistics normalize and the running statistics (if given, and training) are
    updated in place with `momentum`; otherwise the running statistics normalize.

    process_group: a torch.distributed process group whose processes' batches share the
    batch statistics (SyncBatchNorm: uneven per-process batches allowed, every process of
    the group must call this for the unit, forward and backward). None, or a group of one
    process, normalizes with this process's batch alone. Only used with batch statistics.
    """
    bn = BatchNormArgs(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, process_group)
    return conv_bn_unit(x, weight, bn, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias,
                        residual=residual, relu=relu)


def conv_bn_unit(x: Tensor, weight: Tensor, bn: BatchNormArgs, *, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: Tensor | None = None, residual: Tensor | None = None, relu: bool = True) -> Tensor:
    """conv_bn_relu with the BatchNorm's arguments as one BatchNormArgs: the one way every
    caller (the functional API, the fused modules) reaches the ops. bn.plain: the norm is plain
    float arithmetic on its own buffers (FrozenBatchNorm2d), so under autocast eager's output
    takes the dtype promoted with those buffers (float32 for float32 buffers), and so does a
    residual sum after it: the conv + BN stay fused, the residual add and ReLU follow in that
    dtype."""
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, process_group, plain = bn
    # Each check accepts the common case in a few reads and otherwise calls the checker that
    # names what is wrong: this runs per unit per call (53 times a ResNet-50 forward). The
    # operands autocast may cast are checked first; the BatchNorm vectors with their shapes
    # below (_check_channel_vector).
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        _check_tensor("x", x)
    if not (isinstance(weight, Tensor) and weight.is_floating_point()):
        _check_tensor("weight", weight)
    if residual is not None:
        _check_tensor("residual", residual)
    if bias is not None:
        _check_tensor("bias", bias)
    # Autocast before the dtype checks: a bfloat16 x with float32 weights is accepted under
    # autocast, as F.conv2d accepts it, and is an error outside.
    autocast_dtype = _library.autocast_dtype(x.device.type) if _library.autocast_active() else None
    uncast_residual = residual
    if autocast_dtype is not None:
        x, weight, bias, residual = _library.autocast_cast(autocast_dtype, x, weight, bias, residual)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D, got shape {tuple(x.shape)}")
    device = x.device
    if weight.device != device or weight.dtype != x.dtype or weight.dim() != 4:
        _check_like("weight", weight, x, dims=4, device=device)
    conv = ConvArgs(_check_pair("stride", stride, 1), _check_pair("padding", padding, 0),
                    _check_pair("dilation", dilation, 1), groups)
    if type(groups) is not int or groups < 1:
        _check_groups(groups)
    if type(training) is not bool:
        _check_bool("training", training)
    if type(relu) is not bool:
        _check_bool("relu", relu)
    if type(momentum) is not float:
        _check_number("momentum", momentum)
    if type(eps) is not float or not eps >= 0:
        _check_number("eps", eps, minimum=0)
    n, c_in, h, w = x.shape
    c_out, c_per_group, kh, kw = w_shape = weight.shape
    if not (c_out and c_per_group and kh and kw):
        raise ValueError(f"weight must have no zero-size dimension, got shape {tuple(w_shape)}")
    if h == 0 or w == 0:
        # As F.conv2d: only the batch may be empty (the output is then empty too).
        raise ValueError(f"x must have non-zero height and width, got shape {tuple(x.shape)}")
    if c_out % groups != 0:
        raise ValueError(f"weight.size(0)={c_out} (out_channels) must be divisible by groups={groups}")
    if c_in != c_per_group * groups:
        raise ValueError(
            f"x has {c_in} channels but weight {tuple(w_shape)} with groups={groups} expects "
            f"{c_per_group * groups} (weight.size(1) * groups)"
        )
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and not (isinstance(t, Tensor) and t.device == device and t.shape == (c_out,)
                                  and t.is_floating_point() and (name != "bias" or t.dtype == x.dtype)):
            _check_channel_vector(name, t, c_out, x, device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    group = None if process_group is None or _sync_group_size(process_group) == 1 else process_group
    out_size = conv_output_size(x.shape, w_shape, conv.stride, conv.padding, conv.dilation)
    if out_size[2] <= 0 or out_size[3] <= 0:
        raise ValueError(
            f"x of spatial size {(h, w)} is too small for kernel {tuple(w_shape[2:])} with "
            f"stride={conv.stride}, padding={conv.padding}, dilation={conv.dilation}: output size would be "
            f"{out_size[2:]}"
        )
    if residual is not None:
        _check_like("residual", residual, x, dims=4, device=device)
        if list(residual.shape) != out_size:
            raise ValueError(f"residual must have the conv output's shape {out_size}, got {list(residual.shape)}")
    if plain and autocast_dtype is not None:
        wider = functools.reduce(torch.promote_types, [t.dtype for t in (bn_weight, running_var) if t is not None],
                                 autocast_dtype)
        if wider != autocast_dtype:
            y = _conv_bn(x, weight, bias, conv, bn, None, False, group, out_size)
            return _add_relu_tail(y.to(wider), uncast_residual, relu)
    return _conv_bn(x, weight, bias, conv, bn, residual, relu, group, out_size)


def _eval_scale_shift(bn_weight, bn_bias, running_mean, running_var, bias, eps, acc) -> tuple[Tensor, Tensor]:
    """Frozen BatchNorm and the conv bias folded into a per-channel scale and shift, in dtype acc,
    for the fused kernels' epilogue. Computed every call, from the tensors as they are now:
    nothing a write could leave stale (resnet_fused.freeze is the promise that they do not
    change)."""
    invstd = torch.rsqrt(running_var.to(acc) + eps)
    scale = invstd if bn_weight is None else bn_weight.to(acc) * invstd
    centre = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    shift = centre * scale if bn_bias is None else bn_bias.to(acc) + centre * scale
    return scale, shift


def _batch_norm_takes(x: Tensor, acc: torch.dtype, bn_weight, bn_bias, running_mean: Tensor, running_var: Tensor
                      ) -> bool:
    """Whether F.batch_norm takes these vectors beside x: one dtype, x's or (for a half x) float32.
    The ops also take vectors of other floating dtypes (float32 beside a float64 conv), which
    eager's BatchNorm refuses; those calls take the op's scale and shift."""
    dtype = running_var.dtype
    return ((dtype is x.dtype or dtype is acc) and running_mean.dtype is dtype
            and (bn_weight is None or bn_weight.dtype is dtype) and (bn_bias is None or bn_bias.dtype is dtype))


def _add_relu_tail(y: Tensor, residual: Tensor | None, relu: bool) -> Tensor:
    """act(y [+ residual]) as eager computes it after a norm: unfused but for add + ReLU."""
    if residual is not None:
        return add_relu(y, residual) if relu else y + residual
    return torch.relu(y) if relu else y


def _conv_bn(x: Tensor, weight: Tensor, bias: Tensor | None, conv: ConvArgs, bn: BatchNormArgs,
             residual: Tensor | None, relu: bool, group, out_size: list[int]) -> Tensor:
    """The fused unit on checked, autocast arguments; group: a process group of more than one
    process to synchronize the batch statistics over, or None."""
    acc = stat_dtype(x.dtype)
    plain = plain_eager()
    bn_weight, bn_bias, running_mean, running_var, training, momentum, eps = bn[:7]
    if not training and running_mean is not None:
        # The backends choose on shapes, dtypes and devices: running_var stands in for the
        # scale and shift where it has their dtype, so they are computed only for a call that
        # takes them. In plain eager the reference runs eager's own modules' arithmetic: the
        # upstream model's bits.
        scale = shift = None
        if running_var.dtype is not acc:
            scale, shift = _eval_scale_shift(bn_weight, bn_bias, running_mean, running_var, bias, eps, acc)
        probe = running_var if scale is None else scale
        backend = select_backend("conv_bn_eval", x, weight, probe, probe, residual, *conv, relu)
        if plain and backend is reference and (bn.plain or _batch_norm_takes(x, acc, bn_weight, bn_bias, running_mean,
                                                                          running_var)):
            return reference.conv_bn_eval_eager(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                                residual, *conv, relu, bn.plain)
        if scale is None:
            scale, shift = _eval_scale_shift(bn_weight, bn_bias, running_mean, running_var, bias, eps, acc)
        return backend_ops(backend, plain).conv_bn_eval(x, weight, scale, shift, residual, *conv, relu)

    count = out_size[0] * out_size[2] * out_size[3]
    if group is None:
        check_values_per_channel(count, out_size)
    if bn_weight is None or bn_bias is None:
        bn_weight, bn_bias = affine_or_default(bn_weight, bn_bias, out_size[1], acc, x.device)
    if group is not None:
        y, mean, var, count = sync_conv_bn_train(x, weight, bias, bn_weight, bn_bias, residual, conv, eps, relu,
                                                 group)
    else:
        args = (x, weight, bias, bn_weight, bn_bias, residual, *conv, eps, relu)
        y, _, mean, var = select_ops("conv_bn_train", *args, plain_eager=plain).conv_bn_train(*args)
    # The synchronized count is a device tensor (no host read, for CUDA graphs), > 1 as
    # sync_conv_bn_train checked; the local one an int, 0 for an empty batch.
    if training and running_mean is not None and (group is not None or count > 0):
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    """relu(x + residual), in one pass over memory on the fused backends."""
    _check_tensor("x", x)
    _check_tensor("residual", residual)
    x, residual = _library.autocast_args("add_relu", (x, residual), x.device.type)  # promote, as x + residual
    _check_like("residual", residual, x)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    return select_ops("add_relu", x, residual).add_relu(x, residual)
