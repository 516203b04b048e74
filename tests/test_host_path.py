"""The per-call path in plain eager (backends.plain_eager): ops run as their backend's Python
implementations without the dispatcher, eval on the reference runs eager's own modules'
arithmetic with nothing kept between calls, and everything that watches the dispatcher still
meets the ops. Results must equal the dispatched path's exactly (eval: eager's bits, the op's
within a few ulps); the speed is measured by benchmarks/host_overhead.py, never here.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from recorders import OpRecorder

import resnet_fused
from resnet_fused import backends, ops
from resnet_fused.backends import reference


def _unit(training: bool, dtype=torch.float64):
    torch.manual_seed(0)
    unit = resnet_fused.nn.ConvBNReLU2d(4, 6, 3, padding=1).to(dtype).train(training)
    with torch.no_grad():
        unit.bn.running_mean.normal_()
        unit.bn.running_var.uniform_(0.5, 2.0)
        unit.bn.weight.uniform_(0.5, 1.5)
        unit.bn.bias.normal_()
    return unit


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the reference backend's implementations made without the dispatcher."""
    counts = {}
    for name in ("conv_bn_eval", "conv_bn_train", "conv_bn_train_backward"):
        impl = getattr(reference.DIRECT, name)

        def counting(*args, impl=impl, name=name):
            counts[name] = counts.get(name, 0) + 1
            return impl(*args)

        monkeypatch.setattr(reference.DIRECT, name, counting)
    with resnet_fused.use_backend("reference"):
        yield counts


def test_inference_skips_the_dispatcher(counted):
    """Eval in plain eager runs eager's modules' ops (reference.conv_bn_eval_eager): no
    resnet_fused op, eager's bits. Under a dispatch mode the op runs, within a few ulps (it
    takes the BatchNorm as a per-channel scale and shift)."""
    unit = _unit(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad(), OpRecorder() as rec:  # a dispatch mode: the op is dispatched
        y_dispatched = unit(x)
    assert "resnet_fused::conv_bn_eval.default" in rec.names
    with torch.no_grad():
        y = unit(x)
        expected = torch.relu(F.batch_norm(unit.conv(x), unit.bn.running_mean, unit.bn.running_var, unit.bn.weight,
                                           unit.bn.bias, False, 0.0, unit.bn.eps))
    assert counted == {}
    assert torch.equal(y, expected)
    torch.testing.assert_close(y_dispatched, y, rtol=8 * torch.finfo(x.dtype).eps, atol=0)


@pytest.mark.parametrize("watcher", ["autocast", "profiler", "flop_counter", "jit_trace"])
def test_watchers_meet_the_ops(counted, watcher):
    """Whatever watches or transforms the dispatcher sees the resnet_fused op as before."""
    unit = _unit(False, torch.float32)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        if watcher == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = unit(x)
            assert y.dtype == torch.bfloat16
        elif watcher == "profiler":
            with torch.profiler.profile() as prof:
                unit(x)
            assert any(e.name.startswith("resnet_fused::conv_bn_eval") for e in prof.events())
        elif watcher == "flop_counter":
            with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
                unit(x)
            assert counter.get_total_flops() > 0
        else:
            tensors = (x, unit.conv.weight.detach(), unit.bn.weight.detach(), unit.bn.bias.detach(),
                       unit.bn.running_mean, unit.bn.running_var)
            traced = torch.jit.trace(lambda t, w, g, b, m, v: ops.conv_bn_relu(t, w, g, b, m, v, training=False,
                                                                                padding=1), tensors,
                                     check_trace=False)  # the check reruns the function untraced
            assert "resnet_fused::conv_bn_eval" in str(traced.graph)
    assert counted == {}


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_training_without_the_dispatcher_equals_dispatched(counted, dtype):
    """Grad mode on: in the statistics dtype the reference runs the unit as aten's own autograd
    graph (reference._conv_bn_train_graph: no resnet_fused op is called), elsewhere as an
    autograd.Function over the implementations with the registered ops' formulas. Either way
    the output, every gradient and the running mean equal the dispatched run's (a dispatch
    mode forces that path) bitwise; the running variance within a few ulp (the graph takes the
    unbiased variance from aten's BatchNorm and the op returns it biased: one more rounding)."""
    direct_unit = _unit(True, dtype)
    dispatched_unit = copy.deepcopy(direct_unit)
    x = torch.randn(3, 4, 5, 5, dtype=dtype, requires_grad=True)
    residual = torch.randn(3, 6, 5, 5, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 6, 5, 5, dtype=dtype)

    def run(unit):
        y = unit(x, residual)
        grads = torch.autograd.grad(y, (x, residual, *unit.parameters()), grad)
        return (y, *grads, unit.bn.running_mean.clone(), unit.bn.running_var.clone())

    direct = run(direct_unit)
    as_function = {"conv_bn_train": 1, "conv_bn_train_backward": 1}
    assert counted == ({} if dtype == torch.float64 else as_function)
    counted.clear()
    with OpRecorder() as rec:
        dispatched = run(dispatched_unit)
    assert "resnet_fused::conv_bn_train.default" in rec.names and counted == {}
    for i, (a, b) in enumerate(zip(direct[:-1], dispatched[:-1], strict=True)):
        assert torch.equal(a, b), f"output {i} differs by {(a.double() - b.double()).abs().max().item():.3g}"
    torch.testing.assert_close(direct[-1], dispatched[-1], rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_double_backward_still_raises(counted):
    unit = _unit(True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(unit(x).square().sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        gx.sum().backward()


def _stock_twin(unit):
    """The eager modules of a ConvBNReLU2d, sharing its tensors."""
    return torch.nn.Sequential(unit.conv, unit.bn, torch.nn.ReLU())


def test_eval_reads_writes_no_version_counter_sees():
    """Eval computes from the tensors as they are at the call: a write through a NumPy view of
    the statistics or of the weights (which bumps no version counter, as a CUDA graph replay or
    another library's kernel does not) is read by the next call, which equals eager's bitwise.
    Nothing is kept between calls that such a write could leave stale."""
    unit = _unit(False, torch.float32)
    stock = _stock_twin(unit)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        before = unit(x)
        unit.bn.running_var.numpy()[:] = 4 * unit.bn.running_var.numpy() + 1
        after = unit(x)
        assert torch.equal(after, stock(x))
        assert not torch.equal(after, before)
        unit.conv.weight.detach().numpy()[:] *= 0.5
        unit.bn.bias.detach().numpy()[:] += 1.0
        assert torch.equal(unit(x), stock(x))
    with torch.inference_mode():
        unit.bn.running_mean.numpy()[:] += 0.25
        assert torch.equal(unit(x), stock(x))


def test_resnet18_eval_reads_a_numpy_write():
    """The issue's reproduction: after one call, a NumPy write to the stem's running_var is
    read by the next call, which equals torchvision's on the same tensors bitwise."""
    import torchvision

    model = resnet_fused.resnet18().eval()
    stock = torchvision.models.resnet18().eval()
    stock.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        for m in (model, stock):
            v = m.bn1.running_var.numpy()
            v[:] = 4 * v + 1
        assert torch.equal(model(x), stock(x))


def test_eval_with_grad_gives_eager_gradients():
    """Eval with grad mode on (fine-tuning with frozen statistics) is eager's own graph: the
    output and every gradient, the BatchNorm affine's included, equal eager's bitwise."""
    unit = _unit(False)
    stock_unit = copy.deepcopy(unit)
    stock = _stock_twin(stock_unit)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with resnet_fused.use_backend("reference"):
        y = unit(x)
    expected = stock(x)
    assert torch.equal(y, expected)
    grads = torch.autograd.grad(y.square().sum(), (x, *unit.parameters()))
    want = torch.autograd.grad(expected.square().sum(), (x, *stock_unit.parameters()))
    for got, exp in zip(grads, want, strict=True):
        assert torch.equal(got, exp)


def test_plain_eager_predicate():
    assert backends.plain_eager()
    with torch.no_grad():
        assert backends.direct_calls()
    assert not backends.direct_calls()  # grad mode on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not backends.plain_eager()
    with OpRecorder():
        assert not backends.plain_eager()


def test_checkpointed_training_saves_what_the_op_saves(counted):
    """Under saved-tensor hooks (non-reentrant activation checkpointing) the training unit saves
    the op's formula's tensors, not aten's graph's: a forward under a dispatch mode (the
    registered op) and its recomputation in plain eager save as many tensors, as checkpointing
    requires, and the gradients equal an unchecked run's."""
    unit = _unit(True)
    plain_unit = copy.deepcopy(unit)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    with OpRecorder() as rec:
        y = torch.utils.checkpoint.checkpoint(unit, x, use_reentrant=False)
    assert "resnet_fused::conv_bn_train.default" in rec.names
    (gx,) = torch.autograd.grad(y.sum(), x)  # recomputes the forward without the recorder
    assert counted == {"conv_bn_train": 1}  # the recomputation, as the autograd.Function
    (expected,) = torch.autograd.grad(plain_unit(x).sum(), x)
    assert torch.equal(gx, expected)
