"""Implicit-GEMM convolution kernels (forward with fused epilogues, dgrad, wgrad).

The GEMM kernels run on NHWC (channels_last) activations and weights: the launchers copy
NCHW (or otherwise strided) operands to channels_last, and compute an NCHW output into a
channels_last buffer copied back. The kernels still take element strides, but gathers along
a strided channel axis spilled in the sm_90 gate (up to 1.9 KB; the NCHW forward of 1x1
256->64 @56 had no spill-free config), and NHWC-only halves the JIT's specializations.
Groups are a grid axis (one GEMM per group). Accumulation is float32; fp32 operands use TF32 on
tensor cores only when the caller allows it (ALLOW_TF32), exact fp32 otherwise.

Forward GEMM: rows = output pixels (n, ho, wo), columns = output channels of the
group, K = (kh, kw, input channel). Epilogues:
  EPILOGUE == 0 (eval):  y = acc * scale[c] + shift[c] (+ residual) (ReLU), one rounding.
  EPILOGUE == 1 (train): z = acc (+ bias[c]) stored in the input dtype, and per-tile
                         (mean, M2) of the rounded z per channel for a Chan merge in
                         batchnorm.finalize_stats (the tile count is implied by BLOCK_M).

K loop: one loop over (tap, channel block), channel block fastest, so Triton's software
pipeline (num_stages) runs across taps instead of draining at each one (the gate counted
3 scf.for per 3x3 kernel with the loop nested per tap). A tap moves every row's input
address by the same amount (kh * dil * stride_h + kw * dil * stride_w), so the loop carries
(c0, kh, kw) as scalars and each row's base address is computed once.

Strided dgrad (PHASED): grad_x's pixels split into stride_h * stride_w phases (h % stride_h,
w % stride_w), grid axis 1. A phase meets dz only through the taps kh = kh_first + i * stride_h
(likewise kw), so its K loop runs over those alone: 3x3/2 runs 1, 2 or 4 taps per phase instead
of 9 masked ones, and 1x1/2 one tap or none (those pixels get a zero gradient).

Few channels (FLAT: the 7x7 stem's 3 input channels, or dgrad's few output channels): a K
block is one filter row, (kw, c) with c padded to a power of two C_PAD and kw to KW_PAD, so
its index math is shifts and masks of constants, and the loop runs over kh.

Index math is int32; INDEX_64 (the launcher's choice when a tensor spans 2**31 elements or
more, see launch.needs_int64) makes every pixel and offset computation int64.

TMA (forward): a 1x1, stride-1, unpadded conv on dense NHWC input is the plain GEMM
x[M, C_in] @ w[C_out, C_in]^T; its tiles are loaded through device-side tensor descriptors
(tl.make_tensor_descriptor, triton >= 3.4), whose out-of-bounds zero fill replaces the row and
channel masks (gate, bf16 1x1 256->64 @56: 112 registers against 126-164 with pointer loads;
UTMALDG instead of LDGSTS). The descriptors need 256 B of global scratch per program, which
Triton takes from its allocator (torch's caching allocator unless one was set; _install_scratch_allocator).

Tile order: n-fastest (program id -> (m tile, n tile) with the n tiles of one m tile adjacent),
so the programs sharing an activation tile run together and read it from DRAM once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...._utils import interpret
from .batchnorm import sum_partials
from .configs import (conv_block_m, conv_configs, m_bucket, prune_gemm_configs, prune_wgrad_configs, sm_count,
                      wgrad_configs)
from .launch import INT32_LIMIT, as_index, cdiv, launch, needs_int64, next_power_of_2

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


@triton.autotune(configs=conv_configs(), key=["M_BUCKET", "C_OUT_G", "C_IN_G", "KH", "KW", "EPILOGUE", "TMA",
                                              "PROLOGUE"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs("C_OUT_G", "C_IN_G", "x_ptr")})
@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, shift_ptr, res_ptr, pmean_ptr, pm2_ptr,
    in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,
    M, M_BUCKET, HWO, WO, H, W, C_IN_G, C_OUT_G, C_OUT, KH, KW, PAD_H, PAD_W,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    son, soc, sohw,
    srn, src, srhw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    EPILOGUE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    FLAT: tl.constexpr, C_PAD: tl.constexpr, KW_PAD: tl.constexpr, TMA: tl.constexpr,
    PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, grp = _tile_ids(C_OUT_G, BLOCK_N, INDEX_64)
    offs_m, m_mask, n_idx, hw, ho, wo = _pixel_rows(pid_m, M, HWO, WO, BLOCK_M)
    h0 = ho * STRIDE_H - PAD_H
    w0 = wo * STRIDE_W - PAD_W
    x_rows = x_ptr + grp * C_IN_G * sxc + n_idx * sxn + h0 * sxh + w0 * sxw  # tap (0, 0), channel 0

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
        x_cols = kw_f * (DIL_W * sxw) + c_f * sxc
        w_f = w0[:, None] + (kw_f * DIL_W)[None, :]
        row_ok = m_mask[:, None] & f_ok[None, :] & (w_f >= 0) & (w_f < W)
        w_k = kw_f * sww + c_f * swi
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
            a = tl.load(x_rows[:, None] + (kh * (DIL_H * sxh) + kw * (DIL_W * sxw)) + offs_c[None, :] * sxc,
                        mask=a_ok, other=0.0)
            if PROLOGUE:
                a = _bn_act_prologue(a, a_ok, grp * C_IN_G + offs_c, c_ok, in_mean_ptr, in_var_ptr, in_w_ptr,
                                     in_b_ptr, in_eps, IN_RELU)
            b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + offs_c[:, None] * swi,
                        mask=c_ok[:, None] & co_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
            c0, kh, kw = _next_tap(c0, kh, kw, C_IN_G, KW, 0, 1, 1, BLOCK_K)

    out_dtype = out_ptr.dtype.element_ty
    out_offs = (n_idx * son + hw * sohw)[:, None] + (offs_co * soc)[None, :]
    mask2 = m_mask[:, None] & co_mask[None, :]
    if EPILOGUE == 0:
        scale = tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)
        y = acc * scale[None, :] + shift[None, :]
        if HAS_RES:
            r_offs = (n_idx * srn + hw * srhw)[:, None] + (offs_co * src)[None, :]
            y += tl.load(res_ptr + r_offs, mask=mask2, other=0.0).to(tl.float32)
        if RELU:
            y = tl.where(y <= 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
        tl.store(out_ptr + out_offs, y.to(out_dtype), mask=mask2)
    else:
        z = acc
        if HAS_SHIFT:  # conv bias
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


def _nhwc(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as dense channels_last: itself when it already is, else a copy."""
    if t is None or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous(memory_format=torch.channels_last)


def _nhwc_buffer(out: torch.Tensor) -> torch.Tensor:
    """Where a kernel writes `out`: out itself when channels_last, else a channels_last buffer
    that the launcher copies into out."""
    if out.is_contiguous(memory_format=torch.channels_last):
        return out
    return torch.empty_like(out, memory_format=torch.channels_last)


def _hw_stride(t: torch.Tensor) -> int:
    """Stride of the flattened (h, w) index; valid for NCHW and NHWC dense tensors."""
    assert t.stride(2) == t.size(3) * t.stride(3) or t.size(2) == 1, "H and W must be dense together"
    return t.stride(3)


def allow_tf32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and torch.backends.cudnn.allow_tf32


def _flat(channels: int, kw: int) -> tuple[bool, int, int]:
    """(FLAT, C_PAD, KW_PAD) for a K side of `channels` per tap and filter rows of kw taps."""
    c_pad, kw_pad = next_power_of_2(channels), next_power_of_2(kw)
    c_pad = max(c_pad, cdiv(16, kw_pad))  # tl.dot needs K >= 16
    flat = channels < FLAT_BELOW and kw_pad * c_pad <= FLAT_MAX_BLOCK
    return flat, c_pad, kw_pad


def _tma_aligned(t: torch.Tensor, rows_stride: int) -> bool:
    """A TMA descriptor's base and row stride must be 16-byte multiples (the allocator's
    blocks are 512-byte aligned, so the storage offset decides)."""
    size = t.element_size()
    return (t.storage_offset() * size) % 16 == 0 and (rows_stride * size) % 16 == 0


def use_tma_1x1(x, weight, stride, padding, dilation, groups) -> bool:
    """Whether the forward runs as a TMA-fed GEMM: a 1x1, stride-1, unpadded, ungrouped conv on
    dense NHWC input, channels contiguous in the weight, every address 16-byte aligned.
    RESNET_FUSED_TRITON_TMA=0 turns it off."""
    if os.environ.get("RESNET_FUSED_TRITON_TMA", "1") == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    n, c_in, h, w = x.shape
    if weight.shape[2:] != (1, 1) or list(stride) != [1, 1] or list(padding) != [0, 0] or groups != 1:
        return False
    dense_nhwc = x.stride() == (h * w * c_in, 1, w * c_in, c_in)
    # A descriptor's tile offsets are int32: its rows (output pixels) must stay below 2**31.
    return (dense_nhwc and n * h * w < INT32_LIMIT and weight.stride(1) == 1 and _tma_aligned(x, c_in)
            and _tma_aligned(weight, weight.stride(0)))


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
    if _SCRATCH_ALLOCATOR_INSTALLED or interpret():
        return
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(torch_scratch)


def conv_forward(x, weight, out, scale, shift, residual, stride, padding, dilation, groups, relu,
                 pmean=None, pm2=None, prologue=None):
    """Launch the fused forward. `out` is y (eval: scale/shift given) or z (train: pass
    pmean/pm2 of shape [cdiv(M, block_m()), C_out]; `shift` is then the conv bias or None).
    prologue: (mean, var, bn_weight, bn_bias, eps, relu) of the previous unit, applied to x as
    it is loaded (x is then that unit's z): the pointer path (no TMA, no FLAT K blocks)."""
    x, weight, residual = _nhwc(x), _nhwc(weight), _nhwc(residual)
    result, out = out, _nhwc_buffer(out)
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    _, _, ho, wo = out.shape
    m = n * ho * wo
    c_out_g = c_out // groups
    train = pmean is not None
    block_m = conv_block_m()
    dummy = out
    res = residual if residual is not None else dummy
    flat, c_pad, kw_pad = _flat(c_in_g, kw)
    tma = prologue is None and use_tma_1x1(x, weight, stride, padding, dilation, groups)
    if tma:
        _ensure_allocator()
    in_mean, in_var, in_w, in_b, in_eps, in_relu = prologue if prologue is not None else (dummy,) * 4 + (0.0, False)
    grid = lambda meta: (cdiv(m, block_m) * cdiv(c_out_g, meta["BLOCK_N"]), 1, groups)  # noqa: E731
    launch(
        _conv_fwd_kernel, grid,
        x, weight, out, scale if scale is not None else dummy, shift if shift is not None else dummy, res,
        pmean if train else dummy, pm2 if train else dummy,
        in_mean, in_var, in_w, in_b, in_eps,
        m, m_bucket(m), ho * wo, wo, h, w, c_in_g, c_out_g, c_out, kh, kw, padding[0], padding[1],
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        out.stride(0), out.stride(1), _hw_stride(out),
        res.stride(0), res.stride(1), _hw_stride(res),
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        EPILOGUE=1 if train else 0, HAS_SHIFT=shift is not None, HAS_RES=residual is not None, RELU=relu,
        FLAT=flat and not tma and prologue is None, C_PAD=c_pad, KW_PAD=kw_pad, TMA=tma,
        PROLOGUE=prologue is not None, IN_RELU=in_relu, ALLOW_TF32=allow_tf32(x.dtype),
        INDEX_64=needs_int64(x, out, residual), BLOCK_M=block_m,
    )
    if out is not result:
        result.copy_(out)


# ---------------------------------------------------------------------------------------
# dgrad: grad_x[n, ci, h, w] = sum over (co, kh, kw) of dz[n, co, ho, wo] * w[co, ci, kh, kw]
# where h = ho * s - p + kh * d. GEMM rows = input pixels, columns = input channels of the group,
# K = (kh, kw, output channel); taps whose (h + p - kh * d) is not a multiple of s are masked.
# With the BN scale (eval backward), the launcher folds it into a scaled copy of the weight
# (rounded to its dtype, as a per-K-step scaling of the weight tile would be).


@triton.autotune(configs=conv_configs(), key=["M_BUCKET", "C_OUT_G", "C_IN_G", "KH", "KW", "RELU_MASK", "BN_SUMS"],
                 prune_configs_by={"early_config_prune": prune_gemm_configs("C_IN_G", "C_OUT_G", "dz_ptr")})
@triton.jit
def _conv_dgrad_kernel(
    dz_ptr, w_ptr, dx_ptr,
    z_ptr, in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps, psum_ptr, PS_T, PS_C,
    M, M_BUCKET, HW, W, HO, WO, C_IN_G, C_OUT_G, KH, KW, PAD_H, PAD_W,
    sdn, sdc, sdh, sdw,
    swo, swi, swh, sww,
    sxn, sxc, sxhw,
    szn, szc, szhw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    FLAT: tl.constexpr, C_PAD: tl.constexpr, KW_PAD: tl.constexpr, PHASED: tl.constexpr, RELU_MASK: tl.constexpr,
    BN_SUMS: tl.constexpr, ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n, grp = _tile_ids(C_IN_G, BLOCK_N, INDEX_64)
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
    dz_rows = dz_ptr + grp * C_OUT_G * sdc + n_idx * sdn

    offs_ci_g = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_mask = offs_ci_g < C_IN_G
    w_cols = w_ptr + grp * C_OUT_G * swo + offs_ci_g * swi

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
        col_offs = wo * sdw + (co_f * sdc)[None, :]
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
            a = tl.load(dz_rows[:, None] + (ho * sdh + wo * sdw)[:, None] + offs_co_g[None, :] * sdc,
                        mask=ok[:, None] & co_ok[None, :], other=0.0)
            b = tl.load(w_cols[None, :] + (kh * swh + kw * sww) + offs_co_g[:, None] * swo,
                        mask=co_ok[:, None] & ci_mask[None, :], other=0.0)
            acc = _dot(a, b, acc, ALLOW_TF32)
            c0, kh, kw = _next_tap(c0, kh, kw, C_OUT_G, KW, kw_first, step_h, step_w, BLOCK_K)

    offs_ci = grp * C_IN_G + offs_ci_g
    out_offs = (n_idx * sxn + hw * sxhw)[:, None] + (offs_ci * sxc)[None, :]
    out_mask = m_mask[:, None] & ci_mask[None, :]
    if RELU_MASK or BN_SUMS:
        z = tl.load(z_ptr + (n_idx * szn + hw * szhw)[:, None] + (offs_ci * szc)[None, :], mask=out_mask,
                    other=0.0)
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
        # per-(tile, channel) partials [2, PS_T, PS_C] summed in tile order by the launcher.
        mean = tl.load(in_mean_ptr + offs_ci, mask=ci_mask, other=0.0).to(tl.float32)
        gf = tl.where(out_mask, g.to(tl.float32), 0.0)
        zc = tl.where(out_mask, z.to(tl.float32) - mean[None, :], 0.0)
        p_offs = tile * PS_C + offs_ci
        tl.store(psum_ptr + p_offs, tl.sum(gf, axis=0), mask=ci_mask)
        tl.store(psum_ptr + PS_T * PS_C + p_offs, tl.sum(gf * zc, axis=0), mask=ci_mask)


def dgrad_phased(stride, dilation, flat: bool) -> bool:
    """Whether dgrad runs per output phase: strided, undilated (a dilated tap's phase is not
    kh mod stride), and not FLAT (whose K block is a whole filter row)."""
    return (stride[0] > 1 or stride[1] > 1) and list(dilation) == [1, 1] and not flat


def conv_dgrad(dz, weight, grad_x, scale, stride, padding, dilation, groups, bn_input=None, bn_sums=None):
    """grad_x = conv_transpose(dz, weight * scale[co]) into the preallocated grad_x.
    bn_input: (z, mean, var, bn_weight, bn_bias, eps, relu) of the unit whose act(bn(z)) was
    the conv's input (the recompute chain's backward): with relu, grad_x is zeroed where that
    input was not positive, the mask recomputed in the epilogue from z. bn_sums: a [2, C_in]
    contiguous float32 tensor that receives sum(grad_x) and sum(grad_x * (z - mean)) per channel (of the
    stored grad_x; needs bn_input), BatchNorm backward's reductions."""
    dz, weight = _nhwc(dz), _nhwc(weight)
    result, grad_x = grad_x, _nhwc_buffer(grad_x)
    n, _, h, w = grad_x.shape
    c_out, c_in_g, kh, kw = weight.shape
    _, _, ho, wo = dz.shape
    m = n * h * w
    c_out_g = c_out // groups
    if scale is not None:
        weight = _nhwc((weight.float() * scale.float().view(-1, 1, 1, 1)).to(weight.dtype))
    block_m = conv_block_m()
    flat, c_pad, kw_pad = _flat(c_out_g, kw)
    relu = False
    if bn_input is not None:
        z, in_mean, in_var, in_w, in_b, in_eps, relu = bn_input
        z = _nhwc(z)
    else:
        z, in_mean, in_var, in_w, in_b, in_eps = grad_x, grad_x, grad_x, grad_x, grad_x, 0.0
    # A strided conv's dgrad runs per phase (h % stride, w % stride): 3x3/2 reads 1-4 taps of 9
    # per pixel, 1x1/2 one or none, where one pass over all pixels masks 3/4 of its tap loads.
    phased = dgrad_phased(stride, dilation, flat)
    phases = stride[0] * stride[1] if phased else 1
    rows = n * cdiv(h, stride[0]) * cdiv(w, stride[1]) if phased else m  # the largest phase's
    tiles = cdiv(rows, block_m)
    c_total = c_in_g * groups
    psum = (torch.empty((2, phases * tiles, c_total), dtype=torch.float32, device=dz.device) if bn_sums is not None
            else grad_x)
    grid = lambda meta: (tiles * cdiv(c_in_g, meta["BLOCK_N"]), phases, groups)  # noqa: E731
    launch(
        _conv_dgrad_kernel, grid,
        dz, weight, grad_x,
        z, in_mean, in_var, in_w, in_b, in_eps, psum, phases * tiles, c_total,
        m, m_bucket(rows), h * w, w, ho, wo, c_in_g, c_out_g, kh, kw, padding[0], padding[1],
        dz.stride(0), dz.stride(1), dz.stride(2), dz.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        grad_x.stride(0), grad_x.stride(1), _hw_stride(grad_x),
        z.stride(0), z.stride(1), _hw_stride(z),
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        FLAT=flat, C_PAD=c_pad, KW_PAD=kw_pad, PHASED=phased, RELU_MASK=relu, BN_SUMS=bn_sums is not None,
        ALLOW_TF32=allow_tf32(dz.dtype),
        INDEX_64=needs_int64(dz, grad_x), BLOCK_M=block_m,
    )
    if grad_x is not result:
        result.copy_(grad_x)
    if bn_sums is not None:
        sum_partials(psum, out=bn_sums)


# ---------------------------------------------------------------------------------------
# wgrad: grad_w[co, ci, kh, kw] = sum over output pixels of dz[n, co, ho, wo] * x[n, ci, h, w].
# GEMM rows = output channels of the group, columns = input channels of the group, K = output
# pixels, split SPLIT ways (grid axis 2) into float32 partials [SPLIT, C_out, C_in_g, KH, KW]
# that wgrad_finalize sums in a fixed order (deterministic, no atomics).


@triton.autotune(configs=wgrad_configs(), key=["M_BUCKET", "C_OUT_G", "C_IN_G", "KH", "KW", "PROLOGUE"],
                 prune_configs_by={"early_config_prune": prune_wgrad_configs})
@triton.jit
def _conv_wgrad_kernel(
    dz_ptr, x_ptr, part_ptr,
    in_mean_ptr, in_var_ptr, in_w_ptr, in_b_ptr, in_eps,
    M, M_BUCKET, HWO, WO, H, W, C_IN_G, C_OUT_G, C_OUT, KH, KW, M_PER_SPLIT, PAD_H, PAD_W,
    sdn, sdc, sdhw,
    sxn, sxc, sxh, sxw,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    FLAT_N: tl.constexpr, PROLOGUE: tl.constexpr, IN_RELU: tl.constexpr,
    ALLOW_TF32: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """FLAT_N: the columns are (ci, kh, kw) flattened (few input channels: the stem) and grid
    axis 1 is the group; otherwise columns are input channels and axis 1 is (group, tap)."""
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
        a = tl.load(dz_ptr + (offs_co * sdc)[:, None] + (n_idx * sdn + hw * sdhw)[None, :],
                    mask=co_mask[:, None] & k_ok[None, :], other=0.0)
        if FLAT_N:
            h = ho[:, None] * STRIDE_H - PAD_H + (kh_j * DIL_H)[None, :]
            w = wo[:, None] * STRIDE_W - PAD_W + (kw_j * DIL_W)[None, :]
            x_ok = k_ok[:, None] & j_mask[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b = tl.load(x_ptr + (n_idx * sxn)[:, None] + h * sxh + w * sxw + (offs_ci * sxc)[None, :],
                        mask=x_ok, other=0.0)
        else:
            h = ho * STRIDE_H - PAD_H + kh * DIL_H
            w = wo * STRIDE_W - PAD_W + kw * DIL_W
            x_ok = k_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_ok = x_ok[:, None] & j_mask[None, :]
            b = tl.load(x_ptr + (n_idx * sxn + h * sxh + w * sxw)[:, None] + (offs_ci * sxc)[None, :],
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
    part_ptr, w_ptr, scale_ptr, gw_ptr, gscale_part_ptr,
    C_OUT, K, KHW, SPLIT,
    sgo, sgi, sgh, sgw, KW,
    HAS_SCALE: tl.constexpr, WRITE_GW: tl.constexpr, WRITE_GSCALE: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (co block, k block) tile (grid axes 0, 1): grad_w = (sum over splits, in order) *
    scale[co]; with WRITE_GSCALE, this k block's share of grad_scale[co] = sum_k wgrad * w[co, k]
    into gscale_part[k block, co] (summed over k blocks in order by the launcher).
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
    if WRITE_GSCALE:
        wv = tl.load(w_ptr + flat, mask=mask, other=0.0).to(tl.float32)
        tl.store(gscale_part_ptr + kb * C_OUT + offs_co, tl.sum(total * wv, axis=1), mask=co_mask)
    if WRITE_GW:
        g = total
        if HAS_SCALE:
            g = g * tl.load(scale_ptr + offs_co, mask=co_mask, other=0.0).to(tl.float32)[:, None]
        ci = offs_k // KHW
        tap = offs_k % KHW
        g_offs = offs_co[:, None] * sgo + (ci * sgi + (tap // KW) * sgh + (tap % KW) * sgw)[None, :]
        tl.store(gw_ptr + g_offs, g.to(gw_ptr.dtype.element_ty), mask=mask)


def wgrad_tiles(c_out_g: int, n_cols: int, flat: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of wgrad: the launcher's choice (not the autotuner's), so that the
    split count, which sizes the partials buffer, is computed for the real tile count.
    FLAT_N (the stem) decodes (ci, kh, kw) and gathers per element of the [BLOCK_K, BLOCK_N]
    tile: BLOCK_N 128 spills under triton 3.6 (64 B bf16, 168 B fp32 at BLOCK_K 32), 64 not."""
    if interpret():
        return 64, 128
    return (128 if c_out_g >= 128 else 64), (128 if n_cols >= 128 and not flat else 64)


# Fewest output pixels one split reduces: 8 K steps of 64 (shorter ones are mostly prologue).
WGRAD_MIN_K_PER_SPLIT = 512


def wgrad_split(m: int, tiles: int, sms: int) -> int:
    """Splits of K (output pixels) so that tiles * splits fills two waves of the GPU's SMs
    (two, so the last wave's tail is half as long), each split at least WGRAD_MIN_K_PER_SPLIT."""
    want = cdiv(2 * sms, max(tiles, 1))
    return max(1, min(want, m // WGRAD_MIN_K_PER_SPLIT))


def conv_wgrad(dz, x, weight, stride, padding, dilation, groups, grad_w=None, scale=None, grad_scale=None,
               split=None, prologue=None):
    """Weight gradient of conv(x, weight) given dz; writes grad_w (= wgrad * scale[co] when scale
    is given) and grad_scale[co] = sum(wgrad[co] * weight[co]) (needs scale-free wgrad) if given.
    `split`: the K split count (default: enough programs for the GPU; 1 in the interpreter).
    grad_w may have any layout: the finalize kernel writes it by strides.
    prologue: (mean, var, bn_weight, bn_bias, eps, relu): x is the previous unit's z, and the
    kernel applies its BatchNorm + ReLU as it loads x (as conv_forward's prologue)."""
    dz, x = _nhwc(dz), _nhwc(x)
    n, _, h, w = x.shape
    c_out, c_in_g, kh, kw = weight.shape
    _, _, ho, wo = dz.shape
    m = n * ho * wo
    c_out_g = c_out // groups
    flat = c_in_g < FLAT_BELOW and prologue is None
    n_cols = c_in_g * kh * kw if flat else c_in_g
    axis1 = groups if flat else kh * kw * groups
    block_m, block_n = wgrad_tiles(c_out_g, n_cols, flat)
    tiles = cdiv(c_out_g, block_m) * cdiv(n_cols, block_n) * axis1
    if split is None:
        split = 1 if interpret() else wgrad_split(m, tiles, sm_count())
    m_per_split = cdiv(cdiv(m, split), 64) * 64  # whole K blocks per split
    split = cdiv(m, m_per_split)
    part = torch.empty((split, c_out, c_in_g, kh, kw), dtype=torch.float32, device=x.device)
    in_mean, in_var, in_w, in_b, in_eps, in_relu = prologue if prologue is not None else (part,) * 4 + (0.0, False)
    launch(
        _conv_wgrad_kernel, (tiles // axis1, axis1, split),
        dz, x, part,
        in_mean, in_var, in_w, in_b, in_eps,
        m, m_bucket(m), ho * wo, wo, h, w, c_in_g, c_out_g, c_out, kh, kw, m_per_split, padding[0], padding[1],
        dz.stride(0), dz.stride(1), _hw_stride(dz),
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        STRIDE_H=stride[0], STRIDE_W=stride[1], DIL_H=dilation[0], DIL_W=dilation[1],
        FLAT_N=flat, PROLOGUE=prologue is not None, IN_RELU=in_relu, ALLOW_TF32=allow_tf32(x.dtype),
        INDEX_64=needs_int64(dz, x), BLOCK_M=block_m, BLOCK_N=block_n,
    )
    # The finalize: one program per (16 output channels, 64 K) tile, so that even 64x64x3x3
    # (36 tiles) is not a handful of programs each summing every split.
    k = c_in_g * kh * kw
    block_co, block_k = (64, 256) if interpret() else (16, 64)
    k_blocks = cdiv(k, block_k)
    w_c = weight.contiguous() if grad_scale is not None else weight
    gw = grad_w if grad_w is not None else part
    gs_part = (torch.empty((1, k_blocks, c_out), dtype=torch.float32, device=x.device)
               if grad_scale is not None else part)
    launch(
        _wgrad_finalize_kernel, (cdiv(c_out, block_co), k_blocks),
        part, w_c, scale if scale is not None else part, gw, gs_part,
        c_out, k, kh * kw, split,
        gw.stride(0), gw.stride(1), gw.stride(2), gw.stride(3), kw,
        HAS_SCALE=scale is not None, WRITE_GW=grad_w is not None, WRITE_GSCALE=grad_scale is not None,
        INDEX_64=needs_int64(part), BLOCK_CO=block_co, BLOCK_K=block_k,
    )
    if grad_scale is not None:
        grad_scale.copy_(sum_partials(gs_part)[0])
