"""Reliability: bad input fails loudly, edge-case input gives eager PyTorch's answer.

  * bad arguments raise a Python exception that names the argument (before any kernel runs);
  * zero-size batches return empty outputs, gradients and untouched running statistics, as
    nn.Conv2d + nn.BatchNorm2d do;
  * NaN and Inf propagate as in eager PyTorch;
  * non-contiguous and oddly strided tensors (slices, permutes, expanded tensors, channels_last
    with odd strides, storage offsets) give correct results;
  * an explicitly requested backend that cannot run gives a clear error, `auto` falls back.

Each behaviour runs on the reference and on the Triton backend (under the Triton interpreter
on CPU tensors when no GPU is present). `check_against_eager` asserts which backend ran.

GPU only (needs_cuda): inputs with more than 2^31 elements on the fused backends, and no
memory leak over 1000 calls on random shapes.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref

import resnet_fused
from resnet_fused import backends, ops

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TRITON_REASON = backends.unavailable_reason("triton")
NAMESPACES = {"reference": "resnet_fused", "triton": "resnet_fused_triton", "cuda": "resnet_fused_cuda"}

# The backends every CPU-side behaviour runs on. Triton runs on CPU tensors only under the
# interpreter (conftest sets TRITON_INTERPRET=1 when no GPU is present).
CUDA_REASON = backends.unavailable_reason("cuda")
BACKENDS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton: {TRITON_REASON}")),
    pytest.param("cuda", marks=(pytest.mark.needs_cuda,
                                pytest.mark.skipif(CUDA_REASON is not None, reason=f"cuda: {CUDA_REASON}"))),
]


@contextlib.contextmanager
def record_namespaces():
    """The torch.ops namespaces ops.conv_bn_relu / ops.add_relu dispatch to, in call order.
    (The backward ops run in the namespace of their forward: _library pairs them.)"""
    seen: list[str] = []
    original = ops.select_ops

    def spy(op_name, *args):
        namespace = original(op_name, *args)
        seen.append(namespace.name)
        return namespace

    ops.select_ops = spy
    try:
        yield seen
    finally:
        ops.select_ops = original


# ---------------------------------------------------------------------------------------
# Oracle: eager F.conv2d + F.batch_norm (+ residual) (+ ReLU).


def eager_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *, training, momentum=0.1,
                       eps=1e-5, stride=1, padding=0, dilation=1, groups=1, bias=None, residual=None, relu=True):
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training or running_mean is None,
                     momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


_TENSOR_ARGS = ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var", "bias", "residual")
_GRAD_ARGS = ("x", "weight", "bn_weight", "bn_bias", "bias", "residual")


def _reduction_scales(tensors: dict, grad_y, kwargs) -> dict:
    """For each result that is a sum over many terms which may cancel, the magnitude of those
    terms (float64): the `scale` of helpers.assert_close_to_ref ("pass the magnitude of the
    summed terms for a quantity that is a cancellation"). Any order of summation errs by a few
    ulps of that magnitude, however small the result.

    With |x_hat| <= (conv(|x|, |w|) + |bias| + |mean|) * invstd and the BatchNorm backward's
    dz = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat)) (eval: gamma * invstd * g),
    bounded termwise by D: the output is gamma * x_hat + ..., where z - mean cancels (a channel
    of near-constant z: invstd -> 1/sqrt(eps) amplifies it); bn_bias sums g; bn_weight sums
    g * x_hat (the folded eval path sums g * conv(x, w) and g * (bias - running_mean)
    separately, two sums that cancel); conv bias
    sums dz (exactly 0 under batch statistics), weight sums dz * x (under batch statistics
    sum(grad_w * w) = 0 per output channel: BatchNorm is scale invariant), x sums dz * w."""
    t = {k: (v.detach().double() if v is not None else None) for k, v in tensors.items()}
    conv = dict(stride=kwargs.get("stride", 1), padding=kwargs.get("padding", 0),
                dilation=kwargs.get("dilation", 1), groups=kwargs.get("groups", 1))
    x, w = t["x"], t["weight"]
    z = F.conv2d(x, w, t.get("bias"), **conv)
    batch_stats = kwargs.get("training") or t["running_mean"] is None
    if batch_stats:
        mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = t["running_mean"], t["running_var"]
    invstd = torch.rsqrt(var + kwargs.get("eps", 1e-5)).view(1, -1, 1, 1)
    x_hat_bound = F.conv2d(x.abs(), w.abs(), None, **conv) + mean.abs().view(1, -1, 1, 1)
    if t.get("bias") is not None:
        x_hat_bound = x_hat_bound + t["bias"].abs().view(1, -1, 1, 1)
    # running statistics: the batch mean sums z (cancelling conv terms); the variance squares
    # z - mean, whose error is a few ulps of |z| + |mean|
    z_bound = x_hat_bound.amax(dim=(0, 2, 3))
    stats = {"running_mean": x_hat_bound.mean(dim=(0, 2, 3)).max().item(),
             "running_var": (2 * var.sqrt() * z_bound + var).max().item()}
    x_hat_bound = x_hat_bound * invstd
    g = grad_y.double().abs()
    gamma = t["bn_weight"].abs().view(1, -1, 1, 1) if t["bn_weight"] is not None else 1.0
    dz = g
    if batch_stats:
        dz = g + g.mean(dim=(0, 2, 3), keepdim=True) + x_hat_bound * (g * x_hat_bound).mean(dim=(0, 2, 3), keepdim=True)
    dz = dz * gamma * invstd
    dz_sum = dz.sum(dim=(0, 2, 3))
    return {
        "output": (x_hat_bound * gamma).max().item(),
        **stats,
        "bn_bias": g.sum(dim=(0, 2, 3)).max().item(),
        "bn_weight": (g * x_hat_bound).sum(dim=(0, 2, 3)).max().item(),
        "bias": torch.maximum(dz_sum, g.sum(dim=(0, 2, 3))).max().item(),
        "weight": torch.nn.grad.conv2d_weight(x.abs(), w.shape, dz, **conv).max().item(),
        "x": torch.nn.grad.conv2d_input(x.shape, w.abs(), dz, **conv).max().item(),
    }


def check_against_eager(backend: str, expect: str | None, tensors: dict, grad_y=None, **kwargs) -> None:
    """ops.conv_bn_relu on `backend` vs eager in the same dtype vs eager in float64: output,
    the gradient of every floating input, and the running statistics (helpers.assert_close_to_ref).
    `tensors` holds x, weight, bn_weight, bn_bias, running_mean, running_var and optionally bias,
    residual, with whatever strides the caller gave them (kept for the fused and eager dtype
    runs). `expect`: the backend that must run the forward (None: not checked). grad_y: the
    output gradient (default random); it may itself be oddly strided."""
    runs = []
    for fn, dt in ((eager_conv_bn_relu, torch.float64), (eager_conv_bn_relu, None), (ops.conv_bn_relu, None)):
        args = {}
        for k, v in tensors.items():
            if v is None:
                args[k] = None
                continue
            v = v.detach() if dt is None else v.detach().to(dt)
            args[k] = v.clone() if k.startswith("running") else v.requires_grad_()
        if fn is ops.conv_bn_relu:
            with resnet_fused.use_backend(backend), record_namespaces() as seen:
                y = fn(**args, **kwargs)
            if expect is not None:
                assert seen and set(seen) == {NAMESPACES[expect]}, f"expected {expect} to run, got {seen}"
        else:
            y = fn(**args, **kwargs)
        g = grad_y if grad_y is not None else torch.randn(
            y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y.device)
        if g.dtype != y.dtype:
            g = g.to(y.dtype)
        inputs = [k for k in _GRAD_ARGS if args.get(k) is not None]
        with resnet_fused.use_backend(backend):
            grads = torch.autograd.grad(y, [args[k] for k in inputs], g)
        runs.append((y, dict(zip(inputs, grads)),
                     {k: args[k] for k in ("running_mean", "running_var") if args.get(k) is not None}))
    (y64, g64, s64), (ye, ge, se), (yf, gf, sf) = runs
    scales = _reduction_scales(tensors, g, kwargs)
    assert_close_to_ref(yf, ye, y64, f"{backend} output", scale=max(scales["output"], y64.abs().max().item()))
    for name in g64:
        assert gf[name].shape == tensors[name].shape, name
        assert_close_to_ref(gf[name], ge[name], g64[name], f"{backend} grad {name}", scale=scales.get(name))
    for name in s64:
        assert_close_to_ref(sf[name], se[name], s64[name], f"{backend} {name}",
                            scale=max(scales[name], s64[name].abs().max().item()))


def _unit(n=2, c_in=4, c_out=6, hw=5, k=3, dtype=torch.float32, residual=True, bias=False, **conv):
    conv = {"padding": k // 2, **conv}
    stride, padding, dilation = (conv.get("stride", 1), conv["padding"], conv.get("dilation", 1))
    ho = (hw + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    groups = conv.get("groups", 1)
    tensors = dict(
        x=torch.randn(n, c_in, hw, hw, dtype=dtype, device=DEVICE),
        weight=torch.randn(c_out, c_in // groups, k, k, dtype=dtype, device=DEVICE),
        bn_weight=torch.rand(c_out, dtype=dtype, device=DEVICE) + 0.5,
        bn_bias=torch.randn(c_out, dtype=dtype, device=DEVICE),
        running_mean=torch.randn(c_out, dtype=dtype, device=DEVICE),
        running_var=torch.rand(c_out, dtype=dtype, device=DEVICE) + 0.5,
        bias=torch.randn(c_out, dtype=dtype, device=DEVICE) if bias else None,
        residual=torch.randn(n, c_out, ho, ho, dtype=dtype, device=DEVICE) if residual else None,
    )
    return tensors, conv


# ---------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument, raised before any backend runs.


def _good_kwargs():
    x = torch.randn(2, 4, 6, 6)
    c = torch.ones(8)
    return dict(x=x, weight=torch.randn(8, 4, 3, 3), bn_weight=c.clone(), bn_bias=c.clone(), running_mean=c.clone(),
                running_var=c.clone(), training=False, padding=1, bias=c.clone(), residual=torch.randn(2, 8, 6, 6))


def _replace(name, fn):
    return lambda kw: kw.update({name: fn(kw[name])})


BAD = {}
for _name in _TENSOR_ARGS:
    for _dtype in (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64):
        BAD[f"{_name}-{_dtype}"] = (_replace(_name, lambda t, d=_dtype: t.to(d)), TypeError,
                                    f"{_name} must be a floating-point tensor")
    other = "x" if _name != "x" else "weight"
    BAD[f"{_name}-meta-device"] = (
        _replace(_name, lambda t: t.to("meta")), ValueError,
        f"{_name} is on meta but x is on cpu" if _name != "x" else "weight is on cpu but x is on meta")
    BAD[f"{_name}-not-a-tensor-list"] = (_replace(_name, lambda t: t.tolist()), TypeError,
                                         f"{_name} must be a Tensor, got list")
    BAD[f"{_name}-not-a-tensor-float"] = (_replace(_name, lambda t: 1.0), TypeError,
                                          f"{_name} must be a Tensor, got float")
    BAD[f"{_name}-numpy"] = (_replace(_name, lambda t: t.numpy()), TypeError, f"{_name} must be a Tensor, got ndarray")
for _name in ("weight", "bias", "residual"):  # must match x's dtype (BatchNorm vectors may differ)
    BAD[f"{_name}-float64"] = (_replace(_name, torch.Tensor.double), TypeError,
                               f"{_name} has dtype torch.float64 but x has dtype torch.float32")
BAD.update({
    "x-3d": (_replace("x", lambda t: t[0]), ValueError, r"x must be 4-D, got shape \(4, 6, 6\)"),
    "x-5d": (_replace("x", lambda t: t[None]), ValueError, "x must be 4-D"),
    "weight-3d": (_replace("weight", lambda t: t[0]), ValueError, "weight must be 4-D"),
    "weight-5d": (_replace("weight", lambda t: t[None]), ValueError, "weight must be 4-D"),
    "residual-3d": (_replace("residual", lambda t: t[0]), ValueError, "residual must be 4-D"),
    "residual-5d": (_replace("residual", lambda t: t[None]), ValueError, "residual must be 4-D"),
    "bn_weight-2d": (_replace("bn_weight", lambda t: t[None]), ValueError, "bn_weight must be 1-D"),
    "running_var-0d": (_replace("running_var", lambda t: t[0]), ValueError, "running_var must be 1-D"),
    "bias-2d": (_replace("bias", lambda t: t[:, None]), ValueError, "bias must be 1-D"),
    "weight-in-channels": (_replace("weight", lambda t: t[:, :3]), ValueError, "x has 4 channels but weight"),
    "weight-out-channels": (_replace("weight", lambda t: t[:6]), ValueError, "bias must have 6 elements"),
    "weight-zero-kernel": (_replace("weight", lambda t: t[:, :, :0]), ValueError,
                           "weight must have no zero-size dimension"),
    "weight-zero-out-channels": (lambda kw: kw.update(weight=kw["weight"][:0], bn_weight=None, bn_bias=None,
                                                      running_mean=None, running_var=None, bias=None,
                                                      residual=None),
                                 ValueError, "weight must have no zero-size dimension"),
    "x-zero-channels": (lambda kw: kw.update(x=kw["x"][:, :0], weight=kw["weight"][:, :0]), ValueError,
                        "weight must have no zero-size dimension"),
    "x-zero-height": (lambda kw: kw.update(x=kw["x"][:, :, :0], weight=kw["weight"][:, :, :1, :1], residual=None),
                      ValueError, "x must have non-zero height and width"),
    "running_mean-length": (_replace("running_mean", lambda t: t[:7]), ValueError,
                            "running_mean must have 8 elements"),
    "bias-length": (_replace("bias", lambda t: torch.ones(9)), ValueError, "bias must have 8 elements"),
    "residual-channels": (_replace("residual", lambda t: t[:, :7]), ValueError,
                          r"residual must have the conv output's shape \[2, 8, 6, 6\]"),
    "residual-batch": (_replace("residual", lambda t: t[:1]), ValueError, "residual must have the conv output's"),
    "residual-spatial": (lambda kw: kw.update(stride=2), ValueError, "residual must have the conv output's"),
    "stride-negative": (lambda kw: kw.update(stride=-1), ValueError, "stride must be >= 1"),
    "stride-zero-pair": (lambda kw: kw.update(stride=(1, 0)), ValueError, "stride must be >= 1"),
    "padding-negative": (lambda kw: kw.update(padding=(0, -2)), ValueError, "padding must be >= 0"),
    "dilation-zero": (lambda kw: kw.update(dilation=0), ValueError, "dilation must be >= 1"),
    "dilation-negative": (lambda kw: kw.update(dilation=-1), ValueError, "dilation must be >= 1"),
    "stride-float": (lambda kw: kw.update(stride=1.5), TypeError, "stride must be an int or a pair of ints"),
    "stride-triple": (lambda kw: kw.update(stride=(1, 1, 1)), TypeError, "stride must be an int or a pair"),
    "stride-bool": (lambda kw: kw.update(stride=True), TypeError, "stride must be an int or a pair"),
    "padding-none": (lambda kw: kw.update(padding=None), TypeError, "padding must be an int or a pair"),
    "padding-str": (lambda kw: kw.update(padding="same"), TypeError, "padding must be an int or a pair"),
    "groups-zero": (lambda kw: kw.update(groups=0), ValueError, "groups must be a positive int"),
    "groups-negative": (lambda kw: kw.update(groups=-2), ValueError, "groups must be a positive int"),
    "groups-float": (lambda kw: kw.update(groups=2.0), TypeError, "groups must be an int"),
    "groups-bool": (lambda kw: kw.update(groups=True), TypeError, "groups must be an int"),
    "groups-mismatch": (lambda kw: kw.update(groups=2), ValueError, "x has 4 channels but weight"),
    "training-none": (lambda kw: kw.update(training=None), TypeError, "training must be a bool"),
    "training-str": (lambda kw: kw.update(training="yes"), TypeError, "training must be a bool"),
    "training-tensor": (lambda kw: kw.update(training=torch.tensor(True)), TypeError, "training must be a bool"),
    "relu-int": (lambda kw: kw.update(relu=1), TypeError, "relu must be a bool"),
    "relu-none": (lambda kw: kw.update(relu=None), TypeError, "relu must be a bool"),
    "eps-str": (lambda kw: kw.update(eps="1e-5"), TypeError, "eps must be a real number"),
    "eps-none": (lambda kw: kw.update(eps=None), TypeError, "eps must be a real number"),
    "eps-negative": (lambda kw: kw.update(eps=-1e-5), ValueError, "eps must be a number >= 0"),
    "eps-nan": (lambda kw: kw.update(eps=float("nan")), ValueError, "eps must be a number >= 0"),
    "momentum-str": (lambda kw: kw.update(momentum="0.1", training=True), TypeError, "momentum must be a real"),
    "momentum-tensor": (lambda kw: kw.update(momentum=torch.tensor(0.1)), TypeError, "momentum must be a real"),
    "running-stats-half-given": (lambda kw: kw.update(running_mean=None), ValueError, "both be tensors or both"),
    "process_group-without-init": (lambda kw: kw.update(process_group="world", training=True), RuntimeError,
                                   "process_group was given but torch.distributed is not initialized"),
    "batch-of-one-training": (lambda kw: kw.update(x=kw["x"][:1, :, :1, :1], padding=0, residual=None,
                                                   weight=kw["weight"][:, :, :1, :1], training=True),
                              ValueError, "Expected more than 1 value per channel when training"),
})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_argument_raises_naming_it(backend, case):
    mutate, error, match = case
    kwargs = _good_kwargs()
    mutate(kwargs)
    with resnet_fused.use_backend(backend), record_namespaces() as seen, pytest.raises(error, match=match):
        ops.conv_bn_relu(**kwargs)
    assert not seen, "validation must happen before any backend op runs"


def test_bad_arguments_of_the_good_kwargs_are_good():
    """Control: the unmutated arguments run (so each case above fails for its own reason)."""
    y = ops.conv_bn_relu(**_good_kwargs())
    assert y.shape == (2, 8, 6, 6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "x, residual, error, match",
    [
        (torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3), TypeError, "x must be a floating-point tensor"),
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool), TypeError, "residual must be a floating-point"),
        (torch.ones(2, 3), torch.ones(2, 3, device="meta"), ValueError, "residual is on meta but x is on cpu"),
        (torch.ones(2, 3), [[1.0] * 3] * 2, TypeError, "residual must be a Tensor, got list"),
        ([[1.0] * 3] * 2, torch.ones(2, 3), TypeError, "x must be a Tensor, got list"),
        (torch.ones(2, 3), torch.ones(2, 1), ValueError, "residual must have x's shape"),  # no broadcasting
        (torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float16), TypeError, "residual has dtype torch.float16"),
    ],
)
def test_add_relu_bad_arguments(backend, x, residual, error, match):
    with resnet_fused.use_backend(backend), pytest.raises(error, match=match):
        ops.add_relu(x, residual)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_meta_tensors_give_shapes_as_eager(training):
    """Every tensor on the meta device (shape inference, deferred initialization): the output's
    shape, dtype and device are eager's, and backward runs."""
    tensors, conv = _unit(n=2, bias=True, stride=2)
    meta = {k: v.to("meta").requires_grad_(k in _GRAD_ARGS) for k, v in tensors.items() if v is not None}
    y = ops.conv_bn_relu(**meta, training=training, **conv)
    ye = eager_conv_bn_relu(**meta, training=training, **conv)
    assert (y.shape, y.dtype, y.device) == (ye.shape, ye.dtype, ye.device)
    grads = torch.autograd.grad(y, [meta[k] for k in _GRAD_ARGS], torch.ones_like(y))
    assert [g.shape for g in grads] == [meta[k].shape for k in _GRAD_ARGS]


def test_bn_vectors_of_another_floating_dtype_are_accepted():
    """BatchNorm vectors may be float32 next to a float64 conv (as under autocast); the answer
    is still eager's."""
    tensors, conv = _unit(dtype=torch.float64)
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
        tensors[name] = tensors[name].float()
    tensors = {k: v for k, v in tensors.items() if v is not None}
    y = ops.conv_bn_relu(**tensors, training=False, **conv)
    expected = eager_conv_bn_relu(**{k: v.double() for k, v in tensors.items() if v is not None},
                                  training=False, **conv)
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------------------------------
# Zero-size batches: empty outputs, zero parameter gradients, running statistics untouched
# (nn.BatchNorm2d with N=0 in training leaves them as they are), as eager does.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch_matches_eager(backend, training, channels_last):
    tensors, conv = _unit(n=0, bias=True, stride=2)
    if channels_last:
        tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    outs = []
    for fn in (eager_conv_bn_relu, ops.conv_bn_relu):
        args = {k: v.clone().requires_grad_(k in _GRAD_ARGS) for k, v in tensors.items()}
        with resnet_fused.use_backend(backend):
            y = fn(**args, training=training, **conv)
            y.sum().backward()
        outs.append((y, args))
    (ye, ae), (yf, af) = outs
    assert yf.shape == ye.shape == (0, 6, 3, 3) and yf.dtype == ye.dtype
    assert yf.requires_grad
    for name in _GRAD_ARGS:
        assert af[name].grad is not None, name
        assert torch.equal(af[name].grad, ae[name].grad), name
    for name in ("running_mean", "running_var"):
        assert torch.equal(af[name], ae[name]), name
        assert torch.equal(af[name], tensors[name]), f"{name} changed by an empty batch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_batch_module_keeps_running_statistics(backend):
    """Module level, as nn.BatchNorm2d: num_batches_tracked still counts the (empty) step."""
    from torch import nn

    from resnet_fused.nn import ConvBNReLU2d

    conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 1.5)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    eager_bn = nn.BatchNorm2d(6, momentum=None)
    eager_bn.load_state_dict(bn.state_dict())
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(0, 4, 5, 5)
    with resnet_fused.use_backend(backend):
        y = fused(x)
    ye = torch.relu(eager_bn(conv(x)))
    assert y.shape == ye.shape
    for key, value in eager_bn.state_dict().items():
        assert torch.equal(fused.bn.state_dict()[key], value), key
    assert torch.equal(fused.bn.running_mean, before["running_mean"])
    assert int(fused.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_size_add_relu(backend):
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    r = torch.randn(0, 3, 4, 4, requires_grad=True)
    with resnet_fused.use_backend(backend):
        y = ops.add_relu(x, r)
        y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and r.grad.shape == r.shape


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton: {TRITON_REASON}")
def test_zero_size_routes_to_reference_on_triton():
    tensors, conv = _unit(n=0)
    with resnet_fused.use_backend("triton"), record_namespaces() as seen:
        ops.conv_bn_relu(**tensors, training=True, **conv)
        ops.conv_bn_relu(**tensors, training=False, **conv)
    assert seen == ["resnet_fused", "resnet_fused"]


# ---------------------------------------------------------------------------------------
# NaN and Inf propagate as they do in eager PyTorch: same NaN positions, same infinities, the
# finite values close; in the output, the gradients and the running statistics.

NONFINITE = {
    "x_nan": ("x", (0, 1, 2, 2), float("nan")),
    "x_inf": ("x", (1, 2, 0, 0), float("inf")),
    "x_neginf": ("x", (1, 3, 4, 4), float("-inf")),
    "residual_nan": ("residual", (0, 0, 0, 0), float("nan")),
    "residual_inf": ("residual", (1, 1, 1, 1), float("inf")),
    "residual_neginf": ("residual", (1, 2, 3, 3), float("-inf")),
    "weight_nan": ("weight", (2, 1, 1, 1), float("nan")),
}

def _nonfinite_params():
    for backend in BACKENDS:
        name = backend if isinstance(backend, str) else backend.values[0]
        marks = () if isinstance(backend, str) else backend.marks
        for relu in (True, False):
            for where in NONFINITE:
                for training in (False, True):
                    # NaN reaches the ReLU with a NaN input, or with an infinite x under batch
                    # statistics (mean = inf, inf - inf = NaN); the fused ReLUs once mapped it to 0.
                    mode = "train" if training else "eval"
                    yield pytest.param(name, relu, where, training, marks=marks,
                                       id=f"{name}-{'relu' if relu else 'noact'}-{where}-{mode}")


def _assert_same_nonfinite(actual, expected, what):
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().sum().item()} positions, eager at {expected.isnan().sum().item()}")
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{what}: +inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{what}: -inf positions differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-5, msg=what)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("backend, relu, where, training", list(_nonfinite_params()))
def test_nan_and_inf_propagate_as_in_eager(backend, relu, where, training):
    tensors, conv = _unit(c_in=4, c_out=6, hw=5)
    name, index, value = NONFINITE[where]
    tensors[name][index] = value
    runs = []
    for fn in (eager_conv_bn_relu, ops.conv_bn_relu):
        args = {k: v.clone() for k, v in tensors.items() if v is not None}
        for k in _GRAD_ARGS:
            if k in args:
                args[k].requires_grad_()
        with resnet_fused.use_backend(backend), record_namespaces() as seen:
            y = fn(**args, training=training, relu=relu, **conv)
            grad_y = 1 + 0.25 * (torch.arange(y.numel(), device=y.device).view(y.shape) % 3).to(y.dtype)
            grads = torch.autograd.grad(y, [args[k] for k in _GRAD_ARGS if k in args], grad_y)
        if fn is ops.conv_bn_relu:
            assert seen == [NAMESPACES[backend]], seen
        runs.append((y, grads, args))
    (ye, ge, ae), (yf, gf, af) = runs
    _assert_same_nonfinite(yf, ye, "output")
    for k, a, e in zip([k for k in _GRAD_ARGS if k in ae], gf, ge):
        _assert_same_nonfinite(a, e, f"grad {k}")
    for k in ("running_mean", "running_var"):
        _assert_same_nonfinite(af[k], ae[k], k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_add_relu_nan_and_inf_forward(backend):
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0, -1.0, float("inf")], device=DEVICE)
    r = torch.tensor([0.0, float("-inf"), 0.0, float("nan"), 0.0, 1.0], device=DEVICE)
    x, r = x.view(1, 1, 2, 3), r.view(1, 1, 2, 3)
    with resnet_fused.use_backend(backend), record_namespaces() as seen:
        y = ops.add_relu(x, r)
    assert seen == [NAMESPACES[backend]]
    _assert_same_nonfinite(y, torch.relu(x + r), "add_relu output")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_relu_nan_gradient_as_in_eager(backend):
    """A NaN output passes its gradient, as eager's threshold_backward does (y <= 0 masks)."""
    x = torch.tensor([float("nan"), 1.0, -1.0, 0.0], device=DEVICE).view(1, 1, 1, 4).requires_grad_()
    r = torch.zeros(1, 1, 1, 4, device=DEVICE, requires_grad=True)
    g = torch.tensor([2.0, 3.0, 4.0, 5.0], device=DEVICE).view(1, 1, 1, 4)
    with resnet_fused.use_backend(backend), record_namespaces() as seen:
        gx, gr = torch.autograd.grad(ops.add_relu(x, r), (x, r), g)
    assert seen == [NAMESPACES[backend]]
    gx_eager, gr_eager = torch.autograd.grad(torch.relu(x + r), (x, r), g)
    assert torch.equal(gx, gx_eager) and torch.equal(gr, gr_eager), (gx, gx_eager)


# ---------------------------------------------------------------------------------------
# Non-contiguous and oddly strided tensors.


def _strided_x(kind: str, n=2, c=4, hw=5):
    def r(*shape):
        return torch.randn(*shape, device=DEVICE)

    return {
        "contiguous": lambda: r(n, c, hw, hw),
        "channels_slice": lambda: r(n, 2 * c, hw, hw)[:, ::2],
        "spatial_step": lambda: r(n, c, 2 * hw, 2 * hw + 1)[:, :, ::2, 1::2],
        "permuted": lambda: r(hw, n, c, hw).permute(1, 2, 3, 0),
        "transposed_hw": lambda: r(n, c, hw, hw).transpose(2, 3),
        "expanded_batch": lambda: r(1, c, hw, hw).expand(n, c, hw, hw),
        "expanded_channels": lambda: r(n, 1, hw, hw).expand(n, c, hw, hw),
        "expanded_spatial": lambda: r(n, c, 1, 1).expand(n, c, hw, hw),
        "channels_last_step": lambda: r(n, c, 2 * hw, hw).contiguous(memory_format=torch.channels_last)[:, :, ::2],
        "channels_last_cslice": lambda: r(n, c + 3, hw, hw).contiguous(memory_format=torch.channels_last)[:, 1:c + 1],
        "storage_offset": lambda: r(n * c * hw * hw + 7)[7:].view(n, c, hw, hw),
        "batch_slice": lambda: r(n + 2, c, hw, hw)[1:n + 1],
    }[kind]()


STRIDED_KINDS = ["channels_slice", "spatial_step", "permuted", "transposed_hw", "expanded_batch", "expanded_channels",
                 "expanded_spatial", "channels_last_step", "channels_last_cslice", "storage_offset", "batch_slice"]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", STRIDED_KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_matches_eager(backend, kind, training):
    tensors, conv = _unit(bias=training)
    x = _strided_x(kind)
    assert not x.is_contiguous() or x.storage_offset() > 0
    tensors["x"] = x
    check_against_eager(backend, backend, tensors, training=training, **conv)


def _strided_params(tensors):
    """Every other tensor argument oddly strided too: weight permuted/sliced, BatchNorm vectors
    with step 2, the residual expanded and transposed."""
    c_out, c_in, kh, kw = tensors["weight"].shape
    out = dict(tensors)
    out["weight"] = torch.randn(c_in, c_out, kw, kh, device=DEVICE).permute(1, 0, 3, 2)
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var", "bias"):
        if tensors.get(name) is not None:
            base = torch.empty(2 * c_out, device=DEVICE)
            base[::2] = tensors[name]
            out[name] = base[::2]
    r = tensors["residual"]
    out["residual"] = torch.randn(r.size(0), r.size(1), r.size(3), 1, device=DEVICE).expand(
        r.size(0), r.size(1), r.size(3), r.size(2)).transpose(2, 3)
    return out


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_parameters_residual_and_grad_output(backend, training):
    tensors, conv = _unit(bias=True, c_in=4, c_out=6, hw=6, stride=2)
    tensors = _strided_params(tensors)
    tensors["x"] = _strided_x("channels_last_cslice", hw=6)
    assert not tensors["weight"].is_contiguous() and tensors["bn_weight"].stride() == (2,)
    ho = tensors["residual"].shape[2]
    # grad_y as autograd hands it over from y.sum() (stride 0 everywhere), and a transposed one
    for grad_y in (torch.ones(1, device=DEVICE).expand(2, 6, ho, ho),
                   torch.randn(2, 6, ho, ho, dtype=torch.float64, device=DEVICE).transpose(2, 3).float()):
        check_against_eager(backend, backend, tensors, grad_y=grad_y, training=training, **conv)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["permuted", "expanded_batch", "channels_last_step", "spatial_step"])
def test_add_relu_strided(backend, kind):
    x = _strided_x(kind)
    r = _strided_x("transposed_hw")
    outs = []
    for fn in (lambda a, b: torch.relu(a + b), ops.add_relu):
        xa, ra = x.detach().requires_grad_(), r.detach().requires_grad_()
        with resnet_fused.use_backend(backend), record_namespaces() as seen:
            y = fn(xa, ra)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
            outs.append((y, *torch.autograd.grad(y, (xa, ra), g)))
    if backend != "reference":
        assert seen == [NAMESPACES[backend]]
    for name, a, e in zip(("output", "grad x", "grad residual"), outs[1], outs[0]):
        torch.testing.assert_close(a, e, msg=name)


# ---------------------------------------------------------------------------------------
# A backend that cannot run: a clear error when requested, `auto` falls back.


def _run_python(code, env_extra=None, drop=("TRITON_INTERPRET",)):
    env = {k: v for k, v in os.environ.items() if k not in drop and k != "RESNET_FUSED_BACKEND"}
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_missing_triton_clear_error_and_auto_falls_back():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import triton -> ImportError
        "import torch, resnet_fused\n"
        "reason = resnet_fused.available_backends()['triton']\n"
        "assert reason and 'Triton is not importable' in reason, reason\n"
        "try:\n"
        "    resnet_fused.set_backend('triton')\n"
        "except RuntimeError as e:\n"
        "    assert \"backend 'triton' is unavailable: Triton is not importable\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('set_backend(triton) did not raise')\n"
        "assert resnet_fused.get_backend() == 'auto'\n"
        "x = torch.randn(2, 3, 4, 4); w = torch.randn(5, 3, 3, 3)\n"
        "y = resnet_fused.ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1)\n"
        "assert y.shape == (2, 5, 4, 4)\n"
        "print('ok')\n"
    )
    assert _run_python(code).strip() == "ok"


def test_extension_built_against_another_torch_clear_message():
    """An extension that fails to load the way one built against another torch does (an
    ImportError naming an undefined C++ symbol) gives a clear reason naming the rebuild
    command; import works, and the reference and triton backends still run."""
    code = (
        "import sys, importlib.abc\n"
        "class Stale(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'resnet_fused._C':\n"
        "            raise ImportError(name + '.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev')\n"
        "sys.meta_path.insert(0, Stale())\n"
        "import torch, resnet_fused\n"
        "reason = resnet_fused.available_backends()['cuda']\n"
        "assert 'failed to load' in reason and 'undefined symbol' in reason and 'another torch' in reason, reason\n"
        "assert 'pip install --no-build-isolation -e .' in reason, reason\n"
        "try:\n"
        "    resnet_fused.set_backend('cuda')\n"
        "except RuntimeError as e:\n"
        "    assert \"backend 'cuda' is unavailable\" in str(e), e\n"
        "else:\n"
        "    raise AssertionError('set_backend(cuda) did not raise')\n"
        "x = torch.randn(2, 3, 4, 4); w = torch.randn(5, 3, 3, 3)\n"
        "for name in ('reference', 'triton'):\n"
        "    if name == 'triton' and resnet_fused.available_backends()['triton'] is not None:\n"
        "        continue  # e.g. a torch whose wrap_triton rejects interpreted kernels\n"
        "    with resnet_fused.use_backend(name):\n"
        "        y = resnet_fused.ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1)\n"
        "    assert y.shape == (2, 5, 4, 4)\n"
        "print('ok')\n"
    )
    assert _run_python(code, {"TRITON_INTERPRET": "1"}, drop=()).strip() == "ok"


def test_env_var_naming_an_unavailable_backend_fails_clearly():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import resnet_fused\n"
        "try:\n"
        "    resnet_fused.get_backend()\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    out = _run_python(code, {"RESNET_FUSED_BACKEND": "triton"})
    assert "resnet_fused backend 'triton' is unavailable: Triton is not importable" in out, out


def test_unsupported_gpu_architecture_clear_error_and_auto_falls_back():
    """A pre-sm80 GPU (simulated: torch.cuda reports a 7.5 device): both fused backends say
    why when requested; `auto` still runs (CPU tensors take the reference)."""
    code = (
        "import torch, resnet_fused\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_capability = lambda *a: (7, 5)\n"
        "torch.cuda.get_device_name = lambda *a: 'Fake T4'\n"
        "reasons = resnet_fused.available_backends()\n"
        "print(reasons)\n"
        "for name in ('triton', 'cuda'):\n"
        "    try:\n"
        "        resnet_fused.set_backend(name)\n"
        "    except RuntimeError as e:\n"
        "        print(name, 'ERROR', e)\n"
        "    else:\n"
        "        print(name, 'ACCEPTED')\n"
        "resnet_fused.set_backend('auto')\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "print('auto', resnet_fused.backends.resolved_backend('add_relu', x, x))\n"
    )
    out = _run_python(code)
    assert "triton ERROR resnet_fused backend 'triton' is unavailable: the GPU has compute capability 7.5" in out, out
    cuda_line = next(line for line in out.splitlines() if line.startswith("cuda "))
    assert "cuda ERROR resnet_fused backend 'cuda' is unavailable: " in cuda_line, out
    if "is not built" not in cuda_line and "failed" not in cuda_line:
        assert "sm80+" in cuda_line and "7.5" in cuda_line, cuda_line
    assert "auto reference" in out, out


# ---------------------------------------------------------------------------------------
# GPU only: large tensors and leaks, on both fused backends.

FUSED = ["triton", "cuda"]


def _require(backend):
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def _chunked_ref(x, w, scale, shift, padding, rows):
    """float64 eager conv * scale + shift + ReLU on the batch rows `rows` only."""
    z = F.conv2d(x[rows].double(), w.double(), padding=padding)
    return torch.relu(z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


@pytest.mark.needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_more_than_2_31_elements_eval(backend):
    """x with 2^31 + 2^22 elements (fp16, 4.3 GB): 32-bit offsets would wrap. The last batch rows
    (where the offsets exceed 2^31) are checked against float64 eager."""
    _require(backend)
    torch.cuda.empty_cache()
    n, c, hw = 2**31 // (16 * 128 * 128) + 16, 16, 128
    x = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    w = torch.randn(16, c, 3, 3, device="cuda", dtype=torch.float16) * 0.1
    gamma, beta = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    rm, rv = torch.randn(16, device="cuda"), torch.rand(16, device="cuda") + 0.5
    with torch.no_grad(), resnet_fused.use_backend(backend), record_namespaces() as seen:
        y = ops.conv_bn_relu(x, w, gamma, beta, rm, rv, training=False, padding=1)
    assert seen == [NAMESPACES[backend]], seen
    scale = gamma * torch.rsqrt(rv + 1e-5)
    shift = beta - rm * scale
    for rows in (slice(0, 2), slice(n // 2, n // 2 + 2), slice(n - 2, n)):
        ref64 = _chunked_ref(x, w, scale, shift, 1, rows)
        eager = torch.relu(F.conv2d(x[rows], w, padding=1).float() * scale.view(1, -1, 1, 1)
                           + shift.view(1, -1, 1, 1)).half()
        assert_close_to_ref(y[rows], eager, ref64, f"{backend} rows {rows}")


@pytest.mark.needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_more_than_2_31_elements_train_forward_backward(backend):
    """Training forward and backward on a > 2^31-element fp16 input: batch statistics, running
    statistics, the weight and BatchNorm gradients (reductions over all 2^31 elements) against
    eager float32, and grad_x on the last rows."""
    _require(backend)
    torch.cuda.empty_cache()
    n, c, hw = 2**31 // (8 * 128 * 128) + 8, 8, 128
    x16 = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert x16.numel() > 2**31
    w = (torch.randn(8, c, 1, 1, device="cuda") * 0.3)
    gamma, beta = torch.rand(8, device="cuda") + 0.5, torch.randn(8, device="cuda")
    results = {}
    for name, dtype in (("fused", torch.float16), ("eager16", torch.float16), ("eager32", torch.float32)):
        xi = x16 if dtype == torch.float16 else None
        wi = w.to(dtype).requires_grad_()
        g_, b_ = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
        if name == "fused":
            xg = xi.detach().requires_grad_()
            with resnet_fused.use_backend(backend), record_namespaces() as seen:
                y = ops.conv_bn_relu(xg, wi, g_, b_, rm, rv, training=True)
            assert seen == [NAMESPACES[backend]], seen
        elif name == "eager16":
            xg = xi.detach().requires_grad_()
            y = torch.relu(F.batch_norm(F.conv2d(xg, wi), rm, rv, g_, b_, True))
        else:  # float32 oracle, processed in place of float64 (which would need ~70 GB)
            xg = x16.float().requires_grad_()
            y = torch.relu(F.batch_norm(F.conv2d(xg, wi), rm, rv, g_, b_, True))
        grad_y = torch.ones(1, device="cuda", dtype=y.dtype).expand(y.shape)  # as y.sum() hands it over
        gx, gw, gg, gb = torch.autograd.grad(y, (xg, wi, g_, b_), grad_y)
        # clones: a view of y or gx would keep the whole tensor alive
        results[name] = dict(y_tail=y[-2:].detach().clone(), gx_tail=gx[-2:].clone(), gw=gw, gg=gg, gb=gb, rm=rm, rv=rv)
        del y, gx, xg, grad_y
        torch.cuda.empty_cache()
    for key in ("y_tail", "gx_tail", "gw", "gg", "gb", "rm", "rv"):
        assert_close_to_ref(results["fused"][key], results["eager16"][key].to(results["fused"][key].dtype),
                            results["eager32"][key], f"{backend} {key}")


def _random_unit_configs(rng, count):
    configs = []
    for _ in range(count):
        n, c_in, c_out = rng.randint(1, 4), rng.choice([3, 8, 16]), rng.choice([8, 16, 32])
        hw, k, stride = rng.randint(4, 20), rng.choice([1, 3]), rng.choice([1, 2])
        ho = (hw + 2 * (k // 2) - k) // stride + 1
        configs.append(dict(n=n, c_in=c_in, c_out=c_out, hw=hw, k=k, stride=stride, ho=ho,
                            training=rng.random() < 0.5 and n * ho * ho > 1,
                            dtype=rng.choice([torch.float16, torch.float32]),
                            channels_last=rng.random() < 0.5, residual=rng.random() < 0.5))
    return configs


def _call_unit(cfg):
    x = torch.randn(cfg["n"], cfg["c_in"], cfg["hw"], cfg["hw"], device="cuda", dtype=cfg["dtype"])
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(cfg["c_out"], cfg["c_in"], cfg["k"], cfg["k"], device="cuda", dtype=cfg["dtype"],
                    requires_grad=True)
    c = cfg["c_out"]
    gamma, beta = torch.ones(c, device="cuda", requires_grad=True), torch.zeros(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    res = (torch.randn(cfg["n"], c, cfg["ho"], cfg["ho"], device="cuda", dtype=cfg["dtype"])
           if cfg["residual"] else None)
    y = ops.conv_bn_relu(x, w, gamma, beta, rm, rv, training=cfg["training"], stride=cfg["stride"],
                         padding=cfg["k"] // 2, residual=res)
    y.backward(torch.randn_like(y))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", FUSED)
def test_no_memory_leak_over_1000_calls(backend):
    """1000 forward+backward calls (train and eval, fp16/fp32, NCHW/NHWC, with and without a
    residual) on shapes drawn at random from 24 configurations leave
    torch.cuda.memory_allocated() where it started. Every configuration runs once first
    (kernel compilation, autotuning, cuBLAS/cuDNN workspaces); the pool is bounded so that
    autotuning does not dominate the run."""
    _require(backend)
    rng = random.Random(0)
    configs = _random_unit_configs(rng, 24)
    with resnet_fused.use_backend(backend):
        for cfg in configs:
            _call_unit(cfg)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        for _ in range(1000):
            _call_unit(rng.choice(configs))
        torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == start, (
        f"{torch.cuda.memory_allocated() - start} bytes still allocated after 1000 calls")


@pytest.mark.needs_cuda
def test_triton_autotune_caches_stay_bounded():
    """Autotuning caches do not grow with every new batch size or resolution: 60 training
    steps on distinct (N, H, W) leave at most 32 entries per autotuned kernel. (An autotune
    key holding the raw GEMM row count M = N * H_out * W_out fails this: one benchmark run
    and one cache entry per new M. Bucketing M, e.g. to a power of two, passes.)"""
    _require("triton")
    from resnet_fused.backends.triton.kernels import batchnorm as k_bn
    from resnet_fused.backends.triton.kernels import conv as k_conv

    kernels = {name: obj for mod in (k_conv, k_bn) for name, obj in vars(mod).items()
               if isinstance(getattr(obj, "cache", None), dict) and hasattr(obj, "configs")}
    assert kernels, "no autotuned kernels found"
    rng = random.Random(1)
    shapes = set()
    while len(shapes) < 60:
        shapes.add((rng.randint(2, 64), rng.randint(4, 56)))
    with resnet_fused.use_backend("triton"):
        for n, hw in sorted(shapes):
            x = torch.randn(n, 16, hw, hw, device="cuda", requires_grad=True)
            w = torch.randn(16, 16, 3, 3, device="cuda", requires_grad=True)
            y = ops.conv_bn_relu(x, w, None, None, None, None, training=True, padding=1)
            y.backward(torch.ones_like(y))
    sizes = {name: len(obj.cache) for name, obj in kernels.items()}
    assert max(sizes.values()) <= 32, sizes
