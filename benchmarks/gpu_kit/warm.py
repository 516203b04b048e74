"""The warm phase: the kernels the headline cases will JIT-compile, compiled before they run,
in parallel worker processes, while the CUDA extension builds.

One resnet50 step on the Triton backend compiles about 300 kernels (layer shapes x kernels x
autotune configs), serially in the process that first calls them. Here the per-layer cases
that launch exactly those kernels (the same shapes, dtypes and strides, so the same
specializations) are spread over many worker processes sharing Triton's on-disk cache; the
timed phases then load the binaries. torch.compile's baseline is compiled the same way, into
Inductor's on-disk caches. The warm workers do not write autotuning results to disk: their
timings, taken side by side on one GPU, would be noise; the timed phases autotune (on
already compiled kernels) themselves.

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
from .plan import model_plan, op_plan
from .processes import start_logged, wait_logged, worker_env

BUILD_JOBS = 4            # nvcc jobs while the warm workers run
COMPILE_THREADS = 2       # Inductor compile threads per torch.compile warm worker


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


def warm_workers(cpus: int | None, building: bool) -> int:
    """Triton warm-up workers: the cores left by the build and the torch.compile workers."""
    cpus = cpus or 2
    return max(1, cpus - (BUILD_JOBS if building else 0) - 2 * COMPILE_THREADS)


def shards(cases: list, n: int) -> list[list]:
    """cases, with their plan indices, dealt round-robin into at most n non-empty shards."""
    dealt = [list(enumerate(cases))[i::n] for i in range(n)]
    return [shard for shard in dealt if shard]


def run_warm(deadline: float, paths: dict, report: dict, on_gpu: bool, building: bool) -> dict:
    """Runs the warm-up cases in parallel workers until done or the deadline. Returns the
    phase record."""
    device = "cuda" if on_gpu else "cpu"
    n = warm_workers(os.cpu_count(), building) if on_gpu else 2
    op_shards = [("ops", shard) for shard in shards(op_plan("warm", on_gpu, False), n)]
    compile_cases = [c for c in model_plan("models-core", on_gpu, False) if c["provider"] == "torchvision-compile"]
    model_shards = [("models", [(i, case)]) for i, case in enumerate(compile_cases)]
    env = worker_env()
    env["TRITON_CACHE_AUTOTUNING"] = "0"  # compile, but keep no side-by-side timings
    running = []
    for number, (kind, shard) in enumerate(op_shards + model_shards):
        plan_path = paths["dir"] / f".{paths['stem']}-warm-{number}-plan.json"
        results_path = paths["dir"] / f".{paths['stem']}-warm-{number}-results.jsonl"
        results_path.unlink(missing_ok=True)
        plan_path.write_text(json.dumps(dict(kind=kind, device=device, deadline=deadline, warm=True, excluded={},
                                             target_seconds=0, cases=shard)))
        worker_env_ = dict(env, TORCHINDUCTOR_COMPILE_THREADS=str(COMPILE_THREADS)) if kind == "models" else env
        cmd = [sys.executable, str(SCRIPT), "--worker", str(plan_path), "--results", str(results_path)]
        running.append((start_logged(cmd, paths["warm_log"], worker_env_), plan_path, results_path, len(shard)))
    counts = dict(warmed=0, skipped=0, error=0, not_reached=0)
    killed = 0
    errors = []
    for proc, plan_path, results_path, planned in running:
        rc = wait_logged(proc, paths["warm_log"], deadline - time.time())
        killed += rc is None
        done = 0
        if results_path.exists():
            for line in results_path.read_text().splitlines():
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event["event"] != "result":
                    continue
                done += 1
                status = event["row"]["status"]
                counts[status if status in counts else "error"] += 1
                if status == "error":
                    errors.append(f"{event['row']['id']}: {event['row'].get('reason', '')[:300]}")
        counts["not_reached"] += planned - done
        plan_path.unlink(missing_ok=True)
        results_path.unlink(missing_ok=True)
    report["warm"] = dict(workers=len(running), op_workers=len(op_shards), compile_workers=len(model_shards),
                          cases=counts, killed_at_deadline=killed, errors=errors[:20], log=paths["warm_log"].name)
    status = "done" if not killed and not counts["error"] else ("partial" if not counts["error"] else "errors")
    return dict(status=status, workers=len(running), cases=dict(ok=counts["warmed"], skipped=counts["skipped"],
                                                                error=counts["error"]),
                notes=[f"{counts['not_reached']} cases not reached by the deadline"] if counts["not_reached"] else [])
