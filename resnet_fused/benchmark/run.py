"""One provider in one process: its model built and checked against torchvision eager's logits,
its step warmed up, then timed into one result row."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

import resnet_fused

from .providers import autocast_for, build_model, model_step, provider_backend, provider_context, uses_cuda_graph
from .timing import max_memory_mib, measure, release_memory, rounds_for, summarize, synchronize

if TYPE_CHECKING:
    from .torchrun import Torchrun


def record_backends():
    """Counts, per backend name, the fused-op calls made inside the block: which backend
    `auto` (or an explicit backend, per call) really ran. Ops that a unit runs unfused,
    module by module, are not counted."""
    return resnet_fused.backends.record_selections()


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the unique storages autograd keeps for backward during one forward of `model`
    (as called: training mode, autocast and backend are the caller's), parameters and buffers
    excluded. Counted by saved_tensors_hooks, so the same on every device."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(saved.values())


def reference_logits_for(tv_model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """torchvision eager's eval logits, float32: what every provider is compared with."""
    tv_model.eval()
    with torch.inference_mode(), autocast_for(x.device, precision)():
        return tv_model(x).float()


def _logit_diff(logits: torch.Tensor, reference_logits: torch.Tensor) -> float:
    return (logits.float() - reference_logits).abs().max().item()


def prepare_provider(provider: str, tv_model: torch.nn.Module, x: torch.Tensor, mode: str, precision: str,
                     reference_logits: torch.Tensor, warmup: int,
                     progress: Callable[[str], object] | None = None, *,
                     recompute_bn_relu: bool = False,
                     torchrun: Torchrun | None = None) -> tuple[Callable[[], object], dict]:
    """Builds `provider`'s model, checks its eval logits against reference_logits (before any
    training step changes the weights), then warms its step up. The logit check and the first
    step (torch.compile, Triton autotuning, cuDNN's search, a CUDA graph's capture happen there)
    are timed together as warmup_s; then `warmup` more steps. progress, if given, is called after
    each model call with its phase ("check", then "warm-up"). A CUDA-graph provider's inference
    graph is checked too: max_abs_logit_diff is the larger of the model's and the first replay's.
    In training, info["saved_mib"] is the activation
    memory one forward keeps for backward (saved_activation_bytes; not for compiled models,
    whose saved tensors autograd hooks do not see). torchrun, under torchrun, makes the model data-parallel
    over the processes (Torchrun.wrap) before the check. Returns (step, info)."""
    if progress is None:
        def progress(phase):
            pass
    device = x.device
    autocast = autocast_for(device, precision, cache_enabled=not uses_cuda_graph(provider))
    after_backward = None
    if torchrun is None:
        model = build_model(provider, tv_model, recompute_bn_relu)
        unwrapped = model
    else:
        wrapped = []

        def wrap(model):
            wrapped.append(torchrun.wrap(provider, model))
            return wrapped[-1].model
        model = build_model(provider, tv_model, recompute_bn_relu, wrap=wrap)
        unwrapped, after_backward = wrapped[-1].module, wrapped[-1].after_backward
    info: dict = dict(backends_used=None, saved_mib=None)
    if torchrun is not None:
        info.update(wrapped[-1].notes)
    t_first = time.perf_counter()
    model.eval()
    with provider_context(provider), torch.inference_mode(), autocast():
        if provider_backend(provider) is not None:
            with record_backends() as counts:
                logits = model(x)
            info["backends_used"] = dict(counts)
        else:
            logits = model(x)
        info["max_abs_logit_diff"] = _logit_diff(logits, reference_logits)
    del logits
    progress("check")
    if mode == "train" and "compile" not in provider:
        model.train()
        with provider_context(provider), autocast():
            # The module inside any DDP wrapper: the wrapper adds no saved tensors, and a forward
            # through it with no backward would leave DDP's reducer expecting one.
            info["saved_mib"] = saved_activation_bytes(unwrapped, x) / 2**20
    step = model_step(provider, model, x, mode, autocast, after_backward)
    output = step()
    if mode == "infer" and uses_cuda_graph(provider):
        info["max_abs_logit_diff"] = max(info["max_abs_logit_diff"], _logit_diff(output, reference_logits))
    del output
    synchronize(device)
    progress("warm-up")
    info["warmup_s"] = time.perf_counter() - t_first
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        step()
        progress("warm-up")
    synchronize(device)
    info["seconds_per_call"] = (time.perf_counter() - t0) / max(warmup, 1)
    return step, info


def run_model_provider(provider: str, tv_model: torch.nn.Module, x: torch.Tensor, mode: str, precision: str,
                       reference_logits: torch.Tensor, *, warmup: int, rounds: int | None,
                       target_seconds: float = 2.0, max_rounds: int = 50,
                       progress: Callable[[str], object] | None = None, recompute_bn_relu: bool = False) -> dict:
    """Times one provider (median over `rounds` steps; None: about target_seconds' worth) and
    returns one result row with images/s, its logit check and, on a GPU, its peak memory.
    progress, if given, is called after each model call with its phase ("check", "warm-up",
    "timed"): calls_per_provider(warmup, rounds) calls in all."""
    device = x.device
    step, info = prepare_provider(provider, tv_model, x, mode, precision, reference_logits, warmup, progress,
                                  recompute_bn_relu=recompute_bn_relu)
    if rounds is None:
        rounds = rounds_for(info.pop("seconds_per_call"), target_seconds, lo=5, hi=max_rounds)
    else:
        info.pop("seconds_per_call")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        memory_before_mib = torch.cuda.memory_allocated(device) / 2**20
    times = measure(step, device, rounds, progress=None if progress is None else lambda: progress("timed"))
    row = dict(provider=provider, status="ok", **summarize(times), **info)
    row["images_per_s"] = x.shape[0] / (row["median_ms"] / 1e3)
    if device.type == "cuda":
        # Peak over the timed steps; memory_before: what was held when they began (the model,
        # its gradients and optimizer state, the input), so peak - before is the step's own.
        row["peak_memory_mib"] = max_memory_mib(device)
        row["memory_before_mib"] = memory_before_mib
    del step
    release_memory(device)
    return row
