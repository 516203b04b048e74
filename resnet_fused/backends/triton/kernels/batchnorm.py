"""BatchNorm kernels around the convolution: statistics finalize, apply, fused backward.

All of them view an activation [N, C, H, W] as rows m = (n, h, w) by channels c, addressed
through (stride_n, stride_c, stride_hw), which covers NCHW and NHWC storage. Math is float32.

  finalize_stats   merges the conv epilogue's per-tile (mean, M2) with Chan's formula in a
                   fixed order (k-way within a block of tiles, block after block within a
                   group of tiles, then group after group): deterministic, and no
                   catastrophic cancellation from sums of squares.
  bn_apply         y = act((z - mean) * bn_w * rsqrt(var + eps) + bn_b [+ residual]).
  bn_bwd_reduce    g = grad_y masked by y > 0 (ReLU); per-tile partial sums of g, g * (z - mean)
                   and (z - mean); sum_partials then adds them in a fixed order (deterministic).
  bn_bwd_dz        dz = bn_w * invstd * (g - sum_g / count - xhat * sum_g_xhat / count), the
                   residual gradient g, and (first row block only) the per-channel grads.
  eval_bwd_g       g = grad_y masked by y > 0, stored once (it is grad_residual and the wgrad
                   operand), with per-tile sums for grad_shift.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import elementwise_block
from .launch import as_index, cdiv, launch, needs_int64


def act_strides(t: torch.Tensor) -> tuple[int, int, int]:
    assert t.size(2) == 1 or t.stride(2) == t.size(3) * t.stride(3), "H and W must be dense together"
    return t.stride(0), t.stride(1), t.stride(3)


@triton.jit
def _channel_tile(M, C, HW, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (BLOCK_M rows, BLOCK_C channels) tile of program (0: rows, 1: channels) of a
    per-channel kernel: its channel offsets and mask, the 2-D mask, and each row's (n, h*W+w)."""
    offs_m = as_index(tl.program_id(0), INDEX_64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = as_index(tl.program_id(1), INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    return offs_c, c_mask, (offs_m < M)[:, None] & c_mask[None, :], offs_m // HW, offs_m % HW


@triton.jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * frac
    m2 = m2_a + m2_b + delta * delta * n_a * frac
    return mean, m2, n


# The per-tile partials of the training statistics and of the backward sums are reduced in
# two launches: up to STAT_GROUPS programs per channel block each reduce one fixed, contiguous
# group of tiles, then one program per channel block reduces the groups in order. The grouping
# depends on the tile count alone (not on the GPU), so the result is the same on every run and
# every device. One program per channel block over all tiles (the gate: 2 programs for C=64
# at 56x56, batch 256) ran on 2 of 132 SMs.
STAT_GROUPS = 256
STAT_BLOCK_T = 32


def stat_group_tiles(t: int) -> int:
    """Tiles per group: about STAT_GROUPS groups (a group need not be whole BLOCK_T blocks)."""
    return cdiv(t, STAT_GROUPS)


@triton.jit
def _chan_merge_kernel(
    pmean_ptr, pm2_ptr, pcnt_ptr, out_mean_ptr, out_m2_ptr, out_cnt_ptr, T, C, M, TILE_M, GROUP_T,
    HAS_CNT: tl.constexpr, FINAL: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the (mean, M2, count) partials of tiles [g * GROUP_T, (g + 1) * GROUP_T), g = grid
    axis 0, for a block of channels (axis 1). Counts are loaded (HAS_CNT) or implied by TILE_M
    (the conv epilogue's tiles: all full but the last of M rows). FINAL writes the mean and the
    biased variance M2 / M in the output dtype; otherwise the group's (mean, M2, count)."""
    g = as_index(tl.program_id(0), INDEX_64)
    offs_c = as_index(tl.program_id(1), INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    t_end = tl.minimum(g * GROUP_T + GROUP_T, T)
    run_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    run_m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    run_n = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(g * GROUP_T, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        mask = t_ok[:, None] & c_mask[None, :]
        offs = offs_t[:, None] * C + offs_c[None, :]
        mean = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        m2 = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        if HAS_CNT:
            cnt = tl.load(pcnt_ptr + offs_t, mask=t_ok, other=0.0)
        else:
            cnt = tl.where(t_ok, tl.minimum(M - offs_t * TILE_M, TILE_M), 0).to(tl.float32)
        # Merge BLOCK_T tiles at once (the k-way form of Chan's formula: deviations of the tile
        # means from the block mean, never a raw sum of squares), then into the running total.
        b_n = tl.sum(cnt, axis=0)
        b_mean = tl.sum(mean * cnt[:, None], axis=0) / tl.maximum(b_n, 1.0)
        dev = tl.where(mask, mean - b_mean[None, :], 0.0)
        b_m2 = tl.sum(m2 + dev * dev * cnt[:, None], axis=0)
        run_mean, run_m2, run_n = _chan_combine(run_mean, run_m2, run_n, b_mean, b_m2, b_n)
    if FINAL:
        tl.store(out_mean_ptr + offs_c, run_mean.to(out_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(out_m2_ptr + offs_c, (run_m2 / M).to(out_m2_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.store(out_mean_ptr + g * C + offs_c, run_mean, mask=c_mask)
        tl.store(out_m2_ptr + g * C + offs_c, run_m2, mask=c_mask)
        if tl.program_id(1) == 0:
            tl.store(out_cnt_ptr + g, tl.max(run_n, axis=0))


def finalize_stats(pmean, pm2, mean, var, m, tile_m, group_tiles=None):
    """mean and biased variance per channel from the conv epilogue's per-tile partials [T, C]
    (tiles of tile_m rows, m rows in all). `group_tiles`: tiles per first-stage group
    (default stat_group_tiles(T))."""
    t, c = pmean.shape
    block_c = 32 if c <= 32 else 64
    gt = group_tiles or stat_group_tiles(t)
    groups = cdiv(t, gt)
    c_blocks = cdiv(c, block_c)
    gmean = torch.empty((groups, c), dtype=torch.float32, device=pmean.device)
    gm2 = torch.empty_like(gmean)
    gcnt = torch.empty((groups,), dtype=torch.float32, device=pmean.device)
    index_64 = needs_int64(pmean)
    launch(
        _chan_merge_kernel, (groups, c_blocks),
        pmean, pm2, pmean, gmean, gm2, gcnt, t, c, m, tile_m, gt,
        HAS_CNT=False, FINAL=False, INDEX_64=index_64, BLOCK_T=STAT_BLOCK_T, BLOCK_C=block_c,
    )
    launch(
        _chan_merge_kernel, (1, c_blocks),
        gmean, gm2, gcnt, mean, var, gcnt, groups, c, m, tile_m, groups,
        HAS_CNT=True, FINAL=True, INDEX_64=index_64, BLOCK_T=STAT_BLOCK_T, BLOCK_C=block_c,
    )


@triton.jit
def _bn_apply_kernel(
    z_ptr, y_ptr, res_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps,
    M, C, HW,
    szn, szc, szhw, syn, syc, syhw, srn, src, srhw,
    HAS_RES: tl.constexpr, RELU: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32)
    scale = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32) * tl.rsqrt(var + eps)
    shift = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + (n_idx * szn + hw * szhw)[:, None] + (offs_c * szc)[None, :], mask=mask, other=0.0)
    y = (z.to(tl.float32) - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + (n_idx * srn + hw * srhw)[:, None] + (offs_c * src)[None, :], mask=mask,
                     other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y <= 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + (n_idx * syn + hw * syhw)[:, None] + (offs_c * syc)[None, :],
             y.to(y_ptr.dtype.element_ty), mask=mask)


def bn_apply(z, y, residual, mean, var, bn_weight, bn_bias, eps, relu):
    n, c, h, w = z.shape
    m = n * h * w
    bm, bc = elementwise_block()
    res = residual if residual is not None else z
    launch(_bn_apply_kernel, (cdiv(m, bm), cdiv(c, bc)),
        z, y, res, mean, var, bn_weight, bn_bias, eps, m, c, h * w,
        *act_strides(z), *act_strides(y), *act_strides(res),
        HAS_RES=residual is not None, RELU=relu, INDEX_64=needs_int64(z, y, residual), BLOCK_M=bm, BLOCK_C=bc,
    )


@triton.jit
def _sum_partials_kernel(p_ptr, out_ptr, T, C, GROUP_T, INDEX_64: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    """out[i, g, c] = sum of p[i, t, c] over the tiles t of group g (grid: g, channel block, i),
    added in a fixed order."""
    g = as_index(tl.program_id(0), INDEX_64)
    offs_c = as_index(tl.program_id(1), INDEX_64) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = as_index(tl.program_id(2), INDEX_64)
    c_mask = offs_c < C
    t_end = tl.minimum(g * GROUP_T + GROUP_T, T)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(g * GROUP_T, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < t_end)[:, None] & c_mask[None, :]
        acc += tl.sum(tl.load(p_ptr + (i * T + offs_t)[:, None] * C + offs_c[None, :], mask=mask, other=0.0),
                      axis=0)
    tl.store(out_ptr + (i * tl.num_programs(0) + g) * C + offs_c, acc, mask=c_mask)


def sum_partials(part, group_tiles=None, out=None):
    """[NUM, T, C] float32 partials -> [NUM, C] sums over T, in two fixed-order stages; into
    `out` (contiguous [NUM, C] float32) when given."""
    num, t, c = part.shape
    block_c = 32 if c <= 32 else 64
    gt = group_tiles or stat_group_tiles(t)
    groups = cdiv(t, gt)
    c_blocks = cdiv(c, block_c)
    index_64 = needs_int64(part)
    mid = torch.empty((num, groups, c), dtype=torch.float32, device=part.device)
    launch(_sum_partials_kernel, (groups, c_blocks, num), part, mid, t, c, gt,
           INDEX_64=index_64, BLOCK_T=STAT_BLOCK_T, BLOCK_C=block_c)
    if out is None:
        out = torch.empty((num, c), dtype=torch.float32, device=part.device)
    launch(_sum_partials_kernel, (1, c_blocks, num), mid, out, groups, c, groups,
           INDEX_64=index_64, BLOCK_T=STAT_BLOCK_T, BLOCK_C=block_c)
    return out


@triton.jit
def _bn_bwd_reduce_kernel(
    gy_ptr, y_ptr, z_ptr, mean_ptr, part_ptr, M, C, HW,
    sgn, sgc, sghw, syn, syc, syhw, szn, szc, szhw,
    RELU: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = as_index(tl.program_id(0), INDEX_64)
    T = tl.num_programs(0)
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    g = tl.load(gy_ptr + (n_idx * sgn + hw * sghw)[:, None] + (offs_c * sgc)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if RELU:
        y = tl.load(y_ptr + (n_idx * syn + hw * syhw)[:, None] + (offs_c * syc)[None, :], mask=mask, other=0.0)
        g = tl.where(y <= 0, 0.0, g)  # threshold_backward: a NaN output passes its grad
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + (n_idx * szn + hw * szhw)[:, None] + (offs_c * szc)[None, :], mask=mask, other=0.0)
    zc = tl.where(mask, z.to(tl.float32) - mean[None, :], 0.0)
    p = part_ptr + pid_m * C + offs_c
    tl.store(p, tl.sum(g, axis=0), mask=c_mask)
    tl.store(p + T * C, tl.sum(g * zc, axis=0), mask=c_mask)
    tl.store(p + 2 * T * C, tl.sum(zc, axis=0), mask=c_mask)


@triton.jit
def _bn_bwd_dz_kernel(
    gy_ptr, y_ptr, z_ptr, mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count,
    dz_ptr, gres_ptr, gbw_ptr, gbb_ptr, gbias_ptr,
    M, C, HW,
    sgn, sgc, sghw, syn, syc, syhw, szn, szc, szhw, sdn, sdc, sdhw, srn, src, srhw,
    RELU: tl.constexpr, WRITE_DZ: tl.constexpr, WRITE_RES: tl.constexpr, WRITE_VEC: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)

    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    invstd = tl.rsqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    bw = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    sum_g = tl.load(sums_ptr + offs_c, mask=c_mask, other=0.0)
    sum_g_xhat = tl.load(sums_ptr + C + offs_c, mask=c_mask, other=0.0) * invstd
    if WRITE_VEC:
        if tl.program_id(0) == 0:  # one row tile writes the per-channel vectors
            sum_xhat = tl.load(sums_ptr + 2 * C + offs_c, mask=c_mask, other=0.0) * invstd
            # sum over rows of dz, the conv bias gradient
            gbias = bw * invstd * (sum_g - count * (sum_g / count) - sum_xhat * (sum_g_xhat / count))
            tl.store(gbw_ptr + offs_c, sum_g_xhat.to(gbw_ptr.dtype.element_ty), mask=c_mask)
            tl.store(gbb_ptr + offs_c, sum_g.to(gbb_ptr.dtype.element_ty), mask=c_mask)
            tl.store(gbias_ptr + offs_c, gbias.to(gbias_ptr.dtype.element_ty), mask=c_mask)
    if WRITE_DZ or WRITE_RES:
        g = tl.load(gy_ptr + (n_idx * sgn + hw * sghw)[:, None] + (offs_c * sgc)[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        if RELU:
            y = tl.load(y_ptr + (n_idx * syn + hw * syhw)[:, None] + (offs_c * syc)[None, :], mask=mask, other=0.0)
            g = tl.where(y <= 0, 0.0, g)  # threshold_backward: a NaN output passes its grad
        if WRITE_RES:
            tl.store(gres_ptr + (n_idx * srn + hw * srhw)[:, None] + (offs_c * src)[None, :],
                     g.to(gres_ptr.dtype.element_ty), mask=mask)
        if WRITE_DZ:
            z = tl.load(z_ptr + (n_idx * szn + hw * szhw)[:, None] + (offs_c * szc)[None, :], mask=mask, other=0.0)
            xhat = (z.to(tl.float32) - mean[None, :]) * invstd[None, :]
            dz = (bw * invstd)[None, :] * (g - (sum_g / count)[None, :] - xhat * (sum_g_xhat / count)[None, :])
            tl.store(dz_ptr + (n_idx * sdn + hw * sdhw)[:, None] + (offs_c * sdc)[None, :],
                     dz.to(dz_ptr.dtype.element_ty), mask=mask)


def bn_backward_sums(grad_y, y, z, mean, relu):
    """Per-channel float32 sums over this tensor's rows, [3, C]: sum(g), sum(g * (z - mean)) and
    sum(z - mean), g = grad_y masked by ReLU (y may be None when not relu)."""
    n, c, h, w = z.shape
    m = n * h * w
    bm, bc = elementwise_block()
    t = cdiv(m, bm)
    part = torch.empty((3, t, c), dtype=torch.float32, device=z.device)
    yy = y if y is not None else z
    launch(_bn_bwd_reduce_kernel, (t, cdiv(c, bc)),
        grad_y, yy, z, mean, part, m, c, h * w,
        *act_strides(grad_y), *act_strides(yy), *act_strides(z),
        RELU=relu, INDEX_64=needs_int64(grad_y, yy, z), BLOCK_M=bm, BLOCK_C=bc,
    )
    return sum_partials(part)


def bn_backward_dz(grad_y, y, z, mean, var, bn_weight, sums, count, eps, relu, dz, grad_res,
                   grad_bn_w=None, grad_bn_b=None, grad_bias=None):
    """dz and the residual gradient g from `sums` (rows 0 and 1 of bn_backward_sums, summed over
    `count` rows: this tensor's, or every process's for SyncBatchNorm); outputs that are None are
    not written. The per-channel vector grads need row 2 and are written together (all or none)."""
    n, c, h, w = z.shape
    m = n * h * w
    bm, bc = elementwise_block()
    t = cdiv(m, bm)
    yy = y if y is not None else z
    write_vec = grad_bn_w is not None
    dzz = dz if dz is not None else z
    res = grad_res if grad_res is not None else z
    vec = sums if not write_vec else None
    launch(_bn_bwd_dz_kernel, (t, cdiv(c, bc)),
        grad_y, yy, z, mean, var, bn_weight, sums, eps, float(count),
        dzz, res, grad_bn_w if write_vec else vec, grad_bn_b if write_vec else vec,
        grad_bias if write_vec else vec,
        m, c, h * w,
        *act_strides(grad_y), *act_strides(yy), *act_strides(z), *act_strides(dzz), *act_strides(res),
        RELU=relu, WRITE_DZ=dz is not None, WRITE_RES=grad_res is not None, WRITE_VEC=write_vec,
        INDEX_64=needs_int64(grad_y, yy, z, dzz, res), BLOCK_M=bm, BLOCK_C=bc,
    )


def bn_backward(grad_y, y, z, mean, var, bn_weight, eps, relu, dz, grad_res, grad_bn_w, grad_bn_b, grad_bias):
    """Fused ReLU-mask + residual grad + BatchNorm backward. Outputs that are None are not written
    (the per-channel vector grads are written together: pass all three or none)."""
    n, _, h, w = z.shape
    sums = bn_backward_sums(grad_y, y, z, mean, relu)
    bn_backward_dz(grad_y, y, z, mean, var, bn_weight, sums, n * h * w, eps, relu, dz, grad_res,
                   grad_bn_w, grad_bn_b, grad_bias)


@triton.jit
def _eval_bwd_g_kernel(
    gy_ptr, y_ptr, g_ptr, part_ptr, M, C, HW,
    sgn, sgc, sghw, syn, syc, syhw, son, soc, sohw,
    RELU: tl.constexpr, WRITE_G: tl.constexpr, WRITE_SUM: tl.constexpr,
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    g = tl.load(gy_ptr + (n_idx * sgn + hw * sghw)[:, None] + (offs_c * sgc)[None, :], mask=mask, other=0.0)
    if RELU:
        y = tl.load(y_ptr + (n_idx * syn + hw * syhw)[:, None] + (offs_c * syc)[None, :], mask=mask, other=0.0)
        g = tl.where(y <= 0, 0.0, g)  # threshold_backward: a NaN output passes its grad
    if WRITE_G:
        tl.store(g_ptr + (n_idx * son + hw * sohw)[:, None] + (offs_c * soc)[None, :],
                 g.to(g_ptr.dtype.element_ty), mask=mask)
    if WRITE_SUM:
        tile = as_index(tl.program_id(0), INDEX_64)
        tl.store(part_ptr + tile * C + offs_c, tl.sum(g.to(tl.float32), axis=0), mask=c_mask)


def eval_backward_g(grad_y, y, relu, g_out, want_sum):
    """Writes g = relu-masked grad_y into g_out (if given); returns the per-channel sum of g if asked."""
    n, c, h, w = grad_y.shape
    m = n * h * w
    bm, bc = elementwise_block()
    t = cdiv(m, bm)
    part = torch.empty((1, t, c), dtype=torch.float32, device=grad_y.device) if want_sum else None
    yy = y if y is not None else grad_y
    go = g_out if g_out is not None else grad_y
    launch(_eval_bwd_g_kernel, (t, cdiv(c, bc)),
        grad_y, yy, go, part if part is not None else grad_y, m, c, h * w,
        *act_strides(grad_y), *act_strides(yy), *act_strides(go),
        RELU=relu, WRITE_G=g_out is not None, WRITE_SUM=want_sum, INDEX_64=needs_int64(grad_y, yy, go),
        BLOCK_M=bm, BLOCK_C=bc,
    )
    return sum_partials(part)[0] if want_sum else None
