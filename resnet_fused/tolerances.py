"""Dtype-aware tolerances: a result against a float64 reference, judged by eager PyTorch's error.

Tolerance rule (flash-attention style): a result in dtype d is compared with a float64
reference, and its error may be at most 2x the error eager PyTorch makes in the same
dtype, plus a floor of a few ulps of the output's magnitude (eager is sometimes exact
where another summation order is not). Relative errors and their aggregate over a list of
tensors serve model-level comparisons; check_step judges float64 training steps.

One rule, one place: the test suite and `python -m resnet_fused.verify` (the on-device check
`auto` trusts) both judge with `judge`.
"""

from __future__ import annotations

import dataclasses

import torch

FLOOR_ULPS = 8

# How a TF32 tensor-core path turns a float32 GEMM operand into tf32 (10 mantissa bits), per
# kernel family (docs/kernels.md#tf32): the sm80 WMMA kernel rounds (__float_to_tf32:
# cvt.rna, to nearest, ties away from zero); wgmma, which the sm90 CUTLASS kernels and
# Triton's sm_90 kernels feed with float32 from shared memory, truncates the low 13 bits (PTX
# ISA). A TF32 result is judged against the float64 op on operands turned the same way.
TF32_OPERANDS = {"cuda-sm80": "round", "cuda-sm90": "truncate", "triton-sm90": "truncate"}
_TF32_DROPPED = 0x1FFF  # the 13 low mantissa bits float32 has and tf32 has not


def tf32_operand(t: torch.Tensor, rounding: str) -> torch.Tensor:
    """t (float32) as a tf32 GEMM operand, in float32: 'round' (to nearest, ties away from zero)
    or 'truncate' (toward zero). Sign-magnitude bits: both act on the magnitude."""
    if rounding not in ("round", "truncate"):
        raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")
    bits = t.float().view(torch.int32)  # a dtype view keeps t's strides (channels_last stays)
    if rounding == "round":
        bits = bits + 0x1000
    return (bits & ~_TF32_DROPPED).view(torch.float32)


def tf32_emulation(op, args, rounding: str, operands=(0, 1)):
    """op (a reference op) in float64 on args whose GEMM operands (positions `operands`: x and
    the weight) are first turned into tf32 as the kernel turns them, each output in float32: the
    TF32 kernel's bar, standing in for eager's output in assert_close_to_ref."""
    args64 = [(tf32_operand(a, rounding) if i in operands else a) for i, a in enumerate(args)]
    args64 = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args64]
    out = op(*args64)
    return tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float()


def max_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return (actual.double() - ref64.double()).abs().max().item() if actual.numel() else 0.0


def l2_err(actual: torch.Tensor, ref64: torch.Tensor) -> float:
    return torch.linalg.vector_norm(actual.double() - ref64.double()).item() if actual.numel() else 0.0


@dataclasses.dataclass(frozen=True)
class Judgement:
    """One tensor judged by the rule: its error against float64, eager's, the floor, and the verdict."""

    name: str
    err: float
    err_eager: float
    floor: float

    @property
    def bar(self) -> float:
        return 2 * self.err_eager + self.floor

    @property
    def passed(self) -> bool:
        return self.err <= self.bar  # False for a NaN error

    @property
    def ratio(self) -> float:
        """err / bar: at most 1 passes (the verifier reports the worst)."""
        return self.err / self.bar if self.bar > 0 else (0.0 if self.err == 0 else float("inf"))

    def message(self, metric: str = "max") -> str:
        return (f"{self.name}: {metric} error {self.err:.3e} vs float64 exceeds 2x eager's {self.err_eager:.3e}"
                f" + floor {self.floor:.1e}")


def judge(actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, name: str = "",
          scale: float | None = None, metric: str = "max") -> Judgement:
    """The rule: |actual - ref64| <= 2 |eager - ref64| + floor, elementwise maxima. The floor is
    a few ulps of `scale`, by default the reference's magnitude; pass the magnitude of the summed
    terms for a quantity that is a cancellation (a conv bias's gradient under BatchNorm).
    metric="l2" compares Euclidean norms of the errors instead: the max over millions of
    elements of a deep network's gradients is one noisy sample, the norm is stable. Shapes and
    dtypes must agree (ValueError otherwise)."""
    if actual.shape != ref64.shape:
        raise ValueError(f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}")
    if actual.dtype != eager.dtype:
        raise ValueError(f"{name}: dtype {actual.dtype} != eager's {eager.dtype}")
    if actual.numel() == 0:
        return Judgement(name, 0.0, 0.0, 0.0)
    err_fn = {"max": max_err, "l2": l2_err}[metric]
    if scale is None:
        scale = ref64.abs().max().item() if metric == "max" else torch.linalg.vector_norm(ref64.double()).item()
    floor = FLOOR_ULPS * torch.finfo(actual.dtype).eps * max(scale, 1e-3)
    return Judgement(name, err_fn(actual, ref64), err_fn(eager, ref64), floor)


def assert_close_to_ref(
    actual: torch.Tensor, eager: torch.Tensor, ref64: torch.Tensor, name: str = "", scale: float | None = None,
    metric: str = "max",
) -> None:
    """Assert `judge`'s rule (a test's form of it)."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype} != eager's {eager.dtype}"
    verdict = judge(actual, eager, ref64, name, scale, metric)
    assert verdict.passed, verdict.message(metric)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (float64 arithmetic)."""
    expected = expected.double()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-300)


def aggregate_rel_l2(tensors, refs) -> float:
    """sqrt(sum_k ||t_k - r_k||^2 / ||r_k||^2): one error figure for a list of tensors (a
    model's gradients, its state), each weighted by its own magnitude."""
    total = 0.0
    for t, r in zip(tensors, refs, strict=True):
        r = r.double()
        norm = torch.linalg.vector_norm(r).item()
        if norm > 0:
            total += (torch.linalg.vector_norm(t.double() - r).item() / norm) ** 2
    return total**0.5


def assert_within_2x(what: str, got, baseline, ref64, floor: float) -> tuple[float, float]:
    """Aggregate relative L2 error of the tensors `got` against `ref64` at most 2x that of
    `baseline` (eager, or torchvision) plus `floor`. Returns both errors."""
    err, err_base = aggregate_rel_l2(got, ref64), aggregate_rel_l2(baseline, ref64)
    assert err <= 2 * err_base + floor, f"{what}: error {err:.2e} > 2x the baseline's {err_base:.2e} + {floor:.1e}"
    return err, err_base


def check_step(what: str, expected, actual, perturbed, step: int) -> None:
    """float64 against torchvision: step 0 to rounding (1e-9 relative); a later step within
    10x what perturbing torchvision's own weights by 1e-15 does (training_loops.perturbed_copy)."""
    bound = 1e-9 if step == 0 else 10 * rel_err(perturbed, expected) + 1e-12
    err = rel_err(actual, expected)
    assert err <= bound, f"step {step} {what}: relative error {err:.2e} > {bound:.2e}"
