"""The run's time budget: the planned window, and the seconds each case is expected to take.

The whole run fits one 600-second device call. Each step of the window has a most-seconds
cap (TIMELINE, the window in docs/benchmarks.md); a step that ends early leaves its time to
the next ones, and a case that would not finish before its phase's deadline is skipped and recorded
as out of time.
"""

from __future__ import annotations

import time

# The planned window, step by step: the most seconds each may take (--quick: half each).
# Estimates for a fresh H100/H200 with 16 CPU cores; the report records what each took.
TIMELINE = {
    "build+warm": 100,   # nvcc on 4 cores for this GPU's architecture, beside the Triton compile gate on 8
    "verify": 90,        # python -m resnet_fused.verify: resnet50's layers in bf16, each backend checked then timed
    "smoke": 90,         # the gpu_smoke tests, over pytest-xdist workers
    "models-core": 150,  # resnet50 bf16 batch 256: inference and a training step per provider
    "ops-core": 90,      # the ResNet-50 layers at batch 256: fused vs conv alone vs the eager unit
}
# Seconds one of the warm phase's Triton compiles takes on one core (bf16 kernels for sm_90,
# ptxas included, no SASS listing): 0.82 s on average over a sample of the compile gate's jobs
# on the 2-core CI machine with Triton 3.8, rounded up. Assumed no slower on the GPU machines'
# cores (not yet measured there: the warm phase's report gives the seconds it took).
WARM_COMPILE_S = 0.9
REPORT_RESERVE_S = 15       # kept back for writing the report at the end
DEFAULT_BUDGET_S = sum(TIMELINE.values()) + REPORT_RESERVE_S  # 535 s: under 9 minutes

# Rough seconds a case needs on an H100, warm-up included: a case is skipped rather than
# started when less than this is left. Estimates, not measurements. fused-triton and the
# default torch.compile assume the warm phase compiled their kernels (then only autotuning's
# benchmarks and the cache loads remain); cold, they take several times longer.
OP_CASE_S = {"compile-unit": 30, "fused-triton": 5}
OP_CASE_DEFAULT_S = 3
MODEL_CASE_S = {
    ("infer", "torchvision-compile"): 40, ("train", "torchvision-compile"): 60,
    ("infer", "torchvision-compile-max-autotune"): 300, ("train", "torchvision-compile-max-autotune"): 400,
    ("infer", "torchvision-compile-max-autotune-freezing"): 300,
    ("infer", "fused-triton"): 30, ("train", "fused-triton"): 45,
    ("infer", "torchvision-compile-reduce-overhead"): 60,
}
MODEL_CASE_DEFAULT_S = 20


def case_estimate_s(row: dict) -> float:
    """The seconds a case is expected to take; row: its plan.row_base."""
    if row["kind"] == "op":
        return OP_CASE_S.get(row["provider"], OP_CASE_DEFAULT_S)
    return MODEL_CASE_S.get((row["config"]["mode"], row["provider"]), MODEL_CASE_DEFAULT_S)


class Budget:
    def __init__(self, seconds: float):
        self.start = time.time()
        self.deadline = self.start + seconds

    def left(self) -> float:
        return max(0.0, self.deadline - REPORT_RESERVE_S - time.time())

    def share(self, fraction: float, cap: float | None = None) -> float:
        """A deadline for the next phase: `fraction` of what is left, at most `cap` seconds."""
        seconds = self.left() * fraction
        if cap is not None:
            seconds = min(seconds, cap)
        return time.time() + seconds
