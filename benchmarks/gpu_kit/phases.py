"""The build and GPU-test phases. Each returns its phase record and fills its part of the report."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

from . import ROOT
from .budget import Budget
from .processes import gpu_env, run_logged, tail, worker_env

# Run in a fresh process (after a build): resnet_fused's backends, and each compiled backend's
# AUTO flag. The backend modules are resnet_fused.backends.{cuda,triton}; older checkouts have
# resnet_fused.{cuda,triton}_backend, tried when the first is absent.
_PROBE_CODE = """\
import importlib, json, resnet_fused
auto = {}
for n in ('cuda', 'triton'):
    for module in (f'resnet_fused.backends.{n}', f'resnet_fused.{n}_backend'):
        try:
            auto[n] = importlib.import_module(module).AUTO
            break
        except Exception as e:
            auto[n] = f'import failed: {e}'
            if not (isinstance(e, ModuleNotFoundError) and e.name == module):
                break
print(json.dumps(dict(backends=resnet_fused.available_backends(), auto_enabled=auto)))
"""


def probe_backends() -> dict:
    """resnet_fused's backends as a fresh process sees them (after a build)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=worker_env())
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}")


def run_build(build: str, budget: Budget, paths: dict, report: dict, gpu: dict | None, others_follow: bool) -> dict:
    """build: --build (auto, always or never); others_follow: phases after this one share the budget."""
    before = probe_backends()
    report["provenance"]["backends_before_build"] = before
    cuda_reason = (before.get("backends") or {}).get("cuda", "probe failed")
    if build == "never":
        return dict(status="skipped", note="--build never")
    if build == "auto" and cuda_reason is None:
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


def pytest_summary(log: str) -> tuple[dict[str, int], list[str]]:
    """From a pytest log: the counts of its last summary line ({"passed": 3, "error": 1, ...}),
    and its FAILED/ERROR lines."""
    counts: dict[str, int] = {}
    summary_lines = [line for line in log.splitlines() if SUMMARY_RE.search(line) and " in " in line]
    if summary_lines:
        for n, what in SUMMARY_RE.findall(summary_lines[-1]):
            counts[what.rstrip("s") if what.startswith("error") else what] = int(n)
    failed = [line.strip() for line in log.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    return counts, failed


def run_tests(quick: bool, budget: Budget, paths: dict, report: dict, on_gpu: bool, benchmarks_follow: bool) -> dict:
    """The needs_cuda tests; benchmarks_follow: models or ops phases come after and share the budget."""
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "needs_cuda", "-q", "-rfE", "--tb=short",
           "-p", "no:cacheprovider"]
    if benchmarks_follow:
        time_limit = budget.share(0.25, cap=60 if quick else 120) - time.time()
    else:  # --phases without models and ops: the tests may take the whole budget
        time_limit = budget.share(1.0) - time.time()
    rc, seconds = run_logged(cmd, paths["tests_log"], time_limit, gpu_env())
    log = tail(paths["tests_log"], 200_000)
    counts, failed = pytest_summary(log)
    status = "timed_out" if rc is None else ("passed" if rc == 0 else ("no_tests" if rc == 5 else "failed"))
    report["tests"] = dict(command=shlex.join(cmd), returncode=rc, seconds=round(seconds, 1), status=status,
                           counts=counts, failed=failed[:100], log=paths["tests_log"].name,
                           on_gpu=on_gpu, time_limit_s=round(time_limit))
    if rc is None:
        report["tests"]["log_tail"] = log[-3000:]
    return dict(status=status, seconds=round(seconds, 1))
