"""Backends: which implementation of the resnet_fused ops runs a given call.

Every backend registers the same ops (schemas, fake kernels, autograd and autocast from
`resnet_fused._library`) under its own torch.ops namespace:

    reference   torch.ops.resnet_fused         pure PyTorch, any device and dtype (reference.py)
    triton      torch.ops.resnet_fused_triton  Triton kernels (triton/)
    cuda        torch.ops.resnet_fused_cuda    the CUDA C++ kernels of csrc/ (cuda.py)

and satisfies the `Backend` protocol below. Selection: `set_backend`, `get_backend`,
`use_backend`, defaulting to $RESNET_FUSED_BACKEND, else `auto`.

`auto` considers, for CUDA tensors, the fused backends that are available, passed
`python -m resnet_fused.verify` on that device (its verdict, read from the cache: verify/cache.py)
and cover the call; per shape it runs the fastest of them and the reference (auto.py: the
verifier's timings, else a first-call timing); with none, the reference. With no verdict for
the device it runs the reference and warns once. An explicitly requested
backend must be available (`set_backend` raises with the reason otherwise); inputs its
kernels do not cover (`unsupported_reason`, docs/design.md's support matrix) take the reference
path. Nothing here touches the GPU at import time.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Iterator
from typing import Protocol

import torch

from .. import _library
from . import auto, reference
from .auto import TIMING_ENV_VAR, auto_choices, clear_auto_choices

__all__ = [
    "Backend", "BACKEND_NAMES", "ENV_VAR", "TIMING_ENV_VAR", "available_backends", "get_backend", "set_backend",
    "use_backend", "unavailable_reason", "unsupported_reason", "select_ops", "plain_eager", "direct_calls",
    "resolved_backend", "record_selections", "auto_choices", "clear_auto_choices", "decompositions",
    "verified_backends", "clear_verdicts",
]


class Backend(Protocol):
    """What a backend module provides (reference.py, cuda.py, triton/__init__.py)."""

    NAME: str  # the name set_backend takes
    NAMESPACE: str  # torch.ops namespace of its ops
    # Its ops as plain eager calls them without the dispatcher (_library.direct_ops), with grad
    # mode off and on; None where the ops are C++ (cuda).
    DIRECT: object | None
    DIRECT_WITH_GRAD: object | None

    def unavailable_reason(self) -> str | None:
        """Why it cannot run at all here (None: it can)."""

    def unsupported_reason(self, op_name: str, *op_args) -> str | None:
        """Why its kernels do not handle this call of op `op_name` (None: they do)."""


BACKEND_NAMES = ("auto", "cuda", "triton", "reference")
ENV_VAR = "RESNET_FUSED_BACKEND"
FUSED_MODULES = {"cuda": "resnet_fused.backends.cuda", "triton": "resnet_fused.backends.triton"}


def _import(name: str) -> tuple[Backend | None, str | None]:
    """(module, None), or (None, why it could not be imported)."""
    try:
        return importlib.import_module(FUSED_MODULES[name]), None
    except ModuleNotFoundError as exc:
        if exc.name == FUSED_MODULES[name]:
            return None, f"the {name} backend is not part of this build of resnet_fused"
        return None, f"importing the {name} backend failed: {exc}"
    except Exception as exc:  # a broken extension must not break `import resnet_fused`
        return None, f"importing the {name} backend failed: {type(exc).__name__}: {exc}"


# Imported eagerly (importing queries no device) so that select_ops, which torch.compile
# traces, only reads this dict; availability is checked lazily, once.
BACKENDS: dict[str, tuple[Backend | None, str | None]] = {
    "reference": (reference, None),
    **{name: _import(name) for name in FUSED_MODULES},
}


@functools.cache
def _unavailable_reason(name: str) -> str | None:
    module, reason = BACKENDS[name]
    return reason if module is None else module.unavailable_reason()


def _check_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


@torch.compiler.assume_constant_result
def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here, else why not."""
    _check_name(name)
    return None if name == "auto" else _unavailable_reason(name)


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to None when usable here, else to the reason it is not."""
    return {name: unavailable_reason(name) for name in BACKEND_NAMES}


def unsupported_reason(name: str, op_name: str, *op_args) -> str | None:
    """None when backend `name` runs this call of op `op_name` itself, else why (unavailable, or
    an input its kernels do not cover); such a call takes the reference path."""
    _check_name(name)
    if name == "auto":
        raise ValueError("unsupported_reason takes a concrete backend, not 'auto' (see resolved_backend)")
    reason = unavailable_reason(name)
    return reason if reason is not None else BACKENDS[name][0].unsupported_reason(op_name, *op_args)


_current: str | None = None


def set_backend(name: str) -> None:
    """Select the backend for subsequent calls ('auto', 'cuda', 'triton', 'reference')."""
    global _current
    reason = unavailable_reason(name)
    if reason is not None:
        raise RuntimeError(f"resnet_fused backend {name!r} is unavailable: {reason}")
    _current = name


def get_backend() -> str:
    """The selected backend name; defaults to $RESNET_FUSED_BACKEND, else 'auto'."""
    if _current is None:
        set_backend(os.environ.get(ENV_VAR, "auto"))
    return _current


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed calls on backend `name`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _auto_candidates(x) -> tuple[str, ...]:
    """The fused backends `auto` considers for a call whose first tensor is x, in preference order."""
    # Fused kernels only for CUDA tensors: on CPU the Triton interpreter is a test
    # vehicle (use_backend("triton") under TRITON_INTERPRET=1), not a fast path.
    return ("cuda", "triton") if x.is_cuda else ()


# Per device: the fused backends its verdict passed (verify/cache.py), read once.
_verified: dict[torch.device, frozenset[str]] = {}
_NOT_VERIFIED_WARNING = (
    "resnet_fused: no verdict for {gpu} in the cache, so `auto` runs PyTorch's own kernels here. Run `{command}` "
    "once on this machine (a few minutes) to check the fused kernels on this GPU and enable the faster of them "
    "per layer; `set_backend('triton')` or `('cuda')` selects one without a verdict.")


def _load_verdict(device: torch.device) -> frozenset[str]:
    from ..verify import cache  # not at import time: nothing here touches the GPU then

    key = cache.device_key(device)
    record = cache.read(key)
    if record is None:
        warnings.warn(_NOT_VERIFIED_WARNING.format(gpu=key["device"], command=cache.VERIFY_COMMAND),
                      RuntimeWarning, stacklevel=5)
    else:
        auto.seed_choices(record.get("timings") or {})
    passed = _verified[device] = cache.passed_backends(record)
    return passed


def _verified_on(device: torch.device) -> frozenset[str]:
    """The fused backends whose verdict passed on `device` (a CUDA tensor's: its index is set)."""
    verified = _verified.get(device)
    return verified if verified is not None else _load_verdict(device)


@torch.compiler.assume_constant_result
def _is_verified(name: str, device: torch.device) -> bool:
    """Whether `auto` may run fused backend `name` on `device`: a constant to torch.compile,
    which must not trace the cache file's reading."""
    return name in _verified_on(device)


def clear_verdicts() -> None:
    """Forget the verdicts read from the cache (read again on the next CUDA call): after running
    the verifier in this process, or changing $RESNET_FUSED_CACHE_DIR."""
    _verified.clear()
    auto.seed_choices({})


def verified_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Each fused backend mapped to None when `auto` may run it on `device` (default: the current
    CUDA device), else why not: unavailable, or no passing verdict from `python -m resnet_fused.verify`
    on that GPU. (available_backends() answers for an explicit set_backend, which needs no verdict.)"""
    if device is None:
        if not torch.cuda.is_available():
            return {name: "no CUDA device: auto runs the reference on CPU tensors" for name in FUSED_MODULES}
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        return {name: f"auto runs the reference on {device.type} tensors" for name in FUSED_MODULES}
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    from ..verify import cache

    with warnings.catch_warnings():  # asked for: the reasons below say it, not a warning
        warnings.simplefilter("ignore")
        passed = _verified_on(device)
    gpu = torch.cuda.get_device_name(device)
    reasons = {}
    for name in FUSED_MODULES:
        reason = unavailable_reason(name)
        if reason is None and name not in passed:
            reason = f"not verified on {gpu}: run {cache.VERIFY_COMMAND}"
        reasons[name] = reason
    return reasons


_recorders: list = []  # callables (op_name, op_args, backend) that record selections


def _select(op_name: str, op_args) -> Backend:
    name = _current or get_backend()
    if name == "auto":
        x = op_args[0]
        candidates = _auto_candidates(x)
        if not candidates:  # a CPU call: the reference, in a few reads (per unit per call)
            return reference
        device = x.device
        candidates = [c for c in candidates if _is_verified(c, device)]
    else:
        candidates = (name,)
    covering = []
    for candidate in candidates:
        module = BACKENDS[candidate][0]
        if unavailable_reason(candidate) is None and module.unsupported_reason(op_name, *op_args) is None:
            covering.append(module)
    if not covering:
        return reference
    if name != "auto":
        return covering[0]
    # auto: the fastest for this shape of the verified fused backends and PyTorch's own kernels.
    return auto.choose(op_name, op_args, [*covering, reference])


_profiler = torch.autograd.profiler
_jit_tracing_state = torch._C._get_tracing_state
_dispatch_modes = torch._C._len_torch_dispatch_stack
_torch_function_modes = torch._C._is_torch_function_mode_enabled
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)  # None: this torch cannot tell


def plain_eager() -> bool:
    """Whether ops may run without the dispatcher (_library.direct_ops): in plain eager the
    custom op's autograd wrapper, autocast kernel and redispatch cost host time (about 20 us a
    call in inference, more in training: more than a small unit's compute) and add nothing.
    Anything that watches or transforms the dispatcher still meets the ops: torch.compile and
    torch.export (is_compiling), jit tracing, dispatch modes (FakeTensor, make_fx,
    FlopCounterMode, functionalization, selective checkpointing), torch-function modes,
    autocast (the op's kernel casts, then excludes autocast) and the profiler."""
    # The C predicates themselves (torch.jit.is_tracing and autocast_active wrap them in
    # Python), the per-call cost of every unit; compiling first: Dynamo traces the rest as
    # constants only after that.
    return not (torch.compiler.is_compiling() or _jit_tracing_state() is not None or _dispatch_modes()
                or _torch_function_modes() or (_any_autocast() if _any_autocast else True)
                or _profiler._is_profiler_enabled)


_plain_eager = plain_eager  # the name select_ops's argument shadows


def direct_calls() -> bool:
    """plain_eager() with grad mode off (inference; an autograd.Function's forward and backward)."""
    return not torch.is_grad_enabled() and plain_eager()


def select_backend(op_name: str, *op_args) -> Backend:
    """The backend module that runs `op_name` on these arguments under the current backend,
    counted by record_selections: the one place a call's backend is chosen."""
    backend = _select(op_name, op_args)
    if _recorders and not torch.compiler.is_compiling():
        for record in _recorders:
            record(op_name, op_args, backend)
    return backend


def backend_ops(backend: Backend, plain_eager: bool):
    """What runs a backend's ops: its torch.ops namespace, or in plain eager its ops without the
    dispatcher (_library.direct_ops: the same implementations and autograd formulas)."""
    if backend.DIRECT is not None and plain_eager:
        return backend.DIRECT_WITH_GRAD if torch.is_grad_enabled() else backend.DIRECT
    return getattr(torch.ops, backend.NAMESPACE)


def select_ops(op_name: str, *op_args, plain_eager: bool | None = None):
    """What runs `op_name` on these arguments under the current backend (select_backend, then
    backend_ops). plain_eager: plain_eager() where the caller has asked it already for this
    call."""
    return backend_ops(select_backend(op_name, *op_args), _plain_eager() if plain_eager is None else plain_eager)


def resolved_backend(op_name: str, *op_args) -> str:
    """Name of the backend `select_ops` picks for this call (for tests and the benchmark report)."""
    return _select(op_name, op_args).NAME


def decompositions(table: dict | None = None) -> dict:
    """A decomposition table for `ExportedProgram.run_decompositions`: every resnet_fused op
    of every backend namespace mapped to its reference composition of standard aten ops, added
    to `table` (default: torch.export.default_decompositions(), the core aten set). The
    decomposed program has no resnet_fused op left: it loads and runs where resnet_fused is
    not installed (unfused)."""
    if table is None:
        default = getattr(torch.export, "default_decompositions", None)
        table = default() if default is not None else {}
    for module, _ in BACKENDS.values():
        if module is None:
            continue
        namespace = getattr(torch.ops, module.NAMESPACE)
        for name in _library.OP_NAMES:
            if hasattr(namespace, name):
                table[getattr(namespace, name).default] = getattr(reference, name)
    return table


@contextlib.contextmanager
def record_selections() -> Iterator[collections.Counter]:
    """Counts, per backend name, the fused-op calls selected inside the block (eager calls;
    compiled code does not select at run time): which backend really ran."""
    counts: collections.Counter = collections.Counter()
    with record_calls(lambda op_name, op_args, backend: counts.update((backend.NAME,))):
        yield counts


@contextlib.contextmanager
def record_calls(record) -> Iterator[None]:
    """Calls record(op_name, op_args, backend) for every fused-op call selected inside the block
    (eager calls), op_args as the backend receives them (checked, autocast): the verifier reads
    a model's layer calls this way."""
    _recorders.append(record)
    try:
        yield
    finally:
        _recorders.remove(record)

