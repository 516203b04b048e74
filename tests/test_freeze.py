"""resnet_fused.freeze: the BatchNorm folded into the convolution on the user's promise that the
tensors do not change. Within float32 rounding of the unfrozen model (every builder:
test_models.test_builder_exact_in_float64), exact composition in float64, and bad input named."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused.models import FusedIntermediateLayerGetter


def _randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in model.modules())


@pytest.mark.parametrize("source", ["fused", "torchvision"])
def test_freeze_folds_every_unit_exactly_in_float64(source):
    """Every BatchNorm of a Bottleneck ResNet (stem, blocks, downsample) is folded, on
    resnet_fused's model and on torchvision's alike; in float64 the frozen model computes the
    same function to rounding. The original model is left unchanged."""
    tv = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], num_classes=10)
    model = _randomized(resnet_fused.from_torchvision(tv) if source == "fused" else tv).double().eval()
    x = torch.randn(2, 3, 33, 33, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = resnet_fused.freeze(model)
    assert _norms(frozen) == 0 and _norms(model) == _norms(tv) > 0
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=1e-11, atol=1e-11)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_freeze_units_and_frozen_batchnorm_backbones():
    """ConvBNReLU2d (with a conv bias) and a detection backbone with FrozenBatchNorm2d, in place."""
    unit = _randomized(resnet_fused.nn.ConvBNReLU2d(4, 6, 3, padding=1, bias=True)).double().eval()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = unit(x)
        assert resnet_fused.freeze(unit, inplace=True) is unit
        torch.testing.assert_close(unit(x), expected, rtol=1e-11, atol=1e-11)
    assert type(unit.bn) is nn.Identity

    resnet = resnet_fused.resnet18(norm_layer=FrozenBatchNorm2d)
    body = _randomized(FusedIntermediateLayerGetter(resnet, {"layer2": "c3", "layer4": "c5"})).double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = body(x)
        got = resnet_fused.freeze(body)(x)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-11, atol=1e-11)


def test_frozen_model_keeps_the_promised_values():
    """The promise: a frozen model reads the statistics once. A later write to the original
    model's statistics does not reach it (the unfrozen model reads it on its next call)."""
    model = _randomized(resnet_fused.resnet18(num_classes=10)).eval()
    frozen = resnet_fused.freeze(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = frozen(x)
        model.bn1.running_var.mul_(4.0)
        assert torch.equal(frozen(x), before)
        assert not torch.equal(model(x), before)


def test_freeze_bad_input():
    model = resnet_fused.resnet18()
    with pytest.raises(ValueError, match=r"eval mode \(call model.eval\(\) first\)"):
        resnet_fused.freeze(model)  # training mode
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        resnet_fused.freeze("resnet18")
    with pytest.raises(TypeError, match="inplace must be a bool, got 1"):
        resnet_fused.freeze(model.eval(), inplace=1)
    with pytest.warns(UserWarning, match="found no .* pair .* in Sequential; the model is unchanged"):
        resnet_fused.freeze(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).eval())
