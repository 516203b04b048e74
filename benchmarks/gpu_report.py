#!/usr/bin/env python
"""GPU evidence in one command: build the extension, run the GPU tests, run the model and
per-layer benchmarks, and write a report with its provenance.

    python benchmarks/gpu_report.py [--out DIR] [--quick] [--budget SECONDS]
                                    [--build auto|always|never] [--phases build,tests,models,ops]
    python benchmarks/gpu_report.py --cpu-smoke [--out DIR]   # the whole pipeline on tiny CPU cases
    python benchmarks/gpu_report.py --render REPORT.json      # rewrite the .md/.png from a report's JSON

Writes, into --out (default benchmarks/results/; for --cpu-smoke a new temporary folder):
  <gpu>-<yyyy-mm-dd>.json   every number, skip and error, with GPU name, driver, CUDA, cuDNN,
                            torch, torchvision, triton and Python versions, the git commit,
                            the date and the command line
  <gpu>-<yyyy-mm-dd>.md     the tables: GPU tests; the performance targets; per model, images/s per
                            provider with speedups vs eager and vs torch.compile and peak
                            memory; per ResNet-50 layer, fused vs the convolution alone (cuDNN)
                            vs the eager unit
  <gpu>-<yyyy-mm-dd>.png    speedup per ResNet-50 layer and images/s per provider (matplotlib;
                            without it the report says so and the rest is written anyway)
  <gpu>-<yyyy-mm-dd>-{build,tests,benchmarks}.log
With --phases other than all four, the phases join the name (<gpu>-<date>-models.json), so
a partial run never overwrites the day's full one.

Budget. The whole run fits one 10-minute device call: --budget (default 560 s; --quick:
half) is shared out between the phases in order (build, tests, the headline model cases,
the per-layer cases, then the remaining model and layer cases), each phase getting a
share of what is left; a case that would not finish in time is skipped and recorded as
such ("out of time"), so the report says what was not measured. The JSON and markdown are
rewritten after every phase, so a run cut short still leaves a report. The full matrix
(every compile mode, batch and precision) needs more than one call: run --phases models
and --phases ops in further calls while the machine is warm (the Triton, autotuning and
inductor caches then carry over).

Isolation. The benchmarks run in worker subprocesses (this script with --worker). Kernels
that have never run on a GPU may fault; a CUDA error poisons its process, so the worker
exits, the case is recorded as an error with the log's tail, and a fresh worker goes on
with the remaining cases (a provider that crashed twice is skipped for the rest of the
phase).

Timing. Every number comes from this run: CUDA events around each call, the L2 cache
flushed before each per-layer call, medians over many rounds after an untimed warm-up
(torch.compile, Triton autotuning and cuDNN's search happen there and are reported apart
as first-call time). Speedups are ratios of medians from the same run.

The implementation is the package gpu_kit/ beside this script, one module per concern (its
__init__ lists them).
"""

import sys

from gpu_kit.cli import main

if __name__ == "__main__":
    sys.exit(main())
