"""The Triton backend: every op against float64 eager PyTorch, kernel coverage and fusion.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest sets
TRITON_INTERPRET=1), in float32; float16/bfloat16 cases need a GPU. Shapes are small because
the interpreter executes every program of every kernel in Python.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torchvision
from helpers import assert_close_to_ref, randomize_bn, randomize_model_bn
from test_models import _aggregate_rel_l2
from test_ops import CONFIGS, run_unit_case
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import _library, backends, ops
from resnet_fused.backends import reference

REASON = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
HALF_DTYPES = [pytest.param(torch.float16, marks=pytest.mark.needs_cuda, id="fp16"),
               pytest.param(torch.bfloat16, marks=pytest.mark.needs_cuda, id="bf16")]


@pytest.fixture
def triton_backend():
    with resnet_fused.use_backend("triton"):
        yield


def _triton_ops():
    return getattr(torch.ops, "resnet_fused_triton")


# --------------------------------------------------------------------------------------
# The backend really runs: selection and coverage.


def _eval_args(x, c_out=6, k=3, groups=1, residual=True):
    w = torch.randn(c_out, x.size(1) // groups, k, k, dtype=x.dtype, device=x.device)
    scale = torch.rand(c_out, device=x.device) + 0.5
    shift = torch.randn(c_out, device=x.device)
    r = torch.randn(x.size(0), c_out, x.size(2), x.size(3), dtype=x.dtype, device=x.device) if residual else None
    return (x, w, scale, shift, r, [1, 1], [k // 2, k // 2], [1, 1], groups, True)


def test_resolved_backend_is_triton_for_covered_inputs(triton_backend):
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    for args in (_eval_args(x), _eval_args(x.contiguous(memory_format=torch.channels_last), groups=2)):
        assert backends.resolved_backend("conv_bn_eval", *args) == "triton"
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    ones, zeros = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    train_args = (x, w, None, ones, zeros, None, [1, 1], [1, 1], [1, 1], 1, 1e-5, True)
    assert backends.resolved_backend("conv_bn_train", *train_args) == "triton"
    assert backends.resolved_backend("add_relu", x, x) == "triton"


def test_uncovered_inputs_take_the_reference_path(triton_backend):
    x64 = torch.randn(2, 4, 5, 5, dtype=torch.float64, device=DEVICE)
    assert backends.resolved_backend("conv_bn_eval", *_eval_args(x64)) == "reference"
    assert backends.resolved_backend("add_relu", x64, x64) == "reference"
    empty = torch.randn(0, 4, 5, 5, device=DEVICE)
    assert backends.resolved_backend("add_relu", empty, empty) == "reference"
    # ...and still give the right answer through the public API
    y = ops.add_relu(x64, -x64 * 0.5)
    torch.testing.assert_close(y, torch.relu(x64 * 0.5))


def test_schemas_match_the_shared_ones():
    for name, schema in _library.SCHEMAS.items():
        assert str(getattr(_triton_ops(), name).default._schema) == f"resnet_fused_triton::{name}{schema}"


# --------------------------------------------------------------------------------------
# Fusion: an eval forward runs the convolution inside Triton.

_FORBIDDEN = ("convolution", "conv2d", "batch_norm", "native_batch_norm", "relu", "threshold", "addmm", "mm",
              "bmm", "add.Tensor", "mul.Tensor", "clamp", "where")


class _Recorder(TorchDispatchMode):
    """Records every aten op, including those issued inside a resnet_fused* op's implementation
    (the mode re-enters itself around the op's own Python implementation)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        from resnet_fused.backends import reference as reference_backend
        from resnet_fused.backends import triton as triton_backend

        self.impls = {"resnet_fused_triton": triton_backend._IMPLS, "resnet_fused": reference_backend._IMPLS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace = func.namespace
        self.ops.append(f"{namespace}::{func._opname}.{func._overloadname}")
        if namespace in self.impls:
            # as triton_op's own kernel does: launch the Triton kernels directly
            from torch._library.triton import set_wrap_triton_enabled

            with self, set_wrap_triton_enabled(False):
                return self.impls[namespace][func._opname](*args, **kwargs)
        return func(*args, **kwargs)


def _eval_unit_forward():
    unit = resnet_fused.nn.ConvBNReLU2d(4, 6, 3, padding=1).to(DEVICE).eval()
    randomize_bn(unit.bn)
    x = torch.randn(2, 4, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 6, 6, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), _Recorder() as rec:
        y = unit(x, r)
    expected = torch.relu(unit.bn(unit.conv(x)) + r)
    return rec.ops, y, expected


def _forbidden(recorded):
    return [op for op in recorded if op.startswith("aten::") and any(f in op for f in _FORBIDDEN)]


def test_eval_forward_runs_no_aten_convolution_batchnorm_or_relu():
    with resnet_fused.use_backend("triton"):
        recorded, y, expected = _eval_unit_forward()
    assert "resnet_fused_triton::conv_bn_eval.default" in recorded, recorded
    assert not _forbidden([op for op in recorded[recorded.index("resnet_fused_triton::conv_bn_eval.default"):]]), \
        recorded
    torch.testing.assert_close(y, expected)
    # The recorder does see a convolution when one runs: the same forward on the reference.
    with resnet_fused.use_backend("reference"):
        recorded_ref, _, _ = _eval_unit_forward()
    assert any("conv" in op for op in _forbidden(recorded_ref)), recorded_ref
    assert any("relu" in op for op in _forbidden(recorded_ref)), recorded_ref


# --------------------------------------------------------------------------------------
# Units against stock nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU, float64 as the oracle.


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_unit_matches_eager_float32(triton_backend, cfg, training, residual, relu, channels_last):
    run_unit_case(cfg, training, residual, relu, channels_last, torch.float32, device=DEVICE, steps=1)


def test_unit_running_statistics_over_steps(triton_backend):
    run_unit_case(CONFIGS["3x3s2_bias"], True, True, True, True, torch.float32, device=DEVICE, steps=3)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_unit_matches_eager_half(triton_backend, cfg, training, channels_last, dtype):
    run_unit_case(cfg, training, True, True, channels_last, dtype, device=DEVICE)


# Wider than the units above: several K blocks, M tiles and channel tiles per kernel, odd sizes.
WIDE = {
    "3x3_c40_13": (40, 36, 3, 1, 1, 1, 1, False, 13),
    "1x1s2_c40": (40, 72, 1, 2, 0, 1, 1, False, 13),
    "7x7s2_stem": (3, 16, 7, 2, 3, 1, 1, False, 17),
    "3x3_groups2_dil": (32, 32, 3, 1, 2, 2, 2, False, 9),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", WIDE.values(), ids=WIDE.keys())
def test_wide_unit_matches_eager_float32(triton_backend, cfg, training):
    run_unit_case(cfg, training, True, True, True, torch.float32, device=DEVICE, steps=1)


# --------------------------------------------------------------------------------------
# Ops directly: every output_mask, output dtypes and layouts, against the reference op.


def _op_pair(name, args32):
    """(triton result, reference float32 result, reference float64 result)."""
    args64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args32]
    return (getattr(_triton_ops(), name)(*args32), getattr(torch.ops.resnet_fused, name)(*args32),
            getattr(torch.ops.resnet_fused, name)(*args64))


def _check_outputs(name, got, ref32, ref64):
    for i, (a, e, r) in enumerate(zip(got, ref32, ref64)):
        assert a.dtype == e.dtype and a.shape == e.shape, (name, i, a.dtype, e.dtype, a.shape, e.shape)
        assert a.stride() == e.stride(), (name, i, a.stride(), e.stride())
        assert_close_to_ref(a, e, r, f"{name} output {i}")


MASKS5 = [[True] * 5, [True, False, False, False, False], [False, True, True, False, False],
          [False, False, False, True, True], [False, True, False, False, True]]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
@pytest.mark.parametrize("mask", MASKS5, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_eval_backward_op(mask, relu):
    x = torch.randn(2, 6, 7, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 3, 3, 3, device=DEVICE)
    scale, shift = torch.rand(8, device=DEVICE) + 0.5, torch.randn(8, device=DEVICE)
    conv = ([2, 2], [1, 1], [1, 1], 2)
    y = reference.conv_bn_eval(x, w, scale, shift, None, *conv, relu)
    grad_y = torch.randn_like(y)
    args = (grad_y, x, w, scale, y if relu else None, *conv, relu, mask)
    got, ref32, ref64 = _op_pair("conv_bn_eval_backward", args)
    for out, needed in zip(got, mask):
        assert (out.numel() == 0) != needed
    _check_outputs("conv_bn_eval_backward", got, ref32, ref64)


MASKS6 = [[True] * 6, [True, False, False, False, False, False], [False, True, True, False, False, False],
          [False, False, False, True, True, True], [False, False, True, False, False, False]]


@pytest.mark.parametrize("mask", MASKS6, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_train_backward_op(mask):
    x = torch.randn(3, 5, 9, 7, device=DEVICE)
    w = torch.randn(7, 5, 3, 3, device=DEVICE)
    bn_w, bn_b, bias = torch.rand(7, device=DEVICE) + 0.5, torch.randn(7, device=DEVICE), torch.randn(7, device=DEVICE)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y, z, mean, var = reference.conv_bn_train(x, w, bias, bn_w, bn_b, None, *conv, 1e-5, True)
    grad_y = torch.randn_like(y)
    args = (grad_y, x, w, z, y, mean, var, bn_w, *conv, 1e-5, True, mask)
    got, ref32, ref64 = _op_pair("conv_bn_train_backward", args)
    for i, (out, needed) in enumerate(zip(got, mask)):
        assert (out.numel() == 0) != needed
        if needed and i == 2:  # conv bias grad cancels to ~0: judge against the summed terms
            scale = grad_y.abs().sum(dim=(0, 2, 3)).max().item()
            assert_close_to_ref(out, ref32[i], ref64[i], "grad bias", scale=scale)
            got, ref32, ref64 = [list(t) for t in (got, ref32, ref64)]
            got[i] = ref32[i] = ref64[i] = out.new_empty(0)
    _check_outputs("conv_bn_train_backward", got, ref32, ref64)


def test_train_forward_op_outputs():
    x = torch.randn(3, 5, 9, 7, device=DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 5, 1, 1, device=DEVICE)
    r = torch.randn(3, 7, 9, 7, device=DEVICE)  # NCHW residual with a channels_last x
    args = (x, w, torch.randn(7, device=DEVICE), torch.rand(7, device=DEVICE) + 0.5, torch.randn(7, device=DEVICE),
            r, [1, 1], [0, 0], [1, 1], 1, 1e-3, False)
    _check_outputs("conv_bn_train", *_op_pair("conv_bn_train", args))


def test_training_statistics_survive_a_large_mean():
    """Per-tile (mean, M2) merged with Chan's formula: a batch whose channels sit far from zero
    keeps its variance (a float32 sum-of-squares would lose most digits here)."""
    x = torch.randn(4, 4, 16, 16, device=DEVICE) * 0.01 + 30.0
    w = torch.rand(6, 4, 1, 1, device=DEVICE) + 1.0
    ones, zeros = torch.ones(6, device=DEVICE), torch.zeros(6, device=DEVICE)
    args = (x, w, None, ones, zeros, None, [1, 1], [0, 0], [1, 1], 1, 1e-5, False)
    _, z, mean, var = _triton_ops().conv_bn_train(*args)
    z64 = torch.nn.functional.conv2d(x.double(), w.double())
    var64 = z64.var(dim=(0, 2, 3), unbiased=False)
    _, var_eager = torch.var_mean(torch.nn.functional.conv2d(x, w), dim=(0, 2, 3), unbiased=False)
    assert_close_to_ref(mean, z64.mean(dim=(0, 2, 3)).float(), z64.mean(dim=(0, 2, 3)), "mean")
    assert_close_to_ref(var, var_eager, var64, "var")
    # naive E[z^2] - E[z]^2 in float32 as a control: it is far off, so the check above can fail
    naive = (z.square().mean(dim=(0, 2, 3)) - z.mean(dim=(0, 2, 3)).square())
    assert (naive.double() - var64).abs().max() > 10 * (var.double() - var64).abs().max()


def test_training_statistics_are_deterministic():
    x = torch.randn(3, 8, 11, 11, device=DEVICE)
    w = torch.randn(16, 8, 3, 3, device=DEVICE)
    args = (x, w, None, torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE), None,
            [1, 1], [1, 1], [1, 1], 1, 1e-5, True)
    first = _triton_ops().conv_bn_train(*args)
    second = _triton_ops().conv_bn_train(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_sync_batchnorm_building_blocks(channels_last):
    """conv_bn_stats, bn_apply, bn_apply_backward_reduce and bn_apply_backward (the fused
    SyncBatchNorm path) against the reference ops, float32."""
    from test_ops import check_sync_building_blocks

    check_sync_building_blocks(_triton_ops(), torch.float32, "cpu" if not torch.cuda.is_available() else "cuda",
                               channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_add_relu_op(triton_backend, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 5, 7, 3, device=DEVICE).contiguous(memory_format=fmt)
    r = torch.randn(2, 5, 7, 3, device=DEVICE)
    got, ref32, ref64 = _op_pair("add_relu", (x, r))
    _check_outputs("add_relu", [got], [ref32], [ref64])
    xg, rg = x.clone().requires_grad_(), r.clone().requires_grad_()
    y = ops.add_relu(xg, rg)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(xg.grad, (y > 0).float())


# --------------------------------------------------------------------------------------
# A whole model on the Triton backend against torchvision.


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_model_matches_torchvision(triton_backend, name):
    """Eval logits, then one training step (logits, every parameter gradient, running
    statistics) through the Triton kernels against torchvision, error within 2x float32
    eager's against float64. resnet18 is held to it tensor by tensor (elementwise maxima).
    The Bottleneck models (53 convs, 1.5-3 min each in the interpreter) are held to it in
    aggregate, as in tests/test_models.py: with batch-2 BatchNorm in training, float32
    rounding is amplified chaotically through 50 layers, so one tensor's error is a noisy
    sample (measured here, per tensor: 2.0x eager's for resnet50's layer2.3.bn2.weight
    gradient, 2.5x for resnext50's layer4.1.bn2.running_mean, with all other tensors within
    2x), while the aggregate over all of them is stable."""
    tv = randomize_model_bn(getattr(torchvision.models, name)(num_classes=10))
    fused = getattr(resnet_fused, name)(num_classes=10)
    fused.load_state_dict(tv.state_dict())
    tv64 = copy.deepcopy(tv).double()
    # Batch 2 at 32x32: layer4 is 1x1, so its BatchNorm sees 2 values per channel.
    x = torch.randn(2, 3, 32, 32)
    models = (tv, tv64, fused)
    metric = "max" if name == "resnet18" else "l2"
    for training in (False, True):
        for m in models:
            m.train(training)
        with torch.set_grad_enabled(training):
            outs = [m(x.double() if m is tv64 else x) for m in models]
        assert_close_to_ref(outs[2], outs[0], outs[1], f"logits (training={training})", metric=metric)
    for o in outs:
        o.square().sum().backward()
    params = [dict(m.named_parameters()) for m in models]
    states = [{k: b for k, b in m.named_buffers() if b.is_floating_point()} for m in models]
    grads = [{k: p.grad for k, p in ps.items()} for ps in params]
    if name == "resnet18":
        for group in (grads, states):
            for key, value in group[0].items():
                assert_close_to_ref(group[2][key], value, group[1][key], key)
        return
    floor = 16 * torch.finfo(torch.float32).eps
    for what, group in (("gradients", grads), ("running statistics", states)):
        keys = list(group[1])
        refs = [group[1][k] for k in keys]
        err_fused = _aggregate_rel_l2([group[2][k] for k in keys], refs)
        err_eager = _aggregate_rel_l2([group[0][k] for k in keys], refs)
        assert err_fused <= 2 * err_eager + floor, f"{what}: error {err_fused:.2e} > 2x eager's {err_eager:.2e}"


# --------------------------------------------------------------------------------------
# GPU only: torch.compile traces through the triton_ops; opcheck's fake-tensor test.


@pytest.mark.needs_cuda
def test_compile_fullgraph_on_gpu(triton_backend):
    unit = resnet_fused.nn.ConvBNReLU2d(16, 32, 3, padding=1).cuda()
    randomize_bn(unit.bn)
    ref = copy.deepcopy(unit)
    compiled = torch.compile(unit, fullgraph=True)
    for mode in (True, False):
        unit.train(mode), ref.train(mode)
        x = torch.randn(4, 16, 14, 14, device="cuda", requires_grad=True)
        y, y_ref = compiled(x), ref(x)
        torch.testing.assert_close(y, y_ref)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(gx, gx_ref)


@pytest.mark.needs_cuda
def test_opcheck_on_gpu():
    from test_ops import op_samples

    for name, args in op_samples(torch.float32, "cuda"):
        torch.library.opcheck(getattr(_triton_ops(), name).default, args)
