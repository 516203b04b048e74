"""BatchNorm's rules, written once (resnet_fused/_batchnorm.py) for the modules, the recompute
chain and SyncBatchNorm: which norms fuse, the step's bookkeeping, the one-value-per-channel
error. Their effect on whole models is tested with the models; here each rule on its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fused
from resnet_fused import _batchnorm


class _OwnForward(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


def test_fusable_norms_are_exact_types():
    for norm in (nn.BatchNorm2d(3), FrozenBatchNorm2d(3), nn.SyncBatchNorm(3), resnet_fused.SyncBatchNorm(3)):
        assert _batchnorm.fusable_norm(norm), type(norm)
        assert _batchnorm.batch_norm_args(norm) is not None
    for norm in (_OwnForward(3), nn.GroupNorm(1, 3), nn.BatchNorm1d(3), nn.Identity()):
        assert not _batchnorm.fusable_norm(norm), type(norm)
        assert _batchnorm.batch_norm_args(norm) is None


@pytest.mark.parametrize("momentum", [0.1, None])
def test_step_momentum_counts_as_batchnorm_does(momentum):
    """num_batches_tracked and the momentum (the cumulative average 1/n for None), step by step,
    against nn.BatchNorm2d's own forward; eval and untracked norms count nothing."""
    ours, eager = nn.BatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    for step in range(1, 4):
        got = _batchnorm.step_momentum(ours)
        eager(torch.randn(2, 3, 2, 2))
        assert ours.num_batches_tracked.item() == eager.num_batches_tracked.item() == step
        assert got == (0.1 if momentum is not None else 1.0 / step)
    ours.eval()
    assert _batchnorm.step_momentum(ours) == (0.1 if momentum is not None else 0.0)
    assert ours.num_batches_tracked.item() == 3
    untracked = nn.BatchNorm2d(3, track_running_stats=False)
    _batchnorm.step_momentum(untracked)
    assert untracked.num_batches_tracked is None


def test_one_value_per_channel_has_one_text():
    with pytest.raises(ValueError) as ours:
        _batchnorm.check_values_per_channel(1, [1, 8, 1, 1])
    with pytest.raises(ValueError) as eager:
        nn.functional.batch_norm(torch.ones(1, 8, 1, 1), None, None, training=True)
    assert str(ours.value) == str(eager.value)
    _batchnorm.check_values_per_channel(0, [0, 8, 1, 1])  # an empty local batch normalizes nothing
    for total in (0, 1):  # a process group's total
        with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training, got "
                                             rf"{total} across all processes of the group$"):
            _batchnorm.check_values_per_channel(total)
    _batchnorm.check_values_per_channel(2)


def test_running_statistics_update_as_batchnorm():
    """The update of running mean and (unbiased) variance matches nn.BatchNorm2d's to rounding,
    for an int count and a device-tensor count, and never records autograd history."""
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    eager = nn.BatchNorm2d(3, momentum=0.3).double()
    eager(x)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    for count in (100, torch.tensor(100.0, dtype=torch.float64)):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        _batchnorm.update_running_stats(rm, rv, mean.requires_grad_(), var, count, 0.3)
        torch.testing.assert_close(rm, eager.running_mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rv, eager.running_var, rtol=1e-14, atol=1e-14)
        assert not rm.requires_grad and rm.grad_fn is None and rv.grad_fn is None
        mean = mean.detach()
