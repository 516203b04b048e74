"""The op suite: every backend's ops against stock nn.Conv2d + nn.BatchNorm2d (+ residual) +
ReLU and against the reference ops.

Each test taking the `backend` fixture (conftest.py) runs on the reference, Triton and CUDA
backends, skipped with `available_backends()`'s reason where a backend cannot run: the
reference on CPU (on a GPU in float16/bfloat16), Triton compiled on a GPU or in its CPU
interpreter, CUDA on a GPU. float16/bfloat16 cases are marked needs_cuda. Direct calls of a
backend's ops skip inputs its kernels do not cover (`unsupported_reason`); through the
public API those take the reference path, which test_unit_matches_eager (float64) and
test_resolved_backend check.

Tolerance (resnet_fused/tolerances.py): error vs a float64 reference at most 2x eager's own error in
the same dtype, plus a floor of a few ulps.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from backend_under_test import dtype_params
from op_samples import (
    DIRECT_SHAPES,
    as64,
    check_sync_building_blocks,
    compare_outputs,
    conv_args,
    direct_inputs,
    op_samples,
    same_strides,
)
from random_bn import randomize_bn
from recorders import ExpandingRecorder, OpRecorder, assert_ran_on, expected_backend
from resnet_fused.tolerances import assert_close_to_ref
from unit_cases import CONFIGS, WIDE_CONFIGS, make_unit, run_unit_case

import resnet_fused
from resnet_fused import _library, backends, ops

LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])


# --------------------------------------------------------------------------------------
# Units against eager nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU, float64 as the oracle:
# forward, every gradient, the running statistics, and which backend's ops ran.


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64, torch.float16, torch.bfloat16))
@LAYOUTS
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_unit_matches_eager(backend, cfg, training, residual, relu, channels_last, dtype):
    """float64 is outside the fused backends' kernels: there it checks the reference path
    they hand such a call to."""
    run_unit_case(cfg, training, residual, relu, channels_last, dtype, device=backend.device(dtype),
                  steps=backend.unit_steps)


@pytest.mark.parametrize("cfg", ["3x3", "3x3_groups4"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backward_runs_on_the_forwards_backend(backend, training, cfg):
    """A unit's forward op and its backward op both run on the selected backend, or both on
    the reference where its kernels do not cover the call (CUDA: groups > 1)."""
    device = backend.device()
    unit = resnet_fused.nn.ConvBNReLU2d.from_modules(*make_unit(CONFIGS[cfg], torch.float32, device)).train(training)
    x = torch.randn(2, CONFIGS[cfg][0], 6, 6, device=device, requires_grad=True)
    recorder = OpRecorder()
    with recorder:
        unit(x).sum().backward()
    op = "conv_bn_train" if training else "conv_bn_eval"
    assert_ran_on(recorder, backend.name, (op, f"{op}_backward"))


def test_unit_running_statistics_over_steps(backend):
    run_unit_case(CONFIGS["3x3s2_bias"], True, True, True, True, torch.float32, device=backend.device(), steps=3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", WIDE_CONFIGS.values(), ids=WIDE_CONFIGS.keys())
def test_wide_unit_matches_eager(backend, cfg, training):
    run_unit_case(cfg, training, True, True, True, torch.float32, device=backend.device(), steps=1)


# --------------------------------------------------------------------------------------
# The ops called directly, against the reference ops (same dtype and float64).


# The DIRECT_SHAPES small enough for the Triton interpreter.
INTERPRETED_SHAPES = [DIRECT_SHAPES[k] for k in ("1x1s2", "3x3_c5_c7", "5x3_asym")]


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@LAYOUTS
@pytest.mark.parametrize("shape", DIRECT_SHAPES.values(), ids=DIRECT_SHAPES.keys())
def test_conv_ops_vs_reference(backend, shape, channels_last, dtype):
    """conv_bn_eval and conv_bn_train with and without residual and ReLU; their backward ops
    with and without ReLU (they take no residual: it only changes y, i.e. the ReLU mask)."""
    if backend.interpreted and shape not in INTERPRETED_SHAPES:
        pytest.skip("a GPU-sized shape (seconds per op in the Triton interpreter): runs compiled on a GPU; "
                    "under the interpreter test_wide_unit_matches_eager covers wide shapes")
    device = backend.device(dtype)
    ns, ref_ops = backend.ops, torch.ops.resnet_fused
    for residual, relu in ((False, True), (False, False), (True, False), (True, True)):
        x, w, r, conv = direct_inputs(shape, dtype, channels_last, residual, device)
        c_out = w.shape[0]
        scale = torch.rand(c_out, device=device) + 0.5
        shift = torch.randn(c_out, device=device)
        bias = torch.randn(c_out, device=device, dtype=dtype)
        tag = f"res={residual} relu={relu}"

        args = (x, w, scale, shift, r, *conv, relu)
        backend.require("conv_bn_eval", *args)
        y = ns.conv_bn_eval(*args)
        compare_outputs(f"conv_bn_eval {tag}", y, ref_ops.conv_bn_eval(*args), ref_ops.conv_bn_eval(*as64(args)))

        args = (x, w, bias, scale, shift, r, *conv, 1e-5, relu)
        y_t, z, mean, var = ns.conv_bn_train(*args)
        ref_t = ref_ops.conv_bn_train(*args)
        ref64_t = ref_ops.conv_bn_train(*as64(args))
        compare_outputs(f"conv_bn_train {tag}", (y_t, z), ref_t[:2], ref64_t[:2])
        # mean/var are float32 for every activation dtype: compare with the float64
        # statistics of the z this kernel stored (z itself is compared above).
        z64 = z.double()
        mean64 = z64.mean(dim=(0, 2, 3))
        var64 = z64.var(dim=(0, 2, 3), unbiased=False)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5 * z64.abs().max().item())
        torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-6)
        if not residual:
            continue

        grad_y = torch.randn_like(y)
        # Bound on the summed terms of the 1-D gradients: sum |g| times the largest factor.
        factor = max(1.0, z.double().abs().max().item(),
                     ((z.double() - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-5).sqrt())
                     .abs().max().item())
        reduction_scale = grad_y.double().abs().sum(dim=(0, 2, 3)).max().item() * factor
        y_arg = y if relu else None
        args = (grad_y, x, w, scale, y_arg, *conv, relu, [True, True, True, True, True])
        compare_outputs(f"conv_bn_eval_backward {tag}", ns.conv_bn_eval_backward(*args),
                        ref_ops.conv_bn_eval_backward(*args), ref_ops.conv_bn_eval_backward(*as64(args)),
                        reduction_scale)

        y_arg = y_t if relu else None
        args = (grad_y, x, w, z, y_arg, mean, var, scale, *conv, 1e-5, relu, [True] * 6)
        ours = ns.conv_bn_train_backward(*args)
        ref = ref_ops.conv_bn_train_backward(*args)
        ref64 = ref_ops.conv_bn_train_backward(*as64(args))
        # grad_bias is a sum that cancels to ~0: also judged against the summed magnitude.
        compare_outputs(f"conv_bn_train_backward {tag}", ours, ref, ref64, reduction_scale)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@LAYOUTS
@pytest.mark.parametrize("shape", DIRECT_SHAPES.values(), ids=DIRECT_SHAPES.keys())
def test_bn_act_conv_bn_stats_vs_reference(backend, shape, channels_last, dtype):
    """bn_act_conv_bn_stats (the recompute chain's forward: the previous unit's BatchNorm + ReLU
    applied to z_in as the conv loads it, then z and its statistics) and bn_act_conv_backward
    against the reference ops: z and the gradients per the 2x rule, the float32 statistics
    against float64 statistics of the stored z. z_in
    has a shifted mean so that the ReLU zeroes part of the input and the padding must stay zero
    after the transform (relu(bn(0)) would not be)."""
    if backend.interpreted and shape not in INTERPRETED_SHAPES:
        pytest.skip("a GPU-sized shape (seconds per op in the Triton interpreter): runs compiled on a GPU")
    device = backend.device(dtype)
    ns, ref_ops = backend.ops, torch.ops.resnet_fused
    for relu, with_bias in ((True, False), (False, True)):
        x, w, _, conv = direct_inputs(shape, dtype, channels_last, False, device)
        c_in = x.shape[1]
        z_in = (x.float() * 2 + 0.5).to(dtype)
        mean = torch.randn(c_in, device=device) * 0.3 + 0.5
        var = torch.rand(c_in, device=device) * 2 + 0.5
        bn_w, bn_b = torch.rand(c_in, device=device) + 0.5, torch.randn(c_in, device=device) * 0.5 + 0.3
        bias = torch.randn(w.shape[0], device=device, dtype=dtype) if with_bias else None
        args = (z_in, mean, var, bn_w, bn_b, 1e-5, relu, w, bias, *conv)
        backend.require("bn_act_conv_bn_stats", *args)
        z, mean_z, var_z = ns.bn_act_conv_bn_stats(*args)
        tag = f"relu={relu} bias={with_bias}"
        compare_outputs(f"bn_act_conv_bn_stats z {tag}", z, ref_ops.bn_act_conv_bn_stats(*args)[0],
                        ref_ops.bn_act_conv_bn_stats(*as64(args))[0])
        z64 = z.double()
        torch.testing.assert_close(mean_z.double(), z64.mean(dim=(0, 2, 3)), rtol=1e-5,
                                   atol=1e-5 * z64.abs().max().item())
        torch.testing.assert_close(var_z.double(), z64.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-6)

        # Its backward's conv part: the dgrad masked by the ReLU of relu(bn(z_in)) and the wgrad
        # against it, both recomputed from z_in.
        grad_z = torch.randn_like(z)
        bargs = (grad_z, z_in, mean, var, bn_w, bn_b, 1e-5, relu, w, *conv, [True, True])
        backend.require("bn_act_conv_backward", *bargs)
        ours = ns.bn_act_conv_backward(*bargs)
        ref64 = ref_ops.bn_act_conv_backward(*as64(bargs))
        # The two sums (of g and g * (z_in - mean)) are judged against their summed magnitude.
        reduction_scale = ref64[0].abs().sum(dim=(0, 2, 3)).max().item() * max(
            1.0, (z_in.double() - mean.double().view(1, -1, 1, 1)).abs().max().item())
        compare_outputs(f"bn_act_conv_backward {tag}", ours, ref_ops.bn_act_conv_backward(*bargs), ref64,
                        reduction_scale)


@pytest.mark.parametrize("output_mask", [[True, False], [False, True], [False, False]], ids=str)
def test_bn_act_conv_backward_output_mask(backend, output_mask):
    """bn_act_conv_backward with part of its outputs asked for: those equal the full call's
    bit for bit, the rest are empty, one tensor each, and every output has the fake kernel's
    shape and dtype (what torch.compile plans with)."""
    dtype = torch.float32
    device = backend.device(dtype)
    x, w, _, conv = direct_inputs(next(iter(INTERPRETED_SHAPES)), dtype, True, False, device)
    c_in = x.shape[1]
    mean, var = torch.randn(c_in, device=device), torch.rand(c_in, device=device) + 0.5
    bn_w, bn_b = torch.rand(c_in, device=device) + 0.5, torch.randn(c_in, device=device)
    grad_z = torch.randn_like(F.conv2d(x, w, None, *conv))
    args = (grad_z, x, mean, var, bn_w, bn_b, 1e-5, True, w, *conv)
    backend.require("bn_act_conv_backward", *args, output_mask)
    full = backend.ops.bn_act_conv_backward(*args, [True, True])
    part = backend.ops.bn_act_conv_backward(*args, output_mask)
    fake = _library.FAKES["bn_act_conv_backward"](*args, output_mask)
    asked = (output_mask[0], output_mask[1], output_mask[0], output_mask[0])
    for i, (got, whole, meta, want) in enumerate(zip(part, full, fake, asked)):
        assert (got.shape, got.dtype) == (meta.shape, meta.dtype), f"output {i}: {got.shape} {got.dtype} vs fake {meta.shape} {meta.dtype}"
        if want:
            torch.testing.assert_close(got, whole, rtol=0, atol=0)
        else:
            assert got.numel() == 0, f"output {i} was not asked for but has {got.numel()} elements"
    ptrs = [t.data_ptr() for t in part if t.numel()]
    assert len(ptrs) == len(set(ptrs)) and len({id(t) for t in part}) == len(part), "outputs alias each other"


def _op_results(backend, name, args):
    """(this backend's result, reference result, reference float64 result), each a list."""
    backend.require(name, *args)

    def listed(out):
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return (listed(getattr(backend.ops, name)(*args)), listed(getattr(torch.ops.resnet_fused, name)(*args)),
            listed(getattr(torch.ops.resnet_fused, name)(*as64(args))))


def _check_outputs(name, got, ref32, ref64):
    for i, (a, e, r) in enumerate(zip(got, ref32, ref64, strict=True)):
        assert a.dtype == e.dtype and a.shape == e.shape, (name, i, a.dtype, e.dtype, a.shape, e.shape)
        assert same_strides(a, e), (name, i, a.stride(), e.stride())
        assert_close_to_ref(a, e, r, f"{name} output {i}")


def _mask_id(mask):
    return "".join("1" if b else "0" for b in mask)


MASKS5 = [[True] * 5, [True, False, False, False, False], [False, True, True, False, False],
          [False, False, False, True, True], [False, True, False, False, True]]


@pytest.mark.parametrize("groups", [1, 2], ids=["g1", "g2"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
@pytest.mark.parametrize("mask", MASKS5, ids=_mask_id)
def test_eval_backward_op(backend, mask, relu, groups):
    """Every output_mask: the gradients asked for, empty ones for the others."""
    device = backend.device()
    x = torch.randn(2, 6, 7, 7, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 6 // groups, 3, 3, device=device)
    scale, shift = torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    conv = ([2, 2], [1, 1], [1, 1], groups)
    y = torch.ops.resnet_fused.conv_bn_eval(x, w, scale, shift, None, *conv, relu)
    grad_y = torch.randn_like(y)
    args = (grad_y, x, w, scale, y if relu else None, *conv, relu, mask)
    got, ref32, ref64 = _op_results(backend, "conv_bn_eval_backward", args)
    for out, needed in zip(got, mask):
        assert (out.numel() == 0) != needed
    _check_outputs("conv_bn_eval_backward", got, ref32, ref64)


MASKS6 = [[True] * 6, [True, False, False, False, False, False], [False, True, True, False, False, False],
          [False, False, False, True, True, True], [False, False, True, False, False, False]]


@pytest.mark.parametrize("mask", MASKS6, ids=_mask_id)
def test_train_backward_op(backend, mask):
    device = backend.device()
    x = torch.randn(3, 5, 9, 7, device=device)
    w = torch.randn(7, 5, 3, 3, device=device)
    bn_w, bn_b, bias = torch.rand(7, device=device) + 0.5, torch.randn(7, device=device), torch.randn(7, device=device)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y, z, mean, var = torch.ops.resnet_fused.conv_bn_train(x, w, bias, bn_w, bn_b, None, *conv, 1e-5, True)
    grad_y = torch.randn_like(y)
    args = (grad_y, x, w, z, y, mean, var, bn_w, *conv, 1e-5, True, mask)
    got, ref32, ref64 = _op_results(backend, "conv_bn_train_backward", args)
    for i, (out, needed) in enumerate(zip(got, mask)):
        assert (out.numel() == 0) != needed
        if needed and i == 2:  # conv bias grad cancels to ~0: judge against the summed terms
            scale = grad_y.abs().sum(dim=(0, 2, 3)).max().item()
            assert_close_to_ref(out, ref32[i], ref64[i], "grad bias", scale=scale)
            got[i] = ref32[i] = ref64[i] = out.new_empty(0)
    _check_outputs("conv_bn_train_backward", got, ref32, ref64)


def test_train_forward_op_outputs(backend):
    """Output dtypes and layouts: channels_last x with an NCHW residual, a conv bias, eps 1e-3."""
    device = backend.device()
    x = torch.randn(3, 5, 9, 7, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 5, 1, 1, device=device)
    r = torch.randn(3, 7, 9, 7, device=device)
    args = (x, w, torch.randn(7, device=device), torch.rand(7, device=device) + 0.5, torch.randn(7, device=device),
            r, [1, 1], [0, 0], [1, 1], 1, 1e-3, False)
    _check_outputs("conv_bn_train", *_op_results(backend, "conv_bn_train", args))


def test_empty_batch(backend):
    device = backend.device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(0, 8, 5, 5, device=device, dtype=dtype)
    w = torch.randn(16, 8, 3, 3, device=device, dtype=dtype)
    v = torch.rand(16, device=device) + 0.5
    backend.require("conv_bn_eval", x, w, v, v, None, *conv_args(), True)
    assert backend.ops.conv_bn_eval(x, w, v, v, None, *conv_args(), True).shape == (0, 16, 5, 5)
    y, z, mean, var = backend.ops.conv_bn_train(x, w, None, v, v, None, *conv_args(), 1e-5, True)
    assert y.shape == z.shape == (0, 16, 5, 5) and mean.shape == var.shape == (16,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()


# --------------------------------------------------------------------------------------
# add_relu.


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64, torch.float16, torch.bfloat16))
def test_add_relu_matches_eager(backend, dtype):
    """Through ops.add_relu and autograd: output and both gradients vs eager relu(x + r)."""
    device = backend.device(dtype)
    x64 = torch.randn(3, 5, 7, 9, dtype=torch.float64, device=device)
    r64 = torch.randn(3, 5, 7, 9, dtype=torch.float64, device=device)
    g64 = torch.randn(3, 5, 7, 9, dtype=torch.float64, device=device)
    outs = []
    for fn, dt in ((lambda a, b: torch.relu(a + b), torch.float64), (lambda a, b: torch.relu(a + b), dtype),
                   (ops.add_relu, dtype)):
        x, r = x64.to(dt).requires_grad_(), r64.to(dt).requires_grad_()
        recorder = OpRecorder()
        with recorder:
            y = fn(x, r)
        outs.append((y, *torch.autograd.grad(y, (x, r), g64.to(dt))))
    assert_ran_on(recorder, backend.name, ("add_relu",))
    for i, name in enumerate(("output", "grad x", "grad residual")):
        assert_close_to_ref(outs[2][i], outs[1][i], outs[0][i], name)


def _add_relu_cases(device, dtype):
    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    return {
        "nchw": lambda: (t(2, 8, 5, 7), t(2, 8, 5, 7)),
        "nhwc": lambda: (t(2, 5, 7, 3).contiguous(memory_format=torch.channels_last),
                         t(2, 5, 7, 3).contiguous(memory_format=torch.channels_last)),
        "mixed_layouts": lambda: (t(3, 16, 4, 4).contiguous(memory_format=torch.channels_last), t(3, 16, 4, 4)),
        "1d_tail": lambda: (t(1001), t(1001)),  # 1-D, the tail not a whole vector
        "misaligned": lambda: (t(4099)[1:], t(4100)[2:]),  # data pointers off the vector alignment
        "empty": lambda: (t(0, 3, 2, 2), t(0, 3, 2, 2)),
    }


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", list(_add_relu_cases("cpu", torch.float32)))
def test_add_relu_op(backend, case, dtype):
    """The op directly: bitwise the reference's result (one rounding of x + r), its shape and strides."""
    x, r = _add_relu_cases(backend.device(dtype), dtype)[case]()
    backend.require("add_relu", x, r)
    y = backend.ops.add_relu(x, r)
    expected = torch.ops.resnet_fused.add_relu(x, r)
    assert y.shape == expected.shape and same_strides(y, expected)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Training statistics: deterministic, and sound where E[z^2] - E[z]^2 would not be.


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16))
def test_training_is_deterministic(backend, dtype):
    """Statistics and gradients are bitwise identical across runs (fixed reduction order)."""
    device = backend.device(dtype)
    x, w, r, conv = direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], dtype, True, True, device)
    bn_w, bn_b = torch.rand(64, device=device) + 0.5, torch.randn(64, device=device)
    backend.require("conv_bn_train", x, w, None, bn_w, bn_b, r, *conv, 1e-5, True)
    runs = []
    for _ in range(2):
        y, z, mean, var = backend.ops.conv_bn_train(x, w, None, bn_w, bn_b, r, *conv, 1e-5, True)
        g = torch.ones_like(y)
        grads = backend.ops.conv_bn_train_backward(g, x, w, z, y, mean, var, bn_w, *conv, 1e-5, True,
                                                   [False, False, False, True, True, True])
        runs.append((y, z, mean, var, *grads[3:]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_statistics_survive_a_large_input_mean(backend):
    """Per-tile (mean, M2) merged with Chan's formula: a batch whose channels sit far from zero
    keeps its variance (a float32 sum-of-squares would lose most digits here)."""
    device = backend.device()
    x = torch.randn(4, 4, 16, 16, device=device) * 0.01 + 30.0
    w = torch.rand(6, 4, 1, 1, device=device) + 1.0
    ones, zeros = torch.ones(6, device=device), torch.zeros(6, device=device)
    args = (x, w, None, ones, zeros, None, [1, 1], [0, 0], [1, 1], 1, 1e-5, False)
    backend.require("conv_bn_train", *args)
    _, z, mean, var = backend.ops.conv_bn_train(*args)
    z64 = F.conv2d(x.double(), w.double())
    var64 = z64.var(dim=(0, 2, 3), unbiased=False)
    _, var_eager = torch.var_mean(F.conv2d(x, w), dim=(0, 2, 3), unbiased=False)
    assert_close_to_ref(mean, z64.mean(dim=(0, 2, 3)).float(), z64.mean(dim=(0, 2, 3)), "mean")
    assert_close_to_ref(var, var_eager, var64, "var")
    # naive E[z^2] - E[z]^2 in float32 as a control: it is far off, so the check above can fail
    naive = (z.square().mean(dim=(0, 2, 3)) - z.mean(dim=(0, 2, 3)).square())
    assert (naive.double() - var64).abs().max() > 10 * (var.double() - var64).abs().max()


def test_statistics_survive_a_large_conv_bias(backend):
    """A large mean relative to the spread (conv bias 1000, unit-ish variance): the variance of
    the stored z to 1e-4 relative."""
    device = backend.device()
    x, w, _, conv = direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], torch.float32, True, False, device)
    bias = torch.full((64,), 1000.0, device=device)
    bn_w, bn_b = torch.ones(64, device=device), torch.zeros(64, device=device)
    args = (x, w, bias, bn_w, bn_b, None, *conv, 1e-5, False)
    backend.require("conv_bn_train", *args)
    _, z, mean, var = backend.ops.conv_bn_train(*args)
    z64 = z.double()
    torch.testing.assert_close(var.double(), z64.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), z64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------
# SyncBatchNorm building blocks.


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float16, torch.bfloat16))
@LAYOUTS
def test_sync_building_blocks(backend, channels_last, dtype):
    """conv_bn_stats, bn_apply, bn_apply_backward_reduce and bn_apply_backward (the fused
    SyncBatchNorm path) against the reference ops."""
    check_sync_building_blocks(backend.ops, dtype, backend.device(dtype), channels_last)


def test_sync_building_blocks_compose_to_the_training_ops(backend):
    """conv_bn_stats + bn_apply is conv_bn_train; bn_apply_backward_reduce + bn_apply_backward
    with this batch's sums and count give conv_bn_train_backward's dz and residual grad (the
    synchronized path runs the same arithmetic with every process's sums)."""
    ns, device = backend.ops, backend.device()
    x, w, bias = torch.randn(2, 4, 6, 6, device=device), torch.randn(5, 4, 3, 3, device=device), torch.randn(
        5, device=device)
    bn_w, bn_b = torch.rand(5, device=device) + 0.5, torch.randn(5, device=device)
    res = torch.randn(2, 5, 6, 6, device=device)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    backend.require("conv_bn_train", x, w, bias, bn_w, bn_b, res, *conv, 1e-5, True)
    y, z, mean, var = ns.conv_bn_train(x, w, bias, bn_w, bn_b, res, *conv, 1e-5, True)
    z2, mean2, var2 = ns.conv_bn_stats(x, w, bias, *conv)
    for a, b in ((z2, z), (mean2, mean), (var2, var)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ns.bn_apply(z, mean, var, bn_w, bn_b, res, 1e-5, True), y)
    gy = torch.randn_like(y)
    grads = ns.conv_bn_train_backward(gy, x, w, z, y, mean, var, bn_w, *conv, 1e-5, True, [True] * 6)
    sum_g, sum_g_zc = ns.bn_apply_backward_reduce(gy, z, y, mean, True)
    torch.testing.assert_close(sum_g, grads[4])  # grad of bn_bias
    torch.testing.assert_close(sum_g_zc * torch.rsqrt(var + 1e-5), grads[3])  # grad of bn_weight
    dz, g = ns.bn_apply_backward(gy, z, y, mean, var, bn_w, sum_g, sum_g_zc, 72, 1e-5, True, [True, True])
    torch.testing.assert_close(g, grads[5])
    gx, gw, *_ = ns.conv_bn_eval_backward(dz, x, w, torch.ones(5, device=device), None, *conv, False,
                                          [True, True] + [False] * 3)
    torch.testing.assert_close(gx, grads[0])
    torch.testing.assert_close(gw, grads[1])
    with pytest.raises(NotImplementedError, match="building block"):
        xg = x.clone().requires_grad_()
        ns.conv_bn_stats(xg, w, None, *conv)[0].sum().backward()


# --------------------------------------------------------------------------------------
# Registration: opcheck, schemas.


def _sample_id(sample):
    return sample[0]


@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32, torch.bfloat16))
@pytest.mark.parametrize("index", range(len(op_samples())), ids=[name for name, _ in op_samples()])
def test_opcheck(backend, index, dtype):
    """torch.library.opcheck: schema, fake kernel, autograd registration, AOT dispatch. Under
    the Triton interpreter AOT dispatch is left out: it traces the kernels with tensors whose
    data the interpreter cannot read ("Attempted to access the data pointer on an invalid
    python storage"); compiled on a GPU all four run."""
    name, args = op_samples(dtype, backend.device(dtype))[index]
    backend.require(name, *args)
    test_utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if backend.interpreted:
        test_utils = tuple(u for u in test_utils if u != "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(backend.ops, name).default, args, test_utils=test_utils)


def test_schemas_are_the_library_schemas(backend):
    for name, schema in _library.SCHEMAS.items():
        got = str(getattr(backend.ops, name).default._schema)
        assert got == f"{backend.namespace}::{name}{schema}", got


# --------------------------------------------------------------------------------------
# Selection: the requested backend runs the calls its kernels cover, the reference the others.


def test_resolved_backend(backend):
    device = backend.device()
    cases = []
    for dtype in (torch.float32, torch.float64):
        cases += op_samples(dtype, device)
    empty = torch.randn(0, 4, 5, 5, device=device)
    cases.append(("add_relu", (empty, empty)))
    for name, args in cases:
        expected, reason = expected_backend(backend.name, name, *args)
        assert backends.resolved_backend(name, *args) == expected, (name, reason)
    # Guards against a suite that silently tests the reference path: the plain float32
    # (on a GPU, float16) calls are covered, float64 is not on the fused backends.
    dtype = torch.float16 if device == "cuda" else torch.float32
    x = torch.randn(2, 8, 6, 6, device=device, dtype=dtype)
    w = torch.randn(16, 8, 3, 3, device=device, dtype=dtype)
    v = torch.rand(16, device=device) + 0.5
    covered = [("conv_bn_eval", (x, w, v, v, None, *conv_args(), True)),
               ("conv_bn_train", (x, w, None, v, v, None, *conv_args(), 1e-5, True)),
               ("add_relu", (x, x))]
    for name, args in covered:
        assert backends.resolved_backend(name, *args) == backend.name, (name, backend.unsupported_reason(name, *args))
        if backend.fused:
            assert backends.resolved_backend(name, *as64(args)) == "reference", name
    # ...and an uncovered call still gives the right answer through the public API
    x64 = x.double()
    torch.testing.assert_close(ops.add_relu(x64, -x64 * 0.5), torch.relu(x64 * 0.5))


# --------------------------------------------------------------------------------------
# Fusion: an eval forward runs the convolution, BatchNorm and ReLU inside the backend's kernels.

_FORBIDDEN = ("convolution", "conv2d", "batch_norm", "native_batch_norm", "relu", "threshold", "addmm", "mm",
              "bmm", "add.Tensor", "mul.Tensor", "clamp", "where")


def _forbidden(recorded):
    return [op for op in recorded if op.startswith("aten::") and any(f in op for f in _FORBIDDEN)]


def test_fused_forward_runs_no_aten_convolution_batchnorm_or_relu(backend):
    """From the fused op on, an eval unit's forward issues no aten convolution, BatchNorm or
    ReLU on a fused backend. On the reference it does, which shows the recorder (that also
    follows the reference's and Triton's Python implementations) would see them."""
    device = backend.device()
    unit = resnet_fused.nn.ConvBNReLU2d(4, 6, 3, padding=1).to(device).eval()
    randomize_bn(unit.bn)
    x = torch.randn(2, 4, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 6, 6, 6, device=device).contiguous(memory_format=torch.channels_last)
    recorder = ExpandingRecorder()
    with torch.no_grad(), recorder:
        y = unit(x, r)
    torch.testing.assert_close(y, torch.relu(unit.bn(unit.conv(x)) + r))
    fused_op = f"{backend.namespace}::conv_bn_eval.default"
    assert fused_op in recorder.names, recorder.names
    forbidden = _forbidden(recorder.names[recorder.names.index(fused_op):])
    if backend.fused:
        assert not forbidden, recorder.names
    else:
        assert any("conv" in op for op in forbidden) and any("relu" in op for op in forbidden), recorder.names


# --------------------------------------------------------------------------------------
# torch.compile traces through the ops.


@pytest.mark.parametrize("kernel_size,memory_format", [(3, torch.contiguous_format), (1, torch.channels_last)],
                         ids=["3x3", "1x1_nhwc"])
def test_compile_fullgraph_unit(backend, kernel_size, memory_format):
    """A compiled unit equals eager, forward and backward, train and eval. The 1x1 NHWC unit
    is Triton's TMA-descriptor GEMM, whose global scratch comes from Triton's allocator at every
    launch: the compiled graph's launcher runs it, also from a thread that never set one."""
    if backend.interpreted:
        pytest.skip("under the Triton interpreter, tracing launches the kernels on tensors without data "
                    "('Attempted to access the data pointer on an invalid python storage'); runs on a GPU")
    device = backend.device()
    unit = resnet_fused.nn.ConvBNReLU2d(16, 8, kernel_size, padding=kernel_size // 2).to(device)
    randomize_bn(unit.bn)
    ref = copy.deepcopy(unit)
    compiled = torch.compile(unit, fullgraph=True)

    def rand(*shape, **kwargs):
        return torch.randn(*shape, device=device).contiguous(memory_format=memory_format).requires_grad_(
            kwargs.get("requires_grad", False))

    for mode in (True, False):
        unit.train(mode), ref.train(mode)
        x = rand(2, 16, 6, 6, requires_grad=True)
        r = rand(2, 8, 6, 6)
        y, y_ref = compiled(x, r), ref(x, r)
        torch.testing.assert_close(y, y_ref)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(unit.bn.running_mean, ref.bn.running_mean)
    x, r = rand(2, 16, 6, 6), rand(2, 8, 6, 6)
    in_thread = []
    with torch.no_grad():
        worker = threading.Thread(target=lambda: in_thread.append(compiled(x, r)))
        worker.start()
        worker.join()
        assert in_thread, "the compiled unit raised in a worker thread (see its traceback above)"
        torch.testing.assert_close(in_thread[0], ref(x, r))


# --------------------------------------------------------------------------------------
# The shared autograd formulas (_library.py), exercised on the reference ops in float64.


@pytest.mark.parametrize("sample", [s for s in op_samples() if not s[0].endswith("backward")
                                    and s[0] not in _library.SYNC_OP_NAMES], ids=_sample_id)
def test_gradcheck_float64(sample):
    name, args = sample
    op = getattr(torch.ops.resnet_fused, name)

    def first_output(*a):
        out = op(*a)
        return out[0] if isinstance(out, tuple) else out

    assert torch.autograd.gradcheck(first_output, args, eps=1e-6, atol=1e-5)


def test_double_backward_raises_clearly():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = ops.conv_bn_relu(x, w, torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), None, None,
                         training=True, padding=1)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()
