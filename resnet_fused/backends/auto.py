"""auto's per-shape choice between the verified fused backends that cover a call and the
reference (PyTorch's own kernels).

The first time a shape is seen, its choice comes from the verifier's timings for this device
(`python -m resnet_fused.verify` times the model's layer shapes; seed_choices), else each
candidate is timed on the call's own arguments (CUDA events, median of a few runs, forward plus
backward for a training op) and the fastest runs; the choice is remembered per shape in memory
(`auto_choices()`). No timing, and the
first of the preference order unless the shape was already timed, when timing is impossible
or unwanted: while torch.compile traces, during CUDA graph capture and with
RESNET_FUSED_AUTO_TIMING=0. Under torch.use_deterministic_algorithms always the first (the
choice must not vary run to run, nor with what was timed before).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from .._utils import device_guard

if TYPE_CHECKING:
    from . import Backend

TIMING_ENV_VAR = "RESNET_FUSED_AUTO_TIMING"
_TIMING_REPS = 5
_auto_choices: dict[tuple, dict] = {}  # shape key -> {"backend": name, "ms": {name: median ms}}
_seeded: dict[str, dict] = {}  # repr(shape key) -> the verifier's {"backend", "ms"} for it


def seed_choices(timings: dict) -> None:
    """The verifier's per-shape timings ({repr(shape key): {"backend": name, "ms": {...}}}),
    used for a shape before timing it here."""
    _seeded.clear()
    _seeded.update({k: v for k, v in timings.items() if isinstance(v, dict) and isinstance(v.get("backend"), str)
                    and isinstance(v.get("ms"), dict)})


def _shape_key(op_name: str, op_args) -> tuple:
    """What the kernels' speed depends on: op, grad mode, shapes, strides, dtypes, devices, the
    non-tensor arguments (conv geometry, relu) and which optional tensors are present. Flat
    (each argument's position is fixed by the op's schema): built on every call auto decides."""
    key = [op_name, torch.is_grad_enabled()]
    for a in op_args:
        if isinstance(a, torch.Tensor):
            key += (a.shape, a.stride(), a.dtype, a.device, a.requires_grad)
        elif isinstance(a, list):
            key.append(tuple(a))
        else:
            key.append(a)
    return tuple(key)


def _may_time() -> bool:
    """Whether a new shape may be timed now (compiling and deterministic mode: _choice)."""
    if os.environ.get(TIMING_ENV_VAR, "1") == "0":
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def choose(op_name: str, op_args, covering: list[Backend]) -> Backend:
    """The backend `auto` runs among several that cover the call (in preference order)."""
    by_name = {b.NAME: b for b in covering}
    return by_name[_choice(op_name, op_args, [b.NAME for b in covering], by_name)]


def _choice(op_name: str, op_args, covering: list[str], by_name: dict[str, Backend]) -> str:
    # Under torch.compile not even a dictionary lookup on shapes (they may be symbolic); in
    # deterministic mode the pick must not depend on timings taken earlier.
    if torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
        return covering[0]
    key = _shape_key(op_name, op_args)
    known = _auto_choices.get(key)
    if known is not None and known["backend"] in covering:  # the common case: one lookup
        return known["backend"]
    if _seeded:  # the verifier timed this shape: its figures, where they cover every candidate
        seeded = _seeded.get(repr(key))
        if seeded is not None and all(isinstance(seeded["ms"].get(c), (int, float)) for c in covering):
            ms = {c: float(seeded["ms"][c]) for c in covering}
            _auto_choices[key] = dict(backend=min(covering, key=lambda c: ms[c]), ms=ms)
            return _auto_choices[key]["backend"]
    if not _may_time():  # RESNET_FUSED_AUTO_TIMING=0, CUDA graph capture: the first candidate
        return covering[0]
    ms = {c: _time_backend(op_name, op_args, by_name[c]) for c in covering}
    _auto_choices[key] = dict(backend=min(covering, key=lambda c: ms[c]), ms=ms)  # ties: preference order
    return _auto_choices[key]["backend"]


def _time_backend(op_name: str, op_args, backend: Backend) -> float:
    return _time_call(op_name, op_args, getattr(torch.ops, backend.NAMESPACE))


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
    device = op_args[0].device
    # The arguments are already autocast's; time the kernels themselves, without a graph, on the
    # tensors' device (the events record on the current device's stream).
    with torch.no_grad(), torch.autocast(device.type, enabled=False), device_guard(device):
        outputs = forward(*op_args)
        backward = _backward_call(op_name, op_args, outputs, ops) if autograd_will_run else None
        run = (lambda: (forward(*op_args), backward())) if backward is not None else (lambda: forward(*op_args))
        run()
        times = []
        on_gpu = device.type == "cuda"
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

