"""The per-call path in plain eager (backends.plain_eager): ops run as their backend's Python
implementations without the dispatcher, the frozen-BatchNorm fold is kept across inference
calls, and everything that watches the dispatcher still meets the ops. Results must equal the
dispatched path's exactly; the speed is measured by benchmarks/host_overhead.py, never here.
"""

from __future__ import annotations

import copy

import pytest
import torch
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
    unit = _unit(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        y = unit(x)
    assert counted == {"conv_bn_eval": 1}
    with torch.no_grad(), OpRecorder() as rec:  # a dispatch mode: the op is dispatched again
        y_dispatched = unit(x)
    assert "resnet_fused::conv_bn_eval.default" in rec.names and counted == {"conv_bn_eval": 1}
    assert torch.equal(y, y_dispatched)


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


def test_eval_fold_is_kept_until_an_input_changes():
    """The inference fold (scale, shift) is reused while its tensors are unchanged, and
    recomputed after each kind of change: an in-place parameter update, load_state_dict, a
    running-statistics update in training, a replaced parameter or its data, another eps; the
    same for the conv weight the reference folds the scale into."""
    unit = _unit(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)

    def fold():
        bn = unit.bn
        return ops._eval_scale_shift(bn.weight, bn.bias, bn.running_mean, bn.running_var, None, bn.eps,
                                     torch.float64, keep=True)

    def expected():
        with torch.no_grad():
            return torch.nn.functional.batch_norm(unit.conv(x), unit.bn.running_mean, unit.bn.running_var,
                                                  unit.bn.weight, unit.bn.bias, False, 0.0, unit.bn.eps).relu()

    def check():
        with torch.no_grad():
            torch.testing.assert_close(unit(x), expected(), rtol=1e-12, atol=1e-12)

    with resnet_fused.use_backend("reference"), torch.no_grad():
        first = fold()
        assert fold()[0] is first[0]  # kept
        check()
        unit.bn.weight.mul_(2.0)  # an in-place update (an optimizer step)
        assert fold()[0] is not first[0]
        check()
        state = copy.deepcopy(unit.state_dict())
        state["bn.running_var"].mul_(3.0)
        kept = fold()
        unit.load_state_dict(state)
        assert fold()[0] is not kept[0]
        check()
        kept = fold()
        unit.bn.bias = torch.nn.Parameter(unit.bn.bias.detach() + 1.0)  # a replaced parameter
        assert fold()[1] is not kept[1]
        check()
        unit.bn.eps = 1e-3
        check()
        # The conv weight, which the reference folds the scale into (kept per scale):
        unit.conv.weight.mul_(0.5)  # in place
        check()
        unit.conv.weight.data = torch.randn_like(unit.conv.weight)  # new data, same object and version
        check()
        kept = fold()
        unit.bn.running_var.data = unit.bn.running_var.data * 2.0  # the same for a statistic
        assert fold()[0] is not kept[0]
        check()
        unit.conv.weight = torch.nn.Parameter(unit.conv.weight.detach() * 3.0)  # a replaced parameter
        check()
    unit.train()
    unit(torch.randn(4, 4, 5, 5, dtype=torch.float64))  # updates the running statistics
    unit.eval()
    with resnet_fused.use_backend("reference"):
        check()


def test_fold_is_not_kept_with_grad():
    """With grad mode on the fold is part of the graph: gradients reach the BatchNorm
    parameters of an eval-mode unit (fine-tuning with frozen statistics)."""
    unit = _unit(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with resnet_fused.use_backend("reference"):
        with torch.no_grad():
            unit(x)
        unit(x).sum().backward()
    assert unit.bn.weight.grad is not None and unit.bn.weight.grad.abs().sum() > 0


def test_plain_eager_predicate():
    assert backends.plain_eager()
    with torch.no_grad():
        assert backends.direct_calls()
    assert not backends.direct_calls()  # grad mode on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not backends.plain_eager()
    with OpRecorder():
        assert not backends.plain_eager()


def test_inference_mode_keeps_the_folds():
    """Under torch.inference_mode (the main job's inference) the scale and shift, and the
    reference's folded conv weight, are kept across calls: the module's tensors are ordinary
    tensors with version counters even though what the calls create is not."""
    unit = _unit(False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with resnet_fused.use_backend("reference"), torch.inference_mode():
        y = unit(x)
        scale = ops._EVAL_FOLDS[id(unit.bn.running_var)][3]
        folded = reference._FOLDED_WEIGHTS[id(scale)][3]
        assert torch.equal(unit(x), y)
        assert ops._EVAL_FOLDS[id(unit.bn.running_var)][3] is scale
        assert reference._FOLDED_WEIGHTS[id(scale)][3] is folded


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
