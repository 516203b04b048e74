"""Launch configuration shared by the Triton kernels.

Under the interpreter (TRITON_INTERPRET=1) `triton.autotune` cannot benchmark more
than one config (it times through a GPU driver), so every autotuned kernel gets
exactly one config there. On a GPU the config set depends on the architecture; the
README's Triton section says how these sets were chosen.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

from ...._utils import interpret


@functools.cache
def _arch() -> int:
    if interpret() or not torch.cuda.is_available():
        return 0
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def conv_configs() -> list[triton.Config]:
    """Configs for the implicit-GEMM kernels (BLOCK_N, BLOCK_K, warps, stages; BLOCK_M is
    fixed by the caller because the training statistics partials are per BLOCK_M tile)."""
    if interpret():
        # The interpreter's cost is per program and per loop iteration, hardly per element.
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    cfgs = [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ]
    if _arch() >= 90:
        cfgs.append(triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4))
    return cfgs


def wgrad_configs() -> list[triton.Config]:
    if interpret():
        return [triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return conv_configs()


def m_bucket(m: int) -> int:
    """The GEMM row count as the autotuner sees it: rounded up to a power of two, so a new
    batch size or resolution reuses the config tuned for its bucket instead of benchmarking
    again and growing the cache by one entry per distinct M (bounded: ~log2(M_max) entries
    per layer shape). Configs depend on M only through the tile-count regime."""
    return triton.next_power_of_2(max(int(m), 1))


def conv_block_m() -> int:
    return 64 if interpret() else 128


def elementwise_block() -> tuple[int, int]:
    """(rows, channels) tile of the per-channel elementwise/reduction kernels."""
    return (64, 32) if interpret() else (64, 64)


_TARGET_ARCH: int | None = None


@contextlib.contextmanager
def target(arch: int):
    """Choose configs for this architecture (sm_XY as XY) instead of the current device's:
    the compile gate (aot.py) enumerates a GPU's configs on a machine without one."""
    global _TARGET_ARCH
    previous, _TARGET_ARCH = _TARGET_ARCH, arch
    try:
        yield
    finally:
        _TARGET_ARCH = previous
