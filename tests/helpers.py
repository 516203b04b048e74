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


def cli_error_line(main, argv, capsys) -> str:
    """Runs a command-line main(argv) in-process; checks that it ends as an argparse error (exit
    code 2, nothing on stdout, no traceback, the usage then exactly one `error:` line, last)
    and returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and captured.err.rstrip("\n").endswith(errors[0]), captured.err
    return errors[0]


def sm90_launch_counter():
    """resnet_fused_sm90_launches from the CUDA extension (ctypes): how many sm90 CUTLASS kernels
    this process launched, so a test can tell they ran rather than the sm80 kernel."""
    import ctypes

    from resnet_fused.backends import cuda_sass

    fn = ctypes.CDLL(cuda_sass.extension_path()).resnet_fused_sm90_launches
    fn.restype = ctypes.c_int64
    return fn


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
# the CUDA WMMA kernel, 128 x 128 x 64 for its CUTLASS kernels on H100/H200, which take
# c_in % 64 == 0 and c_out % 8 == 0, BLOCK_M 64/128 for Triton), several K tiles, channel
# padding (c_in % 8 != 0), 7x7 stem, strides, dilation, a non-square kernel.
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


# ======================================================================================
# Model-level and integration helpers (appended section): test_models, test_validation,
# test_edge_cases, test_properties, test_compile, test_autocast, test_distributed,
# test_module_state, test_determinism, test_cuda_graphs, test_gpu_stress.
# ======================================================================================

import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

MODEL_NAMES = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
    "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)
NAMESPACES = {"reference": "resnet_fused", "triton": "resnet_fused_triton", "cuda": "resnet_fused_cuda"}


def scale_residual_branches(model: nn.Module, factor: float) -> nn.Module:
    """Multiplies the weight of the last BatchNorm of every residual branch (bn2 of a
    BasicBlock, bn3 of a Bottleneck) by `factor`, as zero_init_residual does with 0 and as
    trained ResNets keep their branches small. With unit-scale branches (randomize_model_bn)
    a deep ResNet's gradients explode at initialization: measured for resnet152, float64,
    |grad| / |param| of conv1.weight is 1800, so one SGD step at lr 1e-3 moves conv1 by
    1.8x its norm and the next step amplifies float64 rounding to 1e-8, in torchvision itself."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torchvision.models.resnet.Bottleneck):
                m.bn3.weight.mul_(factor)
            elif isinstance(m, torchvision.models.resnet.BasicBlock):
                m.bn2.weight.mul_(factor)
    return model


def model_twins(name: str, dtype: torch.dtype = torch.float32, residual_scale: float = 1.0, **kwargs):
    """(torchvision model, fused model) of builder `name` with identical weights and randomized
    BatchNorm parameters and statistics (randomize_model_bn, residual branches scaled by
    `residual_scale`), both in `dtype`."""
    tv = randomize_model_bn(getattr(torchvision.models, name)(**kwargs))
    if residual_scale != 1.0:
        scale_residual_branches(tv, residual_scale)
    fused = getattr(resnet_fused, name)(**kwargs)
    fused.load_state_dict(tv.state_dict(), strict=True)
    return tv.to(dtype), fused.to(dtype)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64 arithmetic)."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-300)


def aggregate_rel_l2(tensors, refs) -> float:
    """sqrt(sum_k ||t_k - r_k||^2 / ||r_k||^2): one error figure for a list of tensors (a
    model's gradients, its state), each weighted by its own magnitude."""
    total = 0.0
    for t, r in zip(tensors, refs, strict=True):
        r = r.double()
        norm = torch.linalg.vector_norm(r).item()
        if norm > 0:
            total += (torch.linalg.vector_norm(t.double() - r).item() / norm) ** 2
    return total**0.5


def assert_within_2x(what: str, got, baseline, ref64, floor: float) -> tuple[float, float]:
    """Aggregate relative L2 error of the tensors `got` against `ref64` at most 2x that of
    `baseline` (eager, or torchvision) plus `floor`. Returns both errors."""
    err, err_base = aggregate_rel_l2(got, ref64), aggregate_rel_l2(baseline, ref64)
    assert err <= 2 * err_base + floor, f"{what}: error {err:.2e} > 2x the baseline's {err_base:.2e} + {floor:.1e}"
    return err, err_base


def float_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The floating-point entries of the state_dict: parameters and running statistics."""
    return [(k, v) for k, v in model.state_dict().items() if v.is_floating_point()]


def square_mean_loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def sgd_steps(model, inputs, loss_fn=square_mean_loss, lr=1e-3, after_backward=None):
    """One SGD step (momentum 0.9) per input; per step (logits, [grads in parameter order]).
    Works on wrapped models (torch.compile, DDP), whose parameter names differ from the module's."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    record = []
    for x in inputs:
        opt.zero_grad()
        out = model(x)
        loss_fn(out).backward()
        if after_backward is not None:
            after_backward(model)
        record.append((out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


def perturbed_copy(model: nn.Module, seed: int = 123) -> nn.Module:
    """model with every parameter multiplied by (1 + 1e-15 N(0,1)): torchvision's own float64
    sensitivity, the yardstick for training steps after the first in a small-batch regime."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-15 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def check_step(what: str, expected, actual, perturbed, step: int) -> None:
    """float64 against torchvision: step 0 to rounding (1e-9 relative); a later step within
    10x what perturbing torchvision's own weights by 1e-15 does (perturbed_copy)."""
    bound = 1e-9 if step == 0 else 10 * rel_err(perturbed, expected) + 1e-12
    err = rel_err(actual, expected)
    assert err <= bound, f"step {step} {what}: relative error {err:.2e} > {bound:.2e}"


def assert_model_ran_on(recorder: OpRecorder, backend: str, *ops: str) -> None:
    """Each op in `ops` ran in `backend`'s namespace; for a fused backend, no conv unit took
    the reference path (every resnet18/resnet50 unit is covered by both fused backends)."""
    ns = NAMESPACES[backend]
    ran = {(c.namespace, c.op) for c in recorder.calls}
    for op in ops:
        assert (ns, op) in ran, f"{ns}::{op} did not run; ran: {sorted(ran)}"
    if backend != "reference":
        fallen_back = sorted(op for n, op in ran if n == "resnet_fused" and op.startswith("conv_bn"))
        assert not fallen_back, f"{backend}: these units ran on the reference instead: {fallen_back}"


def fused_model(name: str, dtype: torch.dtype, device, num_classes: int = 10) -> nn.Module:
    """Fused `name` with randomized BatchNorm parameters and statistics, channels_last."""
    model = randomize_model_bn(getattr(resnet_fused, name)(num_classes=num_classes))
    return model.to(device=device, dtype=dtype).to(memory_format=torch.channels_last)


def images(batch: int, hw: int, dtype: torch.dtype, device) -> torch.Tensor:
    x = torch.randn(batch, 3, hw, hw, device=device)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def float_loss(out: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) of the squared logits, in float32 (float64 for a float64 model). The mean
    keeps several SGD steps at lr 1e-2 stable; the sum keeps float16 gradients clear of underflow."""
    squares = (out if out.dtype == torch.float64 else out.float()).square()
    return squares.mean() if reduction == "mean" else squares.sum()


def randomize_frozen_bn(model: nn.Module, seed: int = 5) -> nn.Module:
    """randomize_bn for every torchvision FrozenBatchNorm2d of `model` (its buffers)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.numel()
            m.weight.copy_(torch.rand(c, generator=g) + 0.5), m.bias.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model


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

# ======================================================================================
# End of the model-level and integration helpers.
# ======================================================================================
