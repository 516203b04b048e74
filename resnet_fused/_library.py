"""Op schemas, fake kernels and autograd formulas, shared by every backend.

Each backend registers the same ops (SCHEMAS below) under its own namespace:

    resnet_fused          pure-PyTorch reference (CPU and CUDA), backends/reference.py
    resnet_fused_triton   Triton kernels (torch.library.triton_op), backends/triton/
    resnet_fused_cuda     CUDA C++ kernels from csrc/ (TORCH_LIBRARY_IMPL(..., CUDA)), backends/cuda.py

The dispatcher allows one kernel per (op, dispatch key), so backends that all run
on CUDA tensors cannot share one op; they share the schema text below instead, and
`register_fake_and_autograd(namespace)` gives each namespace the same fake kernels
and the same autograd formulas. A test asserts the schemas agree across namespaces.

Decomposition (one autograd node per fused unit, one op per direction):

  conv_bn_eval(x, weight, scale, shift, residual?, ...) -> y
      y = act(conv(x, weight) * scale + shift [+ residual]). scale/shift fold the
      frozen BatchNorm (and a conv bias) and are computed by the caller with plain
      differentiable torch ops, so gradients reach gamma/beta through them.
      Saves x, weight, scale and, with ReLU, y (y is the next layer's input, which
      that layer saves anyway, so the ReLU mask costs no memory).
  conv_bn_eval_backward(grad_y, x, weight, scale, y?, ..., output_mask)
      -> grad_x, grad_weight, grad_scale, grad_shift, grad_residual
  conv_bn_train(x, weight, bias?, bn_weight, bn_bias, residual?, ..., eps, relu)
      -> y, z, mean, var
      z is the pre-BatchNorm conv output (kept for backward), mean/var the biased
      batch statistics in float32 (float64 for float64 x). Kernel plan: implicit-GEMM
      conv whose epilogue stores z and per-tile partial statistics, a finalize that
      merges the partials, an apply pass act(z * scale + shift [+ residual]).
      The running-statistics update is not part of the op (register_autograd needs a
      functional schema); ops.conv_bn_relu does it from mean/var under no_grad.
  conv_bn_train_backward(grad_y, x, weight, z, y?, mean, var, bn_weight, ..., eps, relu,
                         output_mask)
      -> grad_x, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias, grad_residual
      ReLU mask + residual grad + BatchNorm backward reductions + dz, then conv
      dgrad/wgrad. Saves x, weight, z, y: the same two activations per unit eager
      PyTorch keeps (BN input, ReLU output), not three.
  add_relu(x, residual) -> relu(x + residual); its backward is one torch.where.

Synchronized BatchNorm (SyncBatchNorm over several processes) needs the collectives
between the passes of conv_bn_train and of its backward, so it runs the same kernels as
four building-block ops, composed by the autograd.Function in distributed.py:

  conv_bn_stats(x, weight, bias?, ...) -> z, mean, var
      the implicit-GEMM conv storing z with this process's per-channel statistics
      (biased var, float32/float64), merged from per-tile partials as conv_bn_train does.
  bn_apply(z, mean, var, bn_weight, bn_bias, residual?, eps, relu) -> y
      act((z - mean) * bn_weight / sqrt(var + eps) + bn_bias [+ residual]), given (global) stats.
  bn_apply_backward_reduce(grad_y, z, y?, mean, relu) -> sum_g, sum_g_zc
      g = ReLU-masked grad_y; per-channel sum(g) and sum(g * (z - mean)), this process's rows.
  bn_apply_backward(grad_y, z, y?, mean, var, bn_weight, sum_g, sum_g_zc, count, eps, relu,
                    output_mask) -> dz, grad_residual
      dz = bn_weight * invstd * (g - sum_g / count - xhat * invstd * sum_g_zc / count), with the
      sums and the count of every process. The conv gradients then come from
      conv_bn_eval_backward(dz, x, weight, ones, ...).
These have no autograd formula of their own (the autograd.Function is their backward).

Gradients an op was not asked for (output_mask False) come back as empty tensors,
because a custom-op schema cannot return None for a Tensor.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import Tensor

from ._utils import conv_output_size, empty_like_format, relu_backward, stat_dtype

CONV_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups"

SCHEMAS: dict[str, str] = {
    "conv_bn_eval": (
        f"(Tensor x, Tensor weight, Tensor scale, Tensor shift, Tensor? residual, {CONV_ARGS}, bool relu)"
        " -> Tensor"
    ),
    "conv_bn_eval_backward": (
        f"(Tensor grad_y, Tensor x, Tensor weight, Tensor scale, Tensor? y, {CONV_ARGS}, bool relu,"
        " bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "conv_bn_train": (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor bn_weight, Tensor bn_bias, Tensor? residual,"
        f" {CONV_ARGS}, float eps, bool relu) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "conv_bn_train_backward": (
        "(Tensor grad_y, Tensor x, Tensor weight, Tensor z, Tensor? y, Tensor mean, Tensor var,"
        f" Tensor bn_weight, {CONV_ARGS}, float eps, bool relu, bool[6] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "add_relu": "(Tensor x, Tensor residual) -> Tensor",
    "conv_bn_stats": f"(Tensor x, Tensor weight, Tensor? bias, {CONV_ARGS}) -> (Tensor, Tensor, Tensor)",
    "bn_apply": (
        "(Tensor z, Tensor mean, Tensor var, Tensor bn_weight, Tensor bn_bias, Tensor? residual, float eps,"
        " bool relu) -> Tensor"
    ),
    "bn_apply_backward_reduce": "(Tensor grad_y, Tensor z, Tensor? y, Tensor mean, bool relu) -> (Tensor, Tensor)",
    "bn_apply_backward": (
        "(Tensor grad_y, Tensor z, Tensor? y, Tensor mean, Tensor var, Tensor bn_weight, Tensor sum_g,"
        " Tensor sum_g_zc, int count, float eps, bool relu, bool[2] output_mask) -> (Tensor, Tensor)"
    ),
    # conv_bn_stats of bn_apply(z_in, ...) without the residual: the recompute chain's forward
    # (recompute.py), the previous unit's BatchNorm + ReLU applied as the convolution loads it.
    "bn_act_conv_bn_stats": (
        "(Tensor z_in, Tensor mean, Tensor var, Tensor bn_weight, Tensor bn_bias, float eps, bool relu,"
        f" Tensor weight, Tensor? bias, {CONV_ARGS}) -> (Tensor, Tensor, Tensor)"
    ),
    # Its backward's conv part: (g, grad_weight, sum_g, sum_g_zc) for grad_z. g is the gradient
    # of the previous unit's BatchNorm output (the ReLU's input): dgrad masked where
    # relu(bn(z_in)) was not positive; grad_weight the wgrad against relu(bn(z_in)), recomputed
    # from z_in; sum_g and sum_g_zc BatchNorm backward's per-channel sums of g and
    # g * (z_in - mean) (bn_apply_backward_reduce's, with g and no ReLU). The sums come with g.
    "bn_act_conv_backward": (
        "(Tensor grad_z, Tensor z_in, Tensor mean, Tensor var, Tensor bn_weight, Tensor bn_bias, float eps,"
        f" bool relu, Tensor weight, {CONV_ARGS}, bool[2] output_mask) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

# The building blocks of the synchronized BatchNorm path and of recompute.py's chain (no
# autograd formula of their own: the autograd.Functions there compose them).
SYNC_OP_NAMES = ("conv_bn_stats", "bn_apply", "bn_apply_backward_reduce", "bn_apply_backward")
CHAIN_OP_NAMES = ("bn_act_conv_bn_stats", "bn_act_conv_backward")

OP_NAMES = tuple(SCHEMAS)

# ---------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes, dtypes and memory formats exactly as the real kernels give.


def _fake_conv_bn_eval(x, weight, scale, shift, residual, stride, padding, dilation, groups, relu):
    return empty_like_format(conv_output_size(x.shape, weight.shape, stride, padding, dilation), x)


def _grad_or_empty(needed: bool, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    if not needed:
        return like.new_empty(0)
    if like.dim() == 4:
        return empty_like_format(like.shape, like, dtype)
    return torch.empty(like.shape, dtype=dtype or like.dtype, device=like.device)


def _fake_conv_bn_eval_backward(grad_y, x, weight, scale, y, stride, padding, dilation, groups, relu, output_mask):
    need_x, need_w, need_scale, need_shift, need_residual = output_mask
    return (
        _grad_or_empty(need_x, x),
        _grad_or_empty(need_w, weight),
        _grad_or_empty(need_scale, scale),
        _grad_or_empty(need_shift, scale),
        empty_like_format(grad_y.shape, x) if need_residual else x.new_empty(0),
    )


def _fake_conv_bn_train(x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu):
    size = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    acc = stat_dtype(x.dtype)
    return (
        empty_like_format(size, x),
        empty_like_format(size, x),
        x.new_empty(size[1], dtype=acc),
        x.new_empty(size[1], dtype=acc),
    )


def _fake_conv_bn_train_backward(
    grad_y, x, weight, z, y, mean, var, bn_weight, stride, padding, dilation, groups, eps, relu, output_mask
):
    need_x, need_w, need_bias, need_bn_weight, need_bn_bias, need_residual = output_mask
    return (
        _grad_or_empty(need_x, x),
        _grad_or_empty(need_w, weight),
        x.new_empty(weight.shape[0], dtype=weight.dtype) if need_bias else x.new_empty(0),
        _grad_or_empty(need_bn_weight, bn_weight),
        _grad_or_empty(need_bn_bias, bn_weight),
        empty_like_format(z.shape, x) if need_residual else x.new_empty(0),
    )


def _fake_add_relu(x, residual):
    return empty_like_format(x.shape, x)


def _fake_conv_bn_stats(x, weight, bias, stride, padding, dilation, groups):
    size = conv_output_size(x.shape, weight.shape, stride, padding, dilation)
    acc = stat_dtype(x.dtype)
    return empty_like_format(size, x), x.new_empty(size[1], dtype=acc), x.new_empty(size[1], dtype=acc)


def _fake_bn_act_conv_bn_stats(z_in, mean, var, bn_weight, bn_bias, eps, relu, weight, bias, stride, padding,
                               dilation, groups):
    return _fake_conv_bn_stats(z_in, weight, bias, stride, padding, dilation, groups)


def _fake_bn_act_conv_backward(grad_z, z_in, mean, var, bn_weight, bn_bias, eps, relu, weight, stride, padding,
                               dilation, groups, output_mask):
    need_g, need_w = output_mask
    acc = stat_dtype(z_in.dtype)
    sums = [z_in.new_empty(z_in.size(1) if need_g else 0, dtype=acc) for _ in range(2)]
    return (empty_like_format(z_in.shape, z_in) if need_g else z_in.new_empty(0),
            empty_like_format(weight.shape, weight) if need_w else weight.new_empty(0), *sums)


def _fake_bn_apply(z, mean, var, bn_weight, bn_bias, residual, eps, relu):
    return empty_like_format(z.shape, z)


def _fake_bn_apply_backward_reduce(grad_y, z, y, mean, relu):
    acc = stat_dtype(z.dtype)
    return z.new_empty(z.size(1), dtype=acc), z.new_empty(z.size(1), dtype=acc)


def _fake_bn_apply_backward(grad_y, z, y, mean, var, bn_weight, sum_g, sum_g_zc, count, eps, relu, output_mask):
    return tuple(empty_like_format(z.shape, z) if need else z.new_empty(0) for need in output_mask)


FAKES = {
    "conv_bn_eval": _fake_conv_bn_eval,
    "conv_bn_eval_backward": _fake_conv_bn_eval_backward,
    "conv_bn_train": _fake_conv_bn_train,
    "conv_bn_train_backward": _fake_conv_bn_train_backward,
    "add_relu": _fake_add_relu,
    "conv_bn_stats": _fake_conv_bn_stats,
    "bn_apply": _fake_bn_apply,
    "bn_apply_backward_reduce": _fake_bn_apply_backward_reduce,
    "bn_apply_backward": _fake_bn_apply_backward,
    "bn_act_conv_bn_stats": _fake_bn_act_conv_bn_stats,
    "bn_act_conv_backward": _fake_bn_act_conv_backward,
}

# ---------------------------------------------------------------------------------------
# Autograd formulas. Written once; `ops` is the namespace (torch.ops.<ns>) whose backward
# op is called, so each backend's forward is paired with the same backend's backward.


def _none_if_empty(grads, mask):
    return [g if m else None for g, m in zip(grads, mask)]


def _make_autograd(ops):
    def setup_conv_bn_eval(ctx, inputs, output):
        x, weight, scale, shift, residual, stride, padding, dilation, groups, relu = inputs
        ctx.save_for_backward(x, weight, scale, output if relu else None)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.relu = relu
        ctx.has_residual = residual is not None

    def backward_conv_bn_eval(ctx, grad_y):
        x, weight, scale, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2], need[3], ctx.has_residual and need[4]]
        if not any(mask):
            return (None,) * 10
        grads = ops.conv_bn_eval_backward(grad_y, x, weight, scale, y, *ctx.conv_args, ctx.relu, mask)
        return (*_none_if_empty(grads, mask), None, None, None, None, None)

    def setup_conv_bn_train(ctx, inputs, output):
        x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu = inputs
        y, z, mean, var = output
        ctx.mark_non_differentiable(z, mean, var)
        # No zero-filled gradients for z, mean and var (autograd would allocate and fill a
        # z-sized tensor per unit per backward): backward reads grad_y only.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, z, y if relu else None, mean, var, bn_weight)
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.eps = eps
        ctx.relu = relu
        ctx.has_bias = bias is not None
        ctx.has_residual = residual is not None

    def backward_conv_bn_train(ctx, grad_y, _grad_z, _grad_mean, _grad_var):
        x, weight, z, y, mean, var, bn_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[1], ctx.has_bias and need[2], need[3], need[4], ctx.has_residual and need[5]]
        if grad_y is None or not any(mask):  # None: only a non-differentiable output was reached
            return (None,) * 12
        grads = ops.conv_bn_train_backward(
            grad_y, x, weight, z, y, mean, var, bn_weight, *ctx.conv_args, ctx.eps, ctx.relu, mask
        )
        return (*_none_if_empty(grads, mask), None, None, None, None, None, None)

    def setup_add_relu(ctx, inputs, output):
        ctx.save_for_backward(output)

    def backward_add_relu(ctx, grad_y):
        (y,) = ctx.saved_tensors
        grad = relu_backward(grad_y, y)
        return grad, grad

    return {
        "conv_bn_eval": (backward_conv_bn_eval, setup_conv_bn_eval),
        "conv_bn_train": (backward_conv_bn_train, setup_conv_bn_train),
        "add_relu": (backward_add_relu, setup_add_relu),
    }


def _raising_autograd(message: str):
    """An autograd formula whose backward raises NotImplementedError(message)."""

    def setup(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(message)

    return backward, setup


def _no_formula(name: str):
    if name in CHAIN_OP_NAMES:
        return _raising_autograd(
            f"resnet_fused: {name} is a building block of recompute_bn_relu's chain (recompute.py) and has no "
            "autograd formula of its own."
        )
    if name in SYNC_OP_NAMES:
        return _raising_autograd(
            f"resnet_fused: {name} is a building block of the synchronized BatchNorm path and has no "
            "autograd formula of its own; call ops.conv_bn_relu(..., process_group=...) instead."
        )
    return _raising_autograd(double_backward_message(name))  # the backward ops: reached by double backward only


def double_backward_message(backward_op: str) -> str:
    return (f"resnet_fused: double backward through {backward_op} is not supported. Use torch.autograd.grad "
            "without create_graph=True, or convert the model with resnet_fused.to_torchvision().")


class _RaisesWhenDifferentiated(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, message):
        ctx.message = message
        return grad.clone()

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(ctx.message)


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, message):
        ctx.mark_dirty(y)  # y itself, not a view: the caller keeps working on it in place
        ctx.message = message
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: the gradient joins a graph that must not be differentiated
            grad = _RaisesWhenDifferentiated.apply(grad, ctx.message)
        return grad, None


def _top_saved_tensors_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        top(False)
    except TypeError:  # absent, or a signature this code does not know: count hooks as present
        return lambda: True
    return functools.partial(top, False)


_saved_tensors_hooks = _top_saved_tensors_hooks()


def saved_tensors_watched() -> bool:
    """Whether saved-tensor hooks are active (torch.utils.checkpoint, save_on_cpu, activation
    memory counters). They see what each autograd node saves, and non-reentrant checkpointing
    requires its recomputation to save as many tensors as the forward did, whatever else
    (a dispatch mode, the profiler) watched either pass: there a unit saves the op's formula's
    tensors (the registered op's or its autograd.Function's), never those of aten's graph."""
    return _saved_tensors_hooks() is not None


def once_differentiable(y: Tensor, backward_op: str) -> Tensor:
    """y (marked modified in place, so take it fresh from an op that did not save it), its
    gradient passed through unchanged; differentiating that gradient again raises as
    differentiating the registered op `backward_op` does. For a unit that runs as aten's own
    autograd graph (which would support double backward) in place of a resnet_fused op (which
    does not): every backend then behaves alike."""
    return _OnceDifferentiable.apply(y, double_backward_message(backward_op))


# ---------------------------------------------------------------------------------------
# Autocast, registered per op at the dispatcher (AutocastCPU, AutocastCUDA), so a direct
# torch.ops call, the functional API and a compiled graph all get the same dtypes as eager
# nn.Conv2d -> nn.BatchNorm2d -> ReLU under torch.autocast:
#   * the ops that contain the convolution cast its operands (x, weight, conv bias, and the
#     residual, which joins the conv-dtype output) to the autocast dtype, as aten::conv2d's
#     lower-precision rule does (floating tensors other than float64); BatchNorm vectors,
#     scale/shift and statistics keep their dtype, as eager BatchNorm keeps its float32
#     parameters under autocast. The output has the autocast dtype, as eager's BN output.
#   * add_relu promotes its two inputs to their common dtype, as eager `x + residual` does.
#   * the backward ops and the SyncBatchNorm apply/reduce ops have no autocast rule: they
#     are called with the dtypes their forward produced (autocast does not apply to
#     backward), and run with autocast's fallthrough.
# The op then runs with autocast excluded, so a backend's internal float32 math stays
# float32.

AUTOCAST_DISPATCH_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
# op -> the arguments cast to the autocast dtype, by schema name
AUTOCAST_CAST_ARGS = {"conv_bn_eval": ("x", "weight", "residual"), "conv_bn_train": ("x", "weight", "bias", "residual"),
                      "conv_bn_stats": ("x", "weight", "bias")}
AUTOCAST_PROMOTE_ARGS = {"add_relu": ("x", "residual")}


def argument_names(op_name: str) -> tuple[str, ...]:
    """The argument names of op `op_name`, in order, read from its schema in SCHEMAS."""
    return tuple(arg.name for arg in torch._C.parse_schema(op_name + SCHEMAS[op_name]).arguments)


def argument_positions(op_name: str, names) -> tuple[int, ...]:
    """Positions of the arguments `names` in op `op_name`'s schema (a KeyError names the one
    the schema lacks), so a table of arguments cannot go stale when a schema changes."""
    order = {name: i for i, name in enumerate(argument_names(op_name))}
    return tuple(order[name] for name in names)


_CAST_AT = {op: argument_positions(op, names) for op, names in AUTOCAST_CAST_ARGS.items()}
_PROMOTE_AT = {op: argument_positions(op, names) for op, names in AUTOCAST_PROMOTE_ARGS.items()}


@torch.compiler.assume_constant_result
def _has_autocast(device_type: str) -> bool:
    # A constant for torch.compile: Dynamo in torch 2.11 cannot trace
    # torch._C._is_autocast_available (a graph break, an error under fullgraph=True).
    return torch.amp.is_autocast_available(device_type)


_is_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_active() -> bool:
    """Whether torch.autocast may be on for some device: one C call, the per-call test before
    autocast_dtype. True where this torch cannot tell, and while compiling (Dynamo traces
    autocast_dtype, not this call)."""
    if _is_any_autocast_enabled is None or torch.compiler.is_compiling():
        return True
    return _is_any_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """torch.autocast's lower-precision dtype when it is enabled for device_type, else None."""
    # Devices without autocast (meta) would make is_autocast_enabled raise.
    if not _has_autocast(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(dtype: torch.dtype, *tensors):
    """tensors as the convolution's autocast rule casts its operands: floating tensors other
    than float64 to dtype; None and everything else as they are."""
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def autocast_args(op_name: str, args: tuple, device_type: str) -> tuple:
    """`args` of op `op_name` as its autocast rule (above) gives them on device_type."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return args
    args = list(args)
    if op_name in _CAST_AT:
        positions = _CAST_AT[op_name]
        for i, t in zip(positions, autocast_cast(dtype, *(args[i] for i in positions))):
            args[i] = t
    elif op_name in _PROMOTE_AT:
        positions = _PROMOTE_AT[op_name]
        common = functools.reduce(torch.promote_types, (args[i].dtype for i in positions))
        for i in positions:
            args[i] = args[i].to(common)
    return tuple(args)


_autocast_libs: list[torch.library.Library] = []  # registrations live as long as their Library


def register_autocast(namespace: str) -> None:
    """Register the autocast rules above for the ops of `namespace`."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    _autocast_libs.append(lib)
    for name in (*AUTOCAST_CAST_ARGS, *AUTOCAST_PROMOTE_ARGS):
        op = getattr(getattr(torch.ops, namespace), name).default
        for device_type, key in AUTOCAST_DISPATCH_KEYS.items():
            dispatch_key = getattr(torch._C.DispatchKey, key)

            def autocast_kernel(*args, op=op, name=name, device_type=device_type, dispatch_key=dispatch_key):
                cast = autocast_args(name, args, device_type)
                with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
                    return op(*cast)

            # The C++ dispatcher (eager) and the Python dispatcher (torch.compile's tracing)
            # each look the kernel up in their own table, so it goes into both.
            lib.impl(name, lambda _keyset, *args, kernel=autocast_kernel: kernel(*args), key, with_keyset=True)
            op.py_impl(dispatch_key)(autocast_kernel)


# ---------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter), so FLOP counters and MFU tools see the
# convolutions inside the fused ops. As torch's own formulas count them: the convolution's
# multiply-adds only (BatchNorm, residual and ReLU are not counted), the backward's data and
# weight gradients each the forward's count when asked for. The formulas get tensors as shapes.


def _conv_flops(x_shape, w_shape, out_shape) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape))


def _flops_conv_forward(x, weight, *args, out_shape=None, **kwargs) -> int:
    y_shape = out_shape[0] if isinstance(out_shape[0], (list, tuple, torch.Size)) else out_shape
    return _conv_flops(x, weight, y_shape)


def _flops_conv_bn_eval_backward(grad_y, x, weight, *args, out_shape=None, **kwargs) -> int:
    need_x, need_w, need_scale = args[-1][:3]
    return _conv_flops(x, weight, grad_y) * (int(need_x) + int(need_w or need_scale))


def _flops_conv_bn_train_backward(grad_y, x, weight, *args, out_shape=None, **kwargs) -> int:
    need_x, need_w = args[-1][:2]
    return _conv_flops(x, weight, grad_y) * (int(need_x) + int(need_w))


def _flops_bn_act_conv_forward(z_in, mean, var, bn_weight, bn_bias, eps, relu, weight, *args, out_shape=None,
                               **kwargs) -> int:
    return _flops_conv_forward(z_in, weight, out_shape=out_shape)


def _flops_bn_act_conv_backward(grad_z, z_in, mean, var, bn_weight, bn_bias, eps, relu, weight, *args,
                                out_shape=None, **kwargs) -> int:
    need_g, need_w = args[-1]
    return _conv_flops(z_in, weight, grad_z) * (int(need_g) + int(need_w))


FLOP_FORMULAS = {
    "bn_act_conv_bn_stats": _flops_bn_act_conv_forward,
    "bn_act_conv_backward": _flops_bn_act_conv_backward,
    "conv_bn_eval": _flops_conv_forward,
    "conv_bn_train": _flops_conv_forward,
    "conv_bn_stats": _flops_conv_forward,
    "conv_bn_eval_backward": _flops_conv_bn_eval_backward,
    "conv_bn_train_backward": _flops_conv_bn_train_backward,
}


def register_flop_formulas(namespace: str) -> None:
    """Register FLOP_FORMULAS for the ops of `namespace` (the elementwise ops count 0, as
    torch's counter counts elementwise aten ops)."""
    from torch.utils.flop_counter import register_flop_formula

    for name, formula in FLOP_FORMULAS.items():
        register_flop_formula(getattr(getattr(torch.ops, namespace), name))(formula)


def direct_ops(impls: dict, namespace: str, no_grad: dict | None = None, with_grad: dict | None = None
               ) -> tuple[types.SimpleNamespace, types.SimpleNamespace]:
    """A backend's ops as plain eager calls them without the dispatcher (backends.select_ops,
    where nothing watches it): (grad mode off: the implementations themselves; grad mode on: the
    ops with an autograd formula as torch.autograd.Functions over the implementations, with the
    same formulas as the registered ops, and every other op as its torch.ops op).

    The registered op's autograd wrapper fills defaults, redispatches and checks aliasing on
    every call, tens of microseconds a unit in training; an autograd.Function over the same
    formula is the same graph (saved tensors, needs_input_grad, non-differentiable outputs)
    for less. A backward run with create_graph=True calls the backward op through torch.ops, so
    double backward still raises as the registered ops do.

    no_grad: implementations that replace impls' in the first namespace only (grad mode off:
    inference; never traced or decomposed, so they may work in place on their own fresh
    outputs and keep what they derive from the parameters).

    with_grad: implementations for grad mode on that build their autograd graph from aten's own
    differentiable ops (C++ backward nodes, as eager's modules) where they cover a call, with
    the op's values and gradients and its double-backward error (once_differentiable); each
    takes the autograd.Function's apply first and calls it for the calls it does not cover."""
    no_grad = no_grad or {}
    with_grad_impls = with_grad or {}
    direct = types.SimpleNamespace(**{**impls, **no_grad})
    registered = getattr(torch.ops, namespace)

    class BackwardOps:  # what a formula's backward calls
        def __getattr__(self, name):
            return getattr(registered if torch.is_grad_enabled() else direct, name)

    def forward_of(name, setup):
        # The ctx-taking form: with a separate setup_context, Function.apply binds the
        # arguments against forward's signature (inspect.signature, ~15 us) on every call.
        def forward(ctx, *args):
            # Looked up per call: the namespace above is the one place (grad mode is off in a
            # forward, but its output joins a graph, so no_grad's implementations do not run here).
            output = impls[name](*args) if name in no_grad else getattr(direct, name)(*args)
            setup(ctx, args, output)
            return output
        return forward

    formulas = _make_autograd(BackwardOps())
    with_grad = {}
    for name in impls:
        if name not in formulas:
            with_grad[name] = getattr(registered, name)
            continue
        backward, setup = formulas[name]
        function = type(f"{name}_direct", (torch.autograd.Function,), {
            "forward": staticmethod(forward_of(name, setup)),
            "backward": staticmethod(backward),
        })
        with_grad[name] = function.apply
        if name in with_grad_impls:
            with_grad[name] = functools.partial(with_grad_impls[name], function.apply)
    return direct, types.SimpleNamespace(**with_grad)


def register_fake_and_autograd(namespace: str) -> None:
    """Give every op of `namespace` the shared fake kernels, autograd formulas, autocast rules
    and FLOP formulas."""
    ops = getattr(torch.ops, namespace)
    formulas = _make_autograd(ops)
    for name in OP_NAMES:
        qualname = f"{namespace}::{name}"
        torch.library.register_fake(qualname, FAKES[name])
        backward, setup = formulas.get(name) or _no_formula(name)
        torch.library.register_autograd(qualname, backward, setup_context=setup)
    register_autocast(namespace)
    register_flop_formulas(namespace)


def define_library(namespace: str, impls: dict, dispatch_keys=("CPU", "CUDA")) -> torch.library.Library:
    """Define the schemas in `namespace`, register `impls` (name -> fn) for dispatch_keys,
    then the shared fake kernels and autograd. `impls` may be empty when the kernels come
    from C++ (the CUDA extension registers them with TORCH_LIBRARY_IMPL)."""
    lib = torch.library.Library(namespace, "DEF")
    for name, schema in SCHEMAS.items():
        lib.define(name + schema)
        if name in impls:
            for key in dispatch_keys:
                lib.impl(name, impls[name], key)
    register_fake_and_autograd(namespace)
    return lib

