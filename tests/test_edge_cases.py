"""Edge cases: input at the edges of the domain gives eager PyTorch's answer.

  * meta tensors (shape inference) and BatchNorm vectors of another floating dtype;
  * zero-size batches return empty outputs, gradients and untouched running statistics, as
    nn.Conv2d + nn.BatchNorm2d do;
  * NaN and Inf propagate as in eager PyTorch;
  * non-contiguous and oddly strided tensors (slices, permutes, expanded tensors, channels_last
    with odd strides, storage offsets) give correct results;
  * inputs with more than 2^31 elements (GPU only: needs_cuda, slow).

Each behaviour runs on every backend through the `backend` fixture (conftest.py): the
reference, Triton (in its interpreter on CPU tensors when no GPU is present) and CUDA, each
skipped with available_backends()'s reason where it cannot run. check_against_eager
(unit_cases.py) asserts which backend ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backend_under_test import interpreted, sm90_launch_counter
from resnet_fused.tolerances import assert_close_to_ref
from unit_cases import UNIT_GRAD_ARGS, check_against_eager, eager_conv_bn_relu

import resnet_fused
from resnet_fused import backends, ops


def _unit(n=2, c_in=4, c_out=6, hw=5, k=3, dtype=torch.float32, residual=True, bias=False, device="cpu", **conv):
    """Random conv + BatchNorm (+ residual) tensors on `device` and the conv arguments."""
    conv = {"padding": k // 2, **conv}
    stride, padding, dilation = (conv.get("stride", 1), conv["padding"], conv.get("dilation", 1))
    ho = (hw + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    groups = conv.get("groups", 1)
    tensors = dict(
        x=torch.randn(n, c_in, hw, hw, dtype=dtype, device=device),
        weight=torch.randn(c_out, c_in // groups, k, k, dtype=dtype, device=device),
        bn_weight=torch.rand(c_out, dtype=dtype, device=device) + 0.5,
        bn_bias=torch.randn(c_out, dtype=dtype, device=device),
        running_mean=torch.randn(c_out, dtype=dtype, device=device),
        running_var=torch.rand(c_out, dtype=dtype, device=device) + 0.5,
        bias=torch.randn(c_out, dtype=dtype, device=device) if bias else None,
        residual=torch.randn(n, c_out, ho, ho, dtype=dtype, device=device) if residual else None,
    )
    return tensors, conv


# ---------------------------------------------------------------------------------------
# Meta tensors and mixed floating dtypes.


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_meta_tensors_give_shapes_as_eager(training):
    """Every tensor on the meta device (shape inference, deferred initialization): the output's
    shape, dtype and device are eager's, and backward runs."""
    tensors, conv = _unit(n=2, bias=True, stride=2)
    meta = {k: v.to("meta").requires_grad_(k in UNIT_GRAD_ARGS) for k, v in tensors.items() if v is not None}
    y = ops.conv_bn_relu(**meta, training=training, **conv)
    ye = eager_conv_bn_relu(**meta, training=training, **conv)
    assert (y.shape, y.dtype, y.device) == (ye.shape, ye.dtype, ye.device)
    grads = torch.autograd.grad(y, [meta[k] for k in UNIT_GRAD_ARGS], torch.ones_like(y))
    assert [g.shape for g in grads] == [meta[k].shape for k in UNIT_GRAD_ARGS]


def test_bn_vectors_of_another_floating_dtype_are_accepted():
    """BatchNorm vectors may be float32 next to a float64 conv (as under autocast); the answer
    is still eager's."""
    tensors, conv = _unit(dtype=torch.float64)
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
        tensors[name] = tensors[name].float()
    tensors = {k: v for k, v in tensors.items() if v is not None}
    y = ops.conv_bn_relu(**tensors, training=False, **conv)
    expected = eager_conv_bn_relu(**{k: v.double() for k, v in tensors.items() if v is not None},
                                  training=False, **conv)
    torch.testing.assert_close(y, expected)


# ---------------------------------------------------------------------------------------
# Zero-size batches: empty outputs, zero parameter gradients, running statistics untouched
# (nn.BatchNorm2d with N=0 in training leaves them as they are), as eager does.


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch_matches_eager(backend, training, channels_last):
    tensors, conv = _unit(n=0, bias=True, stride=2, device=backend.device())
    if channels_last:
        tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    outs = []
    for fn in (eager_conv_bn_relu, ops.conv_bn_relu):
        args = {k: v.clone().requires_grad_(k in UNIT_GRAD_ARGS) for k, v in tensors.items()}
        y = fn(**args, training=training, **conv)
        y.sum().backward()
        outs.append((y, args))
    (ye, ae), (yf, af) = outs
    assert yf.shape == ye.shape == (0, 6, 3, 3) and yf.dtype == ye.dtype
    assert yf.requires_grad
    for name in UNIT_GRAD_ARGS:
        assert af[name].grad is not None, name
        assert torch.equal(af[name].grad, ae[name].grad), name
    for name in ("running_mean", "running_var"):
        assert torch.equal(af[name], ae[name]), name
        assert torch.equal(af[name], tensors[name]), f"{name} changed by an empty batch"


def test_zero_size_batch_module_keeps_running_statistics(backend):
    """Module level, as nn.BatchNorm2d: num_batches_tracked still counts the (empty) step."""
    from torch import nn

    from resnet_fused.nn import ConvBNReLU2d

    device = backend.device()
    conv, bn = nn.Conv2d(4, 6, 3, padding=1).to(device), nn.BatchNorm2d(6, momentum=None).to(device)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 1.5)
    fused = ConvBNReLU2d.from_modules(conv, bn)
    eager_bn = nn.BatchNorm2d(6, momentum=None).to(device)
    eager_bn.load_state_dict(bn.state_dict())
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(0, 4, 5, 5, device=device)
    y = fused(x)
    ye = torch.relu(eager_bn(conv(x)))
    assert y.shape == ye.shape
    for key, value in eager_bn.state_dict().items():
        assert torch.equal(fused.bn.state_dict()[key], value), key
    assert torch.equal(fused.bn.running_mean, before["running_mean"])
    assert int(fused.bn.num_batches_tracked) == 1


def test_zero_size_add_relu(backend):
    device = backend.device()
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    r = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    y = ops.add_relu(x, r)
    y.sum().backward()
    assert y.shape == x.shape and x.grad.shape == x.shape and r.grad.shape == r.shape


@pytest.mark.skipif(backends.unavailable_reason("triton") is not None,
                    reason=f"triton backend unavailable: {backends.unavailable_reason('triton')}")
def test_zero_size_routes_to_reference_on_triton():
    """An empty batch leaves the Triton kernels nothing to do: the reference takes it."""
    tensors, conv = _unit(n=0, device="cpu" if interpreted("triton") else "cuda")
    with resnet_fused.use_backend("triton"), backends.record_selections() as selected:
        ops.conv_bn_relu(**tensors, training=True, **conv)
        ops.conv_bn_relu(**tensors, training=False, **conv)
    assert dict(selected) == {"reference": 2}, dict(selected)


# ---------------------------------------------------------------------------------------
# NaN and Inf propagate as they do in eager PyTorch: same NaN positions, same infinities, the
# finite values close; in the output, the gradients and the running statistics.

NONFINITE = {
    "x_nan": ("x", (0, 1, 2, 2), float("nan")),
    "x_inf": ("x", (1, 2, 0, 0), float("inf")),
    "x_neginf": ("x", (1, 3, 4, 4), float("-inf")),
    "residual_nan": ("residual", (0, 0, 0, 0), float("nan")),
    "residual_inf": ("residual", (1, 1, 1, 1), float("inf")),
    "residual_neginf": ("residual", (1, 2, 3, 3), float("-inf")),
    "weight_nan": ("weight", (2, 1, 1, 1), float("nan")),
}


def _assert_same_nonfinite(actual, expected, what):
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().sum().item()} positions, eager at {expected.isnan().sum().item()}")
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{what}: +inf positions differ"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{what}: -inf positions differ"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-5, atol=1e-5, msg=what)


# NaN reaches the ReLU with a NaN input, or with an infinite x under batch statistics
# (mean = inf, inf - inf = NaN); the fused ReLUs once mapped it to 0.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("where", NONFINITE)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "noact"])
def test_nan_and_inf_propagate_as_in_eager(backend, relu, where, training):
    tensors, conv = _unit(c_in=4, c_out=6, hw=5, device=backend.device())
    name, index, value = NONFINITE[where]
    tensors[name][index] = value
    runs = []
    for fn in (eager_conv_bn_relu, ops.conv_bn_relu):
        args = {k: v.clone() for k, v in tensors.items() if v is not None}
        for k in UNIT_GRAD_ARGS:
            if k in args:
                args[k].requires_grad_()
        with backends.record_selections() as selected:
            y = fn(**args, training=training, relu=relu, **conv)
            grad_y = 1 + 0.25 * (torch.arange(y.numel(), device=y.device).view(y.shape) % 3).to(y.dtype)
            grads = torch.autograd.grad(y, [args[k] for k in UNIT_GRAD_ARGS if k in args], grad_y)
        if fn is ops.conv_bn_relu:
            assert dict(selected) == {backend.name: 1}, dict(selected)
        runs.append((y, grads, args))
    (ye, ge, ae), (yf, gf, af) = runs
    _assert_same_nonfinite(yf, ye, "output")
    for k, a, e in zip([k for k in UNIT_GRAD_ARGS if k in ae], gf, ge):
        _assert_same_nonfinite(a, e, f"grad {k}")
    for k in ("running_mean", "running_var"):
        _assert_same_nonfinite(af[k], ae[k], k)


@pytest.mark.needs_cuda
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["x_nan", "x_inf"])
def test_nonfinite_statistics_on_a_64_channel_layer(backend, where):
    """The test above has 4 input channels, which only the CUDA backend's sm80 kernel takes. A
    64-channel bf16 channels_last layer is one the sm90 (CUTLASS) kernels take on an H100/H200,
    whose per-tile statistics once clamped a NaN variance to 0: a NaN or an Inf in x gives NaN
    batch statistics there as in eager, in the output and the running statistics."""
    if backend.interpreted:
        pytest.skip("the Triton interpreter runs CPU tensors only")
    tensors, conv = _unit(c_in=64, c_out=64, hw=8, dtype=torch.bfloat16, device="cuda")
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var"):
        tensors[name] = tensors[name].float()
    tensors["x"] = tensors["x"].contiguous(memory_format=torch.channels_last)
    tensors["residual"] = tensors["residual"].contiguous(memory_format=torch.channels_last)
    _, index, value = NONFINITE[where]
    tensors["x"][index] = value
    on_sm90 = backend.name == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    launches = sm90_launch_counter() if on_sm90 else None
    before = launches() if on_sm90 else 0
    runs = []
    for fn in (eager_conv_bn_relu, ops.conv_bn_relu):
        args = {k: v.clone() for k, v in tensors.items() if v is not None}
        runs.append((fn(**args, training=True, relu=True, **conv), args))
    if on_sm90:
        assert launches() > before, "the layer did not run on an sm90 kernel"
    (ye, ae), (yf, af) = runs
    _assert_same_nonfinite(yf.float(), ye.float(), "output")
    for k in ("running_mean", "running_var"):
        _assert_same_nonfinite(af[k], ae[k], k)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_add_relu_nan_and_inf_forward(backend):
    device = backend.device()
    x = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0, -1.0, float("inf")], device=device)
    r = torch.tensor([0.0, float("-inf"), 0.0, float("nan"), 0.0, 1.0], device=device)
    x, r = x.view(1, 1, 2, 3), r.view(1, 1, 2, 3)
    with backends.record_selections() as selected:
        y = ops.add_relu(x, r)
    assert dict(selected) == {backend.name: 1}, dict(selected)
    _assert_same_nonfinite(y, torch.relu(x + r), "add_relu output")


def test_add_relu_nan_gradient_as_in_eager(backend):
    """A NaN output passes its gradient, as eager's threshold_backward does (y <= 0 masks)."""
    device = backend.device()
    x = torch.tensor([float("nan"), 1.0, -1.0, 0.0], device=device).view(1, 1, 1, 4).requires_grad_()
    r = torch.zeros(1, 1, 1, 4, device=device, requires_grad=True)
    g = torch.tensor([2.0, 3.0, 4.0, 5.0], device=device).view(1, 1, 1, 4)
    with backends.record_selections() as selected:
        gx, gr = torch.autograd.grad(ops.add_relu(x, r), (x, r), g)
    assert dict(selected) == {backend.name: 1}, dict(selected)
    gx_eager, gr_eager = torch.autograd.grad(torch.relu(x + r), (x, r), g)
    assert torch.equal(gx, gx_eager) and torch.equal(gr, gr_eager), (gx, gx_eager)


# ---------------------------------------------------------------------------------------
# Non-contiguous and oddly strided tensors.


def _strided_x(kind: str, n=2, c=4, hw=5, device="cpu"):
    def r(*shape):
        return torch.randn(*shape, device=device)

    return {
        "contiguous": lambda: r(n, c, hw, hw),
        "channels_slice": lambda: r(n, 2 * c, hw, hw)[:, ::2],
        "spatial_step": lambda: r(n, c, 2 * hw, 2 * hw + 1)[:, :, ::2, 1::2],
        "permuted": lambda: r(hw, n, c, hw).permute(1, 2, 3, 0),
        "transposed_hw": lambda: r(n, c, hw, hw).transpose(2, 3),
        "expanded_batch": lambda: r(1, c, hw, hw).expand(n, c, hw, hw),
        "expanded_channels": lambda: r(n, 1, hw, hw).expand(n, c, hw, hw),
        "expanded_spatial": lambda: r(n, c, 1, 1).expand(n, c, hw, hw),
        "channels_last_step": lambda: r(n, c, 2 * hw, hw).contiguous(memory_format=torch.channels_last)[:, :, ::2],
        "channels_last_cslice": lambda: r(n, c + 3, hw, hw).contiguous(memory_format=torch.channels_last)[:, 1:c + 1],
        "storage_offset": lambda: r(n * c * hw * hw + 7)[7:].view(n, c, hw, hw),
        "batch_slice": lambda: r(n + 2, c, hw, hw)[1:n + 1],
    }[kind]()


STRIDED_KINDS = ["channels_slice", "spatial_step", "permuted", "transposed_hw", "expanded_batch", "expanded_channels",
                 "expanded_spatial", "channels_last_step", "channels_last_cslice", "storage_offset", "batch_slice"]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", STRIDED_KINDS)
def test_strided_input_matches_eager(backend, kind, training):
    device = backend.device()
    tensors, conv = _unit(bias=training, device=device)
    x = _strided_x(kind, device=device)
    assert not x.is_contiguous() or x.storage_offset() > 0
    tensors["x"] = x
    check_against_eager(backend.name, backend.name, tensors, training=training, **conv)


def _strided_params(tensors):
    """Every other tensor argument oddly strided too: weight permuted/sliced, BatchNorm vectors
    with step 2, the residual expanded and transposed."""
    c_out, c_in, kh, kw = tensors["weight"].shape
    device = tensors["weight"].device
    out = dict(tensors)
    out["weight"] = torch.randn(c_in, c_out, kw, kh, device=device).permute(1, 0, 3, 2)
    for name in ("bn_weight", "bn_bias", "running_mean", "running_var", "bias"):
        if tensors.get(name) is not None:
            base = torch.empty(2 * c_out, device=device)
            base[::2] = tensors[name]
            out[name] = base[::2]
    r = tensors["residual"]
    out["residual"] = torch.randn(r.size(0), r.size(1), r.size(3), 1, device=device).expand(
        r.size(0), r.size(1), r.size(3), r.size(2)).transpose(2, 3)
    return out


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_strided_parameters_residual_and_grad_output(backend, training):
    device = backend.device()
    tensors, conv = _unit(bias=True, c_in=4, c_out=6, hw=6, stride=2, device=device)
    tensors = _strided_params(tensors)
    tensors["x"] = _strided_x("channels_last_cslice", hw=6, device=device)
    assert not tensors["weight"].is_contiguous() and tensors["bn_weight"].stride() == (2,)
    ho = tensors["residual"].shape[2]
    # grad_y as autograd hands it over from y.sum() (stride 0 everywhere), and a transposed one
    for grad_y in (torch.ones(1, device=device).expand(2, 6, ho, ho),
                   torch.randn(2, 6, ho, ho, dtype=torch.float64, device=device).transpose(2, 3).float()):
        check_against_eager(backend.name, backend.name, tensors, grad_y=grad_y, training=training, **conv)


@pytest.mark.parametrize("kind", ["permuted", "expanded_batch", "channels_last_step", "spatial_step"])
def test_add_relu_strided(backend, kind):
    x = _strided_x(kind, device=backend.device())
    r = _strided_x("transposed_hw", device=backend.device())
    outs = []
    for fn in (lambda a, b: torch.relu(a + b), ops.add_relu):
        xa, ra = x.detach().requires_grad_(), r.detach().requires_grad_()
        with backends.record_selections() as selected:
            y = fn(xa, ra)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.device)
            outs.append((y, *torch.autograd.grad(y, (xa, ra), g)))
    assert dict(selected) == {backend.name: 1}, dict(selected)  # the last loop's: ops.add_relu
    for name, a, e in zip(("output", "grad x", "grad residual"), outs[1], outs[0]):
        torch.testing.assert_close(a, e, msg=name)


# ---------------------------------------------------------------------------------------
# GPU only: inputs with more than 2^31 elements (32-bit offsets would wrap), on both fused
# backends.

FUSED = ["triton", "cuda"]


def _require(name):
    reason = backends.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"{name}: {reason}")


def _chunked_ref(x, w, scale, shift, padding, rows):
    """float64 eager conv * scale + shift + ReLU on the batch rows `rows` only."""
    z = F.conv2d(x[rows].double(), w.double(), padding=padding)
    return torch.relu(z * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


@pytest.mark.needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("name", FUSED)
def test_more_than_2_31_elements_eval(name):
    """x with 2^31 + 2^22 elements (fp16, 4.3 GB): 32-bit offsets would wrap. The last batch rows
    (where the offsets exceed 2^31) are checked against float64 eager."""
    _require(name)
    torch.cuda.empty_cache()
    n, c, hw = 2**31 // (16 * 128 * 128) + 16, 16, 128
    x = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    w = torch.randn(16, c, 3, 3, device="cuda", dtype=torch.float16) * 0.1
    gamma, beta = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    rm, rv = torch.randn(16, device="cuda"), torch.rand(16, device="cuda") + 0.5
    with torch.no_grad(), resnet_fused.use_backend(name), backends.record_selections() as selected:
        y = ops.conv_bn_relu(x, w, gamma, beta, rm, rv, training=False, padding=1)
    assert dict(selected) == {name: 1}, dict(selected)
    scale = gamma * torch.rsqrt(rv + 1e-5)
    shift = beta - rm * scale
    for rows in (slice(0, 2), slice(n // 2, n // 2 + 2), slice(n - 2, n)):
        ref64 = _chunked_ref(x, w, scale, shift, 1, rows)
        eager = torch.relu(F.conv2d(x[rows], w, padding=1).float() * scale.view(1, -1, 1, 1)
                           + shift.view(1, -1, 1, 1)).half()
        assert_close_to_ref(y[rows], eager, ref64, f"{name} rows {rows}")


@pytest.mark.needs_cuda
@pytest.mark.slow
@pytest.mark.parametrize("name", FUSED)
def test_more_than_2_31_elements_train_forward_backward(name):
    """Training forward and backward on a > 2^31-element fp16 input: batch statistics, running
    statistics, the weight and BatchNorm gradients (reductions over all 2^31 elements) against
    eager float32, and grad_x on the last rows."""
    _require(name)
    torch.cuda.empty_cache()
    n, c, hw = 2**31 // (8 * 128 * 128) + 8, 8, 128
    x16 = torch.randn(n, c, hw, hw, device="cuda", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    assert x16.numel() > 2**31
    w = (torch.randn(8, c, 1, 1, device="cuda") * 0.3)
    gamma, beta = torch.rand(8, device="cuda") + 0.5, torch.randn(8, device="cuda")
    results = {}
    for name, dtype in (("fused", torch.float16), ("eager16", torch.float16), ("eager32", torch.float32)):
        xi = x16 if dtype == torch.float16 else None
        wi = w.to(dtype).requires_grad_()
        g_, b_ = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        rm, rv = torch.zeros(8, device="cuda"), torch.ones(8, device="cuda")
        if name == "fused":
            xg = xi.detach().requires_grad_()
            with resnet_fused.use_backend(name), backends.record_selections() as selected:
                y = ops.conv_bn_relu(xg, wi, g_, b_, rm, rv, training=True)
            assert dict(selected) == {name: 1}, dict(selected)
        elif name == "eager16":
            xg = xi.detach().requires_grad_()
            y = torch.relu(F.batch_norm(F.conv2d(xg, wi), rm, rv, g_, b_, True))
        else:  # float32 oracle, processed in place of float64 (which would need ~70 GB)
            xg = x16.float().requires_grad_()
            y = torch.relu(F.batch_norm(F.conv2d(xg, wi), rm, rv, g_, b_, True))
        grad_y = torch.ones(1, device="cuda", dtype=y.dtype).expand(y.shape)  # as y.sum() hands it over
        gx, gw, gg, gb = torch.autograd.grad(y, (xg, wi, g_, b_), grad_y)
        # clones: a view of y or gx would keep the whole tensor alive
        results[name] = dict(y_tail=y[-2:].detach().clone(), gx_tail=gx[-2:].clone(), gw=gw, gg=gg, gb=gb, rm=rm, rv=rv)
        del y, gx, xg, grad_y
        torch.cuda.empty_cache()
    for key in ("y_tail", "gx_tail", "gw", "gg", "gb", "rm", "rv"):
        assert_close_to_ref(results["fused"][key], results["eager16"][key].to(results["fused"][key].dtype),
                            results["eager32"][key], f"{name} {key}")

