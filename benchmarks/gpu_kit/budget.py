"""The run's time budget, and the seconds each case is expected to take.

The whole run fits one 600-second device call. The budget is shared out between the phases
in order, each getting a share of what is left (plan.SCHEDULE); a case that would not finish
before its phase's deadline is skipped and recorded as out of time.
"""

from __future__ import annotations

import time

DEFAULT_BUDGET_S = 560      # one device call is 600 s; the rest is start-up and margin
REPORT_RESERVE_S = 15       # kept back for writing the report at the end

# Rough seconds a case needs on an H100, warm-up included: a case is skipped rather than
# started when less than this is left. Estimates, not measurements.
OP_CASE_S = {"compile-unit": 30, "fused-triton": 15}
OP_CASE_DEFAULT_S = 3
MODEL_CASE_S = {
    ("infer", "torchvision-compile"): 90, ("train", "torchvision-compile"): 150,
    ("infer", "torchvision-compile-max-autotune"): 300, ("train", "torchvision-compile-max-autotune"): 400,
    ("infer", "torchvision-compile-max-autotune-freezing"): 300,
    ("infer", "fused-triton"): 60, ("train", "fused-triton"): 90,
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
