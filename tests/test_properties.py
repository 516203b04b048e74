"""Property-based tests (hypothesis): resnet_fused.ops.conv_bn_relu against eager
F.conv2d + F.batch_norm (+ residual) (+ ReLU), forward, every gradient and the running
statistics, over shapes, memory layouts and strides, kernel sizes (non-square), conv
strides, paddings, dilations, groups, dtypes, train/eval, with/without running statistics,
conv bias, residual and ReLU.

Oracle and tolerance: `unit_cases.check_against_eager` (eager float64 as the reference,
the fused result may err at most 2x eager's own error in the same dtype plus a few ulps,
tolerances.assert_close_to_ref). It also asserts which backend ran the forward.

The example budget is fixed and the search derandomized, so the run is reproducible and its
time bounded. Shapes are small because the Triton kernels run in the Triton interpreter on
CPU (channels <= 8, spatial <= 9). With a GPU the same properties run on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch
from unit_cases import check_against_eager
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from resnet_fused import backends

# CPU tensors where the Triton kernels run in the interpreter (no GPU), else CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TRITON_REASON = backends.unavailable_reason("triton")

LAYOUTS = ["contiguous", "channels_last", "permuted", "channels_slice", "spatial_step", "expanded_batch",
           "channels_last_step", "storage_offset"]


def _laid_out(shape, layout, dtype):
    """A tensor of `shape` with values from torch's RNG, stored as `layout` says."""
    n, c, h, w = shape

    def r(*s):
        return torch.randn(*s, dtype=dtype, device=DEVICE)

    if layout == "contiguous":
        return r(n, c, h, w)
    if layout == "channels_last":
        return r(n, c, h, w).contiguous(memory_format=torch.channels_last)
    if layout == "permuted":  # (h, n, w, c) storage
        return r(h, n, w, c).permute(1, 3, 0, 2)
    if layout == "channels_slice":
        return r(n, 2 * c + 1, h, w)[:, 1::2]
    if layout == "spatial_step":
        return r(n, c, 2 * h, w + 2)[:, :, ::2, 1:w + 1]
    if layout == "expanded_batch":
        return r(1, c, h, w).expand(n, c, h, w)
    if layout == "channels_last_step":
        return r(n, c, h, 2 * w).contiguous(memory_format=torch.channels_last)[..., ::2]
    if layout == "storage_offset":
        return r(n * c * h * w + 3)[3:].view(n, c, h, w)
    raise AssertionError(layout)


def _out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@st.composite
def conv_bn_cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    c_in = groups * draw(st.integers(1, 8 // groups))
    c_out = groups * draw(st.integers(1, 8 // groups))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = [draw(st.integers(1, 3)), draw(st.integers(1, 3))]
    padding = [draw(st.integers(0, 2)), draw(st.integers(0, 2))]
    dilation = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    # the smallest input giving at least one output pixel, up to 9
    h = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 9))
    w = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 9))
    n = draw(st.integers(1, 3))
    ho, wo = _out_size(h, kh, stride[0], padding[0], dilation[0]), _out_size(w, kw, stride[1], padding[1], dilation[1])
    training = draw(st.booleans())
    running = draw(st.booleans()) if training else draw(st.sampled_from([True, True, False]))
    if (training or not running) and n * ho * wo == 1:
        n = 2  # one value per channel: the BatchNorm error (tested in test_validation), not a property
    return dict(
        dtype=dtype, n=n, c_in=c_in, c_out=c_out, h=h, w=w, kernel=(kh, kw), stride=stride, padding=padding,
        dilation=dilation, groups=groups, training=training, running=running,
        relu=draw(st.booleans()), residual=draw(st.booleans()), bias=draw(st.booleans()),
        x_layout=draw(st.sampled_from(LAYOUTS)),
        w_layout=draw(st.sampled_from(["contiguous", "channels_last", "permuted"])),
        r_layout=draw(st.sampled_from(["contiguous", "channels_last", "spatial_step"])),
        momentum=draw(st.sampled_from([0.1, 0.0, 1.0, 0.37])), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        seed=draw(st.integers(0, 2**16)),
    )


def _eager_conv_backward_fails(tensors, case) -> bool:
    """Eager PyTorch itself raises for a few layouts: on CPU, slow_conv2d's weight gradient
    with a weight that is channels_last but not contiguous ("slow_conv2d: grad_weight must be
    contiguous", torch 2.14). Such examples test torch, not resnet_fused; they are rejected."""
    x = tensors["x"].detach().requires_grad_()
    w = tensors["weight"].detach().requires_grad_()
    try:
        torch.nn.functional.conv2d(x, w, None, case["stride"], case["padding"], case["dilation"],
                                   case["groups"]).sum().backward()
    except RuntimeError as exc:
        assert "must be contiguous" in str(exc), exc
        return True
    return False


def _run_case(case, backend):
    torch.manual_seed(case["seed"])
    dtype, c_out = case["dtype"], case["c_out"]
    n, kh, kw = case["n"], *case["kernel"]
    ho = _out_size(case["h"], kh, case["stride"][0], case["padding"][0], case["dilation"][0])
    wo = _out_size(case["w"], kw, case["stride"][1], case["padding"][1], case["dilation"][1])

    def vec(positive=False):
        v = torch.rand(c_out, dtype=dtype, device=DEVICE) + 0.5 if positive else torch.randn(
            c_out, dtype=dtype, device=DEVICE)
        return v

    tensors = dict(
        x=_laid_out((n, case["c_in"], case["h"], case["w"]), case["x_layout"], dtype),
        weight=_laid_out((c_out, case["c_in"] // case["groups"], kh, kw), case["w_layout"], dtype),
        bn_weight=vec(positive=True), bn_bias=vec(),
        running_mean=vec() if case["running"] else None,
        running_var=vec(positive=True) if case["running"] else None,
        bias=vec() if case["bias"] else None,
        residual=_laid_out((n, c_out, ho, wo), case["r_layout"], dtype) if case["residual"] else None,
    )
    if _eager_conv_backward_fails(tensors, case):
        reject()
    # The support matrix: float64 (and, on cuda, groups > 1) take the reference path; every
    # other call must run on the requested backend.
    expect = backend
    if dtype == torch.float64 or (backend == "cuda" and case["groups"] > 1):
        expect = "reference"
    check_against_eager(
        backend, expect, tensors, training=case["training"], relu=case["relu"], momentum=case["momentum"],
        eps=case["eps"], stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
        groups=case["groups"],
    )


_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=400, **_SETTINGS)
@given(case=conv_bn_cases([torch.float32, torch.float64]))
def test_reference_matches_eager(case):
    _run_case(case, "reference")


@pytest.mark.slow
@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")
@settings(max_examples=80, **_SETTINGS)
@given(case=conv_bn_cases([torch.float32, torch.float32, torch.float32, torch.float64]))
def test_triton_matches_eager(case):
    _run_case(case, "triton")


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_gpu_backends_match_eager(backend):
    """On a GPU: the same properties on CUDA tensors (float32; half precision is covered by
    the op suite), with a larger budget."""
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")

    @settings(max_examples=200, **_SETTINGS)
    @given(case=conv_bn_cases([torch.float32]))
    def run(case):
        _run_case(case, backend)

    run()
