"""nn.BatchNorm2d's rules, written once for every layer and backend: which modules the fused
ops take and with which arguments, the step's momentum and batch count, the running-statistics
update, the one-value-per-channel error, and the defaults for a BatchNorm without affine
parameters."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["BatchNormArgs", "fusable_norm", "batch_norm_args", "step_momentum", "check_values_per_channel",
           "affine_or_default", "update_running_stats"]


class BatchNormArgs(NamedTuple):
    """A BatchNorm's operands and hyperparameters for one fused call, as F.batch_norm takes
    them. process_group: the group whose processes share the batch statistics
    (SyncBatchNorm in training), None for this process's batch alone. plain: the norm is
    plain float arithmetic on its own buffers (FrozenBatchNorm2d), not aten's batch_norm, so
    under autocast its output takes the dtype promoted with those buffers."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    momentum: float
    eps: float
    process_group: object = None
    plain: bool = False


# The synchronized BatchNorms the fused ops take (exact types): torch's, and
# resnet_fused.SyncBatchNorm, which distributed.py adds where it defines it (it imports this
# module, so this module cannot import it).
SYNC_BATCH_NORMS: tuple[type, ...] = (nn.SyncBatchNorm,)


def fusable_norm(norm: nn.Module, kind: type | None = None) -> bool:
    """Whether the fused ops reproduce `norm.forward`: exact types only (BatchNorm2d,
    torchvision's FrozenBatchNorm2d, torch's or resnet_fused's SyncBatchNorm); a user's subclass
    may override forward, so it runs as itself. kind: the type whose forward norm's normalization
    is, where an adapter knows it (fuse's, for timm's BatchNormAct2d: BatchNorm2d's, then its
    drop and act); default type(norm). Asking changes nothing (batch_norm_args counts a training
    step)."""
    kind = type(norm) if kind is None else kind
    return kind is nn.BatchNorm2d or kind is FrozenBatchNorm2d or kind in SYNC_BATCH_NORMS


def step_momentum(bn: nn.Module) -> float:
    """The momentum `bn.forward` uses for this call, with its bookkeeping (as
    torch.nn.modules.batchnorm._BatchNorm.forward): in training with tracked statistics,
    num_batches_tracked grows by one, and momentum=None means the cumulative average
    1 / num_batches_tracked."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def batch_norm_args(norm: nn.Module, kind: type | None = None) -> BatchNormArgs | None:
    """The fused call's BatchNorm arguments reproducing `kind.forward` on norm (default
    type(norm), see fusable_norm) for one call (counting the step, see step_momentum), or None
    if it is not fusable_norm."""
    if kind is None:
        kind = type(norm)
    # The operands straight from the module's tables: nn.Module.__getattr__ costs about 1 us
    # a tensor, paid per unit per call.
    tensors = norm._parameters if kind is not FrozenBatchNorm2d else norm._buffers
    buffers = norm._buffers
    if kind is FrozenBatchNorm2d:
        return BatchNormArgs(tensors["weight"], tensors["bias"], buffers["running_mean"], buffers["running_var"],
                             False, 0.0, norm.eps, None, True)
    if kind is not nn.BatchNorm2d and kind not in SYNC_BATCH_NORMS:
        return None
    training = norm.training
    momentum = step_momentum(norm) if training else (0.0 if norm.momentum is None else norm.momentum)
    use_running = not training or norm.track_running_stats
    group = None
    if training and kind is not nn.BatchNorm2d:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # As torch.nn.SyncBatchNorm.forward: statistics over its group (default: the world)
            # in training; a group of one process is plain BatchNorm (the ops decide).
            group = norm.process_group or dist.group.WORLD
    return BatchNormArgs(tensors["weight"], tensors["bias"], buffers["running_mean"] if use_running else None,
                         buffers["running_var"] if use_running else None, training, momentum, norm.eps, group)


def check_values_per_channel(count: int, size=None) -> None:
    """nn.BatchNorm2d's error for a training batch whose statistics would come from one value
    per channel: `count` values per channel (0, an empty batch, is allowed where `size`, the
    local batch's size, is given: it normalizes nothing); without `size`, count is the total
    over a process group, and must be more than 1."""
    if count == 1 or (size is None and count < 1):
        # nn.BatchNorm2d's own text for a local batch (tests/test_api.py compares the two).
        got = f"input size {torch.Size(size)}" if size is not None else f"{count} across all processes of the group"
        raise ValueError(f"Expected more than 1 value per channel when training, got {got}")


def affine_or_default(weight: Tensor | None, bias: Tensor | None, channels: int, dtype: torch.dtype,
                      device: torch.device) -> tuple[Tensor, Tensor]:
    """The affine parameters a BatchNorm without them (affine=False) applies: ones and zeros."""
    if weight is None:
        weight = torch.ones(channels, dtype=dtype, device=device)
    if bias is None:
        bias = torch.zeros(channels, dtype=dtype, device=device)
    return weight, bias


def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count,
                         momentum: float) -> None:
    """nn.BatchNorm2d's running-statistics update from a batch's mean and biased variance over
    `count` values per channel (an int, or a device tensor so that nothing reads back to the
    host): the running variance tracks the unbiased batch variance."""
    if torch.is_grad_enabled() and (mean.requires_grad or var.requires_grad or running_mean.requires_grad
                                    or running_var.requires_grad):  # e.g. SyncBatchNorm's differentiable statistics
        with torch.no_grad():  # only then: the block costs ~4 us a call
            return update_running_stats(running_mean, running_var, mean, var, count, momentum)
    correction = (count / (count - 1)).to(var.dtype) if isinstance(count, Tensor) else count / (count - 1)
    unbiased = var * correction
    # One call for both buffers (one kernel on a GPU, one dispatch on the CPU), lerp_'s values.
    torch._foreach_lerp_([running_mean, running_var],
                         [mean if mean.dtype == running_mean.dtype else mean.to(running_mean.dtype),
                          unbiased if unbiased.dtype == running_var.dtype else unbiased.to(running_var.dtype)],
                         momentum)
