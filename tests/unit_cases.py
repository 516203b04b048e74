"""Conv + BatchNorm (+ residual) + ReLU units against eager PyTorch, float64 as the oracle:
a ConvBNReLU unit against stock nn.Conv2d + nn.BatchNorm2d (run_unit_case: test_ops,
test_api, test_backend_triton), and ops.conv_bn_relu against eager F.conv2d + F.batch_norm
(check_against_eager: test_edge_cases, test_properties).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused import backends
from resnet_fused.nn import conv_bn_act

from random_bn import randomize_bn
from recorders import expected_backend
from resnet_fused.tolerances import assert_close_to_ref


# --------------------------------------------------------------------------------------
# Units against stock nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU.

# (c_in, c_out, kernel, stride, padding, dilation, groups, conv bias, input H=W)
CONFIGS = {
    "stem7x7s2": (3, 8, 7, 2, 3, 1, 1, False, 13),
    "1x1": (8, 16, 1, 1, 0, 1, 1, False, 7),
    "1x1s2": (8, 16, 1, 2, 0, 1, 1, False, 7),
    "3x3": (8, 8, 3, 1, 1, 1, 1, False, 7),
    "3x3s2_bias": (8, 8, 3, 2, 1, 1, 1, True, 13),
    "3x3_dilation2": (8, 8, 3, 1, 2, 2, 1, False, 7),
    "3x3_groups4": (8, 16, 3, 1, 1, 1, 4, False, 7),
    "3x3_spatial1": (8, 8, 3, 1, 1, 1, 1, False, 1),
}

# Wider than CONFIGS: several K blocks, M tiles and channel tiles per kernel, odd sizes.
WIDE_CONFIGS = {
    "3x3_c40_13": (40, 36, 3, 1, 1, 1, 1, False, 13),
    "1x1s2_c40": (40, 72, 1, 2, 0, 1, 1, False, 13),
    "7x7s2_stem": (3, 16, 7, 2, 3, 1, 1, False, 17),
    "3x3_groups2_dil": (32, 32, 3, 1, 2, 2, 2, False, 9),
}


def make_unit(cfg, dtype, device="cpu"):
    c_in, c_out, k, stride, padding, dilation, groups, bias, _ = cfg
    conv = nn.Conv2d(c_in, c_out, k, stride, padding, dilation, groups, bias)
    bn = nn.BatchNorm2d(c_out)
    randomize_bn(bn)
    return conv.to(device, dtype), bn.to(device, dtype)


def eager_unit(conv, bn, x, residual, relu):
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def fused_unit(conv, bn, x, residual, relu):
    return conv_bn_act(conv, bn, x, residual, nn.ReLU() if relu else None)


def expected_unit_backend(name, conv, bn, x, residual, relu) -> tuple[str, str | None]:
    """expected_backend for the op a ConvBNReLU unit of these modules calls on x (the
    arguments as ops.conv_bn_relu passes them: in eval, scale and shift of the statistics'
    dtype). The backward runs on the forward's backend (test_backward_runs_on_the_forwards_backend)."""
    geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
    if bn.training:
        return expected_backend(name, "conv_bn_train", x, conv.weight, conv.bias, bn.weight, bn.bias, residual,
                                *geometry, bn.eps, relu)
    vector = torch.empty(conv.out_channels, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                         device=x.device)
    return expected_backend(name, "conv_bn_eval", x, conv.weight, vector, vector, residual, *geometry, relu)


def _params(conv, bn):
    return [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]


def run_unit_case(cfg, training, residual, relu, channels_last, dtype, device="cpu", steps=3):
    """Eager in float64 (the reference), eager in `dtype`, fused in `dtype`: forward, every
    gradient and the running statistics after each of `steps` training steps. With a backend
    selected (not 'auto'), also checks that the fused unit's op ran on it, or on the reference
    where its kernels do not cover the call (`expected_unit_backend`)."""
    conv64, bn64 = make_unit(cfg, torch.float64, device)
    conv, bn = copy.deepcopy(conv64).to(dtype), copy.deepcopy(bn64).to(dtype)
    fconv, fbn = copy.deepcopy(conv), copy.deepcopy(bn)
    for m in (bn64, bn, fbn):
        m.train(training)
    selected = resnet_fused.get_backend()
    hw = cfg[-1]
    for step in range(steps if training else 1):
        x64 = torch.randn(3, cfg[0], hw, hw, dtype=torch.float64, device=device)
        if channels_last:
            x64 = x64.contiguous(memory_format=torch.channels_last)
        y_shape = conv64(x64).shape
        r64 = torch.randn(y_shape, dtype=torch.float64, device=device) if residual else None
        g64 = torch.randn(y_shape, dtype=torch.float64, device=device)
        results = []
        for c, b, fn, dt in ((conv64, bn64, eager_unit, torch.float64), (conv, bn, eager_unit, dtype),
                             (fconv, fbn, fused_unit, dtype)):
            x = x64.to(dt).requires_grad_()
            r = r64.to(dt).requires_grad_() if residual else None
            with backends.record_selections() as selections:
                y = fn(c, b, x, r, relu)
            inputs = [x] + ([r] if residual else []) + _params(c, b)
            grads = torch.autograd.grad(y, inputs, g64.to(dt))
            results.append((y, grads, [b.running_mean, b.running_var]))
        if selected != "auto":  # `selections` counted the fused unit's, the last of the three
            expected, reason = expected_unit_backend(selected, fconv, fbn, x, r, relu)
            assert dict(selections) == {expected: 1}, (
                f"ran on {dict(selections)}, expected {expected}" + (f" ({selected}: {reason})" if reason else ""))
        (y64, gr64, st64), (ye, gre, ste), (yf, grf, stf) = results
        tag = f"step {step}"
        assert_close_to_ref(yf, ye, y64, f"{tag} output")
        if channels_last and yf.dim() == 4 and yf.shape[2] * yf.shape[3] > 1:
            assert yf.is_contiguous(memory_format=torch.channels_last), "output lost channels_last"
        names = ["grad x"] + (["grad residual"] if residual else []) + [
            f"grad {n}" for n, p in (("conv.weight", conv.weight), ("conv.bias", conv.bias), ("bn.weight", 1),
                                     ("bn.bias", 1)) if p is not None
        ]
        # Per-channel parameter gradients are sums over N*H*W terms (that cancel to ~0 for a conv
        # bias under training BatchNorm): their rounding floor scales with the summed terms'
        # magnitude, not the result's. (float64 eager can be exact where another order is not.)
        reduction_scale = g64.abs().sum(dim=(0, 2, 3)).max().item()
        reductions = ("grad conv.bias", "grad bn.weight", "grad bn.bias")
        for name, a, e, r in zip(names, grf, gre, gr64):
            assert_close_to_ref(a, e, r, f"{tag} {name}", scale=reduction_scale if name in reductions else None)
        for name, a, e, r in zip(("running_mean", "running_var"), stf, ste, st64):
            assert_close_to_ref(a, e, r, f"{tag} {name}")
        assert int(fbn.num_batches_tracked) == int(bn.num_batches_tracked)


# --------------------------------------------------------------------------------------
# ops.conv_bn_relu against eager F.conv2d + F.batch_norm (+ residual) (+ ReLU) in the same
# dtype and in float64: test_edge_cases and test_properties.

UNIT_TENSOR_ARGS = ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var", "bias", "residual")
UNIT_GRAD_ARGS = ("x", "weight", "bn_weight", "bn_bias", "bias", "residual")


def eager_conv_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *, training, momentum=0.1,
                       eps=1e-5, stride=1, padding=0, dilation=1, groups=1, bias=None, residual=None, relu=True):
    z = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    y = F.batch_norm(z, running_mean, running_var, bn_weight, bn_bias, training or running_mean is None,
                     momentum, eps)
    if residual is not None:
        y = y + residual
    return torch.relu(y) if relu else y


def reduction_scales(tensors: dict, grad_y, kwargs) -> dict:
    """For each result that is a sum over many terms which may cancel, the magnitude of those
    terms (float64): the `scale` of assert_close_to_ref ("pass the magnitude of the summed
    terms for a quantity that is a cancellation"). Any order of summation errs by a few
    ulps of that magnitude, however small the result.

    With |x_hat| <= (conv(|x|, |w|) + |bias| + |mean|) * invstd and the BatchNorm backward's
    dz = gamma * invstd * (g - mean(g) - x_hat * mean(g * x_hat)) (eval: gamma * invstd * g),
    bounded termwise by D: the output is gamma * x_hat + ..., where z - mean cancels (a channel
    of near-constant z: invstd -> 1/sqrt(eps) amplifies it); bn_bias sums g; bn_weight sums
    g * x_hat (the folded eval path sums g * conv(x, w) and g * (bias - running_mean)
    separately, two sums that cancel); conv bias sums dz (exactly 0 under batch statistics),
    weight sums dz * x (under batch statistics sum(grad_w * w) = 0 per output channel:
    BatchNorm is scale invariant), x sums dz * w."""
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
    the gradient of every floating input, and the running statistics (assert_close_to_ref).
    `tensors` holds x, weight, bn_weight, bn_bias, running_mean, running_var and optionally bias,
    residual, with whatever strides the caller gave them (kept for the fused and eager dtype
    runs). `expect`: the backend that must run the forward (None: not checked). grad_y: the
    output gradient (default random); it may itself be oddly strided."""
    runs = []
    fused = resnet_fused.ops.conv_bn_relu
    for fn, dt in ((eager_conv_bn_relu, torch.float64), (eager_conv_bn_relu, None), (fused, None)):
        args = {}
        for k, v in tensors.items():
            if v is None:
                args[k] = None
                continue
            v = v.detach() if dt is None else v.detach().to(dt)
            args[k] = v.clone() if k.startswith("running") else v.requires_grad_()
        if fn is fused:
            with resnet_fused.use_backend(backend), backends.record_selections() as selected:
                y = fn(**args, **kwargs)
            if expect is not None:
                assert set(selected) == {expect}, f"expected {expect} to run, got {dict(selected)}"
        else:
            y = fn(**args, **kwargs)
        g = grad_y if grad_y is not None else torch.randn(
            y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y.device)
        if g.dtype != y.dtype:
            g = g.to(y.dtype)
        inputs = [k for k in UNIT_GRAD_ARGS if args.get(k) is not None]
        with resnet_fused.use_backend(backend):
            grads = torch.autograd.grad(y, [args[k] for k in inputs], g)
        runs.append((y, dict(zip(inputs, grads)),
                     {k: args[k] for k in ("running_mean", "running_var") if args.get(k) is not None}))
    (y64, g64, s64), (ye, ge, se), (yf, gf, sf) = runs
    scales = reduction_scales(tensors, g, kwargs)
    assert_close_to_ref(yf, ye, y64, f"{backend} output", scale=max(scales["output"], y64.abs().max().item()))
    for name in g64:
        assert gf[name].shape == tensors[name].shape, name
        assert_close_to_ref(gf[name], ge[name], g64[name], f"{backend} grad {name}", scale=scales.get(name))
    for name in s64:
        assert_close_to_ref(sf[name], se[name], s64[name], f"{backend} {name}",
                            scale=max(scales[name], s64[name].abs().max().item()))
