#!/usr/bin/env python
"""GPU evidence in one command, fit for one short window on a fresh machine: build the
extension while the Triton kernels compile, check every backend (the verifier, then the gpu_smoke tests), measure
the headline, and write a report with its provenance.

    python benchmarks/gpu_report.py [--out DIR] [--quick] [--budget SECONDS] [--build auto|always|never]
                                    [--phases build,warm,verify,smoke,models,ops,tests]
    python benchmarks/gpu_report.py --cpu-smoke [--out DIR]   # the whole pipeline on tiny CPU cases
    python benchmarks/gpu_report.py --render REPORT.json      # rewrite the .md/.png from a report's JSON

The window (gpu_kit/budget.py TIMELINE; --quick halves each step):
  build + warm   100 s  the CUDA extension built for this GPU only (pip install -e, 6 nvcc jobs),
                        beside the Triton compile gate (resnet_fused.backends.triton.aot) compiling
                        every kernel the headline launches on the free CPU cores, and workers
                        compiling torch.compile's baseline, into the on-disk caches
  verify          90 s  python -m resnet_fused.verify on resnet50's layers in bf16: the verdict
                        auto reads; only a passed one clears a fused backend for the benchmarks
  smoke           90 s  pytest -m gpu_smoke over pytest-xdist workers; a fused backend with a
                        failed smoke test is excluded from the benchmarks, with its failures
  models-core    150 s  resnet50, bf16, batch 256, 224 px: inference and a training step, each
                        with its peak memory: eager (channels_last), fused-triton, fused-cuda,
                        then torch.compile (default mode)
  ops-core        90 s  every ResNet-50 layer at batch 256: fused vs cuDNN's conv alone vs the
                        eager unit
  report          15 s
then, with what is left (nothing, in a default run): the rest of the model and layer
matrix (max-autotune, other batches and precisions) and the rest of the GPU suite
(`-m "needs_cuda and not gpu_smoke"`). Those are for later windows: --phases models,ops,tests.

Writes, into --out (default benchmarks/results/; for --cpu-smoke a new temporary folder):
  <gpu>-<yyyy-mm-dd>.json   every number, skip and error, with GPU name, driver, CUDA, cuDNN,
                            torch, torchvision, triton and Python versions, the git commit,
                            the date, the command line and the budget; each phase's planned and
                            used seconds and the Triton kernels it still compiled (cache misses)
  <gpu>-<yyyy-mm-dd>.md     the tables: the timeline; build, warm-up and tests with per-backend
                            verdicts; the performance targets; per model, images/s per provider
                            with speedups vs eager and vs torch.compile and peak memory; per
                            ResNet-50 layer, fused vs the convolution alone (cuDNN) vs the eager unit
  <gpu>-<yyyy-mm-dd>.png    speedup per ResNet-50 layer and images/s per provider (matplotlib;
                            without it the report says so and the rest is written anyway)
  <gpu>-<yyyy-mm-dd>-verify.json  the verifier's verdicts and per-layer timings
  <gpu>-<yyyy-mm-dd>-{build,warm,verify,smoke,tests,benchmarks}.log
With --phases other than all of them, the phases join the name (<gpu>-<date>-models.json), so
a partial run never overwrites the day's full one.

Budget. --budget (default 535 s, under 9 minutes; --quick: half) bounds the run; each step
ends at its cap or earlier, leaving its time to the next. A case that would not finish in
time is skipped and recorded as such ("out of time"), so the report says what was not
measured. The JSON and markdown are rewritten after every phase, so a run cut short still
leaves a report.

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
