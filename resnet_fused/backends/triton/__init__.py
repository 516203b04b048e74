"""Triton backend: the resnet_fused ops (_library.SCHEMAS) as `torch.library.triton_op`s.

Kernels (kernels/):
  conv_bn_eval            one implicit-GEMM kernel: conv + scale/shift (+ residual) (+ ReLU).
  conv_bn_train           implicit-GEMM conv storing z and per-tile (mean, M2); a Chan merge
                          in fixed order (finalize_stats); an apply pass (bn_apply).
  conv_bn_eval_backward   ReLU mask (+ per-channel sum for grad_shift) in one pass; Triton
                          dgrad on a copy of the weight scaled by the BN scale; Triton wgrad
                          (split-K float32 partials, ordered sum) whose finalize writes
                          grad_w = wgrad * scale and grad_scale = sum(wgrad * w).
  conv_bn_train_backward  fused ReLU mask + residual grad + BatchNorm backward (reduce pass
                          + dz pass); Triton dgrad and wgrad.
  add_relu                one flat pass.
  SyncBatchNorm blocks    conv_bn_stats (the training conv + finalize), bn_apply,
                          bn_apply_backward_reduce / bn_apply_backward (the two passes of the
                          BatchNorm backward, split where distributed.py all-reduces).
  bn_act_conv_bn_stats    recompute.py's chain: conv_bn_stats with the previous unit's
                          BatchNorm + ReLU applied to the A tile as the conv kernel loads it
                          (PROLOGUE; padding zeroed after the transform).
  bn_act_conv_backward    its backward's conv part: dgrad with that ReLU's mask recomputed and
                          BatchNorm backward's two sums taken in its epilogue, wgrad with the
                          same prologue on its x operand.
Every reduction is deterministic (no atomics; fixed merge order). kernels/conv.py describes
the GEMM design (one pipelined K loop, int32 indices, TMA for 1x1), kernels/configs.py the
config pruning; aot.py is the sm_90 compile gate that measures them without a GPU.

Coverage (`unsupported_reason`): float16, bfloat16 and float32 tensors on CUDA (compute capability
>= 8.0), or on CPU under TRITON_INTERPRET=1; any stride, padding, dilation, kernel size
and group count (groups are a grid axis: one GEMM per group); channels_last, or NCHW through
copies to channels_last (kernels/conv.py says why). float64, empty tensors
and mixed dtypes take the reference path. fp32 uses TF32 iff torch.backends.cudnn.allow_tf32.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from ... import _library
from ..._utils import conv_output_size, empty_like_format, in_format, interpret, or_unasked, stat_dtype, unasked

NAME = "triton"
NAMESPACE = "resnet_fused_triton"

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    import triton  # noqa: F401

    from .kernels import add_relu as _k_add_relu
    from .kernels import batchnorm as _k_bn
    from .kernels import conv as _k_conv
    from .kernels.configs import conv_block_m
    from .kernels.conv import BnInput, BnPrologue

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend reports it, the package still imports
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------
# Op implementations (run eagerly, and traced with fake tensors by torch.compile).


def conv_bn_eval(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
) -> Tensor:
    # The output takes x's layout; the residual any (conv_forward copies it to NHWC if need be).
    return _k_conv.conv_forward(x, weight, stride, padding, dilation, groups, scale=scale.contiguous(),
                                shift=shift.contiguous(), residual=residual, relu=relu)


def _conv_stats(x, weight, bias, stride, padding, dilation, groups, prologue=None):
    """z = conv(x, weight) (+ bias) with per-tile (mean, M2) partials in the GEMM epilogue, merged
    in tile order (Chan) into the per-channel mean and biased variance of the stored z.
    prologue: the previous unit's BatchNorm + ReLU applied to x as it loads (a BnPrologue)."""
    z, pmean, pm2 = _k_conv.conv_forward(x, weight, stride, padding, dilation, groups,
                                         shift=bias.contiguous() if bias is not None else None, stats=True,
                                         prologue=prologue)
    n, c_out, h, w = z.shape
    acc = stat_dtype(x.dtype)
    mean = torch.empty(c_out, dtype=acc, device=x.device)
    var = torch.empty(c_out, dtype=acc, device=x.device)
    _k_bn.finalize_stats(pmean, pm2, mean, var, n * h * w, conv_block_m())
    return z, mean, var


def conv_bn_train(
    x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float, relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    z, mean, var = _conv_stats(x, weight, bias, stride, padding, dilation, groups)
    y = bn_apply(z, mean, var, bn_weight, bn_bias, residual, eps, relu)
    return y, z, mean, var


def conv_bn_eval_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, scale: Tensor, y: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int, relu: bool,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_scale, need_shift, need_residual = output_mask
    grad_y = in_format(grad_y, x)
    y = in_format(y, x) if relu else None
    # g = grad_y masked by ReLU, in x's dtype: the operand of dgrad/wgrad and grad_residual.
    write_g = need_residual or (relu and (need_x or need_w or need_scale)) or grad_y.dtype != x.dtype
    g = empty_like_format(grad_y.shape, x) if write_g else grad_y
    sum_g = None
    if write_g or need_shift:
        sum_g = _k_bn.eval_backward_g(grad_y, y, relu, g if write_g else None, need_shift)
    scale = scale.contiguous()
    grad_x = grad_w = grad_scale = None
    if need_x:
        grad_x = empty_like_format(x.shape, x)
        _k_conv.conv_dgrad(g, weight, grad_x, scale, stride, padding, dilation, groups)
    if need_w or need_scale:
        gw = empty_like_format(weight.shape, weight) if need_w else None
        gs = torch.empty(scale.shape, dtype=scale.dtype, device=x.device) if need_scale else None
        _k_conv.conv_wgrad(g, x, weight, stride, padding, dilation, groups, grad_w=gw,
                           scale=scale if need_w else None, grad_scale=gs)
        grad_w, grad_scale = gw, gs
    grad_shift = sum_g.to(scale.dtype) if need_shift else None
    grad_residual = g if need_residual else None
    return or_unasked((grad_x, grad_w, grad_scale, grad_shift, grad_residual), x)


def conv_bn_train_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, var: Tensor,
    bn_weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int, eps: float,
    relu: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    need_x, need_w, need_bias, need_bn_weight, need_bn_bias, need_residual = output_mask
    grad_y = in_format(grad_y, x)
    z = in_format(z, x)
    y = in_format(y, x) if relu else None
    c = z.size(1)
    need_vec = need_bias or need_bn_weight or need_bn_bias
    dz = empty_like_format(z.shape, x) if (need_x or need_w) else None
    grad_res = empty_like_format(z.shape, x) if need_residual else None
    gbw = torch.empty(c, dtype=bn_weight.dtype, device=x.device) if need_vec else None
    gbb = torch.empty(c, dtype=bn_weight.dtype, device=x.device) if need_vec else None
    gbias = torch.empty(c, dtype=weight.dtype, device=x.device) if need_vec else None
    _k_bn.bn_backward(grad_y, y, z, mean.contiguous(), var.contiguous(), bn_weight.contiguous(), eps, relu,
                      dz, grad_res, gbw, gbb, gbias)
    grad_x = grad_w = None
    if need_x:
        grad_x = empty_like_format(x.shape, x)
        _k_conv.conv_dgrad(dz, weight, grad_x, None, stride, padding, dilation, groups)
    if need_w:
        grad_w = empty_like_format(weight.shape, weight)
        _k_conv.conv_wgrad(dz, x, weight, stride, padding, dilation, groups, grad_w=grad_w)
    return or_unasked((grad_x, grad_w, gbias if need_bias else None, gbw if need_bn_weight else None,
                       gbb if need_bn_bias else None, grad_res), x)


def add_relu(x: Tensor, residual: Tensor) -> Tensor:
    xc = in_format(x, x)
    rc = in_format(residual, x, x.dtype)
    if rc.stride() != xc.stride():  # degenerate sizes can leave two valid layouts; make them agree
        rc = torch.empty_like(xc).copy_(rc)
    out = torch.empty_like(xc)
    _k_add_relu.add_relu(xc, rc, out)
    return out


# Building blocks of the synchronized BatchNorm path (distributed.py).


def conv_bn_stats(
    x: Tensor, weight: Tensor, bias: Tensor | None,
    stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    return _conv_stats(x, weight, bias, stride, padding, dilation, groups)


def bn_act_conv_bn_stats(
    z_in: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float, relu: bool,
    weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int], dilation: list[int], groups: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """conv_bn_stats of bn_apply(z_in, ...): the BatchNorm + ReLU run in the conv kernel's operand
    load (its prologue), so the activation is never written."""
    prologue = BnPrologue(mean.contiguous(), var.contiguous(), bn_weight.contiguous(), bn_bias.contiguous(), eps, relu)
    return _conv_stats(z_in, weight, bias, stride, padding, dilation, groups, prologue=prologue)


def bn_act_conv_backward(
    grad_z: Tensor, z_in: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, eps: float,
    relu: bool, weight: Tensor, stride: list[int], padding: list[int], dilation: list[int], groups: int,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dgrad with the ReLU mask of relu(bn(z_in)) and BatchNorm backward's two sums in its
    epilogue, and wgrad with bn(z_in) + ReLU applied to z_in as it loads: relu(bn(z_in)) is
    never written, and g is not read again for the sums."""
    need_g, need_w = output_mask
    bn = BnPrologue(mean.contiguous(), var.contiguous(), bn_weight.contiguous(), bn_bias.contiguous(), eps, relu)
    g = grad_w = sum_g = sum_g_zc = None
    if need_g:
        g = empty_like_format(z_in.shape, z_in)
        sums = torch.empty((2, z_in.size(1)), dtype=torch.float32, device=z_in.device)
        _k_conv.conv_dgrad(grad_z, weight, g, None, stride, padding, dilation, groups, bn_input=BnInput(z_in, bn),
                           bn_sums=sums)
        sum_g, sum_g_zc = sums[0], sums[1].clone()  # custom-op outputs may not alias each other
    if need_w:
        grad_w = empty_like_format(weight.shape, weight)
        _k_conv.conv_wgrad(grad_z, z_in, weight, stride, padding, dilation, groups, grad_w=grad_w, prologue=bn)
    return (g if need_g else unasked(z_in), grad_w if need_w else unasked(weight),
            sum_g if need_g else unasked(mean), sum_g_zc if need_g else unasked(mean))


def bn_apply(
    z: Tensor, mean: Tensor, var: Tensor, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
    eps: float, relu: bool,
) -> Tensor:
    z = in_format(z, z)
    y = empty_like_format(z.shape, z)
    res = in_format(residual, z) if residual is not None else None
    _k_bn.bn_apply(z, y, res, mean.contiguous(), var.contiguous(), bn_weight.contiguous(), bn_bias.contiguous(),
                   eps, relu)
    return y


def bn_apply_backward_reduce(
    grad_y: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, relu: bool
) -> tuple[Tensor, Tensor]:
    z = in_format(z, z)
    sums = _k_bn.bn_backward_sums(in_format(grad_y, z), in_format(y, z) if relu else None, z,
                                  mean.contiguous(), relu)
    return sums[0].clone(), sums[1].clone()  # custom-op outputs may not alias each other


def bn_apply_backward(
    grad_y: Tensor, z: Tensor, y: Tensor | None, mean: Tensor, var: Tensor, bn_weight: Tensor, sum_g: Tensor,
    sum_g_zc: Tensor, count: int, eps: float, relu: bool, output_mask: list[bool],
) -> tuple[Tensor, Tensor]:
    need_dz, need_residual = output_mask
    z = in_format(z, z)
    dz = empty_like_format(z.shape, z) if need_dz else None
    grad_res = empty_like_format(z.shape, z) if need_residual else None
    if need_dz or need_residual:
        sums = torch.stack([sum_g, sum_g_zc]).to(torch.float32)
        _k_bn.bn_backward_dz(in_format(grad_y, z), in_format(y, z) if relu else None, z, mean.contiguous(),
                             var.contiguous(), bn_weight.contiguous(), sums, count, eps, relu, dz, grad_res)
    return or_unasked((dz, grad_res), z)


def on_tensor_device(impl):
    """Run an op implementation with the current CUDA device set to its first tensor's (every op
    takes a tensor first; the rest are on the same device: unsupported_reason). Triton launches
    on the current device and its current stream, and sm_count(), target_arch() and the TMA
    scratch allocator follow the current device: without this, tensors on cuda:1 while cuda:0 is
    current would run on the wrong GPU. The CUDA backend's launchers take a CUDAGuard the same
    way. One context switch per op call (a no-op off CUDA: the interpreter, meta tensors)."""

    @functools.wraps(impl)
    def guarded(first: Tensor, *args, **kwargs):
        device = _cuda_device_of(first)
        if device is None:
            return impl(first, *args, **kwargs)
        with torch.cuda.device(device):
            return impl(first, *args, **kwargs)

    return guarded


def _cuda_device_of(t: Tensor) -> torch.device | None:
    return t.device if t.device.type == "cuda" else None


_IMPLS = {
    "conv_bn_eval": conv_bn_eval,
    "conv_bn_eval_backward": conv_bn_eval_backward,
    "conv_bn_train": conv_bn_train,
    "conv_bn_train_backward": conv_bn_train_backward,
    "add_relu": add_relu,
    "conv_bn_stats": conv_bn_stats,
    "bn_apply": bn_apply,
    "bn_apply_backward_reduce": bn_apply_backward_reduce,
    "bn_apply_backward": bn_apply_backward,
    "bn_act_conv_bn_stats": bn_act_conv_bn_stats,
    "bn_act_conv_backward": bn_act_conv_backward,
}

# ---------------------------------------------------------------------------------------
# Registration.


@contextlib.contextmanager
def _schema_shim(schema: str):
    """torch releases before pytorch/pytorch#188722 accept triton_op(schema=...) but ignore it and
    infer the schema from the annotations (which cannot spell `int[2]`). During registration,
    make that inference return the schema we pass; with a torch that honours `schema=` the
    patched function is never called. The registered schema is verified afterwards."""
    try:
        import torch._library.triton as triton_lib
    except ImportError:
        yield
        return
    original = getattr(triton_lib, "infer_schema", None)
    if original is None:
        yield
        return
    triton_lib.infer_schema = lambda *args, **kwargs: schema
    try:
        yield
    finally:
        triton_lib.infer_schema = original


def _register() -> str | None:
    """Register the ops; returns why the backend cannot be used, or None."""
    if _IMPORT_ERROR is not None:
        return f"Triton is not importable ({_IMPORT_ERROR})"
    if not hasattr(torch.library, "triton_op") or not hasattr(torch.library, "wrap_triton"):
        return f"torch {torch.__version__} has no torch.library.triton_op/wrap_triton (needs torch >= 2.6)"
    try:
        for name, fn in _IMPLS.items():
            schema = _library.SCHEMAS[name]
            with _schema_shim(schema):
                torch.library.triton_op(f"{NAMESPACE}::{name}", on_tensor_device(fn), mutates_args=(),
                                        schema=schema)
        _library.register_fake_and_autograd(NAMESPACE)
    except Exception as exc:
        return f"registering the Triton ops failed on torch {torch.__version__}: {type(exc).__name__}: {exc}"
    ops = getattr(torch.ops, NAMESPACE)
    for name in _IMPLS:
        got = str(getattr(ops, name).default._schema)
        want = f"{NAMESPACE}::{name}{_library.SCHEMAS[name]}"
        if got != want:
            return f"torch {torch.__version__} registered {got!r} instead of the schema {want!r}"
    return None


_REGISTRATION_ERROR = _register()


def _direct_ops() -> tuple[object, object]:
    """The implementations as backends.select_ops calls them without the dispatcher
    (_library.direct_ops): on the tensors' device, with wrap_triton launching the kernels
    directly, as triton_op's own eager path does (through its higher-order op a launch costs
    far more: docs/kernels.md). (None, None) with a torch that lacks the switch: every call then
    dispatches."""
    try:
        from torch._library.triton import set_wrap_triton_enabled
    except ImportError:
        return None, None

    def direct(impl):
        guarded = on_tensor_device(impl)

        @functools.wraps(impl)
        def call(*args):
            with set_wrap_triton_enabled(False):
                return guarded(*args)

        return call

    return _library.direct_ops({name: direct(fn) for name, fn in _IMPLS.items()}, NAMESPACE)


DIRECT, DIRECT_WITH_GRAD = _direct_ops() if _REGISTRATION_ERROR is None else (None, None)


@functools.cache
def _device_reason() -> str | None:
    if interpret():
        # Launching interpreted kernels through wrap_triton needs a torch that accepts them; an
        # older one rejects every kernel without an autotuner (versions in docs/kernels.md). On a
        # GPU the kernels are JIT-compiled, and wrap_triton accepts them on every torch >= 2.6.
        try:
            torch.library.wrap_triton(_k_add_relu._add_relu_kernel)
        except RuntimeError as exc:
            return (f"under TRITON_INTERPRET=1, torch {torch.__version__}'s wrap_triton rejects interpreted "
                    f"kernels ({exc}); the interpreter tests need a newer torch (2.14 works)")
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU is available and TRITON_INTERPRET is not '1'"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"the GPU has compute capability {major}.{minor}; the Triton kernels need 8.0 or newer"
    return None


def unavailable_reason() -> str | None:
    return _REGISTRATION_ERROR or _device_reason()


def _device_ok(t: Tensor) -> bool:
    return t.device.type == ("cpu" if interpret() else "cuda")


def _conv_args_at(op_name: str) -> tuple[int, int | None, int | None, int, int, int]:
    """Positions of (weight, conv bias, residual, stride, padding, dilation) in a conv op's
    arguments, read by name from its schema (_library.SCHEMAS); None for one it does not take."""
    at = {name: i for i, name in enumerate(_library.argument_names(op_name))}
    return at["weight"], at.get("bias"), at.get("residual"), at["stride"], at["padding"], at["dilation"]


# The forward conv ops unsupported_reason checks (the backward ones run on what their forward covered).
_CONV_ARGS_AT = {name: _conv_args_at(name)
                 for name in ("conv_bn_eval", "conv_bn_train", "conv_bn_stats", "bn_act_conv_bn_stats")}


def unsupported_reason(op_name: str, *args) -> str | None:
    """None when the Triton kernels handle this call, else why the reference path runs it."""
    if op_name not in _IMPLS:
        return f"no Triton kernel for op {op_name!r}"
    tensors = [a for a in args if isinstance(a, Tensor)]
    if not tensors:
        return "no tensor arguments"
    x = tensors[0]
    if x.numel() == 0:
        return "empty input"
    for t in tensors:
        if not _device_ok(t):
            return (f"a {t.device.type} tensor: the Triton kernels run on CUDA tensors "
                    "(CPU ones only under TRITON_INTERPRET=1)")
        if t.dtype not in _SUPPORTED_DTYPES:
            return f"dtype {t.dtype}; the Triton kernels take float16, bfloat16 and float32"
        if t.device != x.device:
            return "tensors on different devices"
    if op_name == "add_relu":
        return None if args[1].dtype == x.dtype else "x and residual differ in dtype"
    if op_name in _CONV_ARGS_AT:
        w_at, bias_at, res_at, stride_at, padding_at, dilation_at = _CONV_ARGS_AT[op_name]
        weight = args[w_at]
        if x.dim() != 4 or weight.dim() != 4:
            return "x and weight must be 4-D"
        if weight.dtype != x.dtype:
            return "weight's dtype differs from x's"
        if weight.numel() == 0:
            return "empty weight"
        residual = args[res_at] if res_at is not None else None
        if residual is not None and residual.dtype != x.dtype:
            return "residual's dtype differs from x's"
        if bias_at is not None and args[bias_at] is not None and args[bias_at].dtype != x.dtype:
            return "the conv bias's dtype differs from x's"
        size = conv_output_size(list(x.shape), list(weight.shape), args[stride_at], args[padding_at],
                                args[dilation_at])
        return None if size[0] * size[1] * size[2] * size[3] > 0 else "empty output"
    return None  # the backward and SyncBatchNorm ops run on whatever their forward covered

