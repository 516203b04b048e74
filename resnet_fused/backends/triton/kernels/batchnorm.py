"""BatchNorm kernels around the convolution: statistics finalize, apply, fused backward.

All of them view an activation [N, C, H, W] as rows m = (n, h, w) by channels c, addressed
through (stride_n, stride_c, stride_hw), which covers NCHW and NHWC storage. Every activation
operand of one launch shares one layout (the ops put them in one: _utils.in_format), so a
kernel takes one set of strides (act_strides) for all of them. Absent operands are None
(a constexpr in the kernel). Math is float32.

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
from .launch import as_index, cdiv, int64_forced, launch, needs_int64, plan_cache, plan_key


def act_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(n, c, flattened h*w) strides of an activation whose H and W are dense together."""
    assert t.size(2) == 1 or t.stride(2) == t.size(3) * t.stride(3), "H and W must be dense together"
    return t.stride(0), t.stride(1), t.stride(3)


@plan_cache
def _rows_plan(layout, forced_int64: bool) -> tuple[tuple, dict]:
    """(grid, arguments) of a per-channel kernel over an activation of this plan_key layout: its
    rows, channels, strides, index width and tile."""
    shape, strides, _ = layout
    n, c, h, w = shape
    t = torch.empty_strided(shape, strides, device="meta")
    s_n, s_c, s_hw = act_strides(t)
    bm, bc = elementwise_block()
    m = n * h * w
    args = dict(M=m, C=c, HW=h * w, s_n=s_n, s_c=s_c, s_hw=s_hw, INDEX_64=needs_int64(t), BLOCK_M=bm, BLOCK_C=bc)
    return (cdiv(m, bm), cdiv(c, bc)), args


def _rows(t: torch.Tensor) -> tuple[tuple, dict]:
    return _rows_plan(plan_key(t), int64_forced())


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
# every device. One program per channel block over all tiles left most SMs idle (the gate's
# test_wgrad_and_the_statistics_reductions_fill_the_gpu; docs/kernels.md).
STAT_GROUPS = 256
STAT_BLOCK_T = 32


def stat_group_tiles(t: int) -> int:
    """Tiles per group: about STAT_GROUPS groups (a group need not be whole BLOCK_T blocks)."""
    return cdiv(t, STAT_GROUPS)


@triton.jit
def _chan_merge_kernel(
    pmean_ptr, pm2_ptr, pcnt_ptr, out_mean_ptr, out_m2_ptr, out_cnt_ptr, T, C, M, TILE_M, GROUP_T,
    FINAL: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Merges the (mean, M2, count) partials of tiles [g * GROUP_T, (g + 1) * GROUP_T), g = grid
    axis 0, for a block of channels (axis 1). Counts are loaded (pcnt_ptr) or, where pcnt_ptr
    is None, implied by TILE_M (the conv epilogue's tiles: all full but the last of M rows).
    FINAL writes the mean and the biased variance M2 / M in the output dtype; otherwise the
    group's (mean, M2, count)."""
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
        if pcnt_ptr is not None:
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
    groups, c_blocks, args = _two_stage_plan(pmean.shape, group_tiles, int64_forced())
    gmean = torch.empty((groups, c), dtype=torch.float32, device=pmean.device)
    gm2 = torch.empty((groups, c), dtype=torch.float32, device=pmean.device)
    gcnt = torch.empty((groups,), dtype=torch.float32, device=pmean.device)
    launch(_chan_merge_kernel, (groups, c_blocks), pmean_ptr=pmean, pm2_ptr=pm2, pcnt_ptr=None, out_mean_ptr=gmean,
           out_m2_ptr=gm2, out_cnt_ptr=gcnt, T=t, C=c, M=m, TILE_M=tile_m, GROUP_T=args["GROUP_T"], FINAL=False,
           **args["common"])
    launch(_chan_merge_kernel, (1, c_blocks), pmean_ptr=gmean, pm2_ptr=gm2, pcnt_ptr=gcnt, out_mean_ptr=mean,
           out_m2_ptr=var, out_cnt_ptr=None, T=groups, C=c, M=m, TILE_M=tile_m, GROUP_T=groups, FINAL=True,
           **args["common"])


@plan_cache
def _two_stage_plan(shape, group_tiles: int | None, forced_int64: bool) -> tuple[int, int, dict]:
    """(groups, channel blocks, arguments) of a two-stage reduction of contiguous float32
    partials [(NUM,) T, C] (finalize_stats, sum_partials): the first stage's group size, the
    channel block, the index width."""
    t, c = shape[-2:]
    block_c = 32 if c <= 32 else 64
    gt = group_tiles or stat_group_tiles(t)
    index_64 = needs_int64(torch.empty(shape, device="meta"))
    return cdiv(t, gt), cdiv(c, block_c), {
        "GROUP_T": gt, "common": {"INDEX_64": index_64, "BLOCK_T": STAT_BLOCK_T, "BLOCK_C": block_c}}


@triton.jit
def _bn_apply_kernel(
    z_ptr, y_ptr, res_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, eps,  # res_ptr: None without a residual
    M, C, HW, s_n, s_c, s_hw,
    RELU: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    offs = (n_idx * s_n + hw * s_hw)[:, None] + (offs_c * s_c)[None, :]
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32)
    scale = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32) * tl.rsqrt(var + eps)
    shift = tl.load(b_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    y = (z.to(tl.float32) - mean[None, :]) * scale[None, :] + shift[None, :]
    if res_ptr is not None:
        y += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        y = tl.where(y <= 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def bn_apply(z, y, residual, mean, var, bn_weight, bn_bias, eps, relu):
    """y = act(bn(z) (+ residual)); z, y and the residual in one layout."""
    grid, args = _rows(z)
    launch(_bn_apply_kernel, grid, z_ptr=z, y_ptr=y, res_ptr=residual, mean_ptr=mean, var_ptr=var, w_ptr=bn_weight,
           b_ptr=bn_bias, eps=eps, RELU=relu, **args)


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
    groups, c_blocks, args = _two_stage_plan(part.shape, group_tiles, int64_forced())
    mid = torch.empty((num, groups, c), dtype=torch.float32, device=part.device)
    launch(_sum_partials_kernel, (groups, c_blocks, num), p_ptr=part, out_ptr=mid, T=t, C=c, GROUP_T=args["GROUP_T"],
           **args["common"])
    if out is None:
        out = torch.empty((num, c), dtype=torch.float32, device=part.device)
    launch(_sum_partials_kernel, (1, c_blocks, num), p_ptr=mid, out_ptr=out, T=groups, C=c, GROUP_T=groups,
           **args["common"])
    return out


@triton.jit
def _masked_grad(gy_ptr, y_ptr, offs, mask):
    """grad_y, masked by ReLU's output y where y_ptr is given (None: no ReLU), in float32;
    threshold_backward's rule: a NaN output passes its gradient."""
    g = tl.load(gy_ptr + offs, mask=mask, other=0.0)
    if y_ptr is not None:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0)
        g = tl.where(y <= 0, 0.0, g)
    return g


@triton.jit
def _bn_bwd_reduce_kernel(
    gy_ptr, y_ptr, z_ptr, mean_ptr, part_ptr, M, C, HW, s_n, s_c, s_hw,  # y_ptr: None without ReLU
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_m = as_index(tl.program_id(0), INDEX_64)
    T = tl.num_programs(0)
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    offs = (n_idx * s_n + hw * s_hw)[:, None] + (offs_c * s_c)[None, :]
    g = _masked_grad(gy_ptr, y_ptr, offs, mask).to(tl.float32)
    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    zc = tl.where(mask, z.to(tl.float32) - mean[None, :], 0.0)
    p = part_ptr + pid_m * C + offs_c
    tl.store(p, tl.sum(g, axis=0), mask=c_mask)
    tl.store(p + T * C, tl.sum(g * zc, axis=0), mask=c_mask)
    tl.store(p + 2 * T * C, tl.sum(zc, axis=0), mask=c_mask)


@triton.jit
def _bn_bwd_dz_kernel(
    gy_ptr, y_ptr, z_ptr, mean_ptr, var_ptr, w_ptr, sums_ptr, eps, count,  # y_ptr: None without ReLU
    dz_ptr, gres_ptr, gbw_ptr, gbb_ptr, gbias_ptr,  # outputs; None where not written
    M, C, HW, s_n, s_c, s_hw,
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    offs = (n_idx * s_n + hw * s_hw)[:, None] + (offs_c * s_c)[None, :]

    mean = tl.load(mean_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    invstd = tl.rsqrt(tl.load(var_ptr + offs_c, mask=c_mask, other=1.0).to(tl.float32) + eps)
    bw = tl.load(w_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
    sum_g = tl.load(sums_ptr + offs_c, mask=c_mask, other=0.0)
    sum_g_xhat = tl.load(sums_ptr + C + offs_c, mask=c_mask, other=0.0) * invstd
    if gbw_ptr is not None:  # the per-channel vectors, written together
        if tl.program_id(0) == 0:  # one row tile writes them
            sum_xhat = tl.load(sums_ptr + 2 * C + offs_c, mask=c_mask, other=0.0) * invstd
            # sum over rows of dz, the conv bias gradient
            gbias = bw * invstd * (sum_g - count * (sum_g / count) - sum_xhat * (sum_g_xhat / count))
            tl.store(gbw_ptr + offs_c, sum_g_xhat.to(gbw_ptr.dtype.element_ty), mask=c_mask)
            tl.store(gbb_ptr + offs_c, sum_g.to(gbb_ptr.dtype.element_ty), mask=c_mask)
            tl.store(gbias_ptr + offs_c, gbias.to(gbias_ptr.dtype.element_ty), mask=c_mask)
    if dz_ptr is not None or gres_ptr is not None:
        g = _masked_grad(gy_ptr, y_ptr, offs, mask).to(tl.float32)
        if gres_ptr is not None:
            tl.store(gres_ptr + offs, g.to(gres_ptr.dtype.element_ty), mask=mask)
        if dz_ptr is not None:
            z = tl.load(z_ptr + offs, mask=mask, other=0.0)
            xhat = (z.to(tl.float32) - mean[None, :]) * invstd[None, :]
            dz = (bw * invstd)[None, :] * (g - (sum_g / count)[None, :] - xhat * (sum_g_xhat / count)[None, :])
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def bn_backward_sums(grad_y, y, z, mean, relu):
    """Per-channel float32 sums over this tensor's rows, [3, C]: sum(g), sum(g * (z - mean)) and
    sum(z - mean), g = grad_y masked by ReLU (y may be None when not relu); grad_y, y and z in
    one layout."""
    grid, args = _rows(z)
    part = torch.empty((3, grid[0], args["C"]), dtype=torch.float32, device=z.device)
    launch(_bn_bwd_reduce_kernel, grid, gy_ptr=grad_y, y_ptr=y if relu else None, z_ptr=z, mean_ptr=mean,
           part_ptr=part, **args)
    return sum_partials(part)


def bn_backward_dz(grad_y, y, z, mean, var, bn_weight, sums, count, eps, relu, dz, grad_res,
                   grad_bn_w=None, grad_bn_b=None, grad_bias=None):
    """dz and the residual gradient g from `sums` (rows 0 and 1 of bn_backward_sums, summed over
    `count` rows: this tensor's, or every process's for SyncBatchNorm); outputs that are None are
    not written. The per-channel vector grads need row 2 and are written together (all or none).
    Every activation (grad_y, y, z, dz, grad_res) in one layout."""
    grid, args = _rows(z)
    write_vec = grad_bn_w is not None
    launch(_bn_bwd_dz_kernel, grid, gy_ptr=grad_y, y_ptr=y if relu else None, z_ptr=z, mean_ptr=mean, var_ptr=var,
           w_ptr=bn_weight, sums_ptr=sums, eps=eps, count=float(count), dz_ptr=dz, gres_ptr=grad_res,
           gbw_ptr=grad_bn_w, gbb_ptr=grad_bn_b if write_vec else None, gbias_ptr=grad_bias if write_vec else None,
           **args)


def bn_backward(grad_y, y, z, mean, var, bn_weight, eps, relu, dz, grad_res, grad_bn_w, grad_bn_b, grad_bias):
    """Fused ReLU-mask + residual grad + BatchNorm backward. Outputs that are None are not written
    (the per-channel vector grads are written together: pass all three or none)."""
    n, _, h, w = z.shape
    sums = bn_backward_sums(grad_y, y, z, mean, relu)
    bn_backward_dz(grad_y, y, z, mean, var, bn_weight, sums, n * h * w, eps, relu, dz, grad_res,
                   grad_bn_w, grad_bn_b, grad_bias)


@triton.jit
def _eval_bwd_g_kernel(
    gy_ptr, y_ptr, g_ptr, part_ptr, M, C, HW, s_n, s_c, s_hw,  # y_ptr: None without ReLU; g_ptr, part_ptr if written
    INDEX_64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_c, c_mask, mask, n_idx, hw = _channel_tile(M, C, HW, INDEX_64, BLOCK_M, BLOCK_C)
    offs = (n_idx * s_n + hw * s_hw)[:, None] + (offs_c * s_c)[None, :]
    g = _masked_grad(gy_ptr, y_ptr, offs, mask)
    if g_ptr is not None:
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    if part_ptr is not None:
        tile = as_index(tl.program_id(0), INDEX_64)
        tl.store(part_ptr + tile * C + offs_c, tl.sum(g.to(tl.float32), axis=0), mask=c_mask)


def eval_backward_g(grad_y, y, relu, g_out, want_sum):
    """Writes g = relu-masked grad_y into g_out (if given); returns the per-channel sum of g if
    asked. grad_y, y and g_out in one layout."""
    grid, args = _rows(grad_y)
    part = torch.empty((1, grid[0], args["C"]), dtype=torch.float32, device=grad_y.device) if want_sum else None
    launch(_eval_bwd_g_kernel, grid, gy_ptr=grad_y, y_ptr=y if relu else None, g_ptr=g_out, part_ptr=part, **args)
    return sum_partials(part)[0] if want_sum else None
