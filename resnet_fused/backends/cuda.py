"""CUDA C++ backend: the kernels of csrc/, built into the extension `resnet_fused._C`.

Importing this module loads the extension, whose TORCH_LIBRARY_IMPL registers CUDA kernels
for the ops of the `resnet_fused_cuda` namespace, then defines those ops' schemas (the
same `_library.SCHEMAS` every backend uses) together with the shared fake kernels and
autograd formulas. The dispatcher accepts kernels registered before their schema and
checks each C++ signature against the schema when it is defined.

A missing or broken extension never makes this import fail: `unavailable_reason()` says
what is wrong and the backend selection (`resnet_fused.backends`) falls back.

Support matrix (inputs outside it take the reference path, see `unsupported_reason`):
  devices     CUDA tensors on compute capability 8.0+ (A100, H100, ...)
  dtypes      float16, bfloat16 (tensor cores), float32 (TF32 tensor cores while
              torch.backends.cudnn.allow_tf32 is True, as nn.Conv2d; an exact FFMA path
              otherwise); float64 never
  convolution any kernel size, stride, padding, dilation; groups == 1 only
  layouts     channels_last is the fast path; NCHW inputs are converted (extra copies)
  backward    BatchNorm/ReLU/residual part in CUDA kernels; conv dgrad/wgrad through
              at::convolution_backward (cuDNN)
  SyncBatchNorm  the same kernels as four building-block ops (conv_bn_stats, bn_apply,
              bn_apply_backward_reduce, bn_apply_backward; see _library.py)
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

import torch

from .. import _library

NAME = "cuda"
NAMESPACE = "resnet_fused_cuda"
DIRECT = DIRECT_WITH_GRAD = None  # C++ ops: torch.ops is the way in (backends.select_ops)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_CAPABILITY = (8, 0)

_load_error: str | None = None
_lib = None
try:
    # Loading the library registers the CUDA kernels (TORCH_LIBRARY_IMPL in csrc/ops.cpp).
    importlib.import_module("resnet_fused._C")
except ModuleNotFoundError as exc:
    _load_error = (
        f"the CUDA extension resnet_fused._C is not built ({exc}); build it with nvcc and a CUDA build of torch: "
        "RESNET_FUSED_FORCE_CUDA=1 pip install --no-build-isolation -e ."
    )
except Exception as exc:  # ImportError/OSError: e.g. built against another torch version
    _load_error = (
        f"the CUDA extension resnet_fused._C failed to load ({type(exc).__name__}: {exc}); it was probably built "
        f"against another torch than {torch.__version__}: rebuild it with pip install --no-build-isolation -e ."
    )
else:
    try:
        _lib = _library.define_library(NAMESPACE, {})
    except Exception as exc:  # e.g. a C++ kernel signature that does not match its schema
        _load_error = f"registering the {NAMESPACE} ops failed ({type(exc).__name__}: {exc})"


def _switch_functions():
    """The extension's sm90 switch (csrc/sm90/conv_sm90.cu) through ctypes: (read, set)."""
    import ctypes

    from . import cuda_sass

    path = cuda_sass.extension_path()
    if path is None:
        raise RuntimeError(f"the CUDA extension is not built: {_load_error}")
    lib = ctypes.CDLL(path)
    lib.resnet_fused_set_sm90_enabled.argtypes = [ctypes.c_int]
    return lib.resnet_fused_sm90_enabled, lib.resnet_fused_set_sm90_enabled


def sm90_enabled() -> bool:
    """Whether CUDA-backend calls may take the sm90 (Hopper) CUTLASS kernels; False makes them
    take the sm80 kernel everywhere. Read from RESNET_FUSED_CUDA_SM90 once (0: off), at the
    first call or query, not per call; use_sm90 switches it at run time."""
    return bool(_switch_functions()[0]())


@contextlib.contextmanager
def use_sm90(enabled: bool) -> Iterator[None]:
    """Context manager: CUDA-backend calls inside may (True) or may not (False) take the sm90
    kernels (for comparisons against the sm80 kernel); the previous setting after."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    read, set_enabled = _switch_functions()
    previous = bool(read())
    set_enabled(int(enabled))
    try:
        yield
    finally:
        set_enabled(int(previous))


def unavailable_reason() -> str | None:
    """None when the CUDA backend can run here, else why it cannot."""
    if _load_error is not None:
        return _load_error
    if not torch.cuda.is_available():
        return "no CUDA GPU is available (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if capability < _MIN_CAPABILITY:
        return (
            f"the CUDA kernels need compute capability {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]} or newer (sm80+); "
            f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}"
        )
    return None


def _x_reason(x, name: str = "x") -> str | None:
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        return f"{name} is not a CUDA tensor"
    if x.dtype not in _SUPPORTED_DTYPES:
        return f"{name} has dtype {x.dtype}; the CUDA kernels take float16, bfloat16 and float32"
    if torch.cuda.get_device_capability(x.device) < _MIN_CAPABILITY:
        return f"{x.device} has compute capability below {_MIN_CAPABILITY[0]}.{_MIN_CAPABILITY[1]}"
    return None


def _conv_reason(x, weight, groups) -> str | None:
    reason = _x_reason(x)
    if reason is not None:
        return reason
    if x.dim() != 4:
        return f"x is {x.dim()}-D, not 4-D"
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype or weight.device != x.device:
        return "weight's dtype or device differs from x's"
    if groups != 1:
        return f"groups={groups}: no grouped implicit GEMM yet"
    return None


# Position of (x, weight, groups) in each op's arguments (see _library.SCHEMAS).
_CONV_ARG_POSITIONS = {
    "conv_bn_eval": (0, 1, 8),
    "conv_bn_eval_backward": (1, 2, 8),
    "conv_bn_train": (0, 1, 9),
    "conv_bn_train_backward": (1, 2, 11),
    "conv_bn_stats": (0, 1, 6),
    "bn_act_conv_bn_stats": (0, 7, 12),
    "bn_act_conv_backward": (1, 8, 12),
}

# Elementwise/reduction ops: position of their activation tensor (z).
_ACTIVATION_ARG_POSITION = {"bn_apply": 0, "bn_apply_backward_reduce": 1, "bn_apply_backward": 1}


def unsupported_reason(op_name: str, *op_args) -> str | None:
    """None when the CUDA kernels handle this call, else why the reference path runs it."""
    if op_name == "add_relu":
        x, residual = op_args[:2]
        reason = _x_reason(x)
        if reason is None and not (isinstance(residual, torch.Tensor) and residual.dtype == x.dtype
                                   and residual.device == x.device):
            reason = "residual's dtype or device differs from x's"
        return reason
    if op_name in _ACTIVATION_ARG_POSITION:
        z = op_args[_ACTIVATION_ARG_POSITION[op_name]]
        reason = _x_reason(z, "z")
        return reason if reason is not None or z.dim() == 4 else f"z is {z.dim()}-D, not 4-D"
    positions = _CONV_ARG_POSITIONS.get(op_name)
    if positions is None:
        return f"no CUDA kernel for op {op_name!r}"
    x, weight, groups = (op_args[i] for i in positions)
    return _conv_reason(x, weight, groups)

