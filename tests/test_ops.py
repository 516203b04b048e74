"""The ops against stock nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU, and op-level checks.

Runs on the default backend for the tensors' device (the reference on CPU); the
backend-specific suites (test_triton.py, test_cuda.py) reuse `run_unit_case`.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close_to_ref, randomize_bn
from torch import nn

import resnet_fused
from resnet_fused import _library, ops
from resnet_fused.nn import ConvBNReLU2d, conv_bn_act

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


def _params(conv, bn):
    return [p for p in (conv.weight, conv.bias, bn.weight, bn.bias) if p is not None]


def run_unit_case(cfg, training, residual, relu, channels_last, dtype, device="cpu", steps=3):
    """Eager in float64 (the reference), eager in `dtype`, fused in `dtype`: forward, every
    gradient and the running statistics after each of `steps` training steps."""
    conv64, bn64 = make_unit(cfg, torch.float64, device)
    conv, bn = copy.deepcopy(conv64).to(dtype), copy.deepcopy(bn64).to(dtype)
    fconv, fbn = copy.deepcopy(conv), copy.deepcopy(bn)
    for m in (bn64, bn, fbn):
        m.train(training)
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
            y = fn(c, b, x, r, relu)
            inputs = [x] + ([r] if residual else []) + _params(c, b)
            grads = torch.autograd.grad(y, inputs, g64.to(dt))
            results.append((y, grads, [b.running_mean, b.running_var]))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_conv_bn_relu_matches_eager(cfg, training, residual, relu, channels_last, dtype):
    run_unit_case(cfg, training, residual, relu, channels_last, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_relu_matches_eager(dtype):
    x64 = torch.randn(3, 5, 7, 9, dtype=torch.float64)
    r64 = torch.randn(3, 5, 7, 9, dtype=torch.float64)
    g64 = torch.randn(3, 5, 7, 9, dtype=torch.float64)
    outs = []
    for fn, dt in ((lambda a, b: torch.relu(a + b), torch.float64), (lambda a, b: torch.relu(a + b), dtype),
                   (ops.add_relu, dtype)):
        x, r = x64.to(dt).requires_grad_(), r64.to(dt).requires_grad_()
        y = fn(x, r)
        outs.append((y, *torch.autograd.grad(y, (x, r), g64.to(dt))))
    for i, name in enumerate(("output", "grad x", "grad residual")):
        assert_close_to_ref(outs[2][i], outs[1][i], outs[0][i], name)


def test_module_hyperparameters_read_at_call_time():
    """momentum=None (cumulative average), track_running_stats=False, affine=False, eval(),
    and an eps changed after construction all behave as nn.BatchNorm2d does."""
    unit = ConvBNReLU2d(4, 6, 3, padding=1)
    randomize_bn(unit.bn)
    unit.bn.momentum = None
    unit.bn.eps = 1e-3
    ref_conv, ref_bn = copy.deepcopy(unit.conv), copy.deepcopy(unit.bn)
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(unit(x), torch.relu(ref_bn(ref_conv(x))))
    torch.testing.assert_close(unit.bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(unit.bn.running_var, ref_bn.running_var)
    assert int(unit.bn.num_batches_tracked) == 3
    unit.eval(), ref_bn.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(unit(x), torch.relu(ref_bn(ref_conv(x))))

    for kwargs in (dict(track_running_stats=False), dict(affine=False)):
        conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, **kwargs)
        fused = ConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=False)
        for mode in (True, False):
            fused.train(mode), bn.train(mode)
            torch.testing.assert_close(fused(x), bn(conv(x)), msg=str(kwargs))


def test_functional_training_without_running_stats():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    gamma, beta = torch.rand(4) + 0.5, torch.rand(4)
    y = ops.conv_bn_relu(x, w, gamma, beta, None, None, training=False, padding=1)
    expected = torch.relu(torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(x, w, padding=1), None, None, gamma, beta, training=True))
    torch.testing.assert_close(y, expected)


def test_unfused_norm_and_activation_stay_correct():
    """Modules the fused op does not cover run as themselves: GroupNorm, SiLU, reflect padding."""
    conv, gn = nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 6)
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv_bn_act(conv, gn, x, r, nn.ReLU()), torch.relu(gn(conv(x)) + r))
    bn = nn.BatchNorm2d(6).eval()
    randomize_bn(bn)
    torch.testing.assert_close(conv_bn_act(conv, bn, x, r, nn.SiLU()), nn.functional.silu(bn(conv(x)) + r))
    reflect = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    torch.testing.assert_close(conv_bn_act(reflect, bn, x, None, nn.ReLU()), torch.relu(bn(reflect(x))))


# --------------------------------------------------------------------------------------
# Op-level checks: opcheck, float64 gradcheck, double backward, schemas.


def op_samples(dtype=torch.float64, device="cpu"):
    """(op name, args) for every op, in the op's schema order, with grads where meaningful."""

    def t(*shape, positive=False):
        v = torch.rand(*shape, dtype=dtype, device=device) + 0.5 if positive else torch.randn(
            *shape, dtype=dtype, device=device)
        return v.requires_grad_()

    conv = ([1, 1], [1, 1], [1, 1], 1)
    conv_s2 = ([2, 2], [0, 0], [1, 1], 2)
    x, w = t(2, 4, 5, 5), t(6, 4, 3, 3)
    xg, wg = t(2, 4, 6, 6), t(6, 2, 1, 1)
    stats = [torch.rand(6, dtype=dtype, device=device), torch.rand(6, dtype=dtype, device=device) + 0.5]
    samples = [
        ("conv_bn_eval", (x, w, t(6, positive=True), t(6), t(2, 6, 5, 5), *conv, True)),
        ("conv_bn_eval", (xg, wg, t(6, positive=True), t(6), None, *conv_s2, False)),
        ("conv_bn_train", (x, w, t(6), t(6, positive=True), t(6), t(2, 6, 5, 5), *conv, 1e-5, True)),
        ("conv_bn_train", (xg, wg, None, t(6, positive=True), t(6), None, *conv_s2, 1e-3, False)),
        ("add_relu", (t(2, 3, 4, 5), t(2, 3, 4, 5))),
    ]
    y = torch.relu(torch.randn(2, 6, 5, 5, dtype=dtype, device=device))
    z = torch.randn(2, 6, 5, 5, dtype=dtype, device=device)
    samples += [
        ("conv_bn_eval_backward", (torch.randn_like(y), x.detach(), w.detach(), stats[1], y, *conv, True,
                                   [True, True, True, True, True])),
        ("conv_bn_train_backward", (torch.randn_like(y), x.detach(), w.detach(), z, y, *stats, stats[1], *conv,
                                    1e-5, True, [True, False, True, True, True, True])),
    ]
    # SyncBatchNorm building blocks: no autograd of their own, so inputs without grad.
    xd, wd, r = x.detach(), w.detach(), torch.randn(2, 6, 5, 5, dtype=dtype, device=device)
    samples += [
        ("conv_bn_stats", (xd, wd, stats[0], *conv)),
        ("conv_bn_stats", (xg.detach(), wg.detach(), None, *conv_s2)),
        ("bn_apply", (z, *stats, stats[1], stats[0], r, 1e-5, True)),
        ("bn_apply", (z, *stats, stats[1], stats[0], None, 1e-3, False)),
        ("bn_apply_backward_reduce", (torch.randn_like(y), z, y, stats[0], True)),
        ("bn_apply_backward_reduce", (torch.randn_like(y), z, None, stats[0], False)),
        ("bn_apply_backward", (torch.randn_like(y), z, y, *stats, stats[1], stats[0], stats[1], 100, 1e-5, True,
                               [True, True])),
        ("bn_apply_backward", (torch.randn_like(y), z, None, *stats, stats[1], stats[0], stats[1], 50, 1e-5, False,
                               [True, False])),
    ]
    return samples


def _sample_id(sample):
    return sample[0]


@pytest.mark.parametrize("sample", op_samples(), ids=_sample_id)
def test_opcheck(sample):
    name, args = sample
    torch.library.opcheck(getattr(torch.ops.resnet_fused, name).default, args)


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


def test_sync_building_blocks_compose_to_the_training_ops():
    """conv_bn_stats + bn_apply is conv_bn_train; bn_apply_backward_reduce + bn_apply_backward
    with this batch's sums and count give conv_bn_train_backward's dz and residual grad (the
    synchronized path runs the same arithmetic with every process's sums)."""
    ref = torch.ops.resnet_fused
    x, w, bias = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3), torch.randn(5)
    bn_w, bn_b, res = torch.rand(5) + 0.5, torch.randn(5), torch.randn(2, 5, 6, 6)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    y, z, mean, var = ref.conv_bn_train(x, w, bias, bn_w, bn_b, res, *conv, 1e-5, True)
    z2, mean2, var2 = ref.conv_bn_stats(x, w, bias, *conv)
    for a, b in ((z2, z), (mean2, mean), (var2, var)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(ref.bn_apply(z, mean, var, bn_w, bn_b, res, 1e-5, True), y)
    gy = torch.randn_like(y)
    grads = ref.conv_bn_train_backward(gy, x, w, z, y, mean, var, bn_w, *conv, 1e-5, True, [True] * 6)
    sum_g, sum_g_zc = ref.bn_apply_backward_reduce(gy, z, y, mean, True)
    torch.testing.assert_close(sum_g, grads[4])  # grad of bn_bias
    torch.testing.assert_close(sum_g_zc * torch.rsqrt(var + 1e-5), grads[3])  # grad of bn_weight
    dz, g = ref.bn_apply_backward(gy, z, y, mean, var, bn_w, sum_g, sum_g_zc, 72, 1e-5, True, [True, True])
    torch.testing.assert_close(g, grads[5])
    gx, gw, *_ = ref.conv_bn_eval_backward(dz, x, w, torch.ones(5), None, *conv, False, [True, True] + [False] * 3)
    torch.testing.assert_close(gx, grads[0])
    torch.testing.assert_close(gw, grads[1])
    with pytest.raises(NotImplementedError, match="building block"):
        xg = x.clone().requires_grad_()
        ref.conv_bn_stats(xg, w, None, *conv)[0].sum().backward()


def check_sync_building_blocks(ns, dtype, device, channels_last=False):
    """The SyncBatchNorm building blocks of namespace `ns` against the reference ops: each
    output within 2x the error the reference makes in `dtype` against float64 (the reference
    in `dtype` runs F.conv2d and float32 BatchNorm arithmetic, i.e. eager PyTorch)."""
    ref = torch.ops.resnet_fused
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape, positive=False):
        v = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return v.double().to(device)

    x, w, bias = rand(3, 8, 7, 7), rand(12, 8, 3, 3) * 0.3, rand(12)
    res, gy = rand(3, 12, 4, 4), rand(3, 12, 4, 4)
    bn_w, bn_b = rand(12, positive=True), rand(12)
    conv = ([2, 2], [1, 1], [1, 1], 1)

    def run(ops, low):
        def cast(t):  # activations and conv operands in `dtype` (float64 for the exact run)
            t = t.to(dtype) if low else t
            return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

        def cvec(t):  # BatchNorm parameters stay float32 (float64 for the exact run)
            return t.float() if low else t

        z, mean, var = ops.conv_bn_stats(cast(x), cast(w), cast(bias), *conv)
        y = ops.bn_apply(z, mean, var, cvec(bn_w), cvec(bn_b), cast(res), 1e-5, True)
        sum_g, sum_g_zc = ops.bn_apply_backward_reduce(cast(gy), z, y, mean, True)
        # A count larger than this batch's, as with several processes.
        dz, g_res = ops.bn_apply_backward(cast(gy), z, y, mean, var, cvec(bn_w), sum_g * 1.5, sum_g_zc * 1.5, 72, 1e-5,
                                          True, [True, True])
        return dict(z=z, mean=mean, var=var, y=y, sum_g=sum_g, sum_g_zc=sum_g_zc, dz=dz, g_res=g_res)

    got, eager, exact = run(ns, True), run(ref, True), run(ref, False)
    for key, value in got.items():
        assert value.device.type == torch.device(device).type, key
        if value.dim() == 4:
            assert value.is_contiguous(memory_format=fmt), f"{key}: layout differs from the input's"
        scale = None
        if key in ("sum_g_zc", "sum_g"):  # sums: the floor scales with the summed terms' magnitude
            scale = gy.abs().sum((0, 2, 3)).max().item() * exact["z"].abs().max().item()
        assert_close_to_ref(value, eager[key], exact[key], key, scale=scale)


def test_backend_namespaces_share_schemas():
    """Every loaded backend namespace declares exactly the schemas in _library.SCHEMAS."""
    for namespace in ("resnet_fused", "resnet_fused_triton", "resnet_fused_cuda"):
        ns = getattr(torch.ops, namespace)
        for name, schema in _library.SCHEMAS.items():
            if not hasattr(ns, name):
                assert namespace != "resnet_fused", f"reference op {name} missing"
                continue
            got = str(getattr(ns, name).default._schema)
            assert got == f"{namespace}::{name}{schema}", got


def test_reference_is_used_on_cpu_by_default():
    x = torch.randn(1, 3, 4, 4)
    assert resnet_fused.backends.resolved_backend("add_relu", x, x) == "reference"  # auto on CPU
    with resnet_fused.use_backend("reference"):
        assert resnet_fused.backends.resolved_backend("add_relu", x, x) == "reference"


def test_compile_fullgraph_unit():
    unit = ConvBNReLU2d(4, 6, 3, padding=1)
    randomize_bn(unit.bn)
    ref = copy.deepcopy(unit)
    compiled = torch.compile(unit, fullgraph=True)
    for mode in (True, False):
        unit.train(mode), ref.train(mode)
        x = torch.randn(2, 4, 6, 6, requires_grad=True)
        r = torch.randn(2, 6, 6, 6)
        y, y_ref = compiled(x, r), ref(x, r)
        torch.testing.assert_close(y, y_ref)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
        torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(unit.bn.running_mean, ref.bn.running_mean)
