"""CUDA C++ backend: the kernels of csrc/, built into the extension `resnet_fused._C`.

Importing this module loads the extension, whose TORCH_LIBRARY_IMPL registers CUDA kernels
for the ops of the `resnet_fused_cuda` namespace, then defines those ops' schemas (the
same `_library.SCHEMAS` every backend uses) together with the shared fake kernels and
autograd formulas. The dispatcher accepts kernels registered before their schema and
checks each C++ signature against the schema when it is defined.

A missing or broken extension never makes this import fail: `unavailable_reason()` says
what is wrong and the backend selection (`resnet_fused.backends`) falls back.

Support matrix (inputs outside it take the reference path, see `covers`):
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

import importlib

import torch

from . import _library

NAMESPACE = "resnet_fused_cuda"

# The kernels have compiled but never run on a GPU; flip to True only after
# tests/test_cuda.py passes on a GPU (then `auto` may pick this backend).
AUTO = False

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MIN_CAPABILITY = (8, 0)

_load_error: str | None = None
_lib = None
try:
    # Loading the library registers the CUDA kernels (TORCH_LIBRARY_IMPL in csrc/ops.cpp).
    importlib.import_module(f"{__package__}._C")
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


def _x_supported(x) -> bool:
    if not isinstance(x, torch.Tensor) or not x.is_cuda or x.dtype not in _SUPPORTED_DTYPES:
        return False
    if torch.cuda.get_device_capability(x.device) < _MIN_CAPABILITY:
        return False
    return True


def _conv_supported(x, weight, groups) -> bool:
    if not _x_supported(x) or x.dim() != 4:
        return False
    if not isinstance(weight, torch.Tensor) or weight.dtype != x.dtype or weight.device != x.device:
        return False
    return groups == 1  # no grouped implicit GEMM yet


# Position of (x, weight, groups) in each op's arguments (see _library.SCHEMAS).
_CONV_ARG_POSITIONS = {
    "conv_bn_eval": (0, 1, 8),
    "conv_bn_eval_backward": (1, 2, 8),
    "conv_bn_train": (0, 1, 9),
    "conv_bn_train_backward": (1, 2, 11),
    "conv_bn_stats": (0, 1, 6),
}

# Elementwise/reduction ops: position of their activation tensor (z).
_ACTIVATION_ARG_POSITION = {"bn_apply": 0, "bn_apply_backward_reduce": 1, "bn_apply_backward": 1}


def covers(op_name: str, *op_args) -> bool:
    """Whether the CUDA kernels handle this call (False: the reference path runs it)."""
    if op_name == "add_relu":
        x, residual = op_args[:2]
        return (
            _x_supported(x)
            and isinstance(residual, torch.Tensor)
            and residual.dtype == x.dtype
            and residual.device == x.device
        )
    if op_name in _ACTIVATION_ARG_POSITION:
        z = op_args[_ACTIVATION_ARG_POSITION[op_name]]
        return _x_supported(z) and z.dim() == 4
    positions = _CONV_ARG_POSITIONS.get(op_name)
    if positions is None:
        return False
    x, weight, groups = (op_args[i] for i in positions)
    return _conv_supported(x, weight, groups)
