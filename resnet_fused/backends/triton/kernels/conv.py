"""Implicit-GEMM convolution kernels (forward with fused epilogues, dgrad, wgrad).

The GEMM kernels run on dense NHWC (channels_last) activations and weights: the launchers copy
NCHW (or otherwise strided) operands to channels_last, and compute an NCHW output into a
channels_last buffer copied back. So a kernel derives every operand's strides from its sizes
(_dense_nhwc) instead of taking them: gathers along a strided channel axis spilled (the
compile gate's spill test; figures in docs/kernels.md), and NHWC-only halves the JIT's
specializations.
Groups are a grid axis (one GEMM per group). Accumulation is float32; fp32 operands use TF32 on
tensor cores only when the caller allows it (ALLOW_TF32), exact fp32 otherwise.

Forward GEMM: rows = output pixels (n, ho, wo), columns = output channels of the
group, K = (kh, kw, input channel). Epilogues:
  EPILOGUE == 0 (eval):  y = acc * scale[c] + shift[c] (+ residual) (ReLU), one rounding.
  EPILOGUE == 1 (train): z = acc (+ bias[c]) stored in the input dtype, and per-tile
                         (mean, M2) of the rounded z per channel for a Chan merge in
                         batchnorm.finalize_stats (the tile count is implied by BLOCK_M).

K loop: one loop over (tap, channel block), channel block fastest, so Triton's software
pipeline (num_stages) runs across taps instead of draining at each one, as a loop nested per
tap does (the compile gate's test_3x3_conv_kernels_have_one_pipelined_k_loop). A tap moves
every row's input address by the same amount (kh * dil * stride_h + kw * dil * stride_w), so
the loop carries (c0, kh, kw) as scalars and each row's base address is computed once.

Strided dgrad (PHASED): grad_x's pixels split into stride_h * stride_w phases (h % stride_h,
w % stride_w), grid axis 1. A phase meets dz only through the taps kh = kh_first + i * stride_h
(likewise kw), so its K loop runs over those alone: 3x3/2 runs 1, 2 or 4 taps per phase instead
of 9 masked ones, and 1x1/2 one tap or none (those pixels get a zero gradient).

Few channels (FLAT: the 7x7 stem's 3 input channels, or dgrad's few output channels): a K
block is one filter row, (kw, c) with c padded to a power of two C_PAD and kw to KW_PAD, so
its index math is shifts and masks of constants, and the loop runs over kh.

Index math is int32; INDEX_64 (the launcher's choice when a tensor spans 2**31 elements or
more, see launch.needs_int64) makes every pixel and offset computation int64.

Absent operands are None (Triton specializes a None argument as a constexpr), tested with
`is not None` in the kernel; flags that the autotuner keys on (EPILOGUE, TMA, PROLOGUE, ...)
stay constexprs. Launchers pass every argument by keyword, and decide what depends only on
(shapes, strides, dtype, device, flags) once per key (launch.plan_cache).

TMA (forward): a 1x1, stride-1, unpadded conv on dense NHWC input is the plain GEMM
x[M, C_in] @ w[C_out, C_in]^T; its tiles are loaded through device-side tensor descriptors
(tl.make_tensor_descriptor, triton >= 3.4), whose out-of-bounds zero fill replaces the row and
channel masks (fewer registers than pointer loads, UTMALDG instead of LDGSTS: docs/kernels.md;
the gate's test_1x1_forward_on_nhwc_loads_by_tma). The descriptors need 256 B of global scratch
per program, which Triton takes from its allocator (torch's caching allocator unless one was
set; _install_scratch_allocator).

Tile order: n-fastest (program id -> (m tile, n tile) with the n tiles of one m tile adjacent),
so the programs sharing an activation tile run together and read it from DRAM once.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from ...._utils import conv_output_size, memory_format
from .batchnorm import sum_partials
from .configs import (INTERPRETED, conv_block_m, conv_configs, current_target, m_bucket, prune_gemm_configs,
                      prune_wgrad_configs, sm_count, wgrad_configs)
from .launch import (INT32_LIMIT, as_index, cdiv, int64_forced, launch, needs_int64, next_power_of_2, plan_cache,
                     plan_key)

# Channels (of the GEMM's K side) below which K blocks span a whole filter row (FLAT).
FLAT_BELOW = 16
# Largest FLAT K block (KW_PAD * C_PAD); wider filter rows take the per-tap loop.
FLAT_MAX_BLOCK = 256


@triton.jit
def _dot(a, b, acc, ALLOW_TF32: tl.constexpr):
    if ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _tile_ids(N_COLS, BLOCK_N: tl.constexpr, INDEX_64: tl.constexpr):
    """(m tile, n tile, group) of this program; n tiles of one m tile are adjacent ids."""
    pid = as_index(tl.program_id(0), INDEX_64)
    num_n = tl.cdiv(N_COLS, BLOCK_N)
    pid_m = pid // num_n
    return pid_m, pid - pid_m * num_n, as_index(tl.program_id(2), INDEX_64)


@triton.jit
def _pixel_rows(pid_m, M, HW, W, BLOCK_M: tl.constexpr):
    """The GEMM rows of tile pid_m: flat pixel indices, their mask, and (n, h*W+w, h, w)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_idx = offs_m // HW
    hw = offs_m - n_idx * HW
    h = hw // W
    return offs_m, offs_m < M, n_idx, hw, h, hw - h * W


@triton.jit
def _next_tap(c0, kh, kw, C, KW, KW_FIRST, STEP_H, STEP_W, BLOCK_K: tl.constexpr):
    """Advance (channel block, kw, kh), channel block fastest. Taps step by (STEP_H, STEP_W) and
    a filter row starts at KW_FIRST: steps of 1 from 0, except in the phased dgrad."""
    c0 += BLOCK_K
    wrap_c = c0 >= C
    c0 = tl.where(wrap_c, 0, c0)
    kw = tl.where(wrap_c, kw + STEP_W, kw)
    wrap_w = kw >= KW
    kw = tl.where(wrap_w, KW_FIRST, kw)
    kh = tl.where(wrap_w, kh + STEP_H, kh)
    return c0, kh, kw


@triton.jit
def _bn_act_prologue(a, a_ok, ch, c_ok, mean_ptr, var_ptr, w_ptr, b_ptr, eps, RELU: tl.constexpr):
    """The previous unit's BatchNorm + ReLU on an input tile, as batchnorm._bn_apply_kernel
    computes it ((z - mean) * (w * rsqrt(var + eps)) + b in float32, rounded to the input
    dtype), then zero where the tile reads padding or out-of-range channels: padding is zero
    after the transform, as it is in the materialized activation."""
    mean = tl.load(mean_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + ch, mask=c_ok, other=1.0).to(tl.float32)
    scale = tl.load(w_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) * tl.rsqrt(var + eps)
    shift = tl.load(b_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
    y = (a.to(tl.float32) - mean[None, :]) * scale[None, :] + shift[None, :]
    if RELU:
        y = tl.where(y <= 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    return tl.where(a_ok, y.to(a.dtype), 0.0).to(a.dtype)


@triton.jit
def _dense_nhwc(C, H, W, INDEX_64: tl.constexpr):
    """Element strides (n, h, w) of a dense NHWC tensor of C channels and H x W pixels (its
    channel stride is 1). A weight [C_out, C_in_g, KH, KW] in channels_last is one of C_in_g
    channels and KH x KW pixels; flattened (h, w) pixels are H = 1, W = H * W."""
    if INDEX_64:  # one image may pass 2**31 elements
        C = tl.cast(C, tl.int64)
    return H * W * C, W * C, C


# What every conv kernel's autotune key holds besides its own flags: the GEMM's shape (M bucketed
# to a power of two, so the cache stays bounded) and what else changes a config's speed (the
# geometry's strides and dilation, TF32 against exact float32, 64-bit index math).
_TUNE_KEY = ["M_BUCKET", "C_OUT_G", "C_IN_G", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "ALLOW_TF32",
             "INDEX_64"]


@triton.autotune(configs=conv_configs(), key=_TUNE_KEY + ["EPILOGUE", "RELU", "TMA", "PROLOGUE", "IN_RELU"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs("C_OUT_G", "C_IN_G", "x_ptr")})
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, out_ptr,
    scale_ptr, shift_ptr, res_ptr, pmean_ptr, pm2_ptr,  # None where absent
    in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,  # the BnPrologue; None without PROLOGUE
    M, M_BUCKET, HWO, WO, H, W, C_IN, C_IN_G, C_OUT, C_OUT_G, KH, KW, PAD_H, PAD_W,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    EPILOGUE: tl.constexpr, RELU: tl.constexpr,
    FLAT: tl.constexpr, C_PAD: tl.constexpr, KW_PAD: tl.constexpr, TMA: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """x [N, C_IN, H, W], w [C_OUT, C_IN_G, KH, KW], out (and the residual) [N, C_OUT, HO, WO],
    all dense NHWC; HWO = HO * WO, M = N * HWO."""
    pid_m, pid_n, grp = _tile_ids(C_OUT_G, BLOCK_N, INDEX_64)
    sxn, sxh, sxw = _dense_nhwc(C_IN, H, W, INDEX_64)
    swo, swh, sww = _dense_nhwc(C_IN_G, KH, KW, INDEX_64)
    son, _, sohw = _dense_nhwc(C_OUT, 1, HWO, INDEX_64)
    offs_m, m_mask, n_idx, hw, ho, wo = _pixel_rows(pid_m, M, HWO, WO, BLOCK_M)
    h0 = ho * STRIDE_H - PAD_H
    w0 = wo * STRIDE_W - PAD_W
    x_rows = x_ptr + grp * C_IN_G + n_idx * sxn + h0 * sxh + w0 * sxw  # tap (0, 0), channel 0

    offs_co_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_mask = offs_co_g < C_OUT_G
    offs_co = grp * C_OUT_G + offs_co_g
    w_cols = w_ptr + offs_co * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # A 1x1, stride-1, unpadded conv on dense NHWC is the GEMM x[M, C_in] @ w[C_out, C_in]^T:
        # both tiles arrive by TMA, out-of-bounds rows and channels zero-filled by the copy.
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, C_IN_G], strides=[sxw, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C_OUT, C_IN_G], strides=[swo, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
        # Descriptor offsets must be int32 (Triton rejects int64 ones); the launcher takes this
        # path only while M < 2**31, so the tile origins fit even under INDEX_64.
        m0 = (pid_m * BLOCK_M).to(tl.int32)
        n0 = (pid_n * BLOCK_N).to(tl.int32)
        for k0 in range(0, C_IN_G, BLOCK_K):
            a = x_desc.load([m0, k0])
            b = w_desc.load([n0, k0])
            acc = _dot(a, b.T, acc, ALLOW_TF32)
    elif FLAT:
        # K block = one filter row (kw, c), padded to (KW_PAD, C_PAD); the loop runs over kh.
        offs_f = tl.arange(0, KW_PAD * C_PAD)
        kw_f = offs_f // C_PAD
        c_f = offs_f % C_PAD
        f_ok = (kw_f < KW) & (c_f < C_IN_G)
        x_cols = kw_f * (DIL_W * sxw) + c_f
        w_f = w0[:, None] + (kw_f * DIL_W)[None, :]
        row_ok = m_mask[:, None] & f_ok[None, :] & (w_f >= 0) & (w_f < W)
        w_k = kw_f * sww + c_f
        for kh in range(KH):
            h = h0 + kh * DIL_H
            ok = row_ok & ((h >= 0) & (h < H))[:, None]
            a = tl.load(x_rows[:, None] + kh * (DIL_H * sxh) + x_cols[None, :], mask=ok, other=0.0)
            b = tl.load(w_cols[None, :] + kh * swh + w_k[:, None], mask=f_ok[:, None] & co_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        zero = grp * 0
        c0, kh, kw = zero, zero, zero
        for _ in range(KH * KW * tl.cdiv(C_IN_G, BLOCK_K)):
            h = h0 + kh * DIL_H
            w = w0 + kw * DIL_W
            ok = m_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            offs_c = c0 + offs_k
            c_ok = offs_c < C_IN_G
            a_ok = ok[:, None] & c_ok[None, :]
            a = tl.load(x_rows[:, None] + (kh * (DIL_H * sxh) + kw * (DIL_W * sxw)) + offs_c[None, :],
                        mask=a_ok, other=0.0)
            if PROLOGUE:
                a = _bn_act_prologue(a, a_ok, grp * C_IN_G + offs_c, c_ok, in_mean_ptr, in_var_ptr, in_w_ptr,
                                     in_b_ptr, in_eps, IN_RELU)
            b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + offs_c[:, None],
                        mask=c_ok[:, None] & co_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
            c0, kh, kw = _next_tap(c0, kh, kw, C_IN_G, KW, 0, 1, 1, BLOCK_K)

    out_dtype = out_ptr.dtype.element_ty
    out_offs = (n_idx * son + hw * sohw)[:, None] + offs_co[None, :]  # the residual's too: same layout
    mask2 = m_mask[:, None] & co_mask[None, :]
    if EPILOGUE == 0:
        scale = tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)
        y = acc * scale[None, :] + shift[None, :]
        if res_ptr is not None:
            y += tl.load(res_ptr + out_offs, mask=mask2, other=0.0).to(tl.float32)
        if RELU:
            y = tl.where(y <= 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
        tl.store(out_ptr + out_offs, y.to(out_dtype), mask=mask2)
    else:
        z = acc
        if shift_ptr is not None:  # the conv bias
            z += tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[None, :]
        z_out = z.to(out_dtype)
        tl.store(out_ptr + out_offs, z_out, mask=mask2)
        # Statistics of the stored (rounded) z, as the reference computes them.
        zr = tl.where(mask2, z_out.to(tl.float32), 0.0)
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean = tl.sum(zr, axis=0) / cnt
        d = tl.where(mask2, zr - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        p_offs = pid_m * C_OUT + offs_co
        tl.store(pmean_ptr + p_offs, mean, mask=co_mask)
        tl.store(pm2_ptr + p_offs, m2, mask=co_mask)


class BnPrologue(NamedTuple):
    """The previous unit's BatchNorm + ReLU, applied to a conv operand as the kernel loads it
    (the recompute chain): that unit's per-channel statistics and affine parameters (dense
    1-D tensors), its eps, and whether a ReLU follows."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    relu: bool


_NO_BN = {"in_mean_ptr": None, "in_var_ptr": None, "in_w_ptr": None, "in_b_ptr": None, "in_eps": None}


def _bn_args(bn: BnPrologue | None) -> dict:
    """A BnPrologue as the kernels' in_* arguments (None: absent, each a constexpr None); the
    PROLOGUE and IN_RELU flags are the launch plan's."""
    if bn is None:
        return _NO_BN
    return {"in_mean_ptr": bn.mean, "in_var_ptr": bn.var, "in_w_ptr": bn.weight, "in_b_ptr": bn.bias,
            "in_eps": bn.eps}


def _nhwc(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as dense channels_last: itself when it already is, else a copy."""
    if t is None or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _is_nhwc(layout: tuple | None) -> bool:
    """Whether a tensor of this layout (plan_key's) is dense channels_last (None: absent, so yes)."""
    return layout is None or _meta(layout).is_contiguous(memory_format=torch.channels_last)


def _meta(layout: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A meta tensor of a layout's sizes and strides, to ask torch's layout questions once per plan."""
    shape, strides, _ = layout
    return torch.empty_strided(shape, strides, dtype=dtype, device="meta")


def _nhwc_meta(size, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(size, dtype=dtype, device="meta", memory_format=torch.channels_last)


def allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


# Device-side TMA descriptors (the 1x1 forward's) need triton >= 3.4.
TMA_AVAILABLE = hasattr(tl, "make_tensor_descriptor")


def tma_enabled() -> bool:
    """Whether a 1x1 forward may load through TMA descriptors: RESNET_FUSED_TRITON_TMA=0 turns
    them off (read per call, by the launches it concerns)."""
    return os.environ.get("RESNET_FUSED_TRITON_TMA", "1") != "0"


def launch_mode(dtype: torch.dtype) -> tuple:
    """The process-wide switches a launch plan depends on besides its tensors (each may change
    between calls: tests flip them): TF32 (read for float32 only), forced int64, the gate's
    target. TMA's switch is read per call by the launches it concerns."""
    return allow_tf32(dtype), int64_forced(), current_target()


def _flat(channels: int, kw: int) -> tuple[bool, int, int]:
    """(FLAT, C_PAD, KW_PAD) for a K side of `channels` per tap and filter rows of kw taps."""
    c_pad, kw_pad = next_power_of_2(channels), next_power_of_2(kw)
    c_pad = max(c_pad, cdiv(16, kw_pad))  # tl.dot needs K >= 16
    flat = channels < FLAT_BELOW and kw_pad * c_pad <= FLAT_MAX_BLOCK
    return flat, c_pad, kw_pad


def _tma_aligned(storage_offset: int, rows_stride: int, itemsize: int) -> bool:
    """A TMA descriptor's base and row stride must be 16-byte multiples (the allocator's
    blocks are 512-byte aligned, so the storage offset decides)."""
    return (storage_offset * itemsize) % 16 == 0 and (rows_stride * itemsize) % 16 == 0


def use_tma_1x1(x_layout: tuple, w_layout: tuple, itemsize: int, stride, padding, groups) -> bool:
    """Whether the forward runs as a TMA-fed GEMM: a 1x1, stride-1, unpadded, ungrouped conv on
    dense NHWC input, channels contiguous in the weight, every address 16-byte aligned (the
    layouts are plan_key's of the tensors the kernel reads; tma_enabled() is the caller's)."""
    (n, c_in, h, w), x_strides, x_offset = x_layout
    w_shape, w_strides, w_offset = w_layout
    if tuple(w_shape[2:]) != (1, 1) or list(stride) != [1, 1] or list(padding) != [0, 0] or groups != 1:
        return False
    dense_nhwc = tuple(x_strides) == (h * w * c_in, 1, w * c_in, c_in)
    # A descriptor's tile offsets are int32: its rows (output pixels) must stay below 2**31.
    return (dense_nhwc and n * h * w < INT32_LIMIT and w_strides[1] == 1 and _tma_aligned(x_offset, c_in, itemsize)
            and _tma_aligned(w_offset, w_strides[0], itemsize))


def torch_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Triton's global scratch from torch's caching allocator, on the current device (the op's
    device: the backend's device guard) and its current stream (where Triton launches)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _install_scratch_allocator() -> bool:
    """Device-side TMA descriptors live in global scratch that Triton asks an allocator for at
    every launch, read from a ContextVar whose default raises. Setting it per call in the
    launcher would not reach compiled graphs (inductor's cached launcher runs the kernel without
    our launcher) nor other threads (a thread starts with the default), so make torch's
    allocator the ContextVar's default, once, at import. An allocator set with
    triton.set_allocator still wins where it was set. Returns False where this Triton keeps its
    allocator otherwise; launches then set it per thread (_ensure_allocator)."""
    import contextvars

    try:
        from triton.runtime import _allocation
    except ImportError:
        return False
    var = getattr(_allocation, "_allocator", None)
    null = getattr(_allocation, "NullAllocator", None)
    if not isinstance(var, contextvars.ContextVar) or null is None:
        return False
    current = var.get()
    default = torch_scratch if isinstance(current, null) else current
    _allocation._allocator = contextvars.ContextVar(var.name, default=default)
    return True


_SCRATCH_ALLOCATOR_INSTALLED = _install_scratch_allocator()


def _ensure_allocator() -> None:
    """Where the default could not be installed: set torch's allocator for this thread."""
    if _SCRATCH_ALLOCATOR_INSTALLED or INTERPRETED:
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(torch_scratch)


@dataclasses.dataclass(frozen=True)
class _ForwardPlan:
    """What conv_forward decides once per plan key: copies, the output, the grid and the
    kernel's scalar and constexpr arguments."""

    copy_x: bool            # x is not dense NHWC: the kernel reads a channels_last copy
    copy_w: bool
    copy_res: bool
    out_size: tuple         # [N, C_out, HO, WO]
    out_format: torch.memory_format  # x's (_utils.memory_format)
    out_buffer: bool        # out is not dense NHWC: the kernel writes a channels_last buffer copied to it
    stat_tiles: int         # rows of the training statistics partials
    grid: Any
    args: dict              # the pointer-load kernel's
    tma_args: dict | None   # the TMA-descriptor kernel's, where the conv is one (use_tma_1x1)


@plan_cache
def _forward_plan(x_layout, w_layout, res_layout, dtype, device, geometry, flags, mode) -> _ForwardPlan:
    stride, padding, dilation, groups = geometry[0:2], geometry[2:4], geometry[4:6], geometry[6]
    train, relu, prologue_relu = flags
    prologue = prologue_relu is not None
    tf32 = mode[0]
    n, _, h, w = x_layout[0]
    c_out, c_in_g, kh, kw = w_layout[0]
    copy_x, copy_w = not _is_nhwc(x_layout), not _is_nhwc(w_layout)
    size = tuple(conv_output_size(list(x_layout[0]), list(w_layout[0]), stride, padding, dilation))
    _, _, ho, wo = size
    m = n * ho * wo
    c_out_g = c_out // groups
    block_m = conv_block_m()
    flat, c_pad, kw_pad = _flat(c_in_g, kw)
    itemsize = _meta(x_layout, dtype).element_size()
    # The layouts of what the kernel reads: a copy is dense NHWC from offset 0.
    x_read = (x_layout[0], _nhwc_meta(x_layout[0], dtype).stride(), 0) if copy_x else x_layout
    w_read = (w_layout[0], _nhwc_meta(w_layout[0], dtype).stride(), 0) if copy_w else w_layout
    tma = not prologue and TMA_AVAILABLE and use_tma_1x1(x_read, w_read, itemsize, stride, padding, groups)
    tiles_m = cdiv(m, block_m)
    out_format = memory_format(_meta(x_layout, dtype))
    out_buffer = not torch.empty(size, device="meta", memory_format=out_format).is_contiguous(
        memory_format=torch.channels_last)
    index_64 = needs_int64(_nhwc_meta(x_layout[0], dtype), _nhwc_meta(size, dtype))
    args = dict(
        M=m, M_BUCKET=m_bucket(m), HWO=ho * wo, WO=wo, H=h, W=w, C_IN=c_in_g * groups, C_IN_G=c_in_g, C_OUT=c_out,
        C_OUT_G=c_out_g, KH=kh, KW=kw, PAD_H=padding[0], PAD_W=padding[1],
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        EPILOGUE=1 if train else 0, RELU=relu, FLAT=flat and not prologue, C_PAD=c_pad, KW_PAD=kw_pad,
        TMA=False, PROLOGUE=prologue, IN_RELU=bool(prologue_relu), ALLOW_TF32=tf32,
        INDEX_64=index_64, BLOCK_M=block_m,
    )
    return _ForwardPlan(
        copy_x=copy_x, copy_w=copy_w, copy_res=not _is_nhwc(res_layout), out_size=size, out_format=out_format,
        out_buffer=out_buffer,
        stat_tiles=tiles_m, grid=lambda meta: (tiles_m * cdiv(c_out_g, meta["BLOCK_N"]), 1, groups),
        args=args, tma_args={**args, "FLAT": False, "TMA": True} if tma else None,
    )


def conv_forward(x, weight, stride, padding, dilation, groups, *, scale=None, shift=None, residual=None,
                 relu=False, stats=False, prologue: BnPrologue | None = None):
    """The fused forward. Eval (scale and shift given): returns y = act(conv * scale + shift
    (+ residual)). stats=True (training): returns (z, pmean, pm2), z = conv (+ shift, the conv
    bias, when given) and the per-tile (mean, M2) partials [cdiv(M, conv_block_m()), C_out] of
    the stored z. The output takes x's layout (_utils.memory_format). prologue: the previous
    unit's BatchNorm + ReLU, applied to x as it is loaded (x is then that unit's z): the pointer
    path (no TMA, no FLAT K blocks)."""
    dtype, device = x.dtype, x.device
    plan = _forward_plan(plan_key(x), plan_key(weight), plan_key(residual), dtype, device,
                         (*stride, *padding, *dilation, groups),
                         (stats, relu, None if prologue is None else prologue.relu), launch_mode(dtype))
    if plan.copy_x:
        x = x.contiguous(memory_format=torch.channels_last)
    if plan.copy_w:
        weight = weight.contiguous(memory_format=torch.channels_last)
    if plan.copy_res:
        residual = residual.contiguous(memory_format=torch.channels_last)
    args = plan.args
    if plan.tma_args is not None and tma_enabled():
        args = plan.tma_args
        _ensure_allocator()
    out = torch.empty(plan.out_size, dtype=dtype, device=device, memory_format=plan.out_format)
    written = out
    if plan.out_buffer:
        written = torch.empty(plan.out_size, dtype=dtype, device=device, memory_format=torch.channels_last)
    pmean = pm2 = None
    if stats:
        pmean = torch.empty((plan.stat_tiles, plan.out_size[1]), dtype=torch.float32, device=device)
        pm2 = torch.empty((plan.stat_tiles, plan.out_size[1]), dtype=torch.float32, device=device)
    launch(_conv_fwd_kernel, plan.grid, x_ptr=x, w_ptr=weight, out_ptr=written, scale_ptr=scale, shift_ptr=shift,
           res_ptr=residual, pmean_ptr=pmean, pm2_ptr=pm2, **_bn_args(prologue), **args)
    if written is not out:
        out.copy_(written)
    return (out, pmean, pm2) if stats else out


# ---------------------------------------------------------------------------------------
# dgrad: grad_x[n, ci, h, w] = sum over (co, kh, kw) of dz[n, co, ho, wo] * w[co, ci, kh, kw]
# where h = ho * s - p + kh * d. GEMM rows = input pixels, columns = input channels of the group,
# K = (kh, kw, output channel); taps whose (h + p - kh * d) is not a multiple of s are masked.
# With the BN scale (eval backward), the launcher folds it into a scaled copy of the weight
# (rounded to its dtype, as a per-K-step scaling of the weight tile would be).


@triton.autotune(configs=conv_configs(), key=_TUNE_KEY + ["RELU_MASK", "BN_SUMS"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs("C_IN_G", "C_OUT_G", "dz_ptr")})
@triton.jit
def _conv_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    z_ptr, in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,  # (z, BnPrologue) of bn_input; else None
    psum_ptr, PS_T,  # BN_SUMS' partials [2, PS_T, C_IN]; else None
    M, M_BUCKET, HW, W, HO, WO, C_IN, C_IN_G, C_OUT, C_OUT_G, KH, KW, PAD_H, PAD_W,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    FLAT: tl.constexpr, C_PAD: tl.constexpr, KW_PAD: tl.constexpr, PHASED: tl.constexpr, RELU_MASK: tl.constexpr,
    BN_SUMS: tl.constexpr, ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz [N, C_OUT, HO, WO], w [C_OUT, C_IN_G, KH, KW], dx and z [N, C_IN, H, W], all dense
    NHWC; HW = H * W, M = N * HW."""
    pid_m, pid_n, grp = _tile_ids(C_IN_G, BLOCK_N, INDEX_64)
    sdn, sdh, sdw = _dense_nhwc(C_OUT, HO, WO, INDEX_64)
    swo, swh, sww = _dense_nhwc(C_IN_G, KH, KW, INDEX_64)
    sxn, _, sxhw = _dense_nhwc(C_IN, 1, HW, INDEX_64)
    if PHASED:
        # Grid axis 1 is the phase (h % STRIDE_H, w % STRIDE_W) of the rows; a phase's pixels
        # meet dz only through the taps kh = kh_first + i * STRIDE_H (likewise kw), so the K
        # loop runs over those taps alone and needs no divisibility masks.
        phase = as_index(tl.program_id(1), INDEX_64)
        ph = phase // STRIDE_W
        pw = phase - ph * STRIDE_W
        rows_h = (HW // W - ph + STRIDE_H - 1) // STRIDE_H
        rows_w = (W - pw + STRIDE_W - 1) // STRIDE_W
        offs_m, m_mask, n_idx, _, i, j = _pixel_rows(pid_m, (M // HW) * rows_h * rows_w, rows_h * rows_w, rows_w,
                                                     BLOCK_M)
        h = ph + i * STRIDE_H
        w = pw + j * STRIDE_W
        hw = h * W + w
        kh_first = (ph + PAD_H) % STRIDE_H
        kw_first = (pw + PAD_W) % STRIDE_W
        taps = ((KH - kh_first + STRIDE_H - 1) // STRIDE_H) * ((KW - kw_first + STRIDE_W - 1) // STRIDE_W)
        tile = phase * (PS_T // (STRIDE_H * STRIDE_W)) + pid_m
        step_h = STRIDE_H
        step_w = STRIDE_W
    else:
        offs_m, m_mask, n_idx, hw, h, w = _pixel_rows(pid_m, M, HW, W, BLOCK_M)
        kh_first = 0
        kw_first = 0
        taps = KH * KW
        tile = pid_m
        step_h = 1
        step_w = 1
    th0 = h + PAD_H  # ho * STRIDE_H = th0 - kh * DIL_H
    tw0 = w + PAD_W
    dz_rows = dz_ptr + grp * C_OUT_G + n_idx * sdn

    offs_ci_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = offs_ci_g < C_IN_G
    w_cols = w_ptr + grp * C_OUT_G * swo + offs_ci_g

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FLAT:
        # K block = one filter row (kw, co) padded to (KW_PAD, C_PAD); the loop runs over kh.
        offs_f = tl.arange(0, KW_PAD * C_PAD)
        kw_f = offs_f // C_PAD
        co_f = offs_f % C_PAD
        f_ok = (kw_f < KW) & (co_f < C_OUT_G)
        tw = tw0[:, None] - (kw_f * DIL_W)[None, :]
        wo = tw // STRIDE_W
        col_ok = m_mask[:, None] & f_ok[None, :] & (tw >= 0) & (tw - wo * STRIDE_W == 0) & (wo < WO)
        col_offs = wo * sdw + co_f[None, :]
        w_k = co_f * swo + kw_f * sww
        for kh in range(KH):
            th = th0 - kh * DIL_H
            ho = th // STRIDE_H
            h_ok = (th >= 0) & (th - ho * STRIDE_H == 0) & (ho < HO)
            a = tl.load(dz_rows[:, None] + (ho * sdh)[:, None] + col_offs, mask=col_ok & h_ok[:, None], other=0.0)
            b = tl.load(w_cols[None, :] + kh * swh + w_k[:, None], mask=f_ok[:, None] & ci_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        zero = grp * 0
        c0, kh, kw = zero, zero + kh_first, zero + kw_first
        for _ in range(taps * tl.cdiv(C_OUT_G, BLOCK_K)):
            th = th0 - kh * DIL_H
            tw = tw0 - kw * DIL_W
            ho = th // STRIDE_H
            wo = tw // STRIDE_W
            ok = m_mask & (th >= 0) & (ho < HO) & (tw >= 0) & (wo < WO)
            if not PHASED:
                ok = ok & (th - ho * STRIDE_H == 0) & (tw - wo * STRIDE_W == 0)
            offs_co_g = c0 + offs_k
            co_ok = offs_co_g < C_OUT_G
            a = tl.load(dz_rows[:, None] + (ho * sdh + wo * sdw)[:, None] + offs_co_g[None, :],
                        mask=ok[:, None] & co_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + offs_co_g[:, None] * swo,
                        mask=co_ok[:, None] & ci_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
            c0, kh, kw = _next_tap(c0, kh, kw, C_OUT_G, KW, kw_first, step_h, step_w, BLOCK_K)

    offs_ci = grp * C_IN_G + offs_ci_g
    out_offs = (n_idx * sxn + hw * sxhw)[:, None] + offs_ci[None, :]  # z's too: same layout
    out_mask = m_mask[:, None] & ci_mask[None, :]
    if RELU_MASK or BN_SUMS:
        z = tl.load(z_ptr + out_offs, mask=out_mask, other=0.0)
    if RELU_MASK:
        # The recompute chain's backward: grad_x is the gradient of y_in = relu(bn(z)); the ReLU
        # stops it where bn(z) <= 0 (a NaN passes, as threshold_backward); bn(z) is recomputed
        # here from z as the forward's prologue computed it.
        y = _bn_act_prologue(z, out_mask, offs_ci, ci_mask, in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,
                             False)
        acc = tl.where(y <= 0.0, 0.0, acc)
    g = acc.to(dx_ptr.dtype.element_ty)
    tl.store(dx_ptr + out_offs, g, mask=out_mask)
    if BN_SUMS:
        # BatchNorm backward's two per-channel sums over this tile's rows, where g and z already
        # sit in registers: sum g and sum g * (z - mean) of the stored (rounded) g, into
        # per-(tile, channel) partials [2, PS_T, C_IN] summed in tile order by the launcher.
        mean = tl.load(in_mean_ptr + offs_ci, mask=ci_mask, other=0.0).to(tl.float32)
        gf = tl.where(out_mask, g.to(tl.float32), 0.0)
        zc = tl.where(out_mask, z.to(tl.float32) - mean[None, :], 0.0)
        p_offs = tile * C_IN + offs_ci
        tl.store(psum_ptr + p_offs, tl.sum(gf, axis=0), mask=ci_mask)
        tl.store(psum_ptr + PS_T * C_IN + p_offs, tl.sum(gf * zc, axis=0), mask=ci_mask)


def dgrad_phased(stride, dilation, flat: bool) -> bool:
    """Whether dgrad runs per output phase: strided, undilated (a dilated tap's phase is not
    kh mod stride), and not FLAT (whose K block is a whole filter row)."""
    return (stride[0] > 1 or stride[1] > 1) and list(dilation) == [1, 1] and not flat


class BnInput(NamedTuple):
    """The recompute chain's conv input act(bn(z)), never written: z (the previous unit's
    pre-BatchNorm output) and that unit's BatchNorm + ReLU."""

    z: torch.Tensor
    bn: BnPrologue


@dataclasses.dataclass(frozen=True)
class _DgradPlan:
    copy_dz: bool
    copy_w: bool
    copy_z: bool
    buffer: bool            # grad_x is not dense NHWC: the kernel writes a channels_last buffer copied to it
    sum_tiles: int          # PS_T: rows of the BatchNorm sums' partials (all phases' tiles)
    grid: Any
    args: dict


@plan_cache
def _dgrad_plan(dz_layout, w_layout, gx_layout, z_layout, dtype, device, geometry, flags, mode) -> _DgradPlan:
    stride, padding, dilation, groups = geometry[0:2], geometry[2:4], geometry[4:6], geometry[6]
    relu_mask, bn_sums = flags
    n, c_in, h, w = gx_layout[0]
    c_out, c_in_g, kh, kw = w_layout[0]
    _, _, ho, wo = dz_layout[0]
    m = n * h * w
    c_out_g = c_out // groups
    block_m = conv_block_m()
    flat, c_pad, kw_pad = _flat(c_out_g, kw)
    # A strided conv's dgrad runs per phase (h % stride, w % stride): 3x3/2 reads 1-4 taps of 9
    # per pixel, 1x1/2 one or none, where one pass over all pixels masks 3/4 of its tap loads.
    phased = dgrad_phased(stride, dilation, flat)
    phases = stride[0] * stride[1] if phased else 1
    rows = n * cdiv(h, stride[0]) * cdiv(w, stride[1]) if phased else m  # the largest phase's
    tiles = cdiv(rows, block_m)
    args = dict(
        PS_T=phases * tiles, M=m, M_BUCKET=m_bucket(rows), HW=h * w, W=w, HO=ho, WO=wo, C_IN=c_in, C_IN_G=c_in_g,
        C_OUT=c_out, C_OUT_G=c_out_g, KH=kh, KW=kw, PAD_H=padding[0], PAD_W=padding[1],
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        FLAT=flat, C_PAD=c_pad, KW_PAD=kw_pad, PHASED=phased, RELU_MASK=relu_mask, BN_SUMS=bn_sums,
        ALLOW_TF32=mode[0],
        INDEX_64=needs_int64(_nhwc_meta(dz_layout[0], dtype), _nhwc_meta(gx_layout[0], dtype)), BLOCK_M=block_m,
    )
    return _DgradPlan(
        copy_dz=not _is_nhwc(dz_layout), copy_w=not _is_nhwc(w_layout), copy_z=not _is_nhwc(z_layout),
        buffer=not _is_nhwc(gx_layout), sum_tiles=phases * tiles,
        grid=lambda meta: (tiles * cdiv(c_in_g, meta["BLOCK_N"]), phases, groups), args=args,
    )


def conv_dgrad(dz, weight, grad_x, scale, stride, padding, dilation, groups, *, bn_input: BnInput | None = None,
               bn_sums=None):
    """grad_x = conv_transpose(dz, weight * scale[co]) into the preallocated grad_x.
    bn_input: the conv's input was act(bn(z)) (the recompute chain's backward): with the ReLU,
    grad_x is zeroed where that input was not positive, the mask recomputed in the epilogue
    from z. bn_sums: a [2, C_in] contiguous float32 tensor that receives sum(grad_x) and
    sum(grad_x * (z - mean)) per channel (of the stored grad_x; needs bn_input), BatchNorm
    backward's reductions."""
    dtype = dz.dtype
    z = bn_input.z if bn_input is not None else None
    plan = _dgrad_plan(plan_key(dz), plan_key(weight), plan_key(grad_x), plan_key(z), dtype, dz.device,
                       (*stride, *padding, *dilation, groups),
                       (bn_input is not None and bn_input.bn.relu, bn_sums is not None), launch_mode(dtype))
    if plan.copy_dz:
        dz = dz.contiguous(memory_format=torch.channels_last)
    if scale is not None:  # folded into a scaled copy of the weight (rounded to its dtype)
        weight = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(weight.dtype)
        weight = _nhwc(weight)
    elif plan.copy_w:
        weight = weight.contiguous(memory_format=torch.channels_last)
    if plan.copy_z:
        z = z.contiguous(memory_format=torch.channels_last)
    written = grad_x
    if plan.buffer:
        written = torch.empty(grad_x.shape, dtype=grad_x.dtype, device=grad_x.device, memory_format=torch.channels_last)
    psum = None
    if bn_sums is not None:
        psum = torch.empty((2, plan.sum_tiles, grad_x.size(1)), dtype=torch.float32, device=dz.device)
    bn = _bn_args(bn_input.bn) if bn_input is not None else _NO_BN
    launch(_conv_dgrad_kernel, plan.grid, dz_ptr=dz, w_ptr=weight, dx_ptr=written, z_ptr=z, **bn, psum_ptr=psum,
           **plan.args)
    if written is not grad_x:
        grad_x.copy_(written)
    if bn_sums is not None:
        sum_partials(psum, out=bn_sums)


# ---------------------------------------------------------------------------------------
# wgrad: grad_w[co, ci, kh, kw] = sum over output pixels of dz[n, co, ho, wo] * x[n, ci, h, w].
# GEMM rows = output channels of the group, columns = input channels of the group, K = output
# pixels, split SPLIT ways (grid axis 2) into float32 partials [SPLIT, C_out, C_in_g, KH, KW]
# that wgrad_finalize sums in a fixed order (deterministic, no atomics).


@triton.autotune(configs=wgrad_configs(), key=_TUNE_KEY + ["PROLOGUE", "IN_RELU"],
                 prune_configs_by={"early_config_prune": prune_wgrad_configs})
@triton.jit
def _conv_wgrad_kernel(
    dz_ptr, x_ptr, part_ptr,
    in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,  # the BnPrologue; None without PROLOGUE
    M, M_BUCKET, HWO, WO, H, W, C_IN, C_IN_G, C_OUT, C_OUT_G, KH, KW, M_PER_SPLIT, PAD_H, PAD_W,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    FLAT_N: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dz [N, C_OUT, HO, WO] and x [N, C_IN, H, W], dense NHWC; HWO = HO * WO, M = N * HWO.
    FLAT_N: the columns are (ci, kh, kw) flattened (few input channels: the stem) and grid
    axis 1 is the group; otherwise columns are input channels and axis 1 is (group, tap)."""
    sdn, _, sdhw = _dense_nhwc(C_OUT, 1, HWO, INDEX_64)
    sxn, sxh, sxw = _dense_nhwc(C_IN, H, W, INDEX_64)
    pid_mn = as_index(tl.program_id(0), INDEX_64)
    axis1 = as_index(tl.program_id(1), INDEX_64)
    split = as_index(tl.program_id(2), INDEX_64)
    KHW = KH * KW
    if FLAT_N:
        N_COLS = C_IN_G * KHW
        grp = axis1
    else:
        N_COLS = C_IN_G
        grp = axis1 // KHW
        tap = axis1 % KHW
        kh = tap // KW
        kw = tap % KW
    num_n = tl.cdiv(N_COLS, BLOCK_N)
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n

    offs_co_g = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co_mask = offs_co_g < C_OUT_G
    offs_co = grp * C_OUT_G + offs_co_g
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = offs_j < N_COLS
    if FLAT_N:
        ci_g = offs_j // KHW
        kh_j = (offs_j % KHW) // KW
        kw_j = offs_j % KW
    else:
        ci_g = offs_j
    offs_ci = grp * C_IN_G + ci_g

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * M_PER_SPLIT
    k_end = tl.minimum(k_start + M_PER_SPLIT, M)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        n_idx = offs_k // HWO
        hw = offs_k % HWO
        ho = hw // WO
        wo = hw % WO
        a = tl.load(dz_ptr + offs_co[:, None] + (n_idx * sdn + hw * sdhw)[None, :],
                    mask=co_mask[:, None] & k_ok[None, :], other=0.0)
        if FLAT_N:
            h = ho[:, None] * STRIDE_H - PAD_H + (kh_j * DIL_H)[None, :]
            w = wo[:, None] * STRIDE_W - PAD_W + (kw_j * DIL_W)[None, :]
            x_ok = k_ok[:, None] & j_mask[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b = tl.load(x_ptr + (n_idx * sxn)[:, None] + h * sxh + w * sxw + offs_ci[None, :],
                        mask=x_ok, other=0.0)
        else:
            h = ho * STRIDE_H - PAD_H + kh * DIL_H
            w = wo * STRIDE_W - PAD_W + kw * DIL_W
            x_ok = k_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_ok = x_ok[:, None] & j_mask[None, :]
            b = tl.load(x_ptr + (n_idx * sxn + h * sxh + w * sxw)[:, None] + offs_ci[None, :],
                        mask=b_ok, other=0.0)
            if PROLOGUE:  # x is the previous unit's z: its BatchNorm + ReLU, as the forward applied them
                b = _bn_act_prologue(b, b_ok, offs_ci, j_mask, in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,
                                     IN_RELU)
        acc = _dot(a, b, acc, ALLOW_TF32)

    # partials laid out [SPLIT, C_OUT, C_IN_G, KH, KW], contiguous
    row = ((split * C_OUT + offs_co) * C_IN_G * KHW)[:, None]
    if FLAT_N:
        p_offs = row + offs_j[None, :]
    else:
        p_offs = row + (offs_j * KHW + tap)[None, :]
    tl.store(part_ptr + p_offs, acc, mask=co_mask[:, None] & j_mask[None, :])


@triton.jit
def _wgrad_finalize_kernel(
    part_ptr, w_ptr, scale_ptr, gw_ptr, gscale_part_ptr,  # None where absent (w with gscale_part)
    C_OUT, K, KHW, SPLIT,
    sgo, sgi, sgh, sgw, KW,  # grad_w's strides (any layout); None without gw_ptr
    INDEX_64: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (co block, k block) tile (grid axes 0, 1): grad_w = (sum over splits, in order) *
    scale[co]; with WRITE_GSCALE, this k block's share of grad_scale[co] = sum_k wgrad * w[co, k]
    into gscale_part[k block, co] (summed over k blocks in order by the launcher), where given.
    K = C_in_g * KH * KW flattened in (ci, kh, kw) order; w is read with the partials' layout
    contract of a contiguous weight (the caller passes weight.contiguous())."""
    offs_co = as_index(tl.program_id(0), INDEX_64) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    kb = as_index(tl.program_id(1), INDEX_64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    co_mask = offs_co < C_OUT
    mask = co_mask[:, None] & (offs_k < K)[None, :]
    flat = offs_co[:, None] * K + offs_k[None, :]
    total = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    for s in range(SPLIT):
        total += tl.load(part_ptr + s * C_OUT * K + flat, mask=mask, other=0.0)
    if gscale_part_ptr is not None:
        wv = tl.load(w_ptr + flat, mask=mask, other=0.0).to(tl.float32)
        tl.store(gscale_part_ptr + kb * C_OUT + offs_co, tl.sum(total * wv, axis=1), mask=co_mask)
    if gw_ptr is not None:
        g = total
        if scale_ptr is not None:
            g = g * tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[:, None]
        ci = offs_k // KHW
        tap = offs_k % KHW
        g_offs = offs_co[:, None] * sgo + (ci * sgi + (tap // KW) * sgh + (tap % KW) * sgw)[None, :]
        tl.store(gw_ptr + g_offs, g.to(gw_ptr.dtype.element_ty), mask=mask)


def wgrad_tiles(c_out_g: int, n_cols: int, flat: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of wgrad: the launcher's choice (not the autotuner's), so that the
    split count, which sizes the partials buffer, is computed for the real tile count.
    FLAT_N (the stem) decodes (ci, kh, kw) and gathers per element of the [BLOCK_K, BLOCK_N]
    tile: BLOCK_N 64, as 128 spills (docs/kernels.md; the gate's spill test)."""
    if INTERPRETED:
        return 64, 128
    return (128 if c_out_g >= 128 else 64), (128 if n_cols >= 128 and not flat else 64)


# Fewest output pixels one split reduces: 8 K steps of 64 (shorter ones are mostly prologue).
WGRAD_MIN_K_PER_SPLIT = 512


def wgrad_split(m: int, tiles: int, sms: int) -> int:
    """Splits of K (output pixels) so that tiles * splits fills two waves of the GPU's SMs
    (two, so the last wave's tail is half as long), each split at least WGRAD_MIN_K_PER_SPLIT."""
    want = cdiv(2 * sms, max(tiles, 1))
    return max(1, min(want, m // WGRAD_MIN_K_PER_SPLIT))


@dataclasses.dataclass(frozen=True)
class _WgradPlan:
    copy_dz: bool
    copy_x: bool
    split: int
    part_shape: tuple       # the float32 partials [SPLIT, C_out, C_in_g, KH, KW]
    grid: Any
    args: dict
    finalize_grid: tuple
    finalize_args: dict


@plan_cache
def _wgrad_plan(dz_layout, x_layout, w_shape, dtype, device, geometry, split, prologue_relu, mode) -> _WgradPlan:
    stride, padding, dilation, groups = geometry[0:2], geometry[2:4], geometry[4:6], geometry[6]
    n, c_in, h, w = x_layout[0]
    c_out, c_in_g, kh, kw = w_shape
    _, _, ho, wo = dz_layout[0]
    m = n * ho * wo
    c_out_g = c_out // groups
    prologue = prologue_relu is not None
    flat = c_in_g < FLAT_BELOW and not prologue
    n_cols = c_in_g * kh * kw if flat else c_in_g
    axis1 = groups if flat else kh * kw * groups
    block_m, block_n = wgrad_tiles(c_out_g, n_cols, flat)
    tiles = cdiv(c_out_g, block_m) * cdiv(n_cols, block_n) * axis1
    if split is None:
        split = 1 if INTERPRETED else wgrad_split(m, tiles, sm_count())
    m_per_split = cdiv(cdiv(m, split), 64) * 64  # whole K blocks per split
    split = cdiv(m, m_per_split)
    part_shape = (split, c_out, c_in_g, kh, kw)
    args = dict(
        M=m, M_BUCKET=m_bucket(m), HWO=ho * wo, WO=wo, H=h, W=w, C_IN=c_in, C_IN_G=c_in_g, C_OUT=c_out,
        C_OUT_G=c_out_g, KH=kh, KW=kw, M_PER_SPLIT=m_per_split, PAD_H=padding[0], PAD_W=padding[1],
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        FLAT_N=flat, PROLOGUE=prologue, IN_RELU=bool(prologue_relu), ALLOW_TF32=mode[0],
        INDEX_64=needs_int64(_nhwc_meta(dz_layout[0], dtype), _nhwc_meta(x_layout[0], dtype)),
        BLOCK_M=block_m, BLOCK_N=block_n,
    )
    # The finalize: one program per (16 output channels, 64 K) tile, so that even 64x64x3x3
    # (36 tiles) is not a handful of programs each summing every split.
    k = c_in_g * kh * kw
    block_co, block_k = (64, 256) if INTERPRETED else (16, 64)
    finalize_args = dict(C_OUT=c_out, K=k, KHW=kh * kw, SPLIT=split, KW=kw,
                         INDEX_64=needs_int64(torch.empty(part_shape, device="meta")), BLOCK_CO=block_co,
                         BLOCK_K=block_k)
    return _WgradPlan(
        copy_dz=not _is_nhwc(dz_layout), copy_x=not _is_nhwc(x_layout), split=split, part_shape=part_shape,
        grid=(tiles // axis1, axis1, split), args=args, finalize_grid=(cdiv(c_out, block_co), cdiv(k, block_k)),
        finalize_args=finalize_args,
    )


_NO_GRAD_W = {"gw_ptr": None, "sgo": None, "sgi": None, "sgh": None, "sgw": None}


def conv_wgrad(dz, x, weight, stride, padding, dilation, groups, *, grad_w=None, scale=None, grad_scale=None,
               split=None, prologue: BnPrologue | None = None):
    """Weight gradient of conv(x, weight) given dz; writes grad_w (= wgrad * scale[co] when scale
    is given) and grad_scale[co] = sum(wgrad[co] * weight[co]) (needs scale-free wgrad) if given.
    `split`: the K split count (default: enough programs for the GPU; 1 in the interpreter).
    grad_w may have any layout: the finalize kernel writes it by strides.
    prologue: x is the previous unit's z, and the kernel applies that unit's BatchNorm + ReLU
    as it loads x (as conv_forward's prologue)."""
    plan = _wgrad_plan(plan_key(dz), plan_key(x), weight.shape, x.dtype, x.device,
                       (*stride, *padding, *dilation, groups), split,
                       None if prologue is None else prologue.relu, launch_mode(x.dtype))
    if plan.copy_dz:
        dz = dz.contiguous(memory_format=torch.channels_last)
    if plan.copy_x:
        x = x.contiguous(memory_format=torch.channels_last)
    part = torch.empty(plan.part_shape, dtype=torch.float32, device=x.device)
    launch(_conv_wgrad_kernel, plan.grid, dz_ptr=dz, x_ptr=x, part_ptr=part, **_bn_args(prologue), **plan.args)
    gs_part = None
    if grad_scale is not None:
        gs_part = torch.empty((1, plan.finalize_grid[1], plan.part_shape[1]), dtype=torch.float32, device=x.device)
    gw = _NO_GRAD_W
    if grad_w is not None:
        sgo, sgi, sgh, sgw = grad_w.stride()
        gw = {"gw_ptr": grad_w, "sgo": sgo, "sgi": sgi, "sgh": sgh, "sgw": sgw}
    launch(_wgrad_finalize_kernel, plan.finalize_grid, part_ptr=part,
           w_ptr=weight.contiguous() if grad_scale is not None else None, scale_ptr=scale, **gw,
           gscale_part_ptr=gs_part, **plan.finalize_args)
    if grad_scale is not None:
        grad_scale.copy_(sum_partials(gs_part)[0])
