"""The warm phase: the kernels the headline cases will JIT-compile, compiled before they run,
while the CUDA extension builds.

One resnet50 step on the Triton backend compiles about 170 kernels (layer shapes x kernels x
kept autotune configs), serially, in the process that first calls them. Here the Triton
backend's compile gate (`python -m resnet_fused.backends.triton.aot`) compiles every kernel
and kept config the backend launches for ResNet-50's 24 convolutions at the headline's batch,
dtype and layout, with the JIT's own specializations, in parallel on the CPU cores, into
Triton's on-disk cache (its cache keys equal the JIT's: tests/test_triton_compile_gate.py).
It needs no GPU, so it does not disturb anything. torch.compile's baseline is compiled the
same way beside it, in worker processes, into Inductor's on-disk caches (those workers do
not write autotuning results: timings taken side by side would be noise).

The Triton cache's entries are counted before and after each phase, so the report says how
many kernels each phase still had to compile (cache misses).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from . import SCRIPT
from .plan import model_plan
from .processes import start_logged, wait_logged, worker_env
from .worker import read_events

# nvcc jobs while the warm-up runs: 22 translation units, 18 of them CUTLASS kernels (two tile
# widths) of 30-60 s and 3.7 GB each for 9.0a alone (61 s on a loaded 2-core machine). 9 jobs:
# two rounds, 70-120 s, against the 100 s of the build+warm step (budget.TIMELINE).
BUILD_JOBS = 9
COMPILE_THREADS = 2       # Inductor compile threads per torch.compile warm worker
# The Triton ops (aot.OPS) the core phases launch: inference is `eval`, a training step
# `train` and `train_bwd` (ops-core's train_fwd and train_bwd cases too). Not the recompute
# chain nor the frozen-BatchNorm backward: no core case runs them, and they would add 139
# compiles to the 235 these need (aot's enumeration for sm_90).
CORE_OPS = ("eval", "train", "train_bwd")


def triton_cache_dir() -> Path:
    """Where Triton caches compiled kernels for this run and its subprocesses (pinned in the
    environment, so that every process agrees)."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))
    return Path(os.environ["TRITON_CACHE_DIR"])


def cache_entries(path: Path) -> int:
    """Compiled kernels in a Triton cache directory (one subdirectory each)."""
    try:
        return sum(1 for entry in os.scandir(path) if entry.is_dir())
    except OSError:
        return 0


def aot_jobs(cpus: int | None, building: bool, compile_workers: int) -> int:
    """Parallel compiles for the Triton gate: the cores the build and the torch.compile
    workers leave."""
    cpus = cpus or 2
    return max(1, cpus - (BUILD_JOBS if building else 0) - COMPILE_THREADS * compile_workers)


def aot_command(gpu: dict | None, jobs: int, cache_dir: Path, json_path: Path) -> list[str]:
    """The compile gate for this GPU's architecture over the headline's kernels (ResNet-50's
    24 convolutions, bf16, NHWC, batch 256, the core phases' ops); without a GPU (--cpu-smoke), one small
    case, to check the pipeline."""
    cmd = [sys.executable, "-m", "resnet_fused.backends.triton.aot", "--jobs", str(jobs), "--cache-dir", str(cache_dir),
           "--sass", "none", "--json", str(json_path)]  # warming reads no SASS
    if gpu is None:
        return cmd + ["--target", "sm_90", "--layers", "1x1 2048->512 @7", "--dtypes", "bf16", "--ops", "eval",
                      "--batch", "2"]
    target = "sm_" + gpu["capability"].replace(".", "")
    return cmd + ["--target", target, "--subset", "all", "--dtypes", "bf16", "--layouts", "nhwc", "--batch", "256",
                  "--ops", ",".join(CORE_OPS)]


def run_warm(deadline: float, paths: dict, report: dict, gpu: dict | None, building: bool) -> dict:
    """Runs the compile gate and the torch.compile warm-up workers side by side until done or
    the deadline. Returns the phase record."""
    on_gpu = gpu is not None
    compile_cases = [c for c in model_plan("models-core", on_gpu, False) if c["provider"] == "torchvision-compile"]
    env = worker_env()
    env["TRITON_CACHE_AUTOTUNING"] = "0"  # compile, but keep no side-by-side timings
    aot_json = paths["dir"] / f".{paths['stem']}-aot.json"
    aot_json.unlink(missing_ok=True)
    jobs = aot_jobs(os.cpu_count(), building, len(compile_cases))
    aot_cmd = aot_command(gpu, jobs, triton_cache_dir(), aot_json)
    aot = start_logged(aot_cmd, paths["warm_log"], env)
    workers = []
    for number, case in enumerate(compile_cases):
        plan_path = paths["dir"] / f".{paths['stem']}-warm-{number}-plan.json"
        results_path = paths["dir"] / f".{paths['stem']}-warm-{number}-results.jsonl"
        results_path.unlink(missing_ok=True)
        plan_path.write_text(json.dumps(dict(kind="models", device="cuda" if on_gpu else "cpu", deadline=deadline,
                                             warm=True, excluded={}, target_seconds=0, cases=[(number, case)])))
        cmd = [sys.executable, str(SCRIPT), "--worker", str(plan_path), "--results", str(results_path)]
        proc = start_logged(cmd, paths["warm_log"], dict(env, TORCHINDUCTOR_COMPILE_THREADS=str(COMPILE_THREADS)))
        workers.append((proc, plan_path, results_path))

    aot_rc = wait_logged(aot, paths["warm_log"], deadline - time.time())
    gate = {}
    if aot_json.exists():
        summary = json.loads(aot_json.read_text())
        gate = {k: summary.get(k) for k in ("target", "triton", "unique_compiles", "cache_hits", "seconds")}
        aot_json.unlink()
    triton = dict(command=" ".join(aot_cmd[1:]).replace(str(aot_json), "REPORT.json"), jobs=jobs, returncode=aot_rc,
                  **gate)
    baseline = dict(warmed=0, error=0, not_reached=0)
    errors = []
    for proc, plan_path, results_path in workers:
        wait_logged(proc, paths["warm_log"], deadline - time.time())
        rows = [event["row"] for event in read_events(results_path) if event["event"] == "result"]
        if not rows:
            baseline["not_reached"] += 1
        for row in rows:
            ok = row["status"] == "warmed"
            baseline["warmed" if ok else "error"] += 1
            if not ok:
                errors.append(f"{row['id']}: {row.get('reason', '')[:300]}")
        plan_path.unlink(missing_ok=True)
        results_path.unlink(missing_ok=True)
    report["warm"] = dict(triton_gate=triton, compile_baseline=baseline, errors=errors[:20], log=paths["warm_log"].name)
    if aot_rc is None:
        status, note = "partial", "the Triton compile gate was stopped at the deadline"
    elif aot_rc != 0:
        status, note = "errors", f"the Triton compile gate exited with status {aot_rc} (log: {paths['warm_log'].name})"
    else:
        status, note = ("errors" if baseline["error"] else "done"), None
    return dict(status=status, note=note, triton_compiles=gate.get("unique_compiles"),
                triton_cache_hits=gate.get("cache_hits"))
