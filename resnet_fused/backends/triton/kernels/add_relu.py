"""relu(x + residual) in one pass over memory (flat; both operands share one dense layout)."""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import INTERPRETED
from .launch import cdiv, launch, needs_int64


@triton.jit
def _relu(v):
    # Not tl.maximum(v, 0): NaN must stay NaN, as torch.relu leaves it.
    return tl.where(v <= 0.0, 0.0, v)


@triton.jit
def _add_relu_kernel(x_ptr, r_ptr, y_ptr, numel, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, _relu(x + r).to(y_ptr.dtype.element_ty), mask=mask)


def add_relu(x, residual, out):
    """x, residual, out: dense tensors with identical strides."""
    numel = out.numel()
    block = 4096 if INTERPRETED else 2048
    launch(_add_relu_kernel, (cdiv(numel, block),), x_ptr=x, r_ptr=residual, y_ptr=out, numel=numel,
           INDEX_64=needs_int64(out), BLOCK=block, num_warps=8 if not INTERPRETED else 4)
