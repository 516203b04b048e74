"""The build and the GPU-test phases (smoke, then the rest of the suite). Each returns its phase
record and fills its part of the report."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from . import ROOT
from .processes import gpu_env, run_logged, start_logged, tail, wait_logged, worker_env

# Run in a fresh process (after a build): resnet_fused's backends, and whether `auto` may run
# each fused one here (a passed verdict of python -m resnet_fused.verify for this GPU).
_PROBE_CODE = """\
import json, resnet_fused
print(json.dumps(dict(backends=resnet_fused.available_backends(), auto_verified=resnet_fused.verified_backends())))
"""


def probe_backends() -> dict:
    """resnet_fused's backends as a fresh process sees them (after a build)."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE_CODE], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env=worker_env())
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception as exc:
        return dict(error=f"{type(exc).__name__}: {exc}")


def cutlass_headers(paths: dict) -> dict:
    """Where the build finds CUTLASS's headers for the Hopper kernels: CUTLASS_DIR, the
    installed nvidia-cutlass package, or its wheel carried in .whl/ (unzipped to a temporary
    directory; a GPU machine has no network). {"note": ..., "CUTLASS_DIR": ... when set here}."""
    import glob
    import tempfile
    import zipfile

    if os.environ.get("CUTLASS_DIR"):
        return dict(note=f"CUTLASS_DIR={os.environ['CUTLASS_DIR']}")
    if importlib.util.find_spec("cutlass_library") is not None:
        return dict(note="the installed nvidia-cutlass package")
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "nvidia_cutlass-*.whl")))
    if not wheels:
        return dict(note="none found (no nvidia-cutlass, no .whl/nvidia_cutlass-*.whl): the sm90 CUTLASS kernels "
                         "are not built, the CUDA backend runs its WMMA kernel")
    target = Path(tempfile.gettempdir()) / "resnet_fused_cutlass"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(target, [n for n in wheel.namelist() if n.startswith("cutlass_library/source/")])
    return dict(note=f"unzipped from {os.path.basename(wheels[-1])}",
                CUTLASS_DIR=str(target / "cutlass_library" / "source"))


def start_build(build: str, paths: dict, report: dict, gpu: dict | None, jobs: int | None):
    """Starts the build of the CUDA extension in the background (--build auto, always or
    never; jobs: nvcc's parallel jobs, None for setup.py's default). Returns
    (process, its record) or (None, the phase record of a skipped build)."""
    before = probe_backends()
    report["provenance"]["backends_before_build"] = before
    cuda_reason = (before.get("backends") or {}).get("cuda", "probe failed")
    if build == "never":
        return None, dict(status="skipped", note="--build never")
    if build == "auto" and cuda_reason is None:
        return None, dict(status="skipped", note="the CUDA extension already loads (--build always rebuilds it)")
    env = dict(os.environ, RESNET_FUSED_FORCE_CUDA="1")
    if gpu and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        # This GPU's architecture only: half the compile time. Hopper as 9.0a, which the
        # CUTLASS kernels (wgmma, TMA) need.
        capability = gpu["capability"]
        env["TORCH_CUDA_ARCH_LIST"] = "9.0a" if capability == "9.0" else capability
    if jobs is not None and "MAX_JOBS" not in os.environ:
        env["MAX_JOBS"] = str(jobs)
    cutlass = cutlass_headers(paths)
    if cutlass.get("CUTLASS_DIR"):
        env["CUTLASS_DIR"] = cutlass["CUTLASS_DIR"]
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    record = dict(command=shlex.join(cmd), env={k: env[k] for k in ("RESNET_FUSED_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST",
                                                                    "MAX_JOBS", "CUTLASS_DIR") if k in env},
                  cutlass=cutlass["note"],
                  how="built on this machine (pip install -e, this GPU's architecture only)", started=time.time())
    return start_logged(cmd, paths["build_log"], env), record


def finish_build(proc, record: dict, deadline: float, paths: dict, report: dict) -> dict:
    """Waits for start_build's process until the deadline; the phase record."""
    rc = wait_logged(proc, paths["build_log"], deadline - time.time())
    seconds = time.time() - record.pop("started")
    after = probe_backends()
    report["provenance"]["backends"] = after.get("backends")
    report["provenance"]["auto_enabled"] = after.get("auto_enabled")
    record.update(returncode=rc, seconds=round(seconds, 1), log=paths["build_log"].name,
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


# A failed test is charged to the backend its id names: the backend fixture's parameter, or
# the backend a test module or function is about (test_backend_cuda.py, ..._triton_...).
BACKEND_WORDS = ("cuda", "triton", "reference")


def backend_of_test(nodeid: str) -> str | None:
    """The fused or reference backend a test id is about, or None for a backend-neutral test."""
    params = nodeid[nodeid.index("[") + 1:-1] if nodeid.endswith("]") and "[" in nodeid else ""
    for text in (params, nodeid.split("[")[0]):
        words = set(re.split(r"[^a-z0-9]+", text.lower()))
        found = [b for b in BACKEND_WORDS if b in words]
        if found:
            return found[0]
    return None


def junit_outcomes(path) -> dict[str, str]:
    """{test id: passed | failed | error | skipped} from a pytest --junitxml file ({} if absent)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    outcomes = {}
    for case in root.iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        nodeid = f"{module}.py::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcome = ("failed" if "failure" in kinds else "error" if "error" in kinds
                   else "skipped" if "skipped" in kinds else "passed")
        # A test that failed in its teardown appears twice; the worse outcome counts.
        if outcomes.get(nodeid) not in ("failed", "error"):
            outcomes[nodeid] = outcome
    return outcomes


def backend_verdicts(outcomes: dict[str, str]) -> dict[str, dict]:
    """Per backend (and "shared" for backend-neutral tests): counts per outcome and the failed ids."""
    verdicts: dict[str, dict] = {}
    for nodeid, outcome in outcomes.items():
        v = verdicts.setdefault(backend_of_test(nodeid) or "shared", dict(counts={}, failed=[]))
        v["counts"][outcome] = v["counts"].get(outcome, 0) + 1
        if outcome in ("failed", "error"):
            v["failed"].append(nodeid)
    return verdicts


TEST_TIMEOUT_S = 120  # per test, with pytest-timeout (on the GPU machine's image)


def pytest_workers(on_gpu: bool) -> int | None:
    """pytest-xdist workers for the GPU test phases (None: xdist is not installed, run serially)."""
    if not on_gpu or importlib.util.find_spec("xdist") is None:
        return None
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def run_pytest(name: str, marker: str, deadline: float, paths: dict, report: dict, on_gpu: bool) -> dict:
    """One GPU test phase: `pytest tests -m marker` (over xdist workers when installed) until the
    deadline, with per-backend verdicts from its junit XML; fills report[name]."""
    junit = paths["dir"] / f".{paths['stem']}-{name}-junit.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", marker, "-q", "-rfE", "--tb=short", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    workers = pytest_workers(on_gpu)
    if workers:
        cmd += ["-n", str(workers)]
    if on_gpu and importlib.util.find_spec("pytest_timeout") is not None:
        cmd += [f"--timeout={TEST_TIMEOUT_S}"]  # one hung test must not take the phase
    time_limit = deadline - time.time()
    log_path = paths[f"{name}_log"]
    rc, seconds = run_logged(cmd, log_path, time_limit, gpu_env())
    log = tail(log_path, 200_000)
    counts, failed = pytest_summary(log)
    verdicts = backend_verdicts(junit_outcomes(junit))
    junit.unlink(missing_ok=True)
    status = "timed_out" if rc is None else ("passed" if rc == 0 else ("no_tests" if rc == 5 else "failed"))
    report[name] = dict(command=shlex.join(cmd).replace(str(junit), "JUNIT.xml"), returncode=rc,
                        seconds=round(seconds, 1), status=status, counts=counts, failed=failed[:100],
                        backends=verdicts, log=log_path.name, on_gpu=on_gpu, time_limit_s=round(time_limit))
    if rc is None:
        report[name]["log_tail"] = log[-3000:]
    return dict(status=status, seconds=round(seconds, 1))


def verify_command(json_path: Path, seconds_per_backend: float, on_gpu: bool) -> list[str]:
    """The verifier's command: on a GPU resnet50's layers in bf16 at the headline's batch 256
    (the shapes the warm phase compiled and the benchmarks run, so Triton's compile and
    autotuning caches serve both), both modes, timed per layer; on CPU (a smoke run of the
    pipeline) the interpreter on resnet18's inference layers at 16 px."""
    cmd = [sys.executable, "-m", "resnet_fused.verify", "--json", str(json_path), "--no-progress",
           "--timeout", f"{max(10.0, seconds_per_backend):.0f}"]
    if on_gpu:
        return cmd + ["--model", "resnet50", "--precision", "bf16", "--batch", "256", "--image-size", "224"]
    return cmd + ["--device", "cpu", "--model", "resnet18", "--mode", "infer", "--batch", "2", "--image-size", "16"]


def run_verify(deadline: float, paths: dict, report: dict, on_gpu: bool) -> dict:
    """The check `auto` trusts: python -m resnet_fused.verify, which writes this GPU's verdict to
    the verdict cache (the benchmarks' fused-auto reads it) and its JSON beside the report
    (<stem>-verify.json); fills report["verify"] with each backend's verdict and the per-layer
    timings and choices."""
    json_path = paths["dir"] / f"{paths['stem']}-verify.json"
    json_path.unlink(missing_ok=True)
    time_limit = deadline - time.time()
    # Each backend may take the whole step, less the parent's start: the verifier checks cuda
    # (no autotuning: quick) before triton and writes its JSON after each backend, so the step's
    # limit, which kills the verifier and its worker, leaves the verdicts reached; a backend
    # without one is excluded.
    cmd = verify_command(json_path, time_limit - 8, on_gpu)
    rc, seconds = run_logged(cmd, paths["verify_log"], time_limit, worker_env() if on_gpu else None)
    status = {None: "timed_out", 0: "passed", 1: "failed", 2: "error"}.get(rc, "error")
    record = dict(command=shlex.join(cmd), returncode=rc, seconds=round(seconds, 1), status=status,
                  log=paths["verify_log"].name, time_limit_s=round(time_limit))
    try:
        found = json.loads(json_path.read_text())
        record["backends"] = {name: {k: v for k, v in verdict.items() if k in (
            "verdict", "reasons", "worst_ratio", "seconds", "output_tail")} for name, verdict in found["backends"].items()}
        record["timings"] = found.get("timings") or {}
        record["json"] = json_path.name
    except (OSError, ValueError, KeyError) as exc:
        record["backends"] = {}
        record["note"] = f"no verifier JSON ({type(exc).__name__}: {exc})"
        record["log_tail"] = tail(paths["verify_log"], 3000)
    report["verify"] = record
    return dict(status=status, seconds=round(seconds, 1))


FINISHED = ("passed", "failed", "no_tests")  # run_pytest statuses of a phase whose junit XML was written


def excluded_providers(verify: dict | None, smoke: dict | None) -> dict[str, str]:
    """The fused providers the benchmarks skip, failing closed. A fused backend is cleared only
    by the verifier's verdict "passed" for it on this GPU (report["verify"]: the same verdict
    `auto` reads) and then by a smoke phase that finished (its junit XML read) with none of its
    tests failed (the deeper check). A verify or smoke phase that timed out or raised clears
    nothing. verify, smoke: the report's records (None: the phase raised before recording or
    did not run)."""
    verdicts = (verify or {}).get("backends") or {}
    smoke = smoke or dict(status="error")
    status = smoke.get("status")
    smoke_verdicts = smoke.get("backends") or {}
    excluded = {}
    for backend in ("cuda", "triton"):
        verdict = verdicts.get(backend) or {}
        failed = (smoke_verdicts.get(backend) or {}).get("failed") or []
        if verdict.get("verdict") != "passed":
            why = verdict.get("verdict") or f"no verdict (the verify phase: {(verify or {}).get('status', 'not run')})"
            reasons = verdict.get("reasons") or []
            excluded[f"fused-{backend}"] = (f"excluded: python -m resnet_fused.verify: {why}"
                                            + (f" ({reasons[0][:300]})" if reasons else ""))
        elif failed:
            excluded[f"fused-{backend}"] = (f"excluded: {len(failed)} gpu_smoke tests of the {backend} "
                                            f"backend failed (first: {failed[0]})")
        elif status not in FINISHED:
            excluded[f"fused-{backend}"] = (f"excluded: the gpu_smoke phase did not finish ({status}), so it did "
                                            f"not clear the {backend} backend")
    return excluded
