"""The parts of benchmarks/gpu_report.py (the command; its docstring says what a run does and
writes), one concern per module:

  cli         the command line: the arguments, and a run's phases in order
  plan        which cases each phase runs, in priority order, and each phase's share of the budget
  budget      the planned window (TIMELINE), the run's budget, and the seconds each case is expected to take
  warm        the warm phase: the kernels the headline cases JIT-compile, compiled in parallel workers;
              the Triton cache's entries counted per phase
  processes   subprocesses with a log and a time limit; the environment the GPU work runs in
  isolation   a phase's cases in worker subprocesses, so that a crash costs one case, not the run
  worker      what runs inside a worker subprocess: the cases, one JSON line per event
  phases      the build (in the background) and the GPU-test phases: smoke with per-backend verdicts, the rest
  provenance  where the numbers come from: GPU, driver, versions, commit, command
  summary     what a report's rows say: the headline targets, and the groupings the markdown and plot share
  markdown    the report's markdown, from the report dict alone
  plot        the report's PNG, from the report dict alone
  report      the report's files: their name, and writing the JSON, markdown and PNG

Importing the package puts benchmarks/ (bench_layers, bench_models) and the repository root
(resnet_fused from the checkout) on sys.path.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
ROOT = BENCHMARKS.parent
SCRIPT = BENCHMARKS / "gpu_report.py"  # the command; its workers run it with --worker

for path in (str(BENCHMARKS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)
