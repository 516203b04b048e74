"""What only the CUDA C++ backend has (csrc/, built into resnet_fused._C, ops under
torch.ops.resnet_fused_cuda); its ops run the shared op suite (tests/test_ops.py) on a GPU.

  * Without a GPU: the extension registers a CUDA kernel, a fake kernel and autograd for
    every op of _library.SCHEMAS with those schemas, a machine without a GPU gets a clear
    reason, a missing extension never breaks `import resnet_fused`, and CPU tensors are not
    covered. Skipped, with the reason, when the extension is not built (a build that exists
    but fails to load is a failure, and so is a missing build under RESNET_FUSED_FORCE_CUDA=1).
  * On a GPU (@needs_cuda): what is covered (groups=1 only), float32 with TF32 allowed, an
    input whose data pointer is not 16-byte aligned (realigned by a copy), the channel padding
    of a 3-channel stem, and on an H100/H200 the CUTLASS sm90 kernels against the sm80 kernel
    (RESNET_FUSED_CUDA_SM90=0) and the float64 reference.

GPU run: RESNET_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e . &&
         pytest tests/test_ops.py tests/test_backend_cuda.py
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch
from helpers import DIRECT_SHAPES, as64, assert_close_to_ref, compare_outputs, conv_args, direct_inputs, tf32

import resnet_fused
from resnet_fused import _library, backends
from resnet_fused.backends import cuda as cuda_backend
from resnet_fused.backends import cuda_sass

NS = cuda_backend.NAMESPACE


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
# Without a GPU


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
        got = str(getattr(getattr(torch.ops, NS), name).default._schema)
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
# On a GPU


@pytest.fixture
def cuda_backend_on():
    require_extension()
    reason = backends.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(reason)
    with resnet_fused.use_backend("cuda"):
        yield


@pytest.mark.needs_cuda
def test_coverage_on_gpu(cuda_backend_on):
    """float16/bfloat16/float32 CUDA tensors with groups=1 are covered; groups > 1 and float64
    take the reference path, with a reason."""
    x = torch.randn(2, 8, 6, 6, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 8, 3, 3, device="cuda", dtype=torch.float16)
    v = torch.rand(16, device="cuda") + 0.5
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        xd, wd = x.to(dtype), w.to(dtype)
        assert cuda_backend.unsupported_reason("conv_bn_eval", xd, wd, v, v, None, *conv_args(), True) is None
        assert cuda_backend.unsupported_reason("conv_bn_train", xd, wd, None, v, v, None, *conv_args(), 1e-5,
                                               True) is None
        assert cuda_backend.unsupported_reason("add_relu", xd, xd) is None
    wg = torch.randn(16, 4, 3, 3, device="cuda", dtype=torch.float16)
    assert "groups" in cuda_backend.unsupported_reason("conv_bn_eval", x, wg, v, v, None, *conv_args(groups=2), True)
    x64, w64 = x.double(), w.double()
    assert cuda_backend.unsupported_reason("conv_bn_eval", x64, w64, v, v, None, *conv_args(), True) is not None


@pytest.mark.needs_cuda
def test_tf32_float32_conv(cuda_backend_on):
    """float32 with TF32 allowed (PyTorch's default for convolutions): the error is the TF32
    rounding of the operands, judged against a float64 conv of TF32-rounded operands."""

    def round_tf32(t):
        i = t.float().contiguous().view(torch.int32)
        return ((i + 0x1000) & ~0x1FFF).view(torch.float32).contiguous(memory_format=torch.channels_last)

    x, w, _, conv = direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], torch.float32, True, False)
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    with tf32(True):
        y = getattr(torch.ops, NS).conv_bn_eval(x, w, scale, shift, None, *conv, False)
    ref64 = torch.ops.resnet_fused.conv_bn_eval(*as64((x, w, scale, shift, None, *conv, False)))
    emulated = torch.ops.resnet_fused.conv_bn_eval(*as64((round_tf32(x), round_tf32(w), scale, shift, None, *conv,
                                                           False))).float()
    assert_close_to_ref(y, emulated, ref64, "tf32 conv_bn_eval")


@pytest.mark.needs_cuda
def test_misaligned_input_is_realigned(cuda_backend_on):
    """x whose data pointer is not 16-byte aligned (a view at an odd offset)."""
    base = torch.randn(2 * 16 * 9 * 9 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(2, 9, 9, 16).permute(0, 3, 1, 2)  # channels_last view, 2-byte offset
    w = torch.randn(24, 16, 3, 3, device="cuda", dtype=torch.float16) / 12
    scale, shift = torch.rand(24, device="cuda") + 0.5, torch.randn(24, device="cuda")
    args = (x, w, scale, shift, None, *conv_args(), True)
    y = getattr(torch.ops, NS).conv_bn_eval(*args)
    compare_outputs("misaligned", y, torch.ops.resnet_fused.conv_bn_eval(*args),
                    torch.ops.resnet_fused.conv_bn_eval(*as64(args)))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("c_in", [3, 12])
def test_channels_padded_to_whole_vectors(cuda_backend_on, c_in):
    """Channel counts that are not a multiple of 16 bytes (the stem's 3) are zero-padded for the
    implicit GEMM, in eval and training."""
    x = torch.randn(2, c_in, 17, 17, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, c_in, 7, 7, device="cuda", dtype=torch.bfloat16) / 10
    scale, shift = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    conv = conv_args(stride=2, padding=3)
    args = (x, w, scale, shift, None, *conv, True)
    compare_outputs(f"eval c_in={c_in}", getattr(torch.ops, NS).conv_bn_eval(*args),
                    torch.ops.resnet_fused.conv_bn_eval(*args), torch.ops.resnet_fused.conv_bn_eval(*as64(args)))
    targs = (x, w, None, scale, shift, None, *conv, 1e-5, True)
    compare_outputs(f"train c_in={c_in}", getattr(torch.ops, NS).conv_bn_train(*targs),
                    torch.ops.resnet_fused.conv_bn_train(*targs), torch.ops.resnet_fused.conv_bn_train(*as64(targs)))


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("residual", [False, True])
def test_sm90_kernels_match_the_sm80_kernel(cuda_backend_on, monkeypatch, dtype, residual):
    """On an H100/H200 the CUTLASS kernels (TMA im2col + wgmma) take the 64-channel layers; the
    sm80 kernel (RESNET_FUSED_CUDA_SM90=0) and the float64 reference judge them, eval and
    training, with a residual and odd spatial sizes (partial M tiles)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 kernels run on compute capability 9.0 only")
    x = torch.randn(3, 64, 15, 13, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 64, 3, 3, device="cuda", dtype=dtype) / 24
    scale, shift = torch.rand(128, device="cuda") + 0.5, torch.randn(128, device="cuda")
    r = torch.randn(3, 128, 15, 13, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last) \
        if residual else None
    conv = conv_args()
    eval_args = (x, w, scale, shift, r, *conv, True)
    train_args = (x, w, None, scale, shift, r, *conv, 1e-5, True)
    launches = ctypes.CDLL(cuda_sass.extension_path()).resnet_fused_sm90_launches
    launches.restype = ctypes.c_int64
    before = launches()
    with tf32(True):
        got_eval = getattr(torch.ops, NS).conv_bn_eval(*eval_args)
        got_train = getattr(torch.ops, NS).conv_bn_train(*train_args)
        assert launches() == before + 2, "the calls did not run on the sm90 kernels"
        monkeypatch.setenv("RESNET_FUSED_CUDA_SM90", "0")
        sm80_eval = getattr(torch.ops, NS).conv_bn_eval(*eval_args)
        sm80_train = getattr(torch.ops, NS).conv_bn_train(*train_args)
        assert launches() == before + 2, "RESNET_FUSED_CUDA_SM90=0 still ran the sm90 kernels"
    compare_outputs("sm90 eval", got_eval, sm80_eval, torch.ops.resnet_fused.conv_bn_eval(*as64(eval_args)))
    compare_outputs("sm90 train", got_train, sm80_train, torch.ops.resnet_fused.conv_bn_train(*as64(train_args)))
