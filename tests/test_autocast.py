"""Autocast: the fused models and ops under torch.autocast have eager PyTorch's dtypes and at
most 2x its error against float64.

  * the rule: registered at the dispatcher for the forward ops of every backend (conv operands
    cast, BatchNorm vectors and statistics kept in float32, add_relu promoting), applied to
    direct op calls, in a compiled graph, and by the functional API;
  * models: fused resnet18 under autocast against torchvision under the same autocast (block
    outputs, logits, gradients, running statistics), CPU bfloat16 on the reference backend and
    CUDA float16/bfloat16 on every backend (needs_cuda); a detection backbone with
    FrozenBatchNorm2d under CPU bfloat16.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from backend_under_test import interpreted
from model_twins import float_state, model_twins
from random_bn import randomize_frozen_bn
from recorders import OpRecorder, assert_model_ran_on
from resnet_fused.tolerances import FLOOR_ULPS, aggregate_rel_l2, assert_within_2x
from training_loops import float_loss
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused

DTYPE_IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CONV = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


def _block_dtypes(model, x):
    """dtype of every block's and the stem's output, and of the logits."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.dtype))
             for name, m in model.named_modules() if name.startswith("layer") and name.count(".") == 1]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


# ------------------------------------------------------------------------------------------
# The rule, op by op.


def _namespaces():
    """The op namespaces, each skipped with its reason where it is not registered in this
    process (Triton not importable, the CUDA extension not loaded)."""
    triton_error = resnet_fused.backends.triton._IMPORT_ERROR
    cuda_error = resnet_fused.backends.cuda._load_error
    return [
        "resnet_fused",
        pytest.param("resnet_fused_triton", marks=pytest.mark.skipif(
            triton_error is not None, reason=f"Triton is not importable ({triton_error})")),
        pytest.param("resnet_fused_cuda", marks=pytest.mark.skipif(cuda_error is not None, reason=str(cuda_error))),
    ]


@pytest.mark.parametrize("namespace", _namespaces())
def test_autocast_rule_registered_per_op(namespace):
    """Autocast is registered at the dispatcher, not left to the fallthrough: the forward ops
    have AutocastCPU and AutocastCUDA kernels on every backend; the backward ops and the
    SyncBatchNorm apply/reduce ops deliberately have none (they run in their inputs' dtypes)."""
    from resnet_fused import _library

    with_rule = set(_library.AUTOCAST_CAST_ARGS) | set(_library.AUTOCAST_PROMOTE_ARGS)
    assert with_rule == {"conv_bn_eval", "conv_bn_train", "conv_bn_stats", "add_relu"}
    for name in _library.OP_NAMES:
        for key in ("AutocastCPU", "AutocastCUDA"):
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{name}", key)
            assert has == (name in with_rule), (namespace, name, key)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_autocast_direct_op_calls(backend):
    """torch.ops calls under torch.autocast('cpu', bfloat16), without the functional API: the
    conv operands (x, weight, conv bias, residual) are cast, the BatchNorm vectors are not
    (a float32 scale that bfloat16 cannot represent gives the float32-scale result, bitwise),
    the statistics stay float32, add_relu promotes as `x + residual` does; the backward runs."""
    from resnet_fused.backends import BACKENDS

    if resnet_fused.available_backends()[backend] is not None:
        pytest.skip(f"{backend} backend unavailable: {resnet_fused.available_backends()[backend]}")
    if backend == "triton" and not interpreted("triton"):
        pytest.skip("CPU tensors reach the Triton kernels only under the interpreter (CUDA autocast: "
                    "test_autocast_cuda_matches_torchvision)")
    ns = {"reference": torch.ops.resnet_fused, "triton": getattr(torch.ops, BACKENDS["triton"][0].NAMESPACE)}[backend]
    x, w, res = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(2, 5, 6, 6)
    scale = torch.full((5,), 1 + 2**-12)  # rounds to 1.0 in bfloat16
    shift = torch.rand(5)
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        y = ns.conv_bn_eval(x, w, scale, shift, res, *CONV, True)
        y_train, z, mean, var = ns.conv_bn_train(x, w, shift, scale, shift, res, *CONV, 1e-5, True)
        z_stats, mean_s, var_s = ns.conv_bn_stats(x, w, shift, *CONV)
        r = ns.add_relu(torch.randn(7).to(bf), torch.randn(7))
    assert y.dtype == y_train.dtype == z.dtype == z_stats.dtype == bf
    assert mean.dtype == var.dtype == mean_s.dtype == var_s.dtype == torch.float32
    assert r.dtype == torch.float32
    expected = ns.conv_bn_eval(x.to(bf), w.to(bf), scale, shift, res.to(bf), *CONV, True)
    assert torch.equal(y, expected)
    assert not torch.equal(y, ns.conv_bn_eval(x.to(bf), w.to(bf), scale.to(bf).float(), shift, res.to(bf), *CONV,
                                              True)), "the scale was rounded to bfloat16"
    expected_train = ns.conv_bn_train(x.to(bf), w.to(bf), shift.to(bf), scale, shift, res.to(bf), *CONV, 1e-5, True)
    for got, want in zip((y_train, z, mean, var), expected_train):
        assert torch.equal(got, want)
    # autograd through the autocast kernel: gradients in the leaves' dtypes
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=bf):
        out = ns.conv_bn_eval(xg, wg, scale, shift, None, *CONV, True)
    out.float().sum().backward()
    assert xg.grad.dtype == wg.grad.dtype == torch.float32


def test_autocast_direct_op_call_compiled():
    """The autocast rule also applies in a torch.compile(fullgraph=True) graph: same dtype and
    values as the eager call."""
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    scale, shift = torch.rand(5) + 0.5, torch.rand(5)

    def fn(x):
        return torch.ops.resnet_fused.conv_bn_eval(x, w, scale, shift, None, *CONV, True)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager, got = fn(x), compiled(x)
    assert got.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(got, eager)


def test_autocast_functional_op_accepts_mixed_dtypes():
    """As F.conv2d under autocast: a bfloat16 input with float32 weights is accepted."""
    unit = resnet_fused.nn.ConvBNReLU2d(8, 8, 3, padding=1).eval()
    x = torch.randn(2, 8, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = unit(x), torch.relu(unit.bn(unit.conv(x)))
    assert y.dtype == y_ref.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):  # outside autocast mixed dtypes stay an error
        unit(x)


def test_autocast_add_relu_functional_promotes():
    """ops.add_relu under autocast accepts mixed dtypes and promotes, as relu(x + residual);
    outside autocast mixed dtypes stay an error."""
    a, b = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = resnet_fused.ops.add_relu(a, b), torch.relu(a + b)
    assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want)
    with pytest.raises(TypeError, match="dtype"):
        resnet_fused.ops.add_relu(a, b)


# ------------------------------------------------------------------------------------------
# Models under autocast against torchvision under the same autocast.


def autocast_check(backend, device, dtype, training, batch=4, hw=48):
    """Fused resnet18 under torch.autocast(device, dtype) against torchvision under the same
    autocast: the same dtypes (block outputs, logits, gradients, running statistics) and at
    most 2x torchvision's error against float64 (logits, gradients, running statistics)."""
    tv, fused = model_twins("resnet18", torch.float32, num_classes=10)
    tv64 = copy.deepcopy(tv).double()
    tv, fused, tv64 = (m.to(device).train(training) for m in (tv, fused, tv64))
    x = torch.randn(batch, 3, hw, hw, device=device)  # hw 48: layer4's BatchNorm sees 2x2 values per image
    ref = tv64(x.double())
    rec = OpRecorder()
    with torch.autocast(device, dtype=dtype):
        out_tv, dtypes_tv = _block_dtypes(tv, x)
        with resnet_fused.use_backend(backend), rec:
            out_f, dtypes_f = _block_dtypes(fused, x)
    assert dtypes_f == dtypes_tv and out_f.dtype == out_tv.dtype == dtype, (dtypes_f, dtypes_tv)
    floor = FLOOR_ULPS * torch.finfo(dtype).eps
    assert_within_2x("logits", [out_f], [out_tv], [ref], floor)
    float_loss(out_tv, "sum").backward()
    float_loss(ref, "sum").backward()
    with rec:
        float_loss(out_f, "sum").backward()
    op = "conv_bn_train" if training else "conv_bn_eval"
    assert_model_ran_on(rec, backend, op, f"{op}_backward")
    grads = [[p.grad for p in m.parameters()] for m in (tv, fused, tv64)]
    assert [g.dtype for g in grads[1]] == [g.dtype for g in grads[0]]
    assert_within_2x("gradients", grads[1], grads[0], grads[2], floor)
    states = [[v for _, v in float_state(m)] for m in (tv, fused, tv64)]
    assert [v.dtype for v in states[1]] == [v.dtype for v in states[0]]
    assert_within_2x("running statistics", states[1], states[0], states[2], floor)
    for (key, a), (_, b) in zip(tv.named_buffers(), fused.named_buffers()):
        if not a.is_floating_point():
            assert torch.equal(a, b), key  # num_batches_tracked


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_autocast_cpu_bfloat16_matches_torchvision(mode):
    """Under torch.autocast('cpu', bfloat16), reference backend: every block's output, the
    logits and the gradients have torchvision's dtypes (eager BatchNorm keeps a bfloat16 input
    in bfloat16, with float32 statistics), and the errors against float64 are at most 2x
    torchvision-under-autocast's. The same check as the CUDA test below."""
    autocast_check("reference", "cpu", torch.bfloat16, mode == "train")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_autocast_cuda_matches_torchvision(backend, dtype, training):
    """Under torch.autocast('cuda', float16/bfloat16), on every backend: torchvision's dtypes,
    and errors at most 2x torchvision-under-autocast's against float64."""
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    autocast_check(backend.name, "cuda", dtype, training)


def test_frozen_batchnorm_backbone_under_autocast():
    """A detection backbone (resnet50 body with FrozenBatchNorm2d + FPN) under
    torch.autocast('cpu', bfloat16): every block's, the body's and the FPN's outputs have
    torchvision's dtypes (FrozenBatchNorm2d's float32 buffers make eager's units float32),
    and the FPN maps' error against float64 is at most 2x torchvision-under-autocast's."""
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    tv = randomize_frozen_bn(_resnet_fpn_extractor(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d), 3)).eval()
    fused = resnet_fused.from_torchvision(tv)
    tv64 = copy.deepcopy(tv).double()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv64(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (out_tv, dtypes_tv), (out_f, dtypes_f) = _block_dtypes(tv.body, x), _block_dtypes(fused.body, x)
            fpn_tv, fpn_f = tv(x), fused(x)
    assert dtypes_f == dtypes_tv and dtypes_tv["layer1.0"] == torch.float32, (dtypes_f, dtypes_tv)
    assert {k: v.dtype for k, v in out_f.items()} == {k: v.dtype for k, v in out_tv.items()}
    assert {k: v.dtype for k, v in fpn_f.items()} == {k: v.dtype for k, v in fpn_tv.items()}
    floor = FLOOR_ULPS * torch.finfo(torch.bfloat16).eps
    for key in ref:
        err_f, err_tv = aggregate_rel_l2([fpn_f[key]], [ref[key]]), aggregate_rel_l2([fpn_tv[key]], [ref[key]])
        assert err_f <= 2 * err_tv + floor, f"{key}: error {err_f:.2e} > 2x torchvision's {err_tv:.2e}"


def test_frozen_batchnorm_unit_adds_the_residual_as_given():
    """A FrozenBatchNorm2d unit under autocast adds a float32 residual in float32, as eager
    does: not a copy rounded to the autocast dtype. A residual much larger than the unit's
    output makes that rounding visible (about 0.25 at 100 in bfloat16)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    norm = randomize_frozen_bn(FrozenBatchNorm2d(6))
    x = torch.randn(2, 4, 8, 8)
    residual = torch.randn(2, 6, 8, 8) * 100
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = torch.relu(norm(conv(x)) + residual)
        fused = resnet_fused.nn.conv_bn_act(conv, norm, x, residual, torch.nn.ReLU())
    assert fused.dtype == eager.dtype == torch.float32
    # Only the unit's own output differs (one bfloat16 rounding of values of about 1).
    assert (fused - eager).abs().max().item() < 0.05
