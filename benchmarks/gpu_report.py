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
  <gpu>-<yyyy-mm-dd>.md     the tables: GPU tests; the issue's targets; per model, images/s per
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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):  # bench_layers/bench_models, and resnet_fused from the checkout
    if path not in sys.path:
        sys.path.insert(0, path)

SCHEMA = 1
DEFAULT_BUDGET_S = 560      # one device call is 600 s; the rest is start-up and margin
REPORT_RESERVE_S = 15       # kept back for writing the report at the end
WORKER_GRACE_S = 20         # a worker past its phase's deadline by this much is killed
MAX_CRASHES_PER_PROVIDER = 2
FUSED_OP_PROVIDERS = ("fused-cuda", "fused-triton")
FUSED_MODEL_PROVIDERS = ("fused-cuda", "fused-triton", "fused-auto")
EAGER = "torchvision-eager"

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

# For the CPU test of the crash isolation (test_gpu_report.py): comma-separated "exit:<text>"
# (the worker dies abruptly), "cuda-error:<text>" (a case raises what a lost CUDA context
# raises) or "hang:<text>" (a case never returns), at each case whose id contains <text>.
INJECT_FAULT_ENV = "GPU_REPORT_INJECT_FAULT"

# Messages meaning the CUDA context is gone: nothing after them in this process can be trusted.
STICKY_CUDA_ERRORS = ("illegal memory access", "illegal address", "device-side assert", "unspecified launch failure",
                      "misaligned address", "an illegal instruction", "CUDA error: unknown error")


# --------------------------------------------------------------------------------------------
# The plan: which cases each phase runs, in priority order.

def model_plan(phase: str, on_gpu: bool, quick: bool) -> list[dict]:
    """[{config, provider}] for a models phase."""
    from bench_models import ModelConfig

    def entries(config, providers):
        return [dict(config=config.to_dict(), provider=p) for p in providers]

    fused_and_eager = (EAGER, "fused-cuda", "fused-triton", "fused-auto")
    if not on_gpu:
        smoke = ("torchvision-eager", "fused-reference", "fused-cuda", "fused-triton")
        if phase == "models-core":
            return (entries(ModelConfig("resnet18", "infer", 2, 64, "fp32", smoke), smoke)
                    + entries(ModelConfig("resnet18", "train", 2, 64, "fp32", smoke), smoke))
        return entries(ModelConfig("resnet18", "infer", 1, 64, "fp32", smoke[:2]), smoke[:2])
    if phase == "models-core":
        # The headline: resnet50, bf16, batch 256 at 224. Fused vs eager first, then the
        # compile baselines, slowest (max-autotune) last.
        infer = ModelConfig("resnet50", "infer", 256, 224, "bf16", ())
        train = ModelConfig("resnet50", "train", 256, 224, "bf16", ())
        plan = entries(infer, fused_and_eager) + entries(train, fused_and_eager)
        plan += entries(infer, ["torchvision-compile"]) + entries(train, ["torchvision-compile"])
        if not quick:
            plan += entries(infer, ["torchvision-compile-max-autotune-freezing"])
            plan += entries(train, ["torchvision-compile-max-autotune"])
        return plan
    plan = []
    for batch in (32, 1):
        plan += entries(ModelConfig("resnet50", "infer", batch, 224, "bf16", ()), fused_and_eager)
    for precision in ("fp16", "fp32"):
        plan += entries(ModelConfig("resnet50", "infer", 256, 224, precision, ()), fused_and_eager)
    for name in ("resnet18", "resnet101"):
        for mode in ("infer", "train"):
            plan += entries(ModelConfig(name, mode, 256, 224, "bf16", ()), fused_and_eager)
    for batch in (32, 1):
        plan += entries(ModelConfig("resnet50", "infer", batch, 224, "bf16", ()), ["torchvision-compile"])
    plan += entries(ModelConfig("resnet50", "infer", 256, 224, "bf16", ()), ["torchvision-compile-max-autotune"])
    return plan


def op_plan(phase: str, on_gpu: bool, quick: bool) -> list[dict]:
    """[OpCase dict] for an ops phase."""
    import bench_layers as bl

    if not on_gpu:
        layers = bl.cpu_layers()
        if phase == "ops-core":
            return [c.to_dict() for c in bl.op_cases(layers[:2], (2,), "fp32", bl.CPU_PROVIDERS)]
        smoke_providers = ("conv-alone", "eager-unit", "fused-reference")
        return [c.to_dict() for c in bl.op_cases(layers[2:], (1,), "fp32", smoke_providers, ops=("eval",))]
    layers = bl.resnet_conv_layers("resnet50", image_size=224)
    main_providers = ("conv-alone", "eager-unit", "fused-triton", "fused-cuda")
    if phase == "ops-core":
        return [c.to_dict() for c in bl.op_cases(layers, (256,), "bf16", main_providers)]
    cases = bl.op_cases(layers, (256,), "bf16", ("compile-unit",))
    cases += bl.op_cases(layers, (32,), "bf16", main_providers)
    cases += bl.op_cases(layers, (32,), "bf16", ("compile-unit",))
    return [c.to_dict() for c in cases]


# --------------------------------------------------------------------------------------------
# The worker: runs a plan's cases in this process, one JSON line per event.

def worker_main(plan_path: str, results_path: str) -> int:
    import bench_layers as bl
    import bench_models as bm
    import torch

    import resnet_fused
    from resnet_fused import benchmark as mb

    with open(plan_path) as f:
        plan = json.load(f)
    device = torch.device(plan["device"])
    mb.configure_device(device)
    deadline = plan["deadline"]
    excluded = plan.get("excluded", {})
    out = open(results_path, "a", buffering=1)

    def emit(**event):
        out.write(json.dumps(event) + "\n")
        out.flush()

    emit(event="env", backends=resnet_fused.available_backends(), pid=os.getpid())
    cache_key, cache = None, None
    for index, spec in plan["cases"]:
        if plan["kind"] == "ops":
            case = bl.OpCase.from_dict(spec)
            provider, key, estimate = case.provider, ("ops", case.op, case.batch, case.dtype, case.layer, case.shape), \
                OP_CASE_S.get(case.provider, OP_CASE_DEFAULT_S)
            base = dict(kind="op", case=case.to_dict(), id=case.id, provider=case.provider)
            reason = bl.skip_reason(case, device)
        else:
            config = bm.ModelConfig.from_dict(spec["config"])
            provider, key = spec["provider"], ("models", config)
            estimate = MODEL_CASE_S.get((config.mode, provider), MODEL_CASE_DEFAULT_S)
            base = dict(kind="model", config=config.to_dict(), provider=provider, id=f"{config.label}-{provider}")
            reason = bm.skip_reason(config, provider, device)
        if reason is None and provider in excluded:
            reason = excluded[provider]
        if reason is None and device.type == "cuda" and time.time() + estimate > deadline:
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
            if key != cache_key:
                cache_key, cache = None, None
                mb.release_memory(device)
                if plan["kind"] == "ops":
                    tensors = bl.make_tensors(case, device)
                    cache = (tensors, bl.reference_outputs(case, device, tensors))
                else:
                    cache = bm.prepare(config, device)
                cache_key = key
            if plan["kind"] == "ops":
                target = plan["target_seconds"]
                row = bl.run_case(case, device, *cache, target_seconds=target)
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
                return 3  # the parent starts a fresh worker for the remaining cases
            continue
        row["seconds"] = time.perf_counter() - t0
        emit(event="result", index=index, row=row)
    return 0


def _inject_fault(case_id: str) -> None:
    for spec in filter(None, os.environ.get(INJECT_FAULT_ENV, "").split(",")):
        kind, _, text = spec.partition(":")
        if text and text in case_id:
            if kind == "exit":
                os._exit(70)
            if kind == "hang":
                time.sleep(10**6)
            raise RuntimeError(f"CUDA error: an illegal memory access was encountered (injected by {INJECT_FAULT_ENV})")


# --------------------------------------------------------------------------------------------
# The parent: phases, subprocesses, budget.

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


def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
    """Runs cmd in its own process group, appending its output to log_path. Returns
    (exit status, or None when it was killed at the timeout; seconds)."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: also inductor's compile workers
            proc.wait()
            log.write(f"\n[gpu_report] killed after {timeout:.0f} s (phase time limit)\n")
            rc = None
    return rc, time.time() - t0


def tail(path: Path, chars: int = 3000, since: int = 0) -> str:
    """The last `chars` characters of a log, from byte offset `since` on."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


def worker_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the Triton kernels must run on the GPU, not the interpreter
    # Autotuning results on disk: the per-layer and the model phases share layer shapes, and
    # each worker process would otherwise benchmark every config again.
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_worker_phase(kind: str, cases: list, device: str, phase_deadline: float, paths: dict, settings: dict,
                     report: dict) -> dict:
    """Runs cases in worker subprocesses until done or out of time. Returns the phase record;
    the rows go into report['ops' | 'models'] in plan order."""
    pending = list(enumerate(cases))
    rows: dict[int, dict] = {}
    excluded: dict[str, str] = {}
    crashes: dict[str, int] = {}
    workers = 0
    notes = []
    status = "done"
    abort_reason = "out of time: the phase's time limit was reached"
    if phase_deadline - time.time() < 5:
        pending_now, pending = pending, []  # not worth a worker's start-up
        rows.update((i, dict(_row_base(kind, c), status="skipped", reason=abort_reason)) for i, c in pending_now)
        status = "partial"
    while pending:
        workers += 1
        plan_path = paths["dir"] / f".{paths['stem']}-{kind}-plan.json"
        results_path = paths["dir"] / f".{paths['stem']}-{kind}-results.jsonl"
        results_path.unlink(missing_ok=True)
        plan_path.write_text(json.dumps(dict(kind=kind, device=device, deadline=phase_deadline, excluded=excluded,
                                             target_seconds=settings[f"{kind}_target_seconds"], cases=pending)))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(plan_path), "--results",
               str(results_path)]
        log_offset = paths["benchmarks_log"].stat().st_size if paths["benchmarks_log"].exists() else 0
        rc, _ = run_logged(cmd, paths["benchmarks_log"], phase_deadline - time.time() + WORKER_GRACE_S, worker_env())
        started, finished = None, set()
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut off by a kill
                if event["event"] == "env":
                    report["provenance"].setdefault("backends", event["backends"])
                elif event["event"] == "start":
                    started = event["index"]
                elif event["event"] == "result":
                    rows[event["index"]] = event["row"]
                    finished.add(event["index"])
        plan_path.unlink(missing_ok=True)
        results_path.unlink(missing_ok=True)
        pending = [(i, c) for i, c in pending if i not in finished]
        if rc == 0:
            break
        lost = started if started is not None and started not in finished else None
        if lost is not None:
            spec = dict(pending)[lost]
            provider = spec["provider"]
            if rc is None:
                what = "had not finished at the phase's time limit and was killed"
            elif rc < 0:
                what = f"died of signal {signal.Signals(-rc).name}"
            else:
                what = f"died (exit status {rc})"
            rows[lost] = dict(_row_base(kind, spec), status="error",
                              reason=f"the worker process {what} during this case",
                              log_tail=tail(paths["benchmarks_log"], 3000, since=log_offset))
            pending = [(i, c) for i, c in pending if i != lost]
            if rc is not None:
                crashes[provider] = crashes.get(provider, 0) + 1
                if crashes[provider] >= MAX_CRASHES_PER_PROVIDER:
                    excluded[provider] = f"skipped: {provider} crashed the worker process {crashes[provider]} times " \
                                         f"in this phase"
        else:
            # A sticky CUDA error recorded by the worker itself (exit 3), or a worker that died
            # between cases / before its first case.
            last = max(finished) if finished else None
            if rc == 3 and last is not None:
                provider = rows[last].get("provider") or rows[last].get("case", {}).get("provider")
                crashes[provider] = crashes.get(provider, 0) + 1
                if crashes[provider] >= MAX_CRASHES_PER_PROVIDER:
                    excluded[provider] = f"skipped: {provider} raised a CUDA error that ends its process " \
                                         f"{crashes[provider]} times in this phase"
            elif rc is None:
                notes.append("the worker was killed at the phase's time limit between cases")
            else:
                notes.append(f"a worker exited with status {rc} outside any case; log tail: "
                             f"{tail(paths['benchmarks_log'], 1500, since=log_offset)}")
                status = "error"
                if not finished:
                    # It cannot even start: another try would fail the same way.
                    abort_reason = f"not run: the worker process exited with status {rc} before its first case"
                    break
        if rc is None or time.time() > phase_deadline:
            break
        if workers > 2 + 2 * MAX_CRASHES_PER_PROVIDER * 3:
            abort_reason = "not run: too many worker restarts in this phase"
            break
    for index, spec in pending:
        rows[index] = dict(_row_base(kind, spec), status="skipped", reason=abort_reason)
    if pending:
        status = "partial" if status == "done" else status
    target = report["ops" if kind == "ops" else "models"]
    target.extend(rows[i] for i in sorted(rows))
    counts = {s: sum(1 for r in rows.values() if r["status"] == s) for s in ("ok", "skipped", "error")}
    return dict(status=status, workers=workers, cases=counts, notes=notes)


def _row_base(kind: str, spec: dict) -> dict:
    if kind == "ops":
        import bench_layers as bl

        case = bl.OpCase.from_dict(spec)
        return dict(kind="op", case=case.to_dict(), id=case.id, provider=case.provider)
    from bench_models import ModelConfig

    config = ModelConfig.from_dict(spec["config"])
    return dict(kind="model", config=config.to_dict(), provider=spec["provider"],
                id=f"{config.label}-{spec['provider']}")


def probe_backends() -> dict:
    """resnet_fused's backends as a fresh process sees them (after a build)."""
    code = ("import json, importlib, resnet_fused\n"
            "auto = {}\n"
            "for n in ('cuda', 'triton'):\n"
            "    try:\n"
            "        auto[n] = importlib.import_module(f'resnet_fused.{n}_backend').AUTO\n"
            "    except Exception as e:\n"
            "        auto[n] = f'import failed: {e}'\n"
            "print(json.dumps(dict(backends=resnet_fused.available_backends(), auto_enabled=auto)))\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=worker_env())
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}")


def phase_build(args, budget: Budget, paths: dict, report: dict, gpu: dict | None, others_follow: bool) -> dict:
    before = probe_backends()
    report["provenance"]["backends_before_build"] = before
    cuda_reason = (before.get("backends") or {}).get("cuda", "probe failed")
    if args.build == "never":
        return dict(status="skipped", note="--build never")
    if args.build == "auto" and cuda_reason is None:
        return dict(status="skipped", note="the CUDA extension already loads (--build always rebuilds it)")
    env = dict(os.environ, RESNET_FUSED_FORCE_CUDA="1")
    if gpu and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        env["TORCH_CUDA_ARCH_LIST"] = gpu["capability"]  # this GPU's architecture only: half the compile time
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    deadline = budget.share(0.6, cap=360) if others_follow else budget.share(1.0)
    rc, seconds = run_logged(cmd, paths["build_log"], deadline - time.time(), env)
    after = probe_backends()
    report["provenance"]["backends"] = after.get("backends")
    report["provenance"]["auto_enabled"] = after.get("auto_enabled")
    record = dict(command=shlex.join(cmd), env={k: env[k] for k in ("RESNET_FUSED_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST")
                                                if k in env},
                  returncode=rc, seconds=round(seconds, 1), log=paths["build_log"].name,
                  cuda_backend_after=(after.get("backends") or {}).get("cuda", after.get("error")))
    if rc == 0 and record["cuda_backend_after"] is None:
        record["status"] = "ok"
    else:
        record["status"] = "timed_out" if rc is None else "error"
        record["log_tail"] = tail(paths["build_log"], 3000)
    report["build"] = record
    return dict(status=record["status"], seconds=record["seconds"])


SUMMARY_RE = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected|warnings?)")


def phase_tests(args, budget: Budget, paths: dict, report: dict, on_gpu: bool, benchmarks_follow: bool) -> dict:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "needs_cuda", "-q", "-rfE", "--tb=short",
           "-p", "no:cacheprovider"]
    if benchmarks_follow:
        time_limit = budget.share(0.25, cap=60 if args.quick else 120) - time.time()
    else:  # --phases without models and ops: the tests may take the whole budget
        time_limit = budget.share(1.0) - time.time()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the Triton kernels must run on the GPU, not the interpreter
    rc, seconds = run_logged(cmd, paths["tests_log"], time_limit, env)
    log = tail(paths["tests_log"], 200_000)
    counts: dict[str, int] = {}
    summary_lines = [line for line in log.splitlines() if SUMMARY_RE.search(line) and " in " in line]
    if summary_lines:
        for n, what in SUMMARY_RE.findall(summary_lines[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    failed = [line.strip() for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    status = "timed_out" if rc is None else ("passed" if rc == 0 else ("no_tests" if rc == 5 else "failed"))
    report["tests"] = dict(command=shlex.join(cmd), returncode=rc, seconds=round(seconds, 1), status=status,
                           counts=counts, failed=failed[:100], log=paths["tests_log"].name,
                           on_gpu=on_gpu, time_limit_s=round(time_limit))
    if rc is None:
        report["tests"]["log_tail"] = log[-3000:]
    return dict(status=status, seconds=round(seconds, 1))


# --------------------------------------------------------------------------------------------
# Provenance.

def _run_text(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(argv: list[str]) -> tuple[dict, dict | None]:
    """Where the numbers come from; argv: this script's arguments."""
    import torch
    import torchvision

    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not importable ({type(exc).__name__}: {exc})"
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = dict(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   count=torch.cuda.device_count())
    status = _run_text(["git", "status", "--porcelain"])
    nvcc = _run_text(["nvcc", "--version"])
    info = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command=shlex.join(["python", "benchmarks/gpu_report.py", *argv]),  # from the repository root
        python_executable=sys.executable,
        git_commit=_run_text(["git", "rev-parse", "HEAD"]),
        git_dirty=None if status is None else bool(status),
        git_changed_files=None if status is None else status.splitlines()[:50],
        gpu=gpu,
        driver=_run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) if gpu else None,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nvcc=nvcc.splitlines()[-1] if nvcc else None,
        torch=torch.__version__, torchvision=torchvision.__version__, triton=triton_version,
        python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
        env={k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "TORCH_CUDA_ARCH_LIST", "TRITON_CACHE_AUTOTUNING",
                                        "RESNET_FUSED_BACKEND") if k in os.environ},
    )
    return info, gpu


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --------------------------------------------------------------------------------------------
# Rendering: markdown and plot, from the report dict alone.

def _f(value, fmt: str, missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def _cell(text: str, limit: int) -> str:
    """text fit for one markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _x(ratio) -> str:
    return "—" if ratio is None else f"{ratio:.2f}x"


def _ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _model_groups(report: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for row in report.get("models", []):
        c = row["config"]
        label = f"{c['model']} {c['mode']}, batch {c['batch']}, {c['image_size']}x{c['image_size']}, {c['precision']}"
        groups.setdefault(label, []).append(row)
    return groups


def _best(rows, providers):
    candidates = [r for r in _ok(rows) if r["provider"] in providers]
    return max(candidates, key=lambda r: r["images_per_s"]) if candidates else None


def targets(report: dict) -> list[dict]:
    """The issue's targets, each with what this run measured (resnet50, bf16, batch 256, 224x224)."""
    def group(mode):
        headline = dict(model="resnet50", mode=mode, batch=256, image_size=224, precision="bf16")
        return [r for r in report.get("models", []) if all(r["config"][k] == v for k, v in headline.items())]

    def provider(rows, name):
        return next((r for r in _ok(rows) if r["provider"] == name), None)

    infer, train = group("infer"), group("train")
    fused_i, fused_t = _best(infer, FUSED_MODEL_PROVIDERS), _best(train, FUSED_MODEL_PROVIDERS)
    eager_i, eager_t = provider(infer, EAGER), provider(train, EAGER)
    frozen = provider(infer, "torchvision-compile-max-autotune-freezing")
    compiled_t = _best(train, ("torchvision-compile", "torchvision-compile-max-autotune"))

    def ratio_target(name, goal, fused, base, base_name):
        value = _ratio(fused and fused["images_per_s"], base and base["images_per_s"])
        what = f"{fused['provider']} {value:.2f}x {base['provider']}" if value is not None else None
        missing = ", ".join(n for n, r in (("the fused model", fused), (base_name, base)) if r is None)
        return dict(target=name, goal=goal, value=value, measured=what, missing=missing or None)

    def activation(r):
        if r is None or r.get("peak_memory_mib") is None:
            return None
        return r["peak_memory_mib"] - r.get("memory_before_mib", 0.0)

    out = [
        ratio_target("inference >= 2.0x torchvision eager (channels_last, bf16)", 2.0, fused_i, eager_i, "eager"),
        ratio_target("inference >= 1.1x torch.compile max-autotune with freezing", 1.1, fused_i, frozen,
                     "compile max-autotune + freezing"),
        ratio_target("training step >= 1.4x eager AMP channels_last", 1.4, fused_t, eager_t, "eager"),
        ratio_target("training step >= 1.1x torch.compile", 1.1, fused_t, compiled_t, "torch.compile"),
    ]
    fused_mem = _best(train, FUSED_MODEL_PROVIDERS)
    mem = _ratio(activation(fused_mem), activation(eager_t))
    out.append(dict(target="training activation memory <= 0.6x eager's (peak minus the memory held before the step)",
                    goal=0.6, value=mem, lower_is_better=True,
                    measured=f"{fused_mem['provider']} {mem:.2f}x" if mem is not None else None,
                    missing=None if mem is not None else "a fused and an eager training step on a GPU"))
    rate = fused_t["images_per_s"] if fused_t else None
    out.append(dict(target="training >= 7,000 images/s (best MLPerf ResNet-50 per-GPU rate on H100)", goal=7000,
                    value=rate, measured=f"{fused_t['provider']} {rate:,.0f} img/s" if rate else None,
                    missing=None if rate else "a fused training step"))
    for t in out:
        if t["value"] is None:
            t["status"] = "not measured"
        elif t.get("lower_is_better"):
            t["status"] = "met" if t["value"] <= t["goal"] else "not met"
        else:
            t["status"] = "met" if t["value"] >= t["goal"] else "not met"
    return out


def _op_tables(report: dict) -> list[str]:
    import bench_layers as bl

    rows = report.get("ops", [])
    lines = []
    order = [p for p in ("conv-alone", "eager-unit", "compile-unit", "fused-reference", "fused-triton", "fused-cuda")
             if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
    fused = [p for p in order if p.startswith("fused-")]
    names = {"conv-alone": "conv alone", "eager-unit": "eager unit", "compile-unit": "compile unit"}
    groups: dict[tuple, dict] = {}
    for row in rows:
        case = bl.OpCase.from_dict(row["case"])
        where = case.layer if case.layer is not None else case.shape
        groups.setdefault((case.op, case.batch, case.dtype), {}).setdefault(where, {})[case.provider] = row
    titles = {"eval": "conv + BN (+ add) (+ ReLU), eval", "train_fwd": "training forward",
              "train_bwd": "training backward (dgrad + wgrad + BN backward)", "add_relu": "add_relu (memory-bound)"}
    for (op, batch, dtype), by_where in groups.items():
        present = [p for p in order if any(p in cells and cells[p]["status"] == "ok" for cells in by_where.values())]
        if not present:
            continue
        rate = "GB/s" if op == "add_relu" else "TFLOP/s"
        lines += ["", f"### {titles[op]}: batch {batch}, {dtype}", ""]
        header = ["layer", "shape", "x"] if op != "add_relu" else ["output shape"]
        header += [f"{names.get(p, p)} ms ({rate})" for p in present]
        for p in fused:
            if p in present:
                if "eager-unit" in present:
                    header.append(f"{p} vs eager")
                if "compile-unit" in present:
                    header.append(f"{p} vs compile")
                if "conv-alone" in present:
                    header.append(f"{p} vs conv alone")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        totals = {p: 0.0 for p in present}
        complete = {p: True for p in present}
        for where, cells in by_where.items():
            if op == "add_relu":
                row = [f"{batch}x{where[0]}x{where[1]}x{where[1]}"]
                count = 1
            else:
                row = [where.name, f"{where.c_in}->{where.c_out} {where.kernel}x{where.kernel}/{where.stride} "
                                   f"@{where.h_in} {where.epilogue}", str(where.count)]
                count = where.count
            med = {}
            for p in present:
                cell = cells.get(p)
                if cell and cell["status"] == "ok":
                    med[p] = cell["median_ms"]
                    totals[p] += count * cell["median_ms"]
                    rate_value = cell.get("gbps") if op == "add_relu" else cell.get("tflops")
                    row.append(f"{cell['median_ms']:.3f} ({_f(rate_value, '.3g')})")
                else:
                    complete[p] = False
                    row.append("skipped" if cell and cell["status"] == "skipped" else ("error" if cell else "—"))
            for p in fused:
                if p in present:
                    for base in ("eager-unit", "compile-unit", "conv-alone"):
                        if base in present:
                            row.append(_x(_ratio(med.get(base), med.get(p))))
            lines.append("| " + " | ".join(row) + " |")
        if op != "add_relu":
            row = ["**total**", "sum over these rows of x times ms", ""]
            row += [f"**{totals[p]:.2f}**" if complete[p] else "incomplete" for p in present]
            for p in fused:
                if p in present:
                    for base in ("eager-unit", "compile-unit", "conv-alone"):
                        if base in present:
                            ok = complete[p] and complete[base]
                            row.append(f"**{totals[base] / totals[p]:.2f}x**" if ok and totals[p] else "—")
            lines.append("| " + " | ".join(row) + " |")
        diffs = []
        for p in present:
            if p in ("eager-unit", "conv-alone"):
                continue
            vals = [(c[p]["max_abs_diff"], c[p]["reference_max_abs"]) for c in by_where.values()
                    if p in c and c[p]["status"] == "ok" and c[p].get("max_abs_diff") is not None]
            if vals:
                worst = max(vals, key=lambda v: v[0] / (v[1] or 1.0))
                diffs.append(f"{p} {worst[0]:.3g} (of max |eager| {worst[1]:.3g})")
        if diffs:
            lines += ["", "Largest |difference| from the eager unit's outputs over these layers: "
                      + "; ".join(diffs) + "."]
    return lines


def render_markdown(report: dict) -> str:
    p = report["provenance"]
    gpu = p.get("gpu")
    device = gpu["name"] if gpu else "CPU (smoke run: no GPU, so no fused-kernel numbers)"
    lines = [
        f"# resnet_fused report: {device}, {p['date_utc'][:10]}",
        "",
        f"Written by `benchmarks/gpu_report.py`; do not edit by hand. Every number is in `{report['stem']}.json`.",
        "",
        f"- commit `{p.get('git_commit') or 'unknown (not a git checkout)'}`"
        + (" with uncommitted changes (listed in the JSON)" if p.get("git_dirty") else ""),
        f"- GPU: {device}" + (f", compute capability {gpu['capability']}, {gpu['memory_gib']} GiB, "
                              f"driver {p.get('driver')}" if gpu else ""),
        f"- torch {p['torch']} (CUDA {p.get('cuda')}, cuDNN {p.get('cudnn')}), torchvision {p['torchvision']}, "
        f"triton {p['triton']}, Python {p['python']}",
        f"- command: `{p['command']}`",
        f"- run: {report['settings']['mode']}, budget {report['settings']['budget_s']:.0f} s, took "
        f"{report.get('elapsed_s', 0):.0f} s"
        + ("" if report.get("complete") else " (**incomplete: the run stopped early**)"),
        "",
        "| phase | status | seconds | note |",
        "|---|---|---|---|",
    ]
    for ph in report["phases"]:
        note = "; ".join(filter(None, [ph.get("note"), *ph.get("notes", [])]))
        cases = ph.get("cases")
        if cases:
            counted = f"{cases['ok']} ok, {cases['skipped']} skipped, {cases['error']} errors"
            note = f"{counted}; {note}" if note else counted
        lines.append(f"| {ph['name']} | {ph['status']} | {_f(ph.get('seconds'), '.0f')} | {_cell(note, 300)} |")
    backends = p.get("backends")
    if backends:
        lines += ["", "Backends: " + ", ".join(f"{k}: {'usable' if v is None else v}" for k, v in backends.items())]
    if report.get("build"):
        b = report["build"]
        lines += ["", "## Build", "",
                  f"`{b['command']}` ({b.get('env')}): {b['status']} in {b['seconds']} s; cuda backend afterwards: "
                  f"{b.get('cuda_backend_after') or 'usable'}. Log: `{b['log']}`."]
    t = report.get("tests")
    if t:
        counts = ", ".join(f"{n} {k}" for k, n in t["counts"].items()) or "no summary line"
        lines += ["", "## GPU test suite", "", f"`{t['command']}`: **{t['status']}** ({counts}) in {t['seconds']} s. "
                                               f"Log: `{t['log']}`."]
        if not t.get("on_gpu"):
            lines.append("No GPU here: the needs_cuda tests skip.")
        for f in t["failed"][:40]:
            lines.append(f"- `{f[:200]}`")
    lines += ["", "## Targets (resnet50, bf16, batch 256, 224x224)", "",
              "| target | measured | status |", "|---|---|---|"]
    for tg in targets(report):
        measured = tg["measured"] or f"needs {tg['missing']}"
        lines.append(f"| {tg['target']} | {measured} | {tg['status']} |")
    groups = _model_groups(report)
    if groups:
        lines += ["", "## Models", "", "img/s from the median step; speedups are ratios of medians from this run. "
                  "max abs dlogit: against torchvision eager's eval logits on the same input, before any training "
                  "step. Peak: `torch.cuda.max_memory_allocated` during the timed steps (it includes the "
                  "torchvision model kept as the source of the weights). First call s: the logit check and the "
                  "first step, where torch.compile, Triton autotuning and cuDNN's search happen."]
    for label, rows in groups.items():
        eager = next((r for r in _ok(rows) if r["provider"] == EAGER), None)
        best_compile = _best(rows, [r["provider"] for r in rows if r["provider"].startswith("torchvision-compile")])
        lines += ["", f"### {label}", "",
                  "| provider | img/s | ms/step (p20-p80) | vs eager | vs best compile | peak MiB | max abs dlogit | "
                  "fused ops ran on | first call s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['provider']} | {r['status']}: {_cell(r.get('reason', ''), 200)} | | | | | | | |")
                continue
            used = ", ".join(f"{k} x{v}" for k, v in sorted((r.get("backends_used") or {}).items())) or "—"
            lines.append(
                f"| {r['provider']} | {r['images_per_s']:,.1f} | "
                f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | "
                f"{_x(_ratio(r['images_per_s'], eager and eager['images_per_s']))} | "
                f"{_x(_ratio(r['images_per_s'], best_compile and best_compile['images_per_s']))} | "
                f"{_f(r.get('peak_memory_mib'), ',.0f')} | {r['max_abs_logit_diff']:.2e} | {used} | "
                f"{r['warmup_s']:.1f} |")
    if report.get("ops"):
        lines += ["", "## ResNet-50 layers", "",
                  "Each cell: median ms (TFLOP/s, convolution FLOPs only; the backward counts dgrad + wgrad; "
                  "add_relu: GB/s of reading x and residual and writing y). Speedup = other's ms / fused ms, so "
                  "above 1 means the fused unit is faster; 'vs conv alone' is against cuDNN's convolution "
                  "without BN or ReLU, the floor. x: how many ResNet-50 layers share the shape."]
        lines += _op_tables(report)
    not_run: dict[tuple, int] = {}
    for r in report.get("models", []) + report.get("ops", []):
        if r["status"] != "ok":
            key = (r["kind"], r["provider"], r["status"], (r.get("reason") or "")[:240])
            not_run[key] = not_run.get(key, 0) + 1
    if not_run:
        lines += ["", "## Not measured", "", "| kind | provider | status | cases | reason |", "|---|---|---|---|---|"]
        for (kind, provider, status, reason), n in not_run.items():
            lines.append(f"| {kind} | {provider} | {status} | {n} | {_cell(reason, 240)} |")
    if report.get("plot"):
        lines += ["", f"![speedup per ResNet-50 layer and images/s per provider]({report['plot']})"]
    elif report.get("plot_note"):
        lines += ["", f"Plot: {report['plot_note']}"]
    return "\n".join(lines) + "\n"


def render_plot(report: dict, path: Path) -> str | None:
    """Writes the PNG; returns None, or why no plot was written (e.g. matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no PNG: matplotlib is not installed ({exc}); pip install matplotlib, then " \
               f"python benchmarks/gpu_report.py --render {report['stem']}.json"
    import bench_layers as bl

    fig, axes = plt.subplots(3, 1, figsize=(14, 13))
    ops = [r for r in report.get("ops", []) if r["status"] == "ok"]
    batch = max((r["case"]["batch"] for r in ops), default=None)

    def medians(op_names):
        table: dict = {}
        for r in ops:
            case = bl.OpCase.from_dict(r["case"])
            if case.op in op_names and case.batch == batch and case.layer is not None:
                table.setdefault(case.layer, {}).setdefault(case.provider, {})[case.op] = r["median_ms"]
        return table

    panels = ((axes[0], ("eval",), "eval"), (axes[1], ("train_fwd", "train_bwd"), "training forward + backward"))
    for ax, op_names, title in panels:
        table = medians(op_names)
        layers = list(table)
        providers = [p for p in ("fused-triton", "fused-cuda", "fused-reference", "compile-unit", "conv-alone")
                     if any(p in table[layer] for layer in layers)]
        plotted = False
        for k, p in enumerate(providers):
            xs, ys = [], []
            for i, layer in enumerate(layers):
                cells, eager = table[layer].get(p, {}), table[layer].get("eager-unit", {})
                if all(o in cells and o in eager for o in op_names):
                    xs.append(i + (k - (len(providers) - 1) / 2) * 0.8 / max(len(providers), 1))
                    ys.append(sum(eager[o] for o in op_names) / sum(cells[o] for o in op_names))
            if xs:
                ax.bar(xs, ys, width=0.8 / max(len(providers), 1), label=p)
                plotted = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"speedup over the eager unit per ResNet-50 layer: {title}, batch {batch}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([layer.name for layer in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("eager ms / provider ms")
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no per-layer measurements in this run", ha="center", va="center", transform=ax.transAxes)
    ax = axes[2]
    groups = [(label, rows) for label, rows in _model_groups(report).items() if _ok(rows)]
    providers = list(dict.fromkeys(r["provider"] for _, rows in groups for r in _ok(rows)))
    width = 0.8 / max(len(providers), 1)
    for k, p in enumerate(providers):
        xs, ys = [], []
        for i, (_, rows) in enumerate(groups):
            r = next((r for r in _ok(rows) if r["provider"] == p), None)
            if r:
                xs.append(i + (k - (len(providers) - 1) / 2) * width)
                ys.append(r["images_per_s"])
        ax.bar(xs, ys, width=width, label=p)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for label, _ in groups], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_title("images/s per provider")
    if providers:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no model measurements in this run", ha="center", va="center", transform=ax.transAxes)
    p = report["provenance"]
    fig.suptitle(f"resnet_fused on {(p.get('gpu') or {}).get('name', 'CPU (smoke)')}, commit "
                 f"{(p.get('git_commit') or '?')[:10]}, {p['date_utc'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(report: dict, out_dir: Path, plot: bool = False) -> None:
    stem = report["stem"]
    if plot:
        note = render_plot(report, out_dir / f"{stem}.png")
        report["plot"], report["plot_note"] = (None, note) if note else (f"{stem}.png", None)
        if note:
            print(f"[gpu_report] {note}", file=sys.stderr)
    tmp = out_dir / f".{stem}.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(out_dir / f"{stem}.json")
    (out_dir / f"{stem}.md").write_text(render_markdown(report))


# --------------------------------------------------------------------------------------------

def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_report.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/, or a new temporary folder with --cpu-smoke)")
    p.add_argument("--quick", action="store_true",
                   help="half the budget: the headline cases only, no max-autotune compile, batch 256 layers only")
    p.add_argument("--budget", type=float, default=None, help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}, "
                                                               "--quick: half)")
    p.add_argument("--build", choices=("auto", "always", "never"), default="auto",
                   help="build the CUDA extension with pip install --no-build-isolation --no-deps -e . "
                        "(auto: only when it does not load)")
    p.add_argument("--phases", default="build,tests,models,ops",
                   help="comma-separated subset of build,tests,models,ops (default: all)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU needed: the whole pipeline on tiny CPU cases (checks this script; "
                        "no performance claim)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the markdown and PNG next to an existing report JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        return worker_main(args.worker, args.results)
    if args.render:
        report = json.loads(args.render.read_text())
        write_report(report, args.render.parent, plot=True)
        print(f"[gpu_report] rewrote {args.render.with_suffix('.md')}", file=sys.stderr)
        return 0

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        print("gpu_report: no CUDA GPU here. Run it on a GPU machine, or pass --cpu-smoke to check the pipeline "
              "on tiny CPU cases.", file=sys.stderr)
        return 2
    budget_s = args.budget or (DEFAULT_BUDGET_S / 2 if args.quick else DEFAULT_BUDGET_S)
    budget = Budget(budget_s)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - {"build", "tests", "models", "ops"}
    if unknown:
        print(f"gpu_report: unknown phases {sorted(unknown)}", file=sys.stderr)
        return 2

    prov, gpu = provenance(argv)
    if args.cpu_smoke:
        prov["gpu"] = gpu = None
    stem = f"{slug(gpu['name']) if gpu else 'cpu-smoke'}-{prov['date_utc'][:10]}"
    if phases != {"build", "tests", "models", "ops"}:  # a partial run does not overwrite the day's full one
        stem += "-" + "-".join(p for p in ("build", "tests", "models", "ops") if p in phases)
    out_dir = args.out or (HERE / "results" if on_gpu else Path(tempfile.mkdtemp(prefix="resnet_fused-cpu-smoke-")))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(dir=out_dir, stem=stem, build_log=out_dir / f"{stem}-build.log",
                 tests_log=out_dir / f"{stem}-tests.log", benchmarks_log=out_dir / f"{stem}-benchmarks.log")
    for log in ("build_log", "tests_log", "benchmarks_log"):
        paths[log].unlink(missing_ok=True)
    mode = "cpu-smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
    settings = dict(mode=mode, budget_s=budget_s, phases=sorted(phases), build=args.build,
                    ops_target_seconds=(0.1 if args.quick else 0.25) if on_gpu else 0.02,
                    models_target_seconds=(1.0 if args.quick else 2.0) if on_gpu else 0.05)
    report = dict(schema=SCHEMA, stem=stem, complete=False, provenance=prov, settings=settings, phases=[],
                  build=None, tests=None, models=[], ops=[])
    print(f"[gpu_report] {mode} run, budget {budget_s:.0f} s, writing {out_dir / stem}.{{json,md,png}}",
          file=sys.stderr)

    def phase(name, fn, *fargs):
        t0 = time.time()
        print(f"[gpu_report] {name} ({budget.left():.0f} s left)", file=sys.stderr)
        try:
            record = fn(*fargs)
        except Exception as exc:  # a phase's failure is recorded; the next phase runs
            record = dict(status="error", note=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        record = dict(name=name, **record)
        record.setdefault("seconds", round(time.time() - t0, 1))
        report["phases"].append(record)
        report["elapsed_s"] = time.time() - budget.start
        write_report(report, out_dir)
        print(f"[gpu_report] {name}: {record['status']} in {record['seconds']:.0f} s", file=sys.stderr)

    def skipped(name, why):
        report["phases"].append(dict(name=name, status="skipped", note=why))

    if "build" in phases and on_gpu:
        phase("build", phase_build, args, budget, paths, report, gpu, bool(phases - {"build"}))
    elif "build" in phases:
        skipped("build", "no GPU: the CUDA extension is not built in a CPU smoke run")
    if "tests" in phases:
        phase("tests", phase_tests, args, budget, paths, report, on_gpu, bool(phases & {"models", "ops"}))
    device = "cuda" if on_gpu else "cpu"
    schedule = [("models-core", "models", 0.45), ("ops-core", "ops", 0.6), ("models-extra", "models", 0.5),
                ("ops-extra", "ops", 1.0)]
    for name, kind, share in schedule:
        if kind not in phases:
            continue
        if args.quick and name.endswith("-extra"):
            skipped(name, "--quick: the headline cases only")
            continue
        cases = model_plan(name, on_gpu, args.quick) if kind == "models" else op_plan(name, on_gpu, args.quick)
        phase(name, run_worker_phase, kind, cases, device, budget.share(share), paths, settings, report)
    report["complete"] = True
    report["elapsed_s"] = time.time() - budget.start
    logs = [paths[k].name for k in ("build_log", "tests_log", "benchmarks_log") if paths[k].exists()]
    report["files"] = [f"{stem}.json", f"{stem}.md", *logs]
    write_report(report, out_dir, plot=True)
    if report.get("plot"):
        report["files"].append(report["plot"])
        write_report(report, out_dir)
    print(f"[gpu_report] done in {report['elapsed_s']:.0f} s: {out_dir / stem}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
