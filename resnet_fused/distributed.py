"""Synchronized BatchNorm for the fused units (SyncBatchNorm across processes).

torch.nn.SyncBatchNorm computes batch statistics over every process of a group. In a
fused unit the statistics come out of the convolution's epilogue, so the synchronized
path runs the same kernels split where the collectives go (ops in _library.py):

  forward   conv_bn_stats (conv + this process's mean/var)  ->  all_gather (count, mean,
            var), merged in rank order (Chan: exact, deterministic, uneven batches)  ->
            bn_apply (BatchNorm with the global statistics, residual, ReLU)
  backward  bn_apply_backward_reduce (sum g, sum g * (z - mean))  ->  all_reduce  ->
            bn_apply_backward (dz, residual gradient)  ->  conv_bn_eval_backward (conv
            dgrad/wgrad of dz)

as torch.nn.SyncBatchNorm does: the gradients of gamma, beta and the conv bias are this
process's (DistributedDataParallel averages them). The global count stays on the device
(bn_apply_backward gets the all-reduced sums already divided by it, with count=1), so
nothing reads back to the host and a synchronized step can be captured in a CUDA graph
(with NCCL). The check that the group has more than one value per channel reads the count
on the host, so it is skipped during capture, as torch.nn.SyncBatchNorm skips its own.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _batchnorm
from ._batchnorm import check_values_per_channel, step_momentum, update_running_stats
from ._utils import stat_dtype
from .backends import select_ops

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "sync_conv_bn_train"]


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _global_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, Tensor]:
    """Every process's (count, mean, biased var) all-gathered and merged in rank order in
    float64: mean = sum n_r mean_r / N, var = sum n_r (var_r + (mean_r - mean)^2) / N.
    A process with an empty batch (NaN statistics) contributes nothing. N is returned as a
    float64 device tensor of one element."""
    c = mean.numel()
    packed = torch.cat([mean.new_full((1,), count, dtype=torch.float64), mean.double(), var.double()])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, packed, group=group)
    stats = torch.stack(gathered)
    counts, means, variances = stats[:, :1], stats[:, 1:1 + c], stats[:, 1 + c:]
    present = counts > 0
    means = torch.where(present, means, 0.0)
    variances = torch.where(present, variances, 0.0)
    total = counts.sum(0)
    if not _capturing(total):
        check_values_per_channel(int(total.item()))  # the host read that capture must not do
    global_mean = (counts * means).sum(0) / total
    global_var = (counts * (variances + (means - global_mean).square())).sum(0) / total
    return global_mean.to(mean.dtype), global_var.to(var.dtype), total


class _SyncConvBN(torch.autograd.Function):
    """act(batch_norm(conv(x)) [+ residual]) with batch statistics over `group`."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, residual, ops, conv_args, eps, relu, group):
        z, local_mean, local_var = ops.conv_bn_stats(x, weight, bias, *conv_args)
        local_count = z.numel() // z.size(1)
        mean, var, total = _global_stats(local_mean, local_var, local_count, group)
        y = ops.bn_apply(z, mean, var, bn_weight, bn_bias, residual, eps, relu)
        ctx.ops, ctx.conv_args, ctx.eps, ctx.relu, ctx.group = ops, conv_args, eps, relu, group
        ctx.local_count = local_count
        ctx.has_bias, ctx.has_residual = bias is not None, residual is not None
        ctx.save_for_backward(x, weight, z, y if relu else None, mean, var, bn_weight, local_mean, total)
        ctx.mark_non_differentiable(mean, var, total)
        return y, mean, var, total

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_var, _grad_total):
        x, weight, z, y, mean, var, bn_weight, local_mean, total = ctx.saved_tensors
        ops = ctx.ops
        need = ctx.needs_input_grad
        need_x, need_w = need[0], need[1]
        need_bias = ctx.has_bias and need[2]
        need_residual = ctx.has_residual and need[5]
        sum_g, sum_g_zc = ops.bn_apply_backward_reduce(grad_y, z, y, mean, ctx.relu)
        # Every process takes part in the all_reduce, whatever its own inputs need.
        sums = torch.cat([sum_g, sum_g_zc])
        dist.all_reduce(sums, group=ctx.group)
        all_sum_g, all_sum_g_zc = sums.split(sum_g.numel())
        total = total.to(sums.dtype)
        need_dz = need_x or need_w
        # The sums divided by the global count on the device, and count=1: the op's
        # `sum / count` is then these means, without reading the count on the host.
        dz, grad_residual = ops.bn_apply_backward(
            grad_y, z, y, mean, var, bn_weight, all_sum_g / total, all_sum_g_zc / total, 1, ctx.eps, ctx.relu,
            [need_dz, need_residual],
        )
        grad_x = grad_w = None
        if need_x or need_w:
            ones = torch.ones_like(mean)
            grads = ops.conv_bn_eval_backward(dz, x, weight, ones, None, *ctx.conv_args, False,
                                              [need_x, need_w, False, False, False])
            grad_x = grads[0] if need_x else None
            grad_w = grads[1] if need_w else None
        invstd = torch.rsqrt(var + ctx.eps)
        grad_bias = None
        if need_bias:
            # This process's sum of dz, from the sums (sum of x_hat over its rows = n (mean_r - mean) invstd).
            local_sum_xhat = (local_mean - mean) * invstd * ctx.local_count if ctx.local_count else 0.0
            grad_bias = bn_weight.to(mean.dtype) * invstd * (
                sum_g - ctx.local_count * all_sum_g / total
                - local_sum_xhat * all_sum_g_zc * invstd / total)
            grad_bias = grad_bias.to(weight.dtype)
        grad_bn_weight = (sum_g_zc * invstd).to(bn_weight.dtype) if need[3] else None
        grad_bn_bias = sum_g.to(bn_weight.dtype) if need[4] else None
        return (grad_x, grad_w, grad_bias, grad_bn_weight, grad_bn_bias, grad_residual if need_residual else None,
                None, None, None, None, None)


def sync_conv_bn_train(
    x: Tensor, weight: Tensor, bias: Tensor | None, bn_weight: Tensor, bn_bias: Tensor, residual: Tensor | None,
    conv_args: tuple, eps: float, relu: bool, group,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, global mean, global biased var, global count as a one-element float64 tensor) of a
    training-mode unit whose batch statistics span every process of `group`; arguments
    already validated (ops.py)."""
    ops = select_ops("conv_bn_stats", x, weight, bias, *conv_args)
    return _SyncConvBN.apply(x, weight, bias, bn_weight, bn_bias, residual, ops, tuple(conv_args), eps, relu,
                             group)


# torch.nn.SyncBatchNorm runs its synchronized path on these device types only (it raises
# ValueError for others, CPU included).
def _torch_sync_devices() -> tuple[str, ...]:
    return ("cuda", "hpu", "xpu", torch._C._get_privateuse1_backend_name())


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the backward sums the gradients the same way (each
    process's loss depends on every process's input through the reduced sum)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(tensor, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce_batch_norm(bn: nn.SyncBatchNorm, x: Tensor, momentum: float, group) -> Tensor:
    """Training-mode BatchNorm over the union of every process's batch: the count, the
    per-channel sum and then the sum of squared deviations from the global mean are
    all-reduced (differentiably, so the backward all-reduces the gradients of those sums).
    Uneven and empty per-process batches are handled by the all-reduced count."""
    acc = stat_dtype(x.dtype)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = torch.tensor([x.numel() // x.size(1)], dtype=torch.int64, device=x.device)
    dist.all_reduce(count, group=group)
    total = int(count.item())
    check_values_per_channel(total)
    xa = x.to(acc)
    mean = _AllReduceSum.apply(xa.sum(dims), group) / total
    centered = xa - mean.view(shape)
    var = _AllReduceSum.apply(centered.square().sum(dims), group) / total
    y = centered * torch.rsqrt(var + bn.eps).view(shape)
    if bn.weight is not None:
        y = y * bn.weight.to(acc).view(shape) + bn.bias.to(acc).view(shape)
    if bn.track_running_stats:
        update_running_stats(bn.running_mean, bn.running_var, mean, var, total, momentum)
    return y.to(x.dtype)


class SyncBatchNorm(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm (same state, same results) that also synchronizes on devices
    torch's implementation rejects, CPU with the gloo backend included: there it all-reduces
    the per-channel sum, count and squared deviations itself. On CUDA it is torch's.

    Inside the fused blocks (resnet_fused.nn) this module's forward is not called: its conv
    + norm (+ residual) + ReLU unit runs fused with synchronized statistics
    (`sync_conv_bn_train`). This forward serves a SyncBatchNorm elsewhere (after a
    non-fusable conv, or outside a ResNet). torch's DistributedDataParallel refuses any
    SyncBatchNorm in a CPU module ("SyncBatchNorm layers only work with GPU modules"); on CPU,
    average the gradients yourself (all_reduce)."""

    def forward(self, input: Tensor) -> Tensor:
        if (
            not self.training
            or input.device.type in _torch_sync_devices()
            or not (dist.is_available() and dist.is_initialized())
        ):
            return super().forward(input)  # torch's: its own sync, or no sync (no device check then)
        group = self.process_group if self.process_group else dist.group.WORLD
        if dist.get_world_size(group) == 1:
            # torch.nn.SyncBatchNorm's fallback for one process (F.batch_norm), without the
            # device check it applies first.
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        return _all_reduce_batch_norm(self, input, step_momentum(self), group)


_batchnorm.SYNC_BATCH_NORMS = (nn.SyncBatchNorm, SyncBatchNorm)  # fused as torch's is


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm*d in `module` by a `resnet_fused.SyncBatchNorm` (in place, like
    torch.nn.SyncBatchNorm.convert_sync_batchnorm, whose result it returns), so batch
    statistics are reduced over `process_group` (default: the whole world), in forward and
    backward, with uneven per-process batches.

    Inside the fused blocks each conv + SyncBatchNorm (+ residual) + ReLU unit runs fused in
    training: the conv kernel's epilogue produces this process's per-channel statistics,
    which are all-gathered (count, mean, variance) and merged in rank order; the apply and
    backward kernels then use the global statistics and all-reduced gradient sums
    (`sync_conv_bn_train`). torch.nn.SyncBatchNorm.convert_sync_batchnorm applied to a fused
    model gives the same fused units. Units in eval mode use the running statistics and do
    not communicate, as torch.nn.SyncBatchNorm."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for m in module.modules():
        if type(m) is nn.SyncBatchNorm:
            m.__class__ = SyncBatchNorm
    return module
