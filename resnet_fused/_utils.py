"""Shape, layout and dtype rules shared by the ops, their fake kernels and every backend."""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

CHANNEL_DIMS = (0, 2, 3)  # BatchNorm2d reduces over N, H, W


def interpret() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The current CUDA device set to `device` for the block (CUDA events, streams, graph
    captures and Triton launches use the current device, not their tensors'); nothing for a CPU
    device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-channel statistics and of the BatchNorm arithmetic."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: Tensor) -> torch.memory_format:
    """Layout an op's activation outputs take: channels_last iff x is channels_last."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_like_format(size, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized tensor of `size` in like's activation layout (see memory_format)."""
    return torch.empty(size, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format(like))


def in_format(t: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """t as a dense tensor in like's activation layout (no copy when it already is one)."""
    return t.to(dtype or t.dtype).contiguous(memory_format=memory_format(like))


def conv_output_size(
    x_size: list[int], w_size: list[int], stride: list[int], padding: list[int], dilation: list[int]
) -> list[int]:
    n, _, h, w = x_size
    c_out, _, kh, kw = w_size
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return [n, c_out, h_out, w_out]


def unasked(like: Tensor) -> Tensor:
    """The value of an op output the caller did not ask for (output_mask False): an empty
    tensor, because a custom-op schema returns Tensor, not Tensor?."""
    return like.new_empty(0)


def or_unasked(outputs, like: Tensor) -> tuple:
    """outputs with each None (not asked for) replaced by unasked(like)."""
    return tuple(like.new_empty(0) if t is None else t for t in outputs)


def relu_backward(grad: Tensor, y: Tensor) -> Tensor:
    """grad masked by ReLU's output y (aten's threshold_backward, as eager's ReLU backward): a
    NaN output passes its gradient."""
    return torch.ops.aten.threshold_backward(grad, y, 0)
