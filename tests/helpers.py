"""Shared test utilities: randomized conv/BN units and dtype-aware tolerances; the op
suite's units, op samples, recorders and backend under test (tests/test_ops.py and the
per-backend modules). Test modules import from here, never from each other.

Tolerance rule (flash-attention style): a result in dtype d is compared with a float64
reference, and its error may be at most 2x the error eager PyTorch makes in the same
dtype, plus a floor of a few ulps of the output's magnitude (eager is sometimes exact
where another summation order is not).

Imported after tests/conftest.py has chosen TRITON_INTERPRET (it imports resnet_fused).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import backends
from resnet_fused.nn import conv_bn_act

FLOOR_ULPS = 8


def randomize_bn(bn: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-default affine parameters and running statistics, so no term is trivially 0 or 1."""
    with torch.no_grad():
        c = bn.num_features
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=generator) - 0.5)
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def randomize_model_bn(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_bn(module)
    return model


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return (actual.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0


def l2_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return torch.linalg.vector_norm(actual.double() - ref64.double()).item() if actual.numel() else 0.0


def assert_close_to_ref(
    actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, name: str = "", scale: float | None = None,
    metric: str = "max",
) -> None:
    """|actual - ref64| <= 2 |eager - ref64| + floor, elementwise maxima. The floor is a few
    ulps of `scale`, by default the reference's magnitude; pass the magnitude of the summed
    terms for a quantity that is a cancellation (a conv bias's gradient under BatchNorm).
    metric="l2" compares Euclidean norms of the errors instead: the max over millions of
    elements of a deep network's gradients is one noisy sample, the norm is stable."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != eager's {eager.dtype}"
    if actual.numel() == 0:
        return
    err_fn = {"max": max_err, "l2": l2_err}[metric]
    if scale is None:
        scale = ref64.abs().max().item() if metric == "max" else torch.linalg.vector_norm(ref64.double()).item()
    floor = FLOOR_ULPS * torch.finfo(actual.dtype).eps * max(scale, 1e-3)
    err, err_eager = err_fn(actual, ref64), err_fn(eager, ref64)
    assert err <= 2 * err_eager + floor, (
        f"{name}: {metric} error {err:.3e} vs float64 exceeds 2x eager's {err_eager:.3e} + floor {floor:.1e}"
    )


# --------------------------------------------------------------------------------------
# The backend under test (the `backend` fixture of conftest.py yields one).

OP_SUITE_BACKENDS = ("reference", "triton", "cuda")
HALF_DTYPES = (torch.float16, torch.bfloat16)


def interpreted(name: str) -> bool:
    """Whether backend `name` runs its kernels in the Triton CPU interpreter here."""
    return name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class BackendUnderTest:
    """The backend a test of the op suite runs on, selected (use_backend) by the fixture."""

    name: str

    @property
    def namespace(self) -> str:
        return backends.BACKENDS[self.name][0].NAMESPACE

    @property
    def ops(self):
        """The backend's torch.ops namespace (its ops called directly, without selection)."""
        return getattr(torch.ops, self.namespace)

    @property
    def interpreted(self) -> bool:
        return interpreted(self.name)

    @property
    def fused(self) -> bool:
        return self.name != "reference"

    def device(self, dtype: torch.dtype = torch.float32) -> str:
        """Where this backend's tests put tensors of `dtype`: the fused backends' devices
        (CUDA; CPU for Triton under the interpreter); the reference on CPU, and on a GPU for
        float16/bfloat16 (half precision is a GPU case for every backend)."""
        if self.name == "cuda":
            return "cuda"
        if self.name == "triton":
            return "cpu" if self.interpreted else "cuda"
        return "cuda" if dtype in HALF_DTYPES else "cpu"

    @property
    def unit_steps(self) -> int:
        """Training steps per unit case: 3, or 1 under the Triton interpreter (slow); there
        test_unit_running_statistics_over_steps runs the 3 steps on one case."""
        return 1 if self.interpreted else 3

    def unsupported_reason(self, op_name: str, *op_args) -> str | None:
        return backends.unsupported_reason(self.name, op_name, *op_args)

    def require(self, op_name: str, *op_args) -> None:
        """Skip a test that calls this backend's op directly on inputs its kernels do not cover
        (through the public API such a call takes the reference path; tested separately)."""
        reason = self.unsupported_reason(op_name, *op_args)
        if reason is not None:
            pytest.skip(f"{self.name} does not cover this {op_name} call: {reason}")


def dtype_params(*dtypes: torch.dtype) -> list:
    """pytest params for `dtypes`, float16/bfloat16 marked needs_cuda: every backend runs them
    on a GPU only (the Triton interpreter path is tested in float32)."""
    return [pytest.param(d, id=str(d).removeprefix("torch."),
                         marks=pytest.mark.needs_cuda if d in HALF_DTYPES else ())
            for d in dtypes]


@contextlib.contextmanager
def tf32(allowed: bool):
    """Set TF32 for convolutions and matmuls for the block (exact float32 comparisons need it
    off; a no-op on CPU)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


# --------------------------------------------------------------------------------------
# Recorders.


@dataclasses.dataclass
class OpCall:
    namespace: str
    op: str  # the op's name without namespace and overload
    args: tuple


class OpRecorder(TorchDispatchMode):
    """Records every op that reaches the kernels (below autograd): `names` as
    'namespace::op.overload', `calls` the resnet_fused* ops with their arguments."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.calls: list[OpCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.names.append(f"{func.namespace}::{func._opname}.{func._overloadname}")
        if func.namespace.startswith("resnet_fused"):
            self.calls.append(OpCall(func.namespace, func._opname, args))
        return func(*args, **kwargs)


class ExpandingRecorder(OpRecorder):
    """Also records the aten ops a resnet_fused* op's Python implementation issues (the
    reference's, and the Triton backend's, whose kernels launch directly as its triton_op
    does): the mode re-enters itself around the implementation. The CUDA backend's ops are
    C++ kernels: what they do inside is not visible here."""

    def __init__(self):
        super().__init__()
        self.impls = {}
        for name in OP_SUITE_BACKENDS:
            module = backends.BACKENDS[name][0]
            if module is not None and hasattr(module, "_IMPLS"):
                self.impls[module.NAMESPACE] = (name, module._IMPLS)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in self.impls:
            return super().__torch_dispatch__(func, types, args, kwargs)
        self.names.append(f"{func.namespace}::{func._opname}.{func._overloadname}")
        self.calls.append(OpCall(func.namespace, func._opname, args))
        name, impls = self.impls[func.namespace]
        context = contextlib.nullcontext()
        if name == "triton":
            from torch._library.triton import set_wrap_triton_enabled

            context = set_wrap_triton_enabled(False)
        with self, context:
            return impls[func._opname](*args, **kwargs)


def expected_backend(name: str, op_name: str, *op_args) -> tuple[str, str | None]:
    """(the backend a call of op `op_name` runs on with backend `name` selected, why it is not
    `name`): `name` itself when its kernels cover the call, else the reference."""
    reason = backends.unsupported_reason(name, op_name, *op_args)
    return (name if reason is None else "reference"), reason


def assert_ran_on(recorder: OpRecorder, name: str, ops: tuple[str, ...]) -> None:
    """The resnet_fused ops recorded are `ops` (in any order, each at least once), all in the
    namespace of the backend that covers the first call under backend `name` selected."""
    assert recorder.calls, "no resnet_fused op ran"
    first = recorder.calls[0]
    expected, reason = expected_backend(name, first.op, *first.args)
    namespace = backends.BACKENDS[expected][0].NAMESPACE
    ran = {(c.namespace, c.op) for c in recorder.calls}
    assert {ns for ns, _ in ran} == {namespace}, (
        f"expected every op on {expected}"
        + (f" ({name} does not cover the call: {reason})" if reason else "") + f", ran {sorted(ran)}")
    assert {op for _, op in ran} == set(ops), f"expected ops {sorted(ops)}, ran {sorted(ran)}"


# --------------------------------------------------------------------------------------
# Units against stock nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU, float64 as the oracle.

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
# The ops called directly.


def conv_args(stride=1, padding=1, dilation=1, groups=1):
    return [stride, stride], [padding, padding], [dilation, dilation], groups


def as64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


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


# Shapes that exercise tile edges (M, c_out, K not multiples of the tiles: 64 x 64 x 32 for
# the CUDA kernels, BLOCK_M 64/128 for Triton), several K tiles, the element-wise gather
# (c_in % 8 != 0), 7x7 stem, strides, dilation, a non-square kernel.
# (n, c_in, h, w, c_out, kernel, stride, padding, dilation)
DIRECT_SHAPES = {
    "stem7x7s2": (2, 3, 23, 19, 64, 7, 2, 3, 1),
    "1x1_c72_c130": (3, 72, 9, 11, 130, 1, 1, 0, 1),
    "1x1s2": (2, 64, 15, 15, 96, 1, 2, 0, 1),
    "3x3_c5_c7": (2, 5, 9, 9, 7, 3, 1, 1, 1),
    "3x3_c64_c64": (4, 64, 14, 14, 64, 3, 1, 1, 1),
    "3x3s2_c40": (2, 40, 17, 13, 72, 3, 2, 1, 1),
    "3x3_dil2": (2, 16, 12, 12, 24, 3, 1, 2, 2),
    "5x3_asym": (1, 8, 10, 7, 8, (5, 3), 1, 1, 1),
}


def direct_inputs(shape, dtype, channels_last, residual, device="cuda"):
    """(x, weight, residual or None, conv args) for a DIRECT_SHAPES entry."""
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    kh, kw = k if isinstance(k, tuple) else (k, k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c_in, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c_out, c_in, kh, kw, device=device, dtype=dtype) / (c_in * kh * kw) ** 0.5).contiguous(
        memory_format=fmt)
    conv = conv_args(stride, padding, dilation)
    out = torch.nn.functional.conv2d(x.float(), weight.float(), None, *conv)
    r = torch.randn(out.shape, device=device, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    return x, weight, r, conv


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides in every dimension of size > 1 (a size-1 dimension's stride is arbitrary:
    a 1x1 kernel's weight is both NCHW- and channels_last-contiguous, whichever strides it has)."""
    return a.shape == b.shape and all(s == t for n, s, t in zip(a.shape, a.stride(), b.stride()) if n > 1)


def compare_outputs(name, ours, ref, ref64, reduction_scale=None):
    """Outputs against the reference op's in the same dtype (standing in for eager: the same
    F.conv2d, float32 BatchNorm math) and in float64: shape, dtype, strides, and error within
    2x the reference's. 1-D outputs are per-channel sums over N*H*W: their floor is judged
    against `reduction_scale`, the magnitude of the summed terms, since the order differs."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    ref64 = ref64 if isinstance(ref64, (tuple, list)) else (ref64,)
    for i, (a, e, r) in enumerate(zip(ours, ref, ref64, strict=True)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}[{i}]: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        assert same_strides(a, e), f"{name}[{i}]: strides {a.stride()} vs {e.stride()}"
        scale = reduction_scale if a.dim() == 1 and reduction_scale is not None else None
        assert_close_to_ref(a, e, r.to(torch.float64), f"{name}[{i}]", scale=scale)
