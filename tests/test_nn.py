"""The nn modules and the functional API on the default backend (the reference on CPU):
BatchNorm hyperparameters read at call time, training without running statistics, and the
norms, activations and padding modes the fused op does not cover."""

from __future__ import annotations

import copy

import torch
from random_bn import randomize_bn
from torch import nn

from resnet_fused import ops
from resnet_fused.nn import ConvBNReLU2d, conv_bn_act


def test_module_hyperparameters_read_at_call_time():
    """momentum=None (cumulative average), track_running_stats=False, affine=False, eval(),
    and an eps changed after construction all behave as nn.BatchNorm2d does."""
    unit = ConvBNReLU2d(4, 6, 3, padding=1)
    randomize_bn(unit.bn)
    unit.bn.momentum = None
    unit.bn.eps = 1e-3
    ref_conv, ref_bn = copy.deepcopy(unit.conv), copy.deepcopy(unit.bn)
    for _ in range(3):
        x = torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(unit(x), torch.relu(ref_bn(ref_conv(x))))
    torch.testing.assert_close(unit.bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(unit.bn.running_var, ref_bn.running_var)
    assert int(unit.bn.num_batches_tracked) == 3
    unit.eval(), ref_bn.eval()
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(unit(x), torch.relu(ref_bn(ref_conv(x))))

    for kwargs in (dict(track_running_stats=False), dict(affine=False)):
        conv, bn = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6, **kwargs)
        fused = ConvBNReLU2d.from_modules(copy.deepcopy(conv), copy.deepcopy(bn), relu=False)
        for mode in (True, False):
            fused.train(mode), bn.train(mode)
            torch.testing.assert_close(fused(x), bn(conv(x)), msg=str(kwargs))


def test_functional_training_without_running_stats():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    gamma, beta = torch.rand(4) + 0.5, torch.rand(4)
    y = ops.conv_bn_relu(x, w, gamma, beta, None, None, training=False, padding=1)
    expected = torch.relu(torch.nn.functional.batch_norm(
        torch.nn.functional.conv2d(x, w, padding=1), None, None, gamma, beta, training=True))
    torch.testing.assert_close(y, expected)


def test_unfused_norm_and_activation_stay_correct():
    """Modules the fused op does not cover run as themselves: GroupNorm, SiLU, reflect padding."""
    conv, gn = nn.Conv2d(4, 6, 3, padding=1), nn.GroupNorm(2, 6)
    x, r = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv_bn_act(conv, gn, x, r, nn.ReLU()), torch.relu(gn(conv(x)) + r))
    bn = nn.BatchNorm2d(6).eval()
    randomize_bn(bn)
    torch.testing.assert_close(conv_bn_act(conv, bn, x, r, nn.SiLU()), nn.functional.silu(bn(conv(x)) + r))
    reflect = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect")
    torch.testing.assert_close(conv_bn_act(reflect, bn, x, None, nn.ReLU()), torch.relu(bn(reflect(x))))
