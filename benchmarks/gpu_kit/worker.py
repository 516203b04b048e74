"""What runs inside a worker subprocess (`gpu_report.py --worker PLAN --results JSONL`): a
plan's cases in this process, one JSON line per event; for the warm phase (warm.py), each
case's first call only. A CUDA error that loses the context
ends the worker (exit status 3); isolation.run_worker_phase starts a fresh one.

Timing: every number comes from this run, medians over many rounds after an untimed warm-up
(torch.compile, Triton autotuning and cuDNN's search happen there and are reported apart as
first-call time).
"""

from __future__ import annotations

import json
import os
import time
import traceback

from .budget import case_estimate_s
from .plan import row_base

# For the CPU test of the crash isolation (test_gpu_report.py): comma-separated "exit:<text>"
# (the worker dies abruptly), "cuda-error:<text>" (a case raises what a lost CUDA context
# raises) or "hang:<text>" (a case never returns), at each case whose id contains <text>.
INJECT_FAULT_ENV = "GPU_REPORT_INJECT_FAULT"

# Messages meaning the CUDA context is gone: nothing after them in this process can be trusted.
STICKY_CUDA_ERRORS = ("illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
                      "misaligned address", "an illegal instruction", "CUDA error: unknown error")
STICKY_EXIT_STATUS = 3  # the worker's exit status after a sticky CUDA error


def main(plan_path: str, results_path: str) -> int:
    import bench_layers as bl
    import bench_models as bm
    import torch

    import resnet_fused
    from resnet_fused import benchmark as mb

    with open(plan_path) as f:
        plan = json.load(f)
    ops = plan["kind"] == "ops"
    device = torch.device(plan["device"])
    mb.configure_device(device)
    deadline = plan["deadline"]
    excluded = plan.get("excluded", {})
    warm = plan.get("warm", False)  # the warm phase: each case's first call only (compiles), no timing
    out = open(results_path, "a", buffering=1)

    def emit(**event):
        out.write(json.dumps(event) + "\n")
        out.flush()

    emit(event="env", backends=resnet_fused.available_backends(), pid=os.getpid())
    cache_key, cache = None, None
    for index, spec in plan["cases"]:
        base = row_base(plan["kind"], spec)
        provider = base["provider"]
        if ops:
            case = bl.OpCase.from_dict(spec)
            key = ("ops", case.op, case.batch, case.dtype, case.layer, case.shape)
            reason = bl.skip_reason(case, device)
        else:
            config = bm.ModelConfig.from_dict(spec["config"])
            key = ("models", config)
            reason = bm.skip_reason(config, provider, device)
        estimate = case_estimate_s(base)
        if reason is None and provider in excluded:
            reason = excluded[provider]
        if warm and reason is None and time.time() > deadline:
            reason = "out of time: the warm phase's deadline passed"
        if not warm and reason is None and device.type == "cuda" and time.time() + estimate > deadline:
            reason = (f"out of time: {max(0, deadline - time.time()):.0f} s left in this phase, the case needs "
                      f"about {estimate} s (an estimate)")
        if reason is not None:
            emit(event="result", index=index, row=dict(base, status="skipped", reason=reason))
            continue
        emit(event="start", index=index)
        print(f"[worker] {base['id']}", flush=True)  # in the log: which case a crash interrupted
        t0 = time.perf_counter()
        try:
            _inject_fault(base["id"])
            if warm:
                _compile_case(case if ops else config, provider, device)
                emit(event="result", index=index, row=dict(base, status="warmed", seconds=time.perf_counter() - t0))
                continue
            if key != cache_key:
                cache_key, cache = None, None
                mb.release_memory(device)
                if ops:
                    tensors = bl.make_tensors(case, device)
                    cache = (tensors, bl.reference_outputs(case, device, tensors))
                else:
                    cache = bm.prepare(config, device)
                cache_key = key
            if ops:
                row = bl.run_case(case, device, *cache, target_seconds=plan["target_seconds"])
            else:
                tv_model, x, reference_logits = cache
                row = mb.run_model_provider(provider, tv_model, x, config.mode, config.precision, reference_logits,
                                            warmup=3 if device.type == "cuda" else 1, rounds=None,
                                            target_seconds=plan["target_seconds"],
                                            max_rounds=200 if device.type == "cuda" else 3)
            row = dict(base, **row)
        except Exception as exc:  # recorded, and the next case runs (unless the CUDA context is lost)
            message = f"{type(exc).__name__}: {exc}"
            sticky = any(s in message for s in STICKY_CUDA_ERRORS)
            if sticky:
                message = ("(CUDA errors surface late: the faulting kernel may belong to an earlier call of this "
                           "worker) " + message)
            emit(event="result", index=index, row=dict(
                base, status="error", reason=message[:2000], traceback=traceback.format_exc()[-4000:],
                sticky_cuda_error=sticky, seconds=time.perf_counter() - t0))
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                cache_key, cache = None, None
                mb.release_memory(device)
            if sticky:
                return STICKY_EXIT_STATUS  # the parent starts a fresh worker for the remaining cases
            continue
        row["seconds"] = time.perf_counter() - t0
        emit(event="result", index=index, row=row)
    return 0


def read_events(results_path) -> list[dict]:
    """The events a worker wrote to its results file (none if it wrote none); a last line cut
    off by a kill is skipped."""
    events = []
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def _compile_case(case, provider: str, device) -> None:
    """The first call of an op case (bench_layers.OpCase) or of a model provider (a
    bench_models.ModelConfig): what JIT-compiles its kernels (Triton, Inductor)."""
    import bench_layers as bl
    import bench_models as bm

    from resnet_fused import benchmark as mb

    if isinstance(case, bl.OpCase):
        unit = bl.make_unit(case, bl.make_tensors(case, device))
        with unit.context():
            unit.run()
    else:
        tv_model, x, reference_logits = bm.prepare(case, device)
        mb.prepare_provider(provider, tv_model, x, case.mode, case.precision, reference_logits, warmup=0)
    mb.synchronize(device)
    mb.release_memory(device)


def _inject_fault(case_id: str) -> None:
    for spec in filter(None, os.environ.get(INJECT_FAULT_ENV, "").split(",")):
        kind, _, text = spec.partition(":")
        if text and text in case_id:
            if kind == "exit":
                os._exit(70)
            if kind == "hang":
                time.sleep(10**6)
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {INJECT_FAULT_ENV})")
