"""Subprocesses with a log and a time limit, and the environment the GPU work runs in."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from . import ROOT


def start_logged(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """Starts cmd in its own process group, appending its output to log_path."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_logged(proc: subprocess.Popen, log_path: Path, timeout: float) -> int | None:
    """Waits for a start_logged process; kills its group at the timeout. Returns its exit
    status, or None when it was killed."""
    try:
        return proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group: also inductor's compile workers
        proc.wait()
        with open(log_path, "a") as log:
            log.write(f"\n[gpu_report] killed after {timeout:.0f} s (phase time limit)\n")
        return None


def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
    """Runs cmd in its own process group, appending its output to log_path. Returns
    (exit status, or None when it was killed at the timeout; seconds)."""
    t0 = time.time()
    rc = wait_logged(start_logged(cmd, log_path, env), log_path, timeout)
    return rc, time.time() - t0


def tail(path: Path, chars: int = 3000, since: int = 0) -> str:
    """The last `chars` characters of a log, from byte offset `since` on."""
    try:
        with open(path, "rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")[-chars:]
    except OSError:
        return ""


def gpu_env() -> dict:
    """This environment, for a subprocess whose Triton kernels must run on the GPU, not the interpreter."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def worker_env() -> dict:
    env = gpu_env()
    # Autotuning results on disk: the per-layer and the model phases share layer shapes, and
    # each worker process would otherwise benchmark every config again.
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env
