"""The CUDA C++ backend (csrc/, built into resnet_fused._C, ops under torch.ops.resnet_fused_cuda).

Two groups of tests:
  * CPU (CI): the extension registers a CUDA kernel for every op of _library.SCHEMAS, the
    schemas match, a machine without a GPU gets a clear reason, and a missing extension
    never breaks `import resnet_fused`. Skipped, with the reason, when the extension is not
    built (a build that exists but fails to load is a failure, and so is a missing build
    under RESNET_FUSED_FORCE_CUDA=1).
  * GPU (@needs_cuda, skipped without a GPU by conftest): every op on the cuda backend
    against eager nn.Conv2d + nn.BatchNorm2d + ReLU and against the reference, in float16,
    bfloat16 and float32, forward and backward, train and eval; opcheck; determinism;
    and checks that the calls really ran the resnet_fused_cuda kernels.

Tolerance (tests/helpers.py): error vs a float64 reference at most 2x eager's own error in
the same dtype, plus a floor of a few ulps.

GPU run: RESNET_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e . && pytest tests/test_cuda.py
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_ref
from test_ops import CONFIGS, op_samples, run_unit_case
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import _library, backends
from resnet_fused.backends import cuda as cuda_backend

NS = cuda_backend.NAMESPACE
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def require_extension() -> None:
    """Skip when the extension was not built; fail when it was built but is broken."""
    error = cuda_backend._load_error
    if error is None:
        return
    not_built = "is not built" in error
    if not not_built or os.environ.get("RESNET_FUSED_FORCE_CUDA") == "1":
        pytest.fail(error)
    pytest.skip(error)


# ---------------------------------------------------------------------------------------
# CPU tests (CI)


def test_every_op_has_a_cuda_kernel():
    require_extension()
    for name in _library.SCHEMAS:
        qualname = f"{NS}::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA"), f"no CUDA kernel for {qualname}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"), f"no fake kernel for {qualname}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"), f"no autograd for {qualname}"


def test_schemas_are_the_library_schemas():
    require_extension()
    for name, schema in _library.SCHEMAS.items():
        got = str(getattr(torch.ops, NS, None) and getattr(getattr(torch.ops, NS), name).default._schema)
        assert got == f"{NS}::{name}{schema}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reason given on a machine without a GPU")
def test_unavailable_reason_without_gpu():
    reason = resnet_fused.available_backends()["cuda"]
    assert reason is not None
    if cuda_backend._load_error is None:
        assert "no CUDA GPU" in reason, reason
    else:
        assert "resnet_fused._C" in reason, reason
    with pytest.raises(RuntimeError, match="unavailable"):
        resnet_fused.set_backend("cuda")


def test_import_survives_a_missing_extension():
    code = (
        "import sys; sys.modules['resnet_fused._C'] = None\n"
        "import resnet_fused\n"
        "reason = resnet_fused.available_backends()['cuda']\n"
        "assert reason is not None and 'resnet_fused._C' in reason, reason\n"
        "print('ok')\n"
    )
    env = dict(os.environ, RESNET_FUSED_BACKEND="reference")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_covers_rejects_cpu_tensors_and_unknown_ops():
    x, w, v = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3), torch.randn(6)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    assert cuda_backend.unsupported_reason("conv_bn_eval", x, w, v, v, None, *conv, True) is not None
    assert cuda_backend.unsupported_reason("conv_bn_train", x, w, None, v, v, None, *conv, 1e-5, True) is not None
    assert cuda_backend.unsupported_reason("add_relu", x, x) is not None
    assert cuda_backend.unsupported_reason("no_such_op", x) is not None


# ---------------------------------------------------------------------------------------
# GPU tests


class OpRecorder(TorchDispatchMode):
    """Records the names of the ops that reach the kernels (below autograd)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    def ran(self, op: str) -> bool:
        return any(name.startswith(f"{NS}.{op}") for name in self.names)


@pytest.fixture
def cuda_backend_on():
    require_extension()
    reason = backends.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    with resnet_fused.use_backend("cuda"):
        yield


@contextlib.contextmanager
def tf32(allowed: bool):
    """Set TF32 for convolutions (and matmuls) for the block: exact float32 comparisons need it off."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def conv_args(stride=1, padding=1, dilation=1, groups=1):
    return [stride, stride], [padding, padding], [dilation, dilation], groups


@pytest.mark.needs_cuda
def test_resolved_backend_is_cuda(cuda_backend_on):
    """Guards the suite against silently testing the reference path."""
    x = torch.randn(2, 8, 6, 6, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=torch.float16)
    v = torch.rand(16, device="cuda") + 0.5
    assert backends.resolved_backend("conv_bn_eval", x, w, v, v, None, *conv_args(), True) == "cuda"
    assert backends.resolved_backend("conv_bn_train", x, w, None, v, v, None, *conv_args(), 1e-5, True) == "cuda"
    assert backends.resolved_backend("add_relu", x, x) == "cuda"
    wg = torch.randn(16, 4, 3, 3, device="cuda", dtype=torch.float16)
    assert backends.resolved_backend("conv_bn_eval", x, wg, v, v, None, *conv_args(groups=2), True) == "reference"
    x64, w64 = x.double(), w.double()
    assert backends.resolved_backend("conv_bn_eval", x64, w64, v, v, None, *conv_args(), True) == "reference"
    rec = OpRecorder()
    with rec:
        resnet_fused.ops.conv_bn_relu(x, w, v, v, v, v, training=False, padding=1)
        resnet_fused.ops.add_relu(x, x)
    assert rec.ran("conv_bn_eval") and rec.ran("add_relu"), rec.names


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cfg", CONFIGS.values(), ids=CONFIGS.keys())
def test_unit_matches_eager(cuda_backend_on, cfg, training, residual, relu, channels_last, dtype):
    """Forward, every gradient and the running statistics vs nn.Conv2d + nn.BatchNorm2d (+ ReLU)."""
    rec = OpRecorder()
    with tf32(False), rec:
        run_unit_case(cfg, training, residual, relu, channels_last, dtype, device="cuda")
    groups = cfg[6]
    op = "conv_bn_train" if training else "conv_bn_eval"
    if groups == 1:
        assert rec.ran(op) and rec.ran(f"{op}_backward"), f"the cuda kernels did not run: {set(rec.names)}"
    else:
        assert not rec.ran(op), "grouped convolutions are not covered and must take the reference path"


# Shapes that exercise tile edges (M, c_out, K not multiples of the 64 x 64 x 32 tiles),
# several K tiles, the element-wise gather (c_in % 8 != 0), 7x7 stem, strides, dilation.
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


def _direct_inputs(shape, dtype, channels_last, residual):
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    kh, kw = k if isinstance(k, tuple) else (k, k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c_in, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c_out, c_in, kh, kw, device="cuda", dtype=dtype) / (c_in * kh * kw) ** 0.5).contiguous(
        memory_format=fmt)
    conv = conv_args(stride, padding, dilation)
    out = F.conv2d(x.float(), weight.float(), None, *conv)
    r = torch.randn(out.shape, device="cuda", dtype=dtype).contiguous(memory_format=fmt) if residual else None
    return x, weight, r, conv


def _as64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _compare_outputs(name, ours, ref, ref64, reduction_scale=None):
    """The reference in the same dtype stands in for eager (same cuDNN conv, float32 BN math).
    1-D outputs are per-channel sums over N*H*W: their floor is judged against
    `reduction_scale`, the magnitude of the summed terms, since the summation order differs."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    ref64 = ref64 if isinstance(ref64, (tuple, list)) else (ref64,)
    for i, (a, e, r) in enumerate(zip(ours, ref, ref64)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}[{i}]: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        assert a.stride() == e.stride() or a.numel() <= 1, f"{name}[{i}]: strides {a.stride()} vs {e.stride()}"
        scale = reduction_scale if a.dim() == 1 and reduction_scale is not None else None
        assert_close_to_ref(a, e, r.to(torch.float64), f"{name}[{i}]", scale=scale)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", DIRECT_SHAPES.values(), ids=DIRECT_SHAPES.keys())
def test_ops_direct_vs_reference(cuda_backend_on, shape, channels_last, dtype):
    """Each torch.ops.resnet_fused_cuda op against torch.ops.resnet_fused (same dtype and float64)."""
    cuda_ops, ref_ops = getattr(torch.ops, NS), torch.ops.resnet_fused
    with tf32(False):
        for residual in (False, True):
            for relu in (True, False):
                x, w, r, conv = _direct_inputs(shape, dtype, channels_last, residual)
                c_out = w.shape[0]
                scale = torch.rand(c_out, device="cuda") + 0.5
                shift = torch.randn(c_out, device="cuda")
                bias = torch.randn(c_out, device="cuda", dtype=dtype)
                tag = f"res={residual} relu={relu}"

                args = (x, w, scale, shift, r, *conv, relu)
                y = cuda_ops.conv_bn_eval(*args)
                _compare_outputs(f"conv_bn_eval {tag}", y, ref_ops.conv_bn_eval(*args),
                                 ref_ops.conv_bn_eval(*_as64(args)))

                args = (x, w, bias, scale, shift, r, *conv, 1e-5, relu)
                y_t, z, mean, var = cuda_ops.conv_bn_train(*args)
                ref_t = ref_ops.conv_bn_train(*args)
                ref64_t = ref_ops.conv_bn_train(*_as64(args))
                _compare_outputs(f"conv_bn_train {tag}", (y_t, z), ref_t[:2], ref64_t[:2])
                # mean/var are float32 for every activation dtype: compare with the float64
                # statistics of the z this kernel stored (z itself is compared above).
                z64 = z.double()
                mean64 = z64.mean(dim=(0, 2, 3))
                var64 = z64.var(dim=(0, 2, 3), unbiased=False)
                torch.testing.assert_close(mean.double(), mean64, rtol=1e-5, atol=1e-5 * z64.abs().max().item())
                torch.testing.assert_close(var.double(), var64, rtol=1e-4, atol=1e-6)

                grad_y = torch.randn_like(y)
                # Bound on the summed terms of the 1-D gradients: sum |g| times the largest factor.
                factor = max(1.0, z.double().abs().max().item(),
                             ((z.double() - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-5).sqrt())
                             .abs().max().item())
                reduction_scale = grad_y.double().abs().sum(dim=(0, 2, 3)).max().item() * factor
                y_arg = y if relu else None
                args = (grad_y, x, w, scale, y_arg, *conv, relu, [True, True, True, True, True])
                _compare_outputs(f"conv_bn_eval_backward {tag}", cuda_ops.conv_bn_eval_backward(*args),
                                 ref_ops.conv_bn_eval_backward(*args), ref_ops.conv_bn_eval_backward(*_as64(args)),
                                 reduction_scale)

                bn_weight = scale
                y_arg = y_t if relu else None
                args = (grad_y, x, w, z, y_arg, mean, var, bn_weight, *conv, 1e-5, relu, [True] * 6)
                ours = cuda_ops.conv_bn_train_backward(*args)
                ref = ref_ops.conv_bn_train_backward(*args)
                ref64 = ref_ops.conv_bn_train_backward(*_as64(args))
                # grad_bias is a sum that cancels to ~0: also judged against the summed magnitude.
                _compare_outputs(f"conv_bn_train_backward {tag}", ours, ref, ref64, reduction_scale)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_tf32_float32_conv(cuda_backend_on, dtype):
    """float32 with TF32 allowed (PyTorch's default for convolutions): the error is the TF32
    rounding of the operands, judged against a float64 conv of TF32-rounded operands."""
    if dtype != torch.float32:
        pytest.skip("TF32 concerns float32 only")

    def round_tf32(t):
        i = t.float().contiguous().view(torch.int32)
        return ((i + 0x1000) & ~0x1FFF).view(torch.float32).contiguous(memory_format=torch.channels_last)

    x, w, _, conv = _direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], dtype, True, False)
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    with tf32(True):
        y = getattr(torch.ops, NS).conv_bn_eval(x, w, scale, shift, None, *conv, False)
    ref64 = torch.ops.resnet_fused.conv_bn_eval(*_as64((x, w, scale, shift, None, *conv, False)))
    emulated = torch.ops.resnet_fused.conv_bn_eval(*_as64((round_tf32(x), round_tf32(w), scale, shift, None, *conv,
                                                            False))).float()
    assert_close_to_ref(y, emulated, ref64, "tf32 conv_bn_eval")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_add_relu(cuda_backend_on, dtype):
    op = getattr(torch.ops, NS).add_relu

    def t(*shape):
        return torch.randn(*shape, device="cuda").to(dtype)

    cases = [
        (t(2, 8, 5, 7), t(2, 8, 5, 7)),                                                # NCHW
        (t(3, 16, 4, 4).contiguous(memory_format=torch.channels_last), t(3, 16, 4, 4)),  # mixed layouts
        (t(1001), t(1001)),                                                            # 1-D, tail not a vector
        (t(4099)[1:], t(4100)[2:]),                                                    # misaligned pointers
        (t(0, 3, 2, 2), t(0, 3, 2, 2)),                                                # empty
    ]
    for i, (x, r) in enumerate(cases):
        y = op(x, r)
        expected = torch.ops.resnet_fused.add_relu(x, r)
        assert y.shape == expected.shape and y.stride() == expected.stride(), f"case {i}"
        torch.testing.assert_close(y, expected, rtol=0, atol=0, msg=f"case {i}")


@pytest.mark.needs_cuda
def test_misaligned_input_uses_the_gather_path(cuda_backend_on):
    """x whose data pointer is not 16-byte aligned (a view at an odd offset)."""
    base = torch.randn(2 * 16 * 9 * 9 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 9, 9, 16).permute(0, 3, 1, 2)  # channels_last view, 2-byte offset
    w = torch.randn(24, 16, 3, 3, device="cuda", dtype=torch.float16) / 12
    scale, shift = torch.rand(24, device="cuda") + 0.5, torch.randn(24, device="cuda")
    args = (x, w, scale, shift, None, *conv_args(), True)
    y = getattr(torch.ops, NS).conv_bn_eval(*args)
    _compare_outputs("misaligned", y, torch.ops.resnet_fused.conv_bn_eval(*args),
                     torch.ops.resnet_fused.conv_bn_eval(*_as64(args)))


@pytest.mark.needs_cuda
def test_empty_batch(cuda_backend_on):
    ops = getattr(torch.ops, NS)
    x = torch.randn(0, 8, 5, 5, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=torch.float16)
    v = torch.rand(16, device="cuda") + 0.5
    assert ops.conv_bn_eval(x, w, v, v, None, *conv_args(), True).shape == (0, 16, 5, 5)
    y, z, mean, var = ops.conv_bn_train(x, w, None, v, v, None, *conv_args(), 1e-5, True)
    assert y.shape == z.shape == (0, 16, 5, 5) and mean.shape == var.shape == (16,)
    assert torch.isnan(mean).all() and torch.isnan(var).all()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_training_is_deterministic(cuda_backend_on, dtype):
    """Statistics and gradients are bitwise identical across runs (fixed reduction order)."""
    x, w, r, conv = _direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], dtype, True, True)
    bn_w, bn_b = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    ops = getattr(torch.ops, NS)
    runs = []
    for _ in range(2):
        y, z, mean, var = ops.conv_bn_train(x, w, None, bn_w, bn_b, r, *conv, 1e-5, True)
        g = torch.ones_like(y)
        grads = ops.conv_bn_train_backward(g, x, w, z, y, mean, var, bn_w, *conv, 1e-5, True,
                                           [False, False, False, True, True, True])
        runs.append((y, z, mean, var, *grads[3:]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.needs_cuda
def test_statistics_are_numerically_sound(cuda_backend_on):
    """A large mean relative to the spread (bias 1000, unit-ish variance): merged per-tile
    (count, mean, M2) partials keep the variance accurate where E[z^2] - E[z]^2 would not."""
    x, w, _, conv = _direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], torch.float32, True, False)
    bias = torch.full((64,), 1000.0, device="cuda")
    bn_w, bn_b = torch.ones(64, device="cuda"), torch.zeros(64, device="cuda")
    with tf32(False):
        _, z, mean, var = getattr(torch.ops, NS).conv_bn_train(x, w, bias, bn_w, bn_b, None, *conv, 1e-5, False)
    z64 = z.double()
    torch.testing.assert_close(var.double(), z64.var(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), z64.mean(dim=(0, 2, 3)), rtol=1e-6, atol=0)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
def test_sync_batchnorm_building_blocks(cuda_backend_on, dtype, channels_last):
    from test_ops import check_sync_building_blocks

    with tf32(False):
        check_sync_building_blocks(getattr(torch.ops, NS), dtype, "cuda", channels_last)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(cuda_backend_on, dtype):
    positions = cuda_backend._CONV_ARG_POSITIONS
    samples = [(name, args) for name, args in op_samples(dtype, "cuda")
               if name not in positions or args[positions[name][2]] == 1]  # groups == 1 only
    assert {name for name, _ in samples} == set(_library.SCHEMAS)
    with tf32(False):
        for name, args in samples:
            torch.library.opcheck(getattr(getattr(torch.ops, NS), name).default, args)
