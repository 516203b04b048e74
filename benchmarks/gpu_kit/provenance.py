"""Provenance: where a report's numbers come from (GPU, driver, versions, commit, command)."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys

from . import ROOT


def _run_text(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def provenance(argv: list[str]) -> tuple[dict, dict | None]:
    """(where the numbers come from, the GPU or None); argv: gpu_report.py's arguments."""
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
