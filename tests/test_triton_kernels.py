"""Paths inside the Triton backend's kernels that the op suite (tests/test_ops.py) does not
choose by itself: the int64-index variants (picked only for tensors of 2**31 elements or
more, forced here on small ones), and the launch-time decisions (configs, no CUDA at import).
Run in the interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU) or on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from resnet_fused import backends

REASON = backends.unavailable_reason("triton")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"triton backend unavailable: {REASON}")

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _launch_mod():
    from resnet_fused.backends.triton.kernels import launch

    return launch


def _ops():
    return torch.ops.resnet_fused_triton


# (c_in, c_out, kernel, stride, padding, dilation, groups, input H=W): a per-tap K loop with
# several channel blocks and a partial one, a strided 3x3 (dgrad per phase), a strided dilated
# 3x3 (dgrad masked), the flattened stem-like K, groups, and an ungrouped 1x1 (TMA descriptors).
INDEX_CASES = {
    "3x3_c40": (40, 24, 3, 1, 1, 1, 1, 6),
    "3x3s2": (24, 16, 3, 2, 1, 1, 1, 7),
    "3x3s2_dil2": (16, 16, 3, 2, 2, 2, 1, 7),
    "stem7x7s2": (3, 8, 7, 2, 3, 1, 1, 9),
    "1x1_groups2": (32, 32, 1, 1, 0, 1, 2, 5),
    "1x1": (32, 16, 1, 1, 0, 1, 1, 5),  # the forward's TMA-descriptor GEMM (x copied to NHWC when NCHW)
}


def _run_all_ops(cfg, channels_last):
    """Every Triton op of a conv unit (both forwards and both backwards, with residual and
    ReLU) on fixed inputs; returns their outputs."""
    c_in, c_out, k, s, p, d, g, hw = cfg
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = rand(2, c_in, hw, hw).contiguous(memory_format=fmt)
    w = rand(c_out, c_in // g, k, k).contiguous(memory_format=fmt)
    ho = (hw + 2 * p - d * (k - 1) - 1) // s + 1
    res = rand(2, c_out, ho, ho).contiguous(memory_format=fmt)
    gy = rand(2, c_out, ho, ho).contiguous(memory_format=fmt)
    vec = torch.rand(c_out, generator=gen).to(DEVICE) + 0.5
    geo = ([s, s], [p, p], [d, d], g)
    ops = _ops()
    y_eval = ops.conv_bn_eval(x, w, vec, vec - 1, res, *geo, True)
    y, z, mean, var = ops.conv_bn_train(x, w, None, vec, vec - 1, res, *geo, 1e-5, True)
    eval_bwd = ops.conv_bn_eval_backward(gy, x, w, vec, y_eval, *geo, True, [True, True, True, True, True])
    train_bwd = ops.conv_bn_train_backward(gy, x, w, z, y, mean, var, vec, *geo, 1e-5, True,
                                           [True, True, False, True, True, True])
    return (y_eval, y, z, mean, var, *eval_bwd, *train_bwd, ops.add_relu(z, res))


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("cfg", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_int64_index_variant_matches_int32(cfg, channels_last):
    """The int64-index variant of every kernel, forced on small tensors, computes exactly what
    the int32 variant computes (the same arithmetic; only the index width differs)."""
    launch = _launch_mod()
    with launch.observing() as default_launches:
        expected = _run_all_ops(cfg, channels_last)
    with launch.force_int64(), launch.observing() as forced_launches:
        got = _run_all_ops(cfg, channels_last)
    assert all(not lc.kwargs["INDEX_64"] for lc in default_launches)
    assert forced_launches and all(lc.kwargs["INDEX_64"] for lc in forced_launches)
    assert {type(lc.kernel) for lc in forced_launches} == {type(lc.kernel) for lc in default_launches}
    tma = [lc.kwargs["TMA"] for lc in forced_launches if "TMA" in lc.kwargs]
    assert any(tma) == (cfg == INDEX_CASES["1x1"])
    for i, (a, b) in enumerate(zip(expected, got)):
        assert torch.equal(a, b), f"output {i} differs between the int32 and int64 variants"


def test_int64_chosen_past_2_31_elements():
    """The launcher's choice: int64 once a tensor spans 2**31 elements, int32 below."""
    launch = _launch_mod()
    below = torch.empty(2**31 - 1, device="meta")
    at = torch.empty(2**31, device="meta")
    assert not launch.needs_int64(below, None)
    assert launch.needs_int64(below, at)
    # a strided view spans more than its element count
    wide = torch.empty(2, device="meta").as_strided((2, 2), (2**30, 2**30))
    assert launch.needs_int64(wide)


def test_every_launch_takes_an_index_width():
    """No kernel is launched without choosing its index width (INDEX_64)."""
    launch = _launch_mod()
    with launch.observing() as launches:
        _run_all_ops(INDEX_CASES["3x3_c40"], True)
    names = {getattr(lc.kernel, "__name__", None) or type(lc.kernel).__name__ for lc in launches}
    assert launches, names
    assert all("INDEX_64" in lc.kwargs for lc in launches), names


def test_autotune_keys_hold_what_changes_a_configs_speed():
    """Each autotuned conv kernel's key holds every launch argument that changes which config is
    fastest: the GEMM shape and, besides, the strides and dilation, TF32 or exact float32 and the
    index width, and the kernel's own epilogue and prologue flags; so two layers that differ
    only in stride (ResNet-50's 3x3 and 3x3/2) are tuned apart."""
    from resnet_fused.backends.triton.kernels import conv

    common = {"M_BUCKET", "C_OUT_G", "C_IN_G", "KH", "KW", "STRIDE_H", "STRIDE_W", "DIL_H", "DIL_W", "ALLOW_TF32",
              "INDEX_64"}
    own = {"_conv_fwd_kernel": {"EPILOGUE", "RELU", "TMA", "PROLOGUE", "IN_RELU"},
           "_conv_dgrad_kernel": {"RELU_MASK", "BN_SUMS"}, "_conv_wgrad_kernel": {"PROLOGUE", "IN_RELU"}}
    for name, flags in own.items():
        tuner = getattr(conv, name)
        assert set(tuner.keys) == common | flags, name
        assert set(tuner.keys) <= set(tuner.arg_names), name


def test_importing_the_backend_initializes_no_cuda():
    """Importing the package and its Triton kernels (outside the interpreter, where a GPU's
    config lists are built) asks CUDA nothing: the architecture is read at launch time."""
    # is_available() says yes, so that a decoration-time architecture check would go on to ask
    # the device (on this CPU machine it would otherwise stop at "no GPU").
    code = (
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "def boom(*a, **k):\n"
        "    raise AssertionError('CUDA queried at import')\n"
        "for name in ('get_device_capability', 'get_device_properties', '_lazy_init', 'current_device',\n"
        "             'device_count', 'init'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "import resnet_fused\n"
        "import resnet_fused.backends.triton.kernels.conv\n"
        "import resnet_fused.backends.triton.kernels.batchnorm\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _assert_exact_float32(launches):
    """The float32 GEMMs ran without TF32 (conftest turns it off for every test): on a GPU a TF32
    dot is off by ~1e-3, which these tests' float64 tolerances would reject."""
    gemms = [lc for lc in launches if "ALLOW_TF32" in lc.kwargs]
    assert gemms and not any(lc.kwargs["ALLOW_TF32"] for lc in gemms)


def _kernels():
    from resnet_fused.backends.triton.kernels import batchnorm, conv

    return conv, batchnorm


@pytest.mark.parametrize("group_tiles", [None, 32, 64], ids=["one-group", "groups32", "groups64"])
def test_finalize_stats_merges_groups_of_tiles(group_tiles):
    """The two-stage Chan merge (groups of tiles in parallel, then the groups in order) gives
    the mean and biased variance of the rows the tiles summarize, with a last partial tile,
    and the same bits on every run."""
    _, bn = _kernels()
    gen = torch.Generator().manual_seed(1)
    tile_m, c = 8, 40
    m = 150 * tile_m - 3  # 150 tiles, the last with 5 rows
    rows = (torch.randn(m, c, generator=gen, dtype=torch.float64) * 3 + 100).to(torch.float32)
    t = -(-m // tile_m)
    padded = torch.cat([rows, rows.new_zeros(t * tile_m - m, c)]).view(t, tile_m, c)
    counts = torch.full((t, 1), float(tile_m))
    counts[-1] = m - (t - 1) * tile_m
    pmean = padded.double().sum(1) / counts
    dev = torch.where((torch.arange(tile_m)[None, :, None] < counts[:, :, None]), padded.double() - pmean[:, None], 0)
    pm2 = (dev * dev).sum(1)
    pmean, pm2 = pmean.float().to(DEVICE), pm2.float().to(DEVICE)
    outs = []
    for _ in range(2):
        mean = torch.empty(c, device=DEVICE)
        var = torch.empty(c, device=DEVICE)
        bn.finalize_stats(pmean, pm2, mean, var, m, tile_m, group_tiles=group_tiles)
        outs.append((mean, var))
    ref_mean, ref_var = rows.double().mean(0), rows.double().var(0, unbiased=False)
    torch.testing.assert_close(outs[0][0].double().cpu(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(outs[0][1].double().cpu(), ref_var, rtol=1e-4, atol=0)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.slow
@pytest.mark.parametrize("group_tiles", [None, 32], ids=["one-group", "groups32"])
def test_sum_partials_in_groups(group_tiles):
    _, bn = _kernels()
    gen = torch.Generator().manual_seed(2)
    part = torch.randn(3, 130, 70, generator=gen).to(DEVICE)
    got = bn.sum_partials(part, group_tiles=group_tiles)
    torch.testing.assert_close(got.double().cpu(), part.double().sum(1).cpu(), rtol=1e-5, atol=1e-5)
    assert torch.equal(got, bn.sum_partials(part, group_tiles=group_tiles))


@pytest.mark.parametrize("cfg", [(16, 24, 3, 1, 1, 1, 1, 9), (3, 8, 7, 2, 3, 1, 1, 11), (32, 32, 1, 2, 0, 1, 2, 8)],
                         ids=["3x3", "stem", "1x1s2_groups2"])
def test_wgrad_split_k(cfg):
    """wgrad with K (output pixels) split 3 ways into float32 partials, summed in order, against
    the single split and against float64 (the GPU path picks its split for the SM count; the
    interpreter's default is 1)."""
    conv, _ = _kernels()
    c_in, c_out, k, s, p, d, g, hw = cfg
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, c_in, hw, hw, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in // g, k, k, generator=gen).to(DEVICE)
    ho = (hw + 2 * p - d * (k - 1) - 1) // s + 1
    dz = torch.randn(2, c_out, ho, ho, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    geo = ([s, s], [p, p], [d, d], g)
    results = {}
    with _launch_mod().observing() as launches:
        for split in (1, 3):
            gw = torch.empty_like(w)
            conv.conv_wgrad(dz, x, w, *geo, grad_w=gw, split=split)
            results[split] = gw
    _assert_exact_float32(launches)
    ref = torch.nn.grad.conv2d_weight(x.double().cpu(), w.shape, dz.double().cpu(), s, p, d, g)
    for split, gw in results.items():
        torch.testing.assert_close(gw.double().cpu(), ref, rtol=1e-4, atol=1e-4, msg=f"split {split}")


@pytest.mark.parametrize("c_in,c_out,hw", [(8, 16, 5), (40, 72, 13)], ids=["c8", "c40_tails"])
def test_1x1_forward_through_tma_descriptors(c_in, c_out, hw, monkeypatch):
    """A 1x1 stride-1 conv on dense NHWC runs the TMA-descriptor GEMM (rows and channels past
    the ends zero-filled by the copy: 13x13 pixels are not whole 64-row tiles, 40 channels not a
    whole K block), in both epilogues, and matches the pointer-load kernel it replaces and float64."""
    launch = _launch_mod()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, c_in, hw, hw, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 1, 1, generator=gen).to(DEVICE)
    scale, shift = torch.rand(c_out, generator=gen).to(DEVICE) + 0.5, torch.randn(c_out, generator=gen).to(DEVICE)
    res = torch.randn(2, c_out, hw, hw, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    geo = ([1, 1], [0, 0], [1, 1], 1)
    ops = _ops()

    def run():
        with launch.observing() as launches:
            y = ops.conv_bn_eval(x, w, scale, shift, res, *geo, True)
            z = ops.conv_bn_train(x, w, None, scale, shift, None, *geo, 1e-5, False)[1]
        conv_launches = [lc for lc in launches if "TMA" in lc.kwargs]
        _assert_exact_float32(conv_launches)
        return y, z, {lc.kwargs["TMA"] for lc in conv_launches}

    y, z, tma = run()
    assert tma == {True}
    monkeypatch.setenv("RESNET_FUSED_TRITON_TMA", "0")
    y_ptr, z_ptr, tma_off = run()
    assert tma_off == {False}
    ref_z = torch.nn.functional.conv2d(x.double().cpu(), w.double().cpu())
    ref_y = torch.relu(ref_z * scale.double().cpu()[:, None, None] + shift.double().cpu()[:, None, None]
                       + res.double().cpu())
    for got, ptr, ref in ((y, y_ptr, ref_y), (z, z_ptr, ref_z)):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ptr, rtol=1e-6, atol=1e-6)


# (c_in, c_out, kernel, stride (h, w), padding, input H, W): 3x3/2 as in ResNet's first block of
# a stage (odd and even sizes, so the phases differ in size), the 1x1/2 downsample (half the
# phases meet no tap: their gradient is zero), unpadded 3x3/2, a stride of (2, 1), 5x5/3.
PHASED_CASES = {
    "3x3s2_odd": (24, 40, 3, (2, 2), 1, 9, 7),
    "3x3s2_even": (16, 16, 3, (2, 2), 1, 8, 8),
    "1x1s2": (32, 24, 1, (2, 2), 0, 7, 6),
    "3x3s2_pad0": (16, 24, 3, (2, 2), 0, 9, 9),
    "3x3s21": (16, 16, 3, (2, 1), 1, 7, 5),
    "5x5s3": (16, 16, 5, (3, 3), 2, 10, 8),
}


@pytest.mark.parametrize("cfg", PHASED_CASES.values(), ids=PHASED_CASES.keys())
def test_strided_dgrad_runs_per_phase(cfg, monkeypatch):
    """A strided conv's dgrad runs per phase (grid axis 1 over h % stride, w % stride, only the
    taps that phase meets); it and the single masked pass over all pixels both match float64, as
    do the BatchNorm-backward sums of the recompute chain's epilogue."""
    conv, _ = _kernels()
    launch = _launch_mod()
    c_in, c_out, k, stride, p, h, w = cfg
    gen = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)

    weight = rand(c_out, c_in, k, k)
    ho, wo = (h + 2 * p - k) // stride[0] + 1, (w + 2 * p - k) // stride[1] + 1
    dz = rand(2, c_out, ho, wo)
    z_in = rand(2, c_in, h, w)
    mean, var = torch.randn(c_in, generator=gen).to(DEVICE), torch.rand(c_in, generator=gen).to(DEVICE) + 0.5
    bn_w, bn_b = torch.rand(c_in, generator=gen).to(DEVICE) + 0.5, torch.randn(c_in, generator=gen).to(DEVICE)
    geo = (list(stride), [p, p], [1, 1], 1)

    def run():
        gx, sums = torch.empty_like(z_in), torch.empty(2, c_in, device=DEVICE)
        with launch.observing() as launches:
            conv.conv_dgrad(dz, weight, gx, None, *geo,
                            bn_input=conv.BnInput(z_in, conv.BnPrologue(mean, var, bn_w, bn_b, 1e-5, True)),
                            bn_sums=sums)
        (lc,) = [lc for lc in launches if "PHASED" in lc.kwargs]
        _assert_exact_float32([lc])
        return gx, sums, lc

    gx, sums, lc = run()
    assert lc.kwargs["PHASED"]
    assert lc.grid({"BLOCK_N": 16})[1] == stride[0] * stride[1]
    monkeypatch.setattr(conv, "dgrad_phased", lambda *args: False)
    conv._dgrad_plan.cache_clear()  # launch plans are cached per shape: plan again under the patched rule
    try:
        gx_masked, sums_masked, lc_masked = run()
    finally:
        conv._dgrad_plan.cache_clear()  # no masked plan outlives the patch
    assert not lc_masked.kwargs["PHASED"]

    d = lambda t: t.double().cpu()  # noqa: E731
    ref = torch.nn.grad.conv2d_input(z_in.shape, d(weight), d(dz), stride, p)
    ref = torch.where(d(z_in - mean[:, None, None]) * d(bn_w * torch.rsqrt(var + 1e-5))[:, None, None]
                      + d(bn_b)[:, None, None] <= 0, 0.0, ref)
    ref_sums = torch.stack([ref.sum((0, 2, 3)), (ref * (d(z_in) - d(mean)[:, None, None])).sum((0, 2, 3))])
    for got in (gx, gx_masked):
        torch.testing.assert_close(d(got), ref, rtol=1e-5, atol=1e-5)
    for got in (sums, sums_masked):
        torch.testing.assert_close(d(got), ref_sums, rtol=1e-5, atol=1e-4)


def test_tma_scratch_allocator_reaches_every_thread():
    """The 1x1 forward's device-side TMA descriptors need Triton's global-scratch allocator at
    every launch: eager, from a compiled graph (inductor's cached launcher, not our launcher),
    and from any thread (a new thread starts with the ContextVar's default). Importing the
    kernels makes torch's allocator that default; an allocator set explicitly still wins."""
    import threading

    import triton
    from triton.runtime import _allocation

    conv, _ = _kernels()
    assert conv._SCRATCH_ALLOCATOR_INSTALLED

    def in_thread(fn):
        got = []
        thread = threading.Thread(target=lambda: got.append(fn()))
        thread.start()
        thread.join()
        return got[0]

    assert in_thread(_allocation._allocator.get) is conv.torch_scratch

    def explicit(size, alignment, stream):
        raise AssertionError("not called here")

    def set_then_get():
        triton.set_allocator(explicit)
        return _allocation._allocator.get()

    assert in_thread(set_then_get) is explicit
    assert in_thread(_allocation._allocator.get) is conv.torch_scratch


def _meta(*shape, dtype=torch.bfloat16, channels_last=True):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if channels_last and len(shape) == 4 else t


def test_plan_cache_plans_once_per_key_and_unhashable_keys_uncached():
    """launch.plan_cache: one build per key, at most PLAN_CACHE_SIZE kept; a key that cannot be
    hashed (torch.compile's symbolic sizes) is planned on every call instead of failing."""
    launch = _launch_mod()
    built = []

    @launch.plan_cache
    def plan(key):
        built.append(key)
        return len(built)

    assert plan((1, 2)) == plan((1, 2)) == 1 and plan((3,)) == 2
    assert built == [(1, 2), (3,)]
    assert plan.cache_info().maxsize == launch.PLAN_CACHE_SIZE
    assert plan([4]) == 3 and plan([4]) == 4  # unhashable: built each time


def test_conv_forward_plans_once_per_shape_layout_dtype_and_switch(monkeypatch):
    """conv_forward decides its configs, grid, copies and index width once per (sizes, strides,
    dtype, device, switches): repeated calls reuse the plan; a new batch, layout or dtype plans
    again with its own sizes; a switch flipped between calls (forced int64, TF32,
    RESNET_FUSED_TRITON_TMA) is seen by the next call. Launches recorded on meta tensors."""
    from resnet_fused.backends.triton.kernels import conv

    launch = _launch_mod()
    x, w, v = _meta(2, 32, 8, 8), _meta(16, 32, 1, 1), torch.empty(16, device="meta")
    geo = ([1, 1], [0, 0], [1, 1], 1)

    def forward(x=x, w=w):
        return conv.conv_forward(x, w, *geo, scale=v, shift=v, relu=True)

    conv._forward_plan.cache_clear()
    with launch.recording() as launches:
        outs = [forward() for _ in range(3)]
    info = conv._forward_plan.cache_info()
    assert (info.misses, info.hits) == (1, 2)
    assert all(o.shape == (2, 16, 8, 8) and o.is_contiguous(memory_format=torch.channels_last) for o in outs)
    assert launches[0].kwargs["TMA"] and launches[0].kwargs["M"] == 2 * 8 * 8
    assert all(lc.kwargs.keys() == launches[0].kwargs.keys() for lc in launches)

    with launch.recording() as launches:
        y_batch = forward(_meta(4, 32, 8, 8))
        y_nchw = forward(_meta(2, 32, 8, 8, channels_last=False))
        forward(_meta(2, 32, 8, 8, dtype=torch.float32), _meta(16, 32, 1, 1, dtype=torch.float32))
    assert conv._forward_plan.cache_info().misses == 4
    assert y_batch.shape == (4, 16, 8, 8) and launches[0].kwargs["M"] == 4 * 8 * 8
    # NCHW: x read from a channels_last copy (so still the TMA GEMM), y returned NCHW
    assert y_nchw.is_contiguous() and launches[1].kwargs["TMA"]
    assert launches[1].kwargs["x_ptr"].is_contiguous(memory_format=torch.channels_last)
    assert launches[2].kwargs["x_ptr"].dtype == torch.float32

    prev_tf32 = torch.backends.cudnn.allow_tf32
    try:
        with launch.recording() as launches:
            with launch.force_int64():
                forward()
            forward()
            torch.backends.cudnn.allow_tf32 = True
            forward(_meta(2, 32, 8, 8, dtype=torch.float32), _meta(16, 32, 1, 1, dtype=torch.float32))
            torch.backends.cudnn.allow_tf32 = False
            forward(_meta(2, 32, 8, 8, dtype=torch.float32), _meta(16, 32, 1, 1, dtype=torch.float32))
            monkeypatch.setenv("RESNET_FUSED_TRITON_TMA", "0")
            forward()
    finally:
        torch.backends.cudnn.allow_tf32 = prev_tf32
    assert [lc.kwargs["INDEX_64"] for lc in launches] == [True, False, False, False, False]
    assert [lc.kwargs["ALLOW_TF32"] for lc in launches] == [False, False, True, False, False]
    assert [lc.kwargs["TMA"] for lc in launches] == [True, True, True, True, False]


def test_backward_and_batchnorm_plans_once_per_shape():
    """dgrad, wgrad and the per-channel BatchNorm kernels plan once per shape too, and again
    for a new one (their grids follow the new sizes)."""
    from resnet_fused.backends.triton.kernels import batchnorm, conv

    launch = _launch_mod()
    plans = (conv._dgrad_plan, conv._wgrad_plan, batchnorm._rows_plan, batchnorm._two_stage_plan)
    for plan in plans:
        plan.cache_clear()
    geo = ([1, 1], [1, 1], [1, 1], 1)
    w, vec = _meta(16, 8, 3, 3), torch.empty(16, dtype=torch.float32, device="meta")

    def step(n):
        x, dz = _meta(n, 8, 6, 6), _meta(n, 16, 6, 6)
        conv.conv_dgrad(dz, w, torch.empty_like(x), None, *geo)
        conv.conv_wgrad(dz, x, w, *geo, grad_w=torch.empty_like(w))
        batchnorm.bn_backward(dz, dz, dz, vec, vec, vec, 1e-5, True, torch.empty_like(dz), None, None, None, None)

    with launch.recording() as launches:
        step(2)
        step(2)
    assert [p.cache_info().misses for p in plans] == [1, 1, 1, 1]
    assert all(p.cache_info().hits >= 1 for p in plans)
    with launch.recording() as launches:
        step(4)
    assert [p.cache_info().misses for p in plans] == [2, 2, 2, 2]
    dgrad = next(lc for lc in launches if lc.kwargs.get("dz_ptr") is not None and "PHASED" in lc.kwargs)
    assert dgrad.kwargs["M"] == 4 * 6 * 6
