"""The one place the Triton backend launches a kernel, and the hooks that see each launch.

Every launcher in this package calls `launch(kernel, grid, *args, **kwargs)`. Normally that is
`wrap_triton(kernel)[grid](...)` (eager on a GPU, in the interpreter, and traced by
torch.compile alike). Two hooks exist for tools and tests:

  recording()   collects the launches instead of running them: the compile gate
                (resnet_fused.backends.triton.aot) runs the backend's op implementations on
                meta tensors and gets every kernel with its real arguments and constexprs.
  observing()   collects the launches and still runs them (tests check which variant ran).

`force_int64()` makes every launcher pick the int64-index variant of its kernel, which it
otherwise picks only for tensors past 2**31 elements (tests run that variant on small tensors).

`plan_cache` memoizes what a launcher decides from its tensors' sizes, strides, dtype and
device and the process-wide switches (configs, grids, the int64 decision, copies), so that a
repeated call is a dictionary lookup plus the launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INT32_LIMIT = 2**31
# Plans kept per launcher (least recently used dropped): a model has a few dozen layer shapes.
PLAN_CACHE_SIZE = 512


@dataclasses.dataclass
class Launch:
    kernel: Any              # a triton JITFunction or Autotuner
    grid: Any                # a tuple, or a callable of the config's meta-parameters
    args: tuple
    kwargs: dict


_recorder: list[Launch] | None = None
_observer: list[Launch] | None = None
_force_int64 = False


def launch(kernel, grid, *args, **kwargs) -> None:
    if _recorder is not None:
        _recorder.append(Launch(kernel, grid, args, kwargs))
        return
    if _observer is not None:
        _observer.append(Launch(kernel, grid, args, kwargs))
    wrap_triton(kernel)[grid](*args, **kwargs)


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Launches are collected (in order) and not run."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


@contextlib.contextmanager
def observing() -> Iterator[list[Launch]]:
    """Launches are collected (in order) and run."""
    global _observer
    previous, _observer = _observer, []
    try:
        yield _observer
    finally:
        _observer = previous


@contextlib.contextmanager
def force_int64() -> Iterator[None]:
    global _force_int64
    previous, _force_int64 = _force_int64, True
    try:
        yield
    finally:
        _force_int64 = previous


def int64_forced() -> bool:
    return _force_int64


def plan_key(t: torch.Tensor | None) -> tuple | None:
    """What a launch plan may depend on of a tensor besides dtype and device: its sizes, strides
    and storage offset modulo 16 elements (TMA's 16-byte alignment); None for an absent operand."""
    return None if t is None else (t.shape, t.stride(), t.storage_offset() % 16)


def plan_cache(build: Callable) -> Callable:
    """build(*key) computed once per key (hashable arguments: plan_key's, dtypes, devices, flags),
    at most PLAN_CACHE_SIZE kept. A key that cannot be hashed (torch.compile's symbolic sizes)
    is planned uncached. cache_info() and cache_clear() as functools.lru_cache's."""
    cached = functools.lru_cache(maxsize=PLAN_CACHE_SIZE)(build)

    @functools.wraps(build)
    def plan(*key):
        try:
            return cached(*key)
        except TypeError:  # unhashable (a SymInt): plan this call alone
            return build(*key)

    plan.cache_info, plan.cache_clear = cached.cache_info, cached.cache_clear
    return plan


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' grids (triton.cdiv is a constexpr function, a few
    microseconds a call from host code)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain Python for the same reason as cdiv."""
    return 1 << (int(n) - 1).bit_length()


def _span(t: torch.Tensor) -> int:
    """One past the largest element offset t addresses (its numel when dense)."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) or t.numel() == 0:
        return t.numel()
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def needs_int64(*tensors: torch.Tensor | None) -> bool:
    """Whether a kernel addressing these tensors must compute offsets in int64: some offset
    (or a product of a pixel index and a stride on the way to it) reaches 2**31."""
    if _force_int64:
        return True
    return any(t is not None and _span(t) >= INT32_LIMIT for t in tensors)


@triton.jit
def as_index(v, INDEX_64: tl.constexpr):
    """v in the kernel's index type: int64 when the launcher chose INDEX_64 (needs_int64), else as is (int32)."""
    if INDEX_64:
        return v.to(tl.int64)
    else:
        return v


def grid_size(grid: Callable | tuple, meta: dict) -> tuple[int, int, int]:
    g = grid(meta) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(g))
    return int(g[0]), int(g[1]), int(g[2])
