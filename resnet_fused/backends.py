"""Backend selection: which namespace's ops run a given call.

`auto` considers, for CUDA tensors, the fused backends that are available, enabled for
auto (their AUTO flag) and cover the call. With one such backend it runs that one; with
cuda and triton both, it times each on the call's own arguments the first time a shape
is seen (CUDA events, median of a few runs, forward plus backward for a training op) and
runs the faster, remembering the choice per shape in memory (`auto_choices()`). It does
not time, and takes the first of (cuda, triton) unless the shape was already timed, when
timing is impossible or unwanted: while torch.compile traces, during CUDA graph capture
and with RESNET_FUSED_AUTO_TIMING=0. Under torch.use_deterministic_algorithms it always
takes the first (the choice must not vary run to run, nor with what was timed before).
With none, the reference runs.

An explicitly requested backend must be available (`set_backend` raises with the reason
otherwise); inputs its kernels do not cover (see each backend's `covers` and the README's
support matrix) take the reference path. Nothing here touches the GPU at import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from collections.abc import Iterator

import torch

BACKEND_NAMES = ("auto", "cuda", "triton", "reference")
ENV_VAR = "RESNET_FUSED_BACKEND"

# A fused backend is a module exposing:
#   NAMESPACE: str                         torch.ops namespace of its ops
#   unavailable_reason() -> str | None     why it cannot run at all here (None: it can)
#   covers(op_name, *op_args) -> bool      whether its kernels handle this particular call
#   AUTO: bool                             whether `auto` may pick it (False until its kernels
#                                          have passed the GPU test suite on real hardware)
_BACKEND_MODULES = {
    "cuda": "resnet_fused.cuda_backend",
    "triton": "resnet_fused.triton_backend",
}


def _import(name: str):
    """(module, None), or (None, why it could not be imported)."""
    try:
        return importlib.import_module(_BACKEND_MODULES[name]), None
    except ModuleNotFoundError as exc:
        if exc.name == _BACKEND_MODULES[name]:
            return None, f"the {name} backend is not part of this build of resnet_fused"
        return None, f"importing the {name} backend failed: {exc}"
    except Exception as exc:  # a broken extension must not break `import resnet_fused`
        return None, f"importing the {name} backend failed: {type(exc).__name__}: {exc}"


# Imported eagerly (importing queries no device) so that select_ops, which torch.compile
# traces, only reads this dict; availability is checked lazily, once.
_MODULES = {name: _import(name) for name in _BACKEND_MODULES}


@functools.cache
def _unavailable_reason(name: str) -> str | None:
    module, reason = _MODULES[name]
    return reason if module is None else module.unavailable_reason()


@torch.compiler.assume_constant_result
def unavailable_reason(name: str) -> str | None:
    """None when backend `name` can run here, else why not."""
    _check_name(name)
    if name in ("auto", "reference"):
        return None
    return _unavailable_reason(name)


def available_backends() -> dict[str, str | None]:
    """Every backend name mapped to None when usable here, else to the reason it is not."""
    return {name: unavailable_reason(name) for name in BACKEND_NAMES}


def _check_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


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
    global _current
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


def select_ops(op_name: str, *op_args):
    """torch.ops namespace that runs `op_name` on these arguments under the current backend."""
    name = get_backend()
    candidates = _auto_candidates(op_args[0]) if name == "auto" else (name,)
    covering = []
    for candidate in candidates:
        if candidate == "reference":
            break
        module = _MODULES[candidate][0]
        if unavailable_reason(candidate) is not None or (name == "auto" and not module.AUTO):
            continue
        if module.covers(op_name, *op_args):
            covering.append(candidate)
    if not covering:
        return torch.ops.resnet_fused
    chosen = covering[0] if len(covering) == 1 else _timed_choice(op_name, op_args, covering)
    return getattr(torch.ops, _MODULES[chosen][0].NAMESPACE)


# ---------------------------------------------------------------------------------------
# auto's per-shape choice between several covering backends.

TIMING_ENV_VAR = "RESNET_FUSED_AUTO_TIMING"
_TIMING_REPS = 5
_auto_choices: dict[tuple, dict] = {}  # shape key -> {"backend": name, "ms": {name: median ms}}


def _shape_key(op_name: str, op_args) -> tuple:
    """What the kernels' speed depends on: op, shapes, strides, dtypes, devices, the
    non-tensor arguments (conv geometry, relu) and which optional tensors are present."""
    key = [op_name, torch.is_grad_enabled()]
    for a in op_args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.stride(), a.dtype, str(a.device), a.requires_grad))
        elif isinstance(a, list):
            key.append(tuple(a))
        else:
            key.append(a)
    return tuple(key)


def _may_time() -> bool:
    if torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
        return False
    if os.environ.get(TIMING_ENV_VAR, "1") == "0":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _timed_choice(op_name: str, op_args, covering: list[str]) -> str:
    if not _may_time():
        # Under torch.compile not even a dictionary lookup on shapes (they may be symbolic);
        # in deterministic mode the pick must not depend on timings taken earlier.
        if torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
            return covering[0]
        known = _auto_choices.get(_shape_key(op_name, op_args))
        return known["backend"] if known is not None and known["backend"] in covering else covering[0]
    key = _shape_key(op_name, op_args)
    known = _auto_choices.get(key)
    if known is None or known["backend"] not in covering:
        ms = {c: _time_call(op_name, op_args, getattr(torch.ops, _MODULES[c][0].NAMESPACE)) for c in covering}
        known = dict(backend=min(covering, key=lambda c: ms[c]), ms=ms)  # ties: preference order
        _auto_choices[key] = known
    return known["backend"]


def _backward_call(op_name: str, op_args, outputs, ops):
    """The backward op of a training or eval forward, as autograd would call it, or None."""
    if op_name == "conv_bn_train":
        x, weight, bias, bn_weight, bn_bias, residual, stride, padding, dilation, groups, eps, relu = op_args
        y, z, mean, var = outputs
        # The mask autograd's formula passes: what requires a gradient.
        mask = [t is not None and t.requires_grad for t in (x, weight, bias, bn_weight, bn_bias, residual)]
        if not any(mask):
            return None
        return lambda: ops.conv_bn_train_backward(torch.ones_like(y), x, weight, z, y if relu else None, mean, var,
                                                  bn_weight, stride, padding, dilation, groups, eps, relu, mask)
    if op_name == "conv_bn_eval":
        x, weight, scale, _, residual, stride, padding, dilation, groups, relu = op_args
        mask = [x.requires_grad, weight.requires_grad, scale.requires_grad, scale.requires_grad,
                residual is not None and residual.requires_grad]
        if not any(mask):
            return None
        return lambda: ops.conv_bn_eval_backward(torch.ones_like(outputs), x, weight, scale,
                                                 outputs if relu else None, stride, padding, dilation, groups,
                                                 relu, mask)
    return None


def _time_call(op_name: str, op_args, ops) -> float:
    """Median milliseconds of one call of ops.<op_name> on op_args (plus its backward when
    autograd would run one), after a warm-up call (JIT compilation, Triton autotuning)."""
    forward = getattr(ops, op_name)
    autograd_will_run = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in op_args)
    # The arguments are already autocast's; time the kernels themselves, without a graph.
    with torch.no_grad(), torch.autocast(op_args[0].device.type, enabled=False):
        outputs = forward(*op_args)
        backward = _backward_call(op_name, op_args, outputs, ops) if autograd_will_run else None
        run = (lambda: (forward(*op_args), backward())) if backward is not None else (lambda: forward(*op_args))
        run()
        times = []
        on_gpu = op_args[0].is_cuda
        for _ in range(_TIMING_REPS):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:  # CPU tensors (the interpreter in tests): wall clock
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def auto_choices() -> dict[tuple, dict]:
    """auto's per-shape choices so far: shape key -> {"backend": name, "ms": {backend: median ms}}."""
    return {key: dict(value, ms=dict(value["ms"])) for key, value in _auto_choices.items()}


def clear_auto_choices() -> None:
    """Forget auto's per-shape choices (they are re-timed on the next call of each shape)."""
    _auto_choices.clear()


def resolved_backend(op_name: str, *op_args) -> str:
    """Name of the backend `select_ops` picks (for tests and the benchmark report)."""
    namespace = select_ops(op_name, *op_args).name
    return {"resnet_fused": "reference", "resnet_fused_triton": "triton", "resnet_fused_cuda": "cuda"}[namespace]
