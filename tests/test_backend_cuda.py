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
    (backends.cuda.use_sm90(False)) and the float64 reference.

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
from backend_under_test import sm90_launch_counter, tf32
from op_samples import DIRECT_SHAPES, as64, compare_outputs, conv_args, direct_inputs
from resnet_fused.tolerances import TF32_OPERANDS, assert_close_to_ref, tf32_emulation, tf32_operand

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


def _sm90_shape_reason():
    """resnet_fused_sm90_shape_reason from the built library (through ctypes; no GPU needed)."""
    require_extension()
    fn = ctypes.CDLL(cuda_sass.extension_path()).resnet_fused_sm90_shape_reason
    fn.restype = ctypes.c_char_p
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    dtypes = {"fp16": 0, "bf16": 1, "fp32": 2}

    def reason(c_in, c_out, k, stride=1, padding=None, dilation=1, hw=56, n=2, dtype="bf16", allow_tf32=True):
        padding = k // 2 if padding is None else padding
        dims = (ctypes.c_int64 * 13)(n, hw, hw, c_in, c_out, k, k, stride, stride, padding, padding, dilation,
                                     dilation)
        got = fn(dtypes[dtype], dims, int(allow_tf32))
        return None if got is None else got.decode()

    return reason


@pytest.mark.slow
def test_sm90_switch_reads_the_environment_once():
    """RESNET_FUSED_CUDA_SM90 is read once (no getenv per call): a later change of the
    environment does not switch the kernels, backends.cuda.use_sm90 does, and restores the
    setting after. Runs without a GPU: the switch lives in the extension's host code."""
    require_extension()
    script = (
        "import os, resnet_fused.backends.cuda as c\n"
        "first = c.sm90_enabled()\n"
        "os.environ['RESNET_FUSED_CUDA_SM90'] = '1' if first is False else '0'\n"
        "after_env = c.sm90_enabled()\n"
        "with c.use_sm90(not first):\n"
        "    inside = c.sm90_enabled()\n"
        "print(first, after_env, inside, c.sm90_enabled())\n"
    )
    cases = (("0", "False False True False"), ("1", "True True False True"), (None, "True True False True"))
    for env_value, expected in cases:
        env = {k: v for k, v in os.environ.items() if k != "RESNET_FUSED_CUDA_SM90"}
        if env_value is not None:
            env["RESNET_FUSED_CUDA_SM90"] = env_value
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split(), (env_value, out.stdout, out.stderr)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        with cuda_backend.use_sm90(0):
            pass


def test_sm90_dispatch_takes_resnet_layers_and_bounds_tma_im2col():
    """The sm90 dispatch's shape rule, on any machine: ResNet-50's layers (but the 3-channel
    stem) go to the CUTLASS kernels; every TMA im2col descriptor limit is bounded before a
    launch, the traversal stride (1-8) above all, which CUTLASS's can_implement does not check
    and NDEBUG does not assert (a patchify stem, 16x16/16, would launch a broken descriptor)."""
    reason = _sm90_shape_reason()
    for c_in, c_out, k, stride in [(64, 64, 3, 1), (256, 64, 1, 1), (64, 256, 1, 1), (128, 128, 3, 2),
                                   (256, 512, 1, 2), (1024, 2048, 1, 2), (512, 512, 3, 1)]:
        for dtype in ("bf16", "fp16", "fp32"):
            assert reason(c_in, c_out, k, stride, dtype=dtype) is None, (c_in, c_out, k, stride, dtype)
    assert "stride above 8" in reason(64, 128, 16, stride=16, padding=0, hw=224)
    assert "stride above 8" in reason(64, 128, 9, stride=9, padding=0, hw=63)
    assert reason(64, 128, 8, stride=8, padding=0, hw=64) is None
    assert "corner" in reason(64, 64, 1, padding=128, hw=8)  # upper corner 128
    assert reason(64, 64, 1, padding=127, hw=8) is None
    assert "corner" in reason(64, 64, 3, padding=129, hw=8)  # lower corner -129
    assert "filter offsets" in reason(64, 64, 3, padding=128, dilation=128, hw=300)  # (3 - 1) * 128 = 256
    assert "K tiles" in reason(8, 64, 7, stride=2)  # the stem (3 channels, padded to 8 by ops.cpp): sm80 kernel
    assert "16-byte" in reason(3, 64, 7, stride=2)
    assert "K tiles" in reason(32, 64, 3, dtype="bf16")
    assert reason(32, 64, 3, dtype="fp32") is None  # TF32's K tile is 32
    assert "TF32" in reason(64, 64, 3, dtype="fp32", allow_tf32=False)
    assert "16-byte" in reason(64, 60, 3)
    assert "int32" in reason(64, 64, 1, n=2**31 // 64 + 1, hw=8)


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
    """float32 with TF32 allowed (PyTorch's default for convolutions) on the sm80 kernel: the
    error is the TF32 rounding of the operands, judged against a float64 conv of operands
    rounded as that kernel rounds them."""

    x, w, _, conv = direct_inputs(DIRECT_SHAPES["3x3_c64_c64"], torch.float32, True, False)
    scale, shift = torch.rand(64, device="cuda") + 0.5, torch.randn(64, device="cuda")
    args = (x, w, scale, shift, None, *conv, False)
    with tf32(True), cuda_backend.use_sm90(False):  # 64 channels would take the sm90 kernel
        y = getattr(torch.ops, NS).conv_bn_eval(*args)
    ref64 = torch.ops.resnet_fused.conv_bn_eval(*as64(args))
    emulated = tf32_emulation(torch.ops.resnet_fused.conv_bn_eval, args, TF32_OPERANDS["cuda-sm80"])
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
def test_sm90_kernels_match_the_sm80_kernel(cuda_backend_on, dtype, residual):
    """On an H100/H200 the CUTLASS kernels (TMA im2col + wgmma) take the 64-channel layers; the
    sm80 kernel (backends.cuda.use_sm90(False)) and the float64 reference judge them, eval and
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
    launches = sm90_launch_counter()
    before = launches()
    with tf32(True):
        got_eval = getattr(torch.ops, NS).conv_bn_eval(*eval_args)
        got_train = getattr(torch.ops, NS).conv_bn_train(*train_args)
        assert launches() == before + 2, "the calls did not run on the sm90 kernels"
        with cuda_backend.use_sm90(False):
            sm80_eval = getattr(torch.ops, NS).conv_bn_eval(*eval_args)
            sm80_train = getattr(torch.ops, NS).conv_bn_train(*train_args)
        assert launches() == before + 2, "use_sm90(False) still ran the sm90 kernels"
    ref_eval = torch.ops.resnet_fused.conv_bn_eval(*as64(eval_args))
    ref_train = torch.ops.resnet_fused.conv_bn_train(*as64(train_args))
    if dtype != torch.float32:
        compare_outputs("sm90 eval", got_eval, sm80_eval, ref_eval)
        compare_outputs("sm90 train", got_train, sm80_train, ref_train)
        return
    # TF32: wgmma truncates the operands, the sm80 kernel rounds them; each kernel is judged
    # against the float64 op on operands turned as it turns them.
    for kernel, eval_out, train_out in (("sm90", got_eval, got_train), ("sm80", sm80_eval, sm80_train)):
        rounding = TF32_OPERANDS[f"cuda-{kernel}"]
        compare_outputs(f"{kernel} eval", eval_out,
                        tf32_emulation(torch.ops.resnet_fused.conv_bn_eval, eval_args, rounding), ref_eval)
        compare_outputs(f"{kernel} train", train_out,
                        tf32_emulation(torch.ops.resnet_fused.conv_bn_train, train_args, rounding), ref_train)


# Shapes that reach each sm90 kernel's paths (c_in, c_out, kernel, stride, n, h, w):
# c_out 64 (the 128x64 tile, full) and 192 (128x128 tiles, the second half-empty), 1x1 at
# stride 1 and 2, 3x3 at stride 2; M = n * h_out * w_out below 64, and a multiple of 128.
SM90_CASES = {
    "3x3_c64_m49": (64, 64, 3, 1, 1, 7, 7),
    "1x1_c192_m512": (64, 192, 1, 1, 2, 16, 16),
    "1x1s2_c128_m128": (128, 128, 1, 2, 2, 16, 15),
    "3x3s2_c192_m147": (64, 192, 3, 2, 3, 13, 13),
    "1x1s2_c64_m98": (128, 64, 1, 2, 2, 13, 14),
}


@pytest.mark.needs_cuda
@pytest.mark.parametrize("mode", ["eval", "eval_residual", "train_bias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "tf32"])
@pytest.mark.parametrize("case", SM90_CASES.values(), ids=SM90_CASES.keys())
def test_sm90_kernel_paths(cuda_backend_on, case, dtype, mode):
    """Every CUTLASS kernel (dtype x epilogue x tile width) on partial and whole M and N tiles,
    1x1 and strided convolutions, a conv bias in training: the launch counter proves the sm90
    kernel ran, and the outputs (y; z, mean, var) are judged against float64 with the sm80
    kernel's error as the bar; in float32 (TF32), the error of the float64 op on truncated
    operands, as wgmma truncates them."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 kernels run on compute capability 9.0 only")
    c_in, c_out, k, stride, n, h, w = case
    gen = torch.Generator(device="cuda").manual_seed(7)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype).contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)

    x = rand(n, c_in, h, w)
    weight = rand(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5)
    conv = conv_args(stride=stride, padding=k // 2)
    h_out, w_out = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    scale, shift = torch.rand(c_out, device="cuda", generator=gen) + 0.5, torch.randn(c_out, device="cuda",
                                                                                       generator=gen)
    if mode == "train_bias":
        op, args = "conv_bn_train", (x, weight, rand(c_out), scale, shift, None, *conv, 1e-5, True)
    else:
        residual = rand(n, c_out, h_out, w_out) if mode == "eval_residual" else None
        op, args = "conv_bn_eval", (x, weight, scale, shift, residual, *conv, True)
    launches = sm90_launch_counter()
    with tf32(True):
        before = launches()
        got = getattr(getattr(torch.ops, NS), op)(*args)
        assert launches() == before + 1, "the call did not run on an sm90 kernel"
        with cuda_backend.use_sm90(False):
            sm80 = getattr(getattr(torch.ops, NS), op)(*args)
        assert launches() == before + 1, "use_sm90(False) still ran the sm90 kernels"
    ref64 = getattr(torch.ops.resnet_fused, op)(*as64(args))
    if dtype == torch.float32:  # wgmma truncates TF32 operands (the sm80 kernel rounds): its own bar
        sm80 = tf32_emulation(getattr(torch.ops.resnet_fused, op), args, TF32_OPERANDS["cuda-sm90"])
    compare_outputs(f"sm90 {op}", got, sm80, ref64)


@pytest.mark.parametrize("rounding", ["truncate", "round"])
def test_tf32_bar_passes_a_tf32_kernel_and_fails_a_worse_one(rounding):
    """The TF32 bar itself, on CPU: a simulated TF32 kernel (exact float32 convolution of
    operands turned into tf32 as the kernel turns them, so with float32 accumulation error on top
    of the operand error) passes; a kernel with 4x that error fails. Truncation is checked as
    truncation: its error is larger and biased, and with the rounding bar the sm90 kernels
    failed (docs/kernels.md#tf32)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(32, 64, 3, 3, generator=gen) / 24
    scale, shift = torch.rand(32, generator=gen) + 0.5, torch.randn(32, generator=gen)
    args = (x, w, scale, shift, None, *conv_args(), False)
    op = torch.ops.resnet_fused.conv_bn_eval
    ref64 = op(*as64(args))
    bar = tf32_emulation(op, args, rounding)
    kernel = op(tf32_operand(x, rounding), tf32_operand(w, rounding), *args[2:])  # float32 arithmetic
    assert not torch.equal(kernel, bar)  # it has its own accumulation error
    assert_close_to_ref(kernel, bar, ref64, f"simulated {rounding} kernel")
    worse = (ref64 + 4 * (bar.double() - ref64)).float()
    with pytest.raises(AssertionError, match="exceeds 2x"):
        assert_close_to_ref(worse, bar, ref64, f"4x the {rounding} error")
    assert tf32_operand(torch.tensor([1 + 2**-11, -(1 + 2**-11)]), rounding).tolist() == (
        [1 + 2**-10, -(1 + 2**-10)] if rounding == "round" else [1.0, -1.0])
