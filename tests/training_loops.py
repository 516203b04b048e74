"""SGD training loops and their losses, and the perturbed copy that measures a model's own
float64 sensitivity (the yardstick of tolerances.check_step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def square_mean_loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


def float_loss(out: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum) of the squared logits, in float32 (float64 for a float64 model). The mean
    keeps several SGD steps at lr 1e-2 stable; the sum keeps float16 gradients clear of underflow."""
    squares = (out if out.dtype == torch.float64 else out.float()).square()
    return squares.mean() if reduction == "mean" else squares.sum()


def sgd_steps(model, inputs, loss_fn=square_mean_loss, lr=1e-3, after_backward=None):
    """One SGD step (momentum 0.9) per input; per step (logits, [grads in parameter order]).
    Works on wrapped models (torch.compile, DDP), whose parameter names differ from the module's."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    record = []
    for x in inputs:
        opt.zero_grad()
        out = model(x)
        loss_fn(out).backward()
        if after_backward is not None:
            after_backward(model)
        record.append((out.detach(), [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record


def perturbed_copy(model: nn.Module, seed: int = 123) -> nn.Module:
    """model with every parameter multiplied by (1 + 1e-15 N(0,1)): torchvision's own float64
    sensitivity, the yardstick for training steps after the first in a small-batch regime."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-15 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model
