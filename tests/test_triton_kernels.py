"""Paths inside the Triton backend's kernels that the op suite (tests/test_ops.py) does not
choose by itself: the int64-index variants (picked only for tensors of 2**31 elements or
more, forced here on small ones).
Run in the interpreter on CPU (conftest sets TRITON_INTERPRET=1 without a GPU) or on a GPU.
"""

from __future__ import annotations

import os

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
# several channel blocks and a partial one, a strided 3x3, the flattened stem-like K, groups.
INDEX_CASES = {
    "3x3_c40": (40, 24, 3, 1, 1, 1, 1, 6),
    "3x3s2_dil2": (16, 16, 3, 2, 2, 2, 1, 7),
    "stem7x7s2": (3, 8, 7, 2, 3, 1, 1, 9),
    "1x1_groups2": (32, 32, 1, 1, 0, 1, 2, 5),
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

