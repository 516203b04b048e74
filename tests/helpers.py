"""Shared test utilities: randomized conv/BN units and dtype-aware tolerances.

Tolerance rule (flash-attention style): a result in dtype d is compared with a float64
reference, and its error may be at most 2x the error eager PyTorch makes in the same
dtype, plus a floor of a few ulps of the output's magnitude (eager is sometimes exact
where another summation order is not).
"""

from __future__ import annotations

import torch
from torch import nn

FLOOR_ULPS = 8


def randomize_bn(bn: nn.Module, generator: torch.Generator | None = None) -> None:
    """Non-default affine parameters and running statistics, so no term is trivially 0 or 1."""
    with torch.no_grad():
        c = bn.num_features
        if getattr(bn, "weight", None) is not None:
            bn.weight.copy_(torch.rand(c, generator=generator) + 0.5)
            bn.bias.copy_(torch.rand(c, generator=generator) - 0.5)
        if getattr(bn, "running_mean", None) is not None:
            bn.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            bn.running_var.copy_(torch.rand(c, generator=generator) + 0.5)


def randomize_model_bn(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            randomize_bn(module)
    return model


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return (actual.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0


def l2_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return torch.linalg.vector_norm(actual.double() - ref64.double()).item() if actual.numel() else 0.0


def assert_close_to_ref(
    actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, name: str = "", scale: float | None = None,
    metric: str = "max",
) -> None:
    """|actual - ref64| <= 2 |eager - ref64| + floor, elementwise maxima. The floor is a few
    ulps of `scale`, by default the reference's magnitude; pass the magnitude of the summed
    terms for a quantity that is a cancellation (a conv bias's gradient under BatchNorm).
    metric="l2" compares Euclidean norms of the errors instead: the max over millions of
    elements of a deep network's gradients is one noisy sample, the norm is stable."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != eager's {eager.dtype}"
    if actual.numel() == 0:
        return
    err_fn = {"max": max_err, "l2": l2_err}[metric]
    if scale is None:
        scale = ref64.abs().max().item() if metric == "max" else torch.linalg.vector_norm(ref64.double()).item()
    floor = FLOOR_ULPS * torch.finfo(actual.dtype).eps * max(scale, 1e-3)
    err, err_eager = err_fn(actual, ref64), err_fn(eager, ref64)
    assert err <= 2 * err_eager + floor, (
        f"{name}: {metric} error {err:.3e} vs float64 exceeds 2x eager's {err_eager:.3e} + floor {floor:.1e}"
    )
