"""Backend selection: which namespace's ops run a given call.

`auto` picks, per call, the CUDA extension for CUDA tensors when it is built, else
Triton on CUDA tensors, else the reference. An explicitly requested backend must be
available (`set_backend` raises with the reason otherwise); inputs its kernels do not
cover (see each backend's `covers` and the README's support matrix) take the
reference path. Nothing here touches the GPU at import time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
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


def select_ops(op_name: str, *op_args):
    """torch.ops namespace that runs `op_name` on these arguments under the current backend."""
    name = get_backend()
    if name == "auto":
        # Fused kernels only for CUDA tensors: on CPU the Triton interpreter is a test
        # vehicle (use_backend("triton") under TRITON_INTERPRET=1), not a fast path.
        candidates = ("cuda", "triton") if op_args[0].is_cuda else ()
    else:
        candidates = (name,)
    for candidate in candidates:
        if candidate == "reference":
            break
        module = _MODULES[candidate][0]
        if unavailable_reason(candidate) is not None or (name == "auto" and not module.AUTO):
            continue
        if module.covers(op_name, *op_args):
            return getattr(torch.ops, module.NAMESPACE)
    return torch.ops.resnet_fused


def resolved_backend(op_name: str, *op_args) -> str:
    """Name of the backend `select_ops` picks (for tests and the benchmark report)."""
    namespace = select_ops(op_name, *op_args).name
    return {"resnet_fused": "reference", "resnet_fused_triton": "triton", "resnet_fused_cuda": "cuda"}[namespace]
