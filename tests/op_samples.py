"""The ops called directly: sample arguments for every op, tile-edge shapes with their inputs,
and output comparisons against the reference ops (strides, dtype, error within 2x)."""

from __future__ import annotations

import torch

from resnet_fused.tolerances import assert_close_to_ref


def conv_args(stride=1, padding=1, dilation=1, groups=1):
    return [stride, stride], [padding, padding], [dilation, dilation], groups


def as64(args):
    return [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def op_samples(dtype=torch.float64, device="cpu"):
    """(op name, args) for every op, in the op's schema order, with grads where meaningful."""

    def t(*shape, positive=False):
        v = torch.rand(*shape, dtype=dtype, device=device) + 0.5 if positive else torch.randn(
            *shape, dtype=dtype, device=device)
        return v.requires_grad_()

    conv = ([1, 1], [1, 1], [1, 1], 1)
    conv_s2 = ([2, 2], [0, 0], [1, 1], 2)
    x, w = t(2, 4, 5, 5), t(6, 4, 3, 3)
    xg, wg = t(2, 4, 6, 6), t(6, 2, 1, 1)
    stats = [torch.rand(6, dtype=dtype, device=device), torch.rand(6, dtype=dtype, device=device) + 0.5]
    samples = [
        ("conv_bn_eval", (x, w, t(6, positive=True), t(6), t(2, 6, 5, 5), *conv, True)),
        ("conv_bn_eval", (xg, wg, t(6, positive=True), t(6), None, *conv_s2, False)),
        ("conv_bn_train", (x, w, t(6), t(6, positive=True), t(6), t(2, 6, 5, 5), *conv, 1e-5, True)),
        ("conv_bn_train", (xg, wg, None, t(6, positive=True), t(6), None, *conv_s2, 1e-3, False)),
        ("add_relu", (t(2, 3, 4, 5), t(2, 3, 4, 5))),
    ]
    y = torch.relu(torch.randn(2, 6, 5, 5, dtype=dtype, device=device))
    z = torch.randn(2, 6, 5, 5, dtype=dtype, device=device)
    samples += [
        ("conv_bn_eval_backward", (torch.randn_like(y), x.detach(), w.detach(), stats[1], y, *conv, True,
                                   [True, True, True, True, True])),
        ("conv_bn_train_backward", (torch.randn_like(y), x.detach(), w.detach(), z, y, *stats, stats[1], *conv,
                                    1e-5, True, [True, False, True, True, True, True])),
    ]
    # SyncBatchNorm building blocks: no autograd of their own, so inputs without grad.
    xd, wd, r = x.detach(), w.detach(), torch.randn(2, 6, 5, 5, dtype=dtype, device=device)
    samples += [
        ("conv_bn_stats", (xd, wd, stats[0], *conv)),
        ("conv_bn_stats", (xg.detach(), wg.detach(), None, *conv_s2)),
        ("bn_apply", (z, *stats, stats[1], stats[0], r, 1e-5, True)),
        ("bn_apply", (z, *stats, stats[1], stats[0], None, 1e-3, False)),
        ("bn_apply_backward_reduce", (torch.randn_like(y), z, y, stats[0], True)),
        ("bn_apply_backward_reduce", (torch.randn_like(y), z, None, stats[0], False)),
        ("bn_apply_backward", (torch.randn_like(y), z, y, *stats, stats[1], stats[0], stats[1], 100, 1e-5, True,
                               [True, True])),
        ("bn_apply_backward", (torch.randn_like(y), z, None, *stats, stats[1], stats[0], stats[1], 50, 1e-5, False,
                               [True, False])),
    ]
    return samples


def check_sync_building_blocks(ns, dtype, device, channels_last=False):
    """The SyncBatchNorm building blocks of namespace `ns` against the reference ops: each
    output within 2x the error the reference makes in `dtype` against float64 (the reference
    in `dtype` runs F.conv2d and float32 BatchNorm arithmetic, i.e. eager PyTorch)."""
    ref = torch.ops.resnet_fused
    g = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape, positive=False):
        v = torch.rand(*shape, generator=g) + 0.5 if positive else torch.randn(*shape, generator=g)
        return v.double().to(device)

    x, w, bias = rand(3, 8, 7, 7), rand(12, 8, 3, 3) * 0.3, rand(12)
    res, gy = rand(3, 12, 4, 4), rand(3, 12, 4, 4)
    bn_w, bn_b = rand(12, positive=True), rand(12)
    conv = ([2, 2], [1, 1], [1, 1], 1)

    def run(ops, low):
        def cast(t):  # activations and conv operands in `dtype` (float64 for the exact run)
            t = t.to(dtype) if low else t
            return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

        def cvec(t):  # BatchNorm parameters stay float32 (float64 for the exact run)
            return t.float() if low else t

        z, mean, var = ops.conv_bn_stats(cast(x), cast(w), cast(bias), *conv)
        y = ops.bn_apply(z, mean, var, cvec(bn_w), cvec(bn_b), cast(res), 1e-5, True)
        sum_g, sum_g_zc = ops.bn_apply_backward_reduce(cast(gy), z, y, mean, True)
        # A count larger than this batch's, as with several processes.
        dz, g_res = ops.bn_apply_backward(cast(gy), z, y, mean, var, cvec(bn_w), sum_g * 1.5, sum_g_zc * 1.5, 72, 1e-5,
                                          True, [True, True])
        return dict(z=z, mean=mean, var=var, y=y, sum_g=sum_g, sum_g_zc=sum_g_zc, dz=dz, g_res=g_res)

    got, eager, exact = run(ns, True), run(ref, True), run(ref, False)
    for key, value in got.items():
        assert value.device.type == torch.device(device).type, key
        if value.dim() == 4:
            assert value.is_contiguous(memory_format=fmt), f"{key}: layout differs from the input's"
        scale = None
        if key in ("sum_g_zc", "sum_g"):  # sums: the floor scales with the summed terms' magnitude
            scale = gy.abs().sum((0, 2, 3)).max().item() * exact["z"].abs().max().item()
        assert_close_to_ref(value, eager[key], exact[key], key, scale=scale)


# Shapes that exercise tile edges (M, c_out, K not multiples of the tiles: 64 x 64 x 32 for
# the CUDA WMMA kernel, 128 x 128 x 64 for its CUTLASS kernels on H100/H200, which take
# c_in % 64 == 0 and c_out % 8 == 0, BLOCK_M 64/128 for Triton), several K tiles, channel
# padding (c_in % 8 != 0), 7x7 stem, strides, dilation, a non-square kernel.
# (n, c_in, h, w, c_out, kernel, stride, padding, dilation)
DIRECT_SHAPES = {
    "stem7x7s2": (2, 3, 23, 19, 64, 7, 2, 3, 1),
    "1x1_c72_c130": (3, 72, 9, 11, 130, 1, 1, 0, 1),
    "1x1s2": (2, 64, 15, 15, 96, 1, 2, 0, 1),
    "3x3_c5_c7": (2, 5, 9, 9, 7, 3, 1, 1, 1),
    "3x3_c64_c64": (4, 64, 14, 14, 64, 3, 1, 1, 1),
    "3x3s2_c40": (2, 40, 17, 13, 72, 3, 2, 1, 1),
    "3x3_dil2": (2, 16, 12, 12, 24, 3, 1, 2, 2),
    "5x3_asym": (1, 8, 10, 7, 8, (5, 3), 1, 1, 1),
}


def direct_inputs(shape, dtype, channels_last, residual, device="cuda"):
    """(x, weight, residual or None, conv args) for a DIRECT_SHAPES entry."""
    n, c_in, h, w, c_out, k, stride, padding, dilation = shape
    kh, kw = k if isinstance(k, tuple) else (k, k)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, c_in, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(c_out, c_in, kh, kw, device=device, dtype=dtype) / (c_in * kh * kw) ** 0.5).contiguous(
        memory_format=fmt)
    conv = conv_args(stride, padding, dilation)
    out = torch.nn.functional.conv2d(x.float(), weight.float(), None, *conv)
    r = torch.randn(out.shape, device=device, dtype=dtype).contiguous(memory_format=fmt) if residual else None
    return x, weight, r, conv


def same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same strides in every dimension of size > 1 (a size-1 dimension's stride is arbitrary:
    a 1x1 kernel's weight is both NCHW- and channels_last-contiguous, whichever strides it has)."""
    return a.shape == b.shape and all(s == t for n, s, t in zip(a.shape, a.stride(), b.stride()) if n > 1)


def compare_outputs(name, ours, ref, ref64, reduction_scale=None):
    """Outputs against the reference op's in the same dtype (standing in for eager: the same
    F.conv2d, float32 BatchNorm math) and in float64: shape, dtype, strides, and error within
    2x the reference's. 1-D outputs are per-channel sums over N*H*W: their floor is judged
    against `reduction_scale`, the magnitude of the summed terms, since the order differs."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    ref64 = ref64 if isinstance(ref64, (tuple, list)) else (ref64,)
    for i, (a, e, r) in enumerate(zip(ours, ref, ref64, strict=True)):
        assert a.shape == e.shape and a.dtype == e.dtype, f"{name}[{i}]: {a.shape} {a.dtype} vs {e.shape} {e.dtype}"
        assert same_strides(a, e), f"{name}[{i}]: strides {a.stride()} vs {e.stride()}"
        scale = reduction_scale if a.dim() == 1 and reduction_scale is not None else None
        assert_close_to_ref(a, e, r.to(torch.float64), f"{name}[{i}]", scale=scale)
