"""The main job: how much faster is the fused ResNet, and is it still the same network?

    python -m resnet_fused.benchmark [--model resnet50] [--batch 64] [--precision bf16]
                                     [--mode infer|train] [--compile] [--max-autotune] [--json PATH]

Runs on the best device present. For each provider (the fused model on each fused backend,
on `auto`, torchvision eager at its strongest: channels_last and the same precision, and
optionally torch.compile of torchvision) it times inference or a full training step
(forward, backward, SGD step) and prints the median time with its 20th/80th percentiles and
their ratio (a warning, with a hint, when that spread is wide), images/s, the speedup over
torchvision eager measured in the same run, the largest |logit difference| against torchvision
on the same input (eval mode, checked before any timed step), the peak GPU memory, and which
backend the fused ops actually ran on.

Under torchrun (`torchrun --nproc_per_node=N -m resnet_fused.benchmark --mode train`) every
provider trains as DistributedDataParallel on N processes (NCCL on GPUs, gloo on CPU; --sync-bn
synchronizes BatchNorm), and rank 0 prints the global images/s and the spread between the ranks.

On CPU only the reference path can run: the fused CUDA and Triton kernels need a GPU, and
the output says so. The pieces below (providers, steps, timing) are shared with the
pytest-benchmark suites and the GPU report in benchmarks/.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torchvision

import resnet_fused

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Every model provider. "fused-*" are resnet_fused models on one backend; the rest are
# torchvision's model, eager or compiled.
FUSED_PROVIDERS = ("fused-cuda", "fused-triton", "fused-auto", "fused-reference")
TORCHVISION_PROVIDERS = (
    "torchvision-eager",
    "torchvision-compile",                     # torch.compile(model), default mode
    "torchvision-compile-max-autotune",        # mode="max-autotune"
    "torchvision-compile-max-autotune-freezing",  # and torch._inductor.config.freezing (inference only)
)
MODEL_PROVIDERS = FUSED_PROVIDERS + TORCHVISION_PROVIDERS
EAGER = "torchvision-eager"


def provider_backend(provider: str) -> str | None:
    """The resnet_fused backend a provider runs on (None: torchvision's model)."""
    return provider.removeprefix("fused-") if provider.startswith("fused-") else None


def provider_skip_reason(provider: str, device: torch.device, mode: str = "infer") -> str | None:
    """Why `provider` cannot run here, or None."""
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {MODEL_PROVIDERS}")
    backend = provider_backend(provider)
    if backend in ("cuda", "triton"):
        if device.type != "cuda":
            # Under TRITON_INTERPRET=1 the Triton kernels run on CPU, but the interpreter is a
            # test vehicle: timing it would say nothing about the kernels.
            return f"the fused {backend} kernels need a CUDA GPU"
        return resnet_fused.available_backends()[backend]
    if provider.endswith("-freezing") and mode != "infer":
        return "inductor freezing applies to inference only"
    return None


def default_providers(device: torch.device, compile_default: bool = False, max_autotune: bool = False) -> list[str]:
    """The providers the main job compares by default on this device (skipped ones included,
    so the table says why they did not run)."""
    out = ["fused-cuda", "fused-triton", "fused-auto" if device.type == "cuda" else "fused-reference", EAGER]
    if compile_default:
        out.append("torchvision-compile")
    if max_autotune:
        out += ["torchvision-compile-max-autotune", "torchvision-compile-max-autotune-freezing"]
    return out


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for `precision` (fp32: none; TF32 is a global switch)."""
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def configure_device(device: torch.device) -> None:
    """Eager at its strongest on a GPU: cuDNN autotuning, TF32 for float32 (the
    'fp32/TF32' precision; the fused kernels follow the same flags)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Freshly initialized BatchNorm (mean 0, var 1, gamma 1, beta 0) would make the logit
    check trivially exact; give every BN the non-trivial statistics a trained model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t, (lo, hi) in ((m.running_mean, (-0.5, 0.5)), (m.running_var, (0.5, 1.5)),
                                    (m.weight, (0.5, 1.5)), (m.bias, (-0.5, 0.5))):
                    t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    return model


# --model timm:NAME and hf:NAME: ResNets of other libraries, fused with resnet_fused.fuse.
# hf: models are built from a transformers ResNetConfig (no download): these names.
HF_RESNETS = {
    "resnet-50": dict(),  # ResNetConfig's defaults are ResNet-50's
    "resnet-18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
}


class LogitsOf(torch.nn.Module):
    """A transformers image classifier returning its logits tensor (its own ModelOutput otherwise)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def library_of(name: str) -> str:
    """"timm", "hf" or "torchvision": which library builds --model `name`."""
    prefix, _, rest = name.partition(":")
    return prefix if rest and prefix in ("timm", "hf") else "torchvision"


def _build_base(name: str) -> torch.nn.Module:
    library, model_name = library_of(name), name.partition(":")[2]
    if library == "timm":
        import timm

        return timm.create_model(model_name, pretrained=False)
    if library == "hf":
        from transformers import ResNetConfig, ResNetForImageClassification

        return LogitsOf(ResNetForImageClassification(ResNetConfig(num_labels=1000, **HF_RESNETS[model_name])))
    return getattr(torchvision.models, name)()


def torchvision_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The unfused model `name` (torchvision's, or timm:/hf: another library's; random weights,
    non-trivial BatchNorm), channels_last on `device`: what every provider starts from."""
    torch.manual_seed(seed)
    model = randomize_batchnorm(_build_base(name), seed)
    return model.to(device, memory_format=torch.channels_last)


def fused_copy(model: torch.nn.Module) -> torch.nn.Module:
    """resnet_fused's version of the unfused `model`: from_torchvision for torchvision's ResNets,
    fuse for the other libraries' (both copy)."""
    if isinstance(model, torchvision.models.ResNet):
        return resnet_fused.from_torchvision(model)
    return resnet_fused.fuse(model)


def model_input(batch: int, image_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A fixed random image batch, channels_last."""
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    return x.to(device).contiguous(memory_format=torch.channels_last)


def build_model(provider: str, tv_model: torch.nn.Module, recompute_bn_relu: bool = False,
                wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> torch.nn.Module:
    """A fresh model for `provider` with tv_model's parameters and buffers (tv_model is left as it is).
    recompute_bn_relu: fused models keep only the pre-BatchNorm activations in training. wrap, if
    given, is applied before torch.compile (DistributedDataParallel goes inside the compiled model,
    so that compile splits the graph at DDP's gradient buckets)."""
    wrap = wrap or (lambda model: model)
    backend = provider_backend(provider)
    if backend is not None:
        model = fused_copy(tv_model)
        return wrap(resnet_fused.nn.set_recompute_bn_relu(model, recompute_bn_relu))
    model = wrap(copy.deepcopy(tv_model))
    if provider == EAGER:
        return model
    # Each compiled provider starts from an empty dynamo cache: every new model instance adds
    # cache entries for the same forward code, and past torch._dynamo's recompile limit it
    # would silently fall back to eager.
    torch._dynamo.reset()
    mode = None if provider == "torchvision-compile" else "max-autotune"
    return torch.compile(model, mode=mode)


def _provider_context(provider: str) -> contextlib.AbstractContextManager:
    """Entered around every call of the provider's model."""
    backend = provider_backend(provider)
    if backend is not None:
        return resnet_fused.use_backend(backend)
    if provider.endswith("-freezing"):
        # Read when inductor compiles, i.e. on the first (warm-up) call.
        return torch._inductor.config.patch(freezing=True)
    return contextlib.nullcontext()


def model_step(provider: str, model: torch.nn.Module, x: torch.Tensor, mode: str,
               autocast: Callable[[], contextlib.AbstractContextManager],
               after_backward: Callable[[], object] | None = None) -> Callable[[], object]:
    """The timed unit: one inference forward (eval, inference_mode) or one full training step
    (forward, cross-entropy, backward, SGD step with momentum). after_backward, if given, runs
    between the backward and the SGD step (averaging the gradients over processes where
    DistributedDataParallel cannot)."""
    if mode == "infer":
        model.eval()

        def infer():
            with _provider_context(provider), torch.inference_mode(), autocast():
                return model(x)
        return infer
    if mode != "train":
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)

    def train():
        with _provider_context(provider):
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x), target)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
        return loss
    return train


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, rounds: int, flush_l2: bool = False,
            progress: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of fn over `rounds` calls (warm fn up first: nothing here compiles).

    On a GPU each call sits between two CUDA events and the host synchronizes once at the
    end, so the times are the GPU's (plus any launch gaps the host leaves). With
    flush_l2, a 256 MiB buffer is zeroed before each call, outside the events, so no
    call finds its inputs in L2 from the previous one. progress, if given, is called after
    each call, outside the timed region (on a GPU: once the host has queued the call)."""
    if device.type != "cuda":
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if progress is not None:
                progress()
        return times
    l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    for start, end in zip(starts, ends, strict=True):
        if l2_flush is not None:
            l2_flush.zero_()
        start.record()
        fn()
        end.record()
        if progress is not None:
            progress()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)]


def rounds_for(seconds_per_call: float, target_seconds: float, lo: int, hi: int) -> int:
    """How many timed rounds fill about target_seconds, within [lo, hi]."""
    return int(min(hi, max(lo, target_seconds / max(seconds_per_call, 1e-6))))


def summarize(times: list[float]) -> dict:
    """Median and 20th/80th percentiles, in milliseconds."""
    ordered = sorted(times)

    def pct(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return dict(median_ms=statistics.median(ordered) * 1e3, p20_ms=pct(0.2), p80_ms=pct(0.8), rounds=len(times))


# Above this p80/p20 ratio the main job warns that its timings are noisy. On a quiet machine with
# one thread per core the ratio stays within a few percent; CPU thread oversubscription or
# other work on the machine spreads it 1.3 to 3 times (and moves the median 5 to 20 times).
# At 1.25 the middle 60% of the timings span 25%: as wide as the differences the speedup
# column is meant to resolve, so past it the medians and the speedups are not to be trusted.
SPREAD_WARN_RATIO = 1.25


def spread(row: dict) -> float:
    """p80/p20 of a timed result row (1.0: every timing the same)."""
    return row["p80_ms"] / row["p20_ms"] if row["p20_ms"] > 0 else float("inf")


def timing_warning(rows: list[dict], device_type: str = "cpu", threshold: float = SPREAD_WARN_RATIO,
                   threads: int | None = None, cpus: int | None = None) -> str | None:
    """The warning the main job gives when any timed row's p80/p20 exceeds threshold, with a hint
    how to get stable numbers on device_type; None when every spread is within it. threads and
    cpus (torch's intra-op threads, the machine's CPUs) go into the CPU hint when given."""
    wide = [(r["provider"], spread(r)) for r in rows if r.get("status") == "ok" and spread(r) > threshold]
    if not wide:
        return None
    listed = ", ".join(f"{provider} {ratio:.2f}" for provider, ratio in wide)
    text = (f"noisy timings: p80/p20 exceeds {threshold:.2f} for {listed}; the medians and the speedup "
            "column can be off by that much. ")
    if device_type == "cpu":
        text += "For stable CPU numbers, run nothing else on the machine"
        if threads == 1:
            text += (" (torch already ran one thread here, so other work on the machine is the likely cause); "
                     "more --iters also help.")
        else:
            used = f" (torch used {threads} threads on {cpus} CPUs here)" if threads and cpus else ""
            text += (f" and do not oversubscribe its cores{used}: set OMP_NUM_THREADS=1 (or "
                     "torch.set_num_threads(1)) when the machine is shared, at most the number of physical "
                     "cores when it is not; more --iters also help.")
    else:
        text += ("For stable GPU numbers, run nothing else on the GPU or the host, and give it more --iters "
                 "and --warmup.")
    return text


def calls_per_provider(warmup: int, rounds: int) -> int:
    """How many model calls prepare_provider and run_model_provider make for one provider: the
    logit check, the first step, max(warmup, 1) warm-up steps, then `rounds` timed steps (what
    their progress callback counts)."""
    return 2 + max(warmup, 1) + rounds


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


def max_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def prepare_provider(provider: str, tv_model: torch.nn.Module, x: torch.Tensor, mode: str, precision: str,
                     reference_logits: torch.Tensor, warmup: int,
                     progress: Callable[[str], object] | None = None, *,
                     recompute_bn_relu: bool = False,
                     torchrun: Torchrun | None = None) -> tuple[Callable[[], object], dict]:
    """Builds `provider`'s model, checks its eval logits against reference_logits (before any
    training step changes the weights), then warms its step up. The logit check and the first
    step (torch.compile, Triton autotuning, cuDNN's search happen there) are timed together as
    warmup_s; then `warmup` more steps. progress, if given, is called after each model call
    with its phase ("check", then "warm-up"). In training, info["saved_mib"] is the activation
    memory one forward keeps for backward (saved_activation_bytes; not for compiled models,
    whose saved tensors autograd hooks do not see). torchrun, under torchrun, makes the model data-parallel
    over the processes (Torchrun.wrap) before the check. Returns (step, info)."""
    if progress is None:
        def progress(phase):
            pass
    device = x.device
    autocast = autocast_for(device, precision)
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
    with _provider_context(provider), torch.inference_mode(), autocast():
        if provider_backend(provider) is not None:
            with record_backends() as counts:
                logits = model(x)
            info["backends_used"] = dict(counts)
        else:
            logits = model(x)
        info["max_abs_logit_diff"] = (logits.float() - reference_logits).abs().max().item()
    del logits
    progress("check")
    if mode == "train" and "compile" not in provider:
        model.train()
        with _provider_context(provider), autocast():
            # The module inside any DDP wrapper: the wrapper adds no saved tensors, and a forward
            # through it with no backward would leave DDP's reducer expecting one.
            info["saved_mib"] = saved_activation_bytes(unwrapped, x) / 2**20
    step = model_step(provider, model, x, mode, autocast, after_backward)
    step()
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


def release_memory(device: torch.device) -> None:
    """Frees what the previous provider held, so peak memory is per provider."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reference_logits_for(tv_model: torch.nn.Module, x: torch.Tensor, precision: str) -> torch.Tensor:
    """torchvision eager's eval logits, float32: what every provider is compared with."""
    tv_model.eval()
    with torch.inference_mode(), autocast_for(x.device, precision)():
        return tv_model(x).float()


# Under torchrun: every provider trains as DistributedDataParallel on every process. ---------

@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process sits in a torchrun job (from torchrun's environment variables)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // self.local_world_size)


def launch_from_env(env=None) -> Launch | None:
    """This process's place in a torchrun job, or None when torchrun did not start it (no RANK and
    WORLD_SIZE in the environment). ValueError for values torchrun never sets."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank, local_world = int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        found = ", ".join(f"{name}={env[name]!r}" for name in names if name in env)
        raise ValueError(f"expected integers in torchrun's variables, got {found}") from None
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
        raise ValueError(f"expected 0 <= RANK < WORLD_SIZE and 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE, "
                         f"got RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}, "
                         f"LOCAL_WORLD_SIZE={local_world}")
    return Launch(rank, local_rank, world, local_world)


def broadcast_state(model: torch.nn.Module, src: int = 0) -> None:
    """Rank src's parameters and buffers on every process, as DistributedDataParallel starts."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor, src)


def average_gradients(model: torch.nn.Module) -> None:
    """What DistributedDataParallel does after backward, without its overlap: every gradient
    averaged over the processes, through one flat buffer (two parameters' gradients may share
    storage, which all-reducing each in place would reduce twice)."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


@dataclasses.dataclass
class Wrapped:
    """A provider's model made data-parallel."""

    model: torch.nn.Module  # what the training step calls (DDP, or the module itself)
    module: torch.nn.Module  # the model inside any wrapper
    after_backward: Callable[[], object] | None  # averages the gradients when DDP does not
    notes: dict  # how: gradient_sync and sync_bn, for the result row


class Torchrun:
    """The process group of a torchrun job (NCCL on CUDA, gloo on CPU) and how each provider's
    model joins it."""

    def __init__(self, launch: Launch, device: torch.device, sync_bn: bool):
        self.launch, self.device, self.sync_bn = launch, device, sync_bn
        self.backend = "nccl" if device.type == "cuda" else "gloo"

    def __enter__(self) -> Torchrun:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(self.backend)  # torchrun's env:// rendezvous
        return self

    def __exit__(self, *exc) -> None:
        dist.destroy_process_group()

    def wrap(self, provider: str, model: torch.nn.Module) -> Wrapped:
        """With --sync-bn: resnet_fused.SyncBatchNorm for the fused providers (fused synchronized
        units) and torch.nn.SyncBatchNorm for torchvision's, except on CPU, where torch's module
        cannot train and resnet_fused.SyncBatchNorm (torch's, plus a CPU all-reduce) stands in.
        Then DistributedDataParallel, except with SyncBatchNorm on CPU, which DDP refuses: there the
        gradients are averaged after backward (average_gradients)."""
        notes: dict = dict(sync_bn=None, gradient_sync="DistributedDataParallel")
        if self.sync_bn:
            if provider_backend(provider) is None and self.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
                notes["sync_bn"] = "torch.nn.SyncBatchNorm"
            else:
                model = resnet_fused.convert_sync_batchnorm(model)
                notes["sync_bn"] = "resnet_fused.SyncBatchNorm"
            if self.device.type == "cpu":
                broadcast_state(model)
                notes["gradient_sync"] = "all_reduce after backward (DDP refuses SyncBatchNorm on CPU)"
                return Wrapped(model, model, lambda: average_gradients(model), notes)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return Wrapped(ddp, model, None, notes)

    def skip_reason(self, provider: str, mode: str) -> str | None:
        """provider_skip_reason on every process: skipped if any process cannot run it (the
        processes must run the same providers, or their collectives would not match)."""
        reasons = [None] * self.launch.world_size
        dist.all_gather_object(reasons, provider_skip_reason(provider, self.device, mode))
        for rank, reason in enumerate(reasons):
            if reason is not None:
                return reason if all(r == reason for r in reasons) else f"rank {rank}: {reason}"
        return None


def combine_ranks(provider: str, per_rank: list[dict], batch: int) -> dict:
    """One result row from every rank's: the timings of the slowest rank (it sets the pace of
    synchronized steps), images/s of all processes together (world size x batch / that rank's
    median), rank_spread (slowest median / fastest median), the largest logit difference and peak
    memory of any rank; per_rank keeps each rank's own."""
    slowest = max(per_rank, key=lambda r: r["median_ms"])
    fastest = min(per_rank, key=lambda r: r["median_ms"])
    row = dict(provider=provider, status="ok", **{k: slowest[k] for k in ("median_ms", "p20_ms", "p80_ms", "rounds")})
    row.update(
        images_per_s=len(per_rank) * batch / (slowest["median_ms"] / 1e3),
        slowest_rank=slowest["rank"],
        rank_spread=slowest["median_ms"] / fastest["median_ms"] if fastest["median_ms"] > 0 else float("inf"),
        max_abs_logit_diff=max(r["max_abs_logit_diff"] for r in per_rank),
        backends_used=per_rank[0]["backends_used"], saved_mib=per_rank[0]["saved_mib"],
        warmup_s=max(r["warmup_s"] for r in per_rank),
        sync_bn=per_rank[0]["sync_bn"], gradient_sync=per_rank[0]["gradient_sync"],
    )
    if per_rank[0].get("peak_memory_mib") is not None:
        row["peak_memory_mib"] = max(r["peak_memory_mib"] for r in per_rank)
        row["memory_before_mib"] = max(r["memory_before_mib"] for r in per_rank)
    keep = ("rank", "host", "median_ms", "p20_ms", "p80_ms", "images_per_s", "max_abs_logit_diff", "peak_memory_mib")
    row["per_rank"] = [{k: r[k] for k in keep if k in r} for r in per_rank]
    return row


def run_torchrun_provider(provider: str, tv_model: torch.nn.Module, x: torch.Tensor, precision: str,
                          reference_logits: torch.Tensor, torchrun: Torchrun, *, warmup: int, rounds: int,
                          progress: Callable[[str], object] | None = None,
                          recompute_bn_relu: bool = False) -> dict | None:
    """Times one provider's data-parallel training step on every process (each on its own input x)
    and returns the combined row (combine_ranks) on rank 0, None elsewhere. The processes start the
    timed steps together."""
    device = x.device
    step, info = prepare_provider(provider, tv_model, x, "train", precision, reference_logits, warmup, progress,
                                  recompute_bn_relu=recompute_bn_relu, torchrun=torchrun)
    info.pop("seconds_per_call")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        info["memory_before_mib"] = torch.cuda.memory_allocated(device) / 2**20
    dist.barrier()
    times = measure(step, device, rounds, progress=None if progress is None else lambda: progress("timed"))
    own = dict(rank=torchrun.launch.rank, host=platform.node(), **summarize(times), **info)
    own["images_per_s"] = x.shape[0] / (own["median_ms"] / 1e3)
    if device.type == "cuda":
        own["peak_memory_mib"] = max_memory_mib(device)
    del step
    release_memory(device)
    per_rank = [None] * torchrun.launch.world_size
    dist.all_gather_object(per_rank, own)
    return combine_ranks(provider, per_rank, x.shape[0]) if torchrun.launch.rank == 0 else None


def program_name(run_as_main: bool, module: str | None, argv0: str) -> str:
    """How the main job was started, as a user would type it: `python -m resnet_fused.benchmark`
    (run_as_main, module: the -m module name), `python path/to/benchmark.py` (run_as_main, no
    module), or the console script's name (resnet-fused-benchmark: argv0's basename)."""
    if run_as_main:
        return f"python -m {module}" if module else f"python {argv0}"
    name = os.path.basename(argv0)
    for suffix in (".exe", "-script.py"):  # Windows console-script launchers
        name = name.removesuffix(suffix)
    return name or "resnet-fused-benchmark"


def command_line(argv: list[str] | None, *, run_as_main: bool, module: str | None, argv0: str,
                 launch: Launch | None = None) -> str:
    """The command that ran, for the JSON's provenance. argv None: the command line (program_name
    and sys.argv[1:]); argv given: main was called from Python with it, and that call is recorded.
    Under torchrun (launch), the torchrun command that starts this program on as many processes per
    node and nodes (its rendezvous options are not known here)."""
    if argv is not None and not run_as_main:
        return f"resnet_fused.benchmark.main({list(argv)!r})"
    args = list(argv) if argv is not None else sys.argv[1:]
    program = program_name(run_as_main, module, argv0)
    if launch is not None:
        nodes = f"--nnodes={launch.nodes} " if launch.nodes > 1 else ""
        torchrun = f"torchrun {nodes}--nproc_per_node={launch.local_world_size} "
        program = torchrun + (program.removeprefix("python ") if program.startswith("python ")
                              else "--no-python " + program)
    return " ".join([program, *map(shlex.quote, args)])


def _this_program() -> str:
    return program_name(__name__ == "__main__", __spec__.name if __spec__ else None, sys.argv[0])


def fused_model_names() -> list[str]:
    """The --model names: resnet_fused's builders (each the name of the torchvision ResNet it
    fuses whole, so every one of them runs its convolutions, BatchNorms and ReLUs fused)."""
    registered = set(torchvision.models.list_models(module=resnet_fused))
    return [name for name in resnet_fused.models.__all__ if resnet_fused.models.REGISTRY_PREFIX + name in registered]


def _int_at_least(minimum: int, expected: str):
    """An argparse type for an integer >= minimum: anything else is an error naming `expected`,
    never a request for the default."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")  # counts: 0 or less is an error
nonnegative_int = _int_at_least(0, "an integer of 0 or more")  # counts where 0 means none


def model_error(name: str) -> str | None:
    """Why --model `name` cannot be benchmarked, or None (for timm: and hf: names, what can be
    told before building the model; nothing_fused_error says the rest)."""
    library, model_name = library_of(name), name.partition(":")[2]
    if library == "timm":
        try:
            import timm
        except ImportError:
            return "timm: models need timm installed (pip install timm)"
        if model_name not in timm.list_models():
            close = difflib.get_close_matches(model_name, timm.list_models("*resnet*"), n=1)
            hint = f" (did you mean timm:{close[0]}?)" if close else ""
            return f"timm has no model {model_name!r}{hint}; see timm.list_models()"
        return None
    if library == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return "hf: models need transformers installed (pip install transformers)"
        if model_name not in HF_RESNETS:
            return f"unknown transformers ResNet {model_name!r}; choose from " + ", ".join(
                f"hf:{n}" for n in HF_RESNETS)
        return None
    names = fused_model_names()
    if name in names:
        return None
    choices = "choose from " + ", ".join(names)
    if name in torchvision.models.list_models(module=torchvision.models):
        # It would run, but with nothing fused both sides are torchvision's model and the
        # speedup column would only show noise.
        return (f"torchvision's {name} has no ResNet blocks, so resnet_fused fuses nothing in it and there "
                f"is no speedup to measure; {choices}")
    close = difflib.get_close_matches(name.lower(), names, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown model {name!r}{hint}; {choices} (or timm:NAME, hf:resnet-50)"


def nothing_fused_error(name: str, model: torch.nn.Module) -> str | None:
    """For a timm: or hf: model: why benchmarking it would measure nothing (fuse finds no unit
    in it), with fuse's summary; None when something runs fused."""
    if library_of(name) == "torchvision":
        return None
    summary = resnet_fused.fuse_summary(resnet_fused.fuse(model))
    if summary.units:
        return None
    return (f"resnet_fused.fuse finds no conv + BatchNorm unit in {name} ({len(summary.unfused)} pairs it cannot "
            f"fuse, {len(summary.convs_without_norm)} convs without a BatchNorm), so there is no speedup to measure")


def device_error(text: str) -> str | None:
    """Why --device `text` cannot be used here, or None."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return f"expected cpu, cuda or cuda:N, got {text!r}"
    if device.type == "cpu":
        return None
    if not torch.cuda.is_available():
        build = "" if torch.version.cuda else " (this torch is a CPU-only build)"
        return (f"{text} asked for, but torch sees no CUDA GPU here{build}; "
                "use --device cpu, or leave --device out to use the best device present")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"{text} asked for, but torch sees {count} CUDA GPU(s) here (cuda:0 to cuda:{count - 1})"
    return None


def torchrun_device_error(text: str | None, launch: Launch) -> str | None:
    """Why this torchrun process cannot run on --device `text` (None: the default), or None. Each
    process takes cuda:LOCAL_RANK, so a GPU index is not for the user to give."""
    if text is not None and ":" in text:
        return f"under torchrun each process takes cuda:LOCAL_RANK; give cuda or cpu, not {text}"
    if text is None and not torch.cuda.is_available():
        return None
    if torch.device(text or "cuda").type == "cpu":
        return None
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        return (f"process LOCAL_RANK={launch.local_rank} needs cuda:{launch.local_rank}, but torch sees {count} "
                f"CUDA GPU(s) here; start at most {count} processes per node (--nproc_per_node) "
                "or use --device cpu")
    return None


def last_stage_size(image_size: int) -> int:
    """Height (= width) of a torchvision ResNet's last stage for image_size: the stem's strided
    convolution, its max pooling and the three strided stages each halve it, rounding up."""
    for _ in range(5):
        image_size = -(-image_size // 2)
    return image_size


def json_path_error(path: str) -> str | None:
    """Why the results cannot be written to `path`, or None: checked before the run, so that a
    long benchmark does not end in an unwritable file."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        return f"{path} is a directory; give a file path, e.g. {os.path.join(path, 'results.json')}"
    if not os.path.isdir(directory):
        return f"directory {directory} does not exist; create it first or choose another path"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"cannot write {path} (no write permission)"
    return None


def provider_list(text: str) -> list[str]:
    """--providers as a list, torchvision eager (the speedup baseline) first when it is missing."""
    providers = [p.strip() for p in text.split(",") if p.strip()]
    if EAGER not in providers:
        providers.insert(0, EAGER)
    return providers


class _ArgumentParser(argparse.ArgumentParser):
    """Under torchrun every process checks the same arguments; only local rank 0 of each node
    prints the error (quiet), and every process exits with 2."""

    quiet = False

    def error(self, message):
        if self.quiet:
            sys.exit(2)
        super().error(message)


def _parse(argv):
    p = _ArgumentParser(prog=_this_program(), description=__doc__.split("\n\n")[0])
    try:
        launch, launch_problem = launch_from_env(), None
    except ValueError as exc:
        launch, launch_problem = None, str(exc)
    p.quiet = launch is not None and launch.local_rank != 0
    p.add_argument("--model", default="resnet50",
                   help="builder name: " + ", ".join(fused_model_names())
                        + "; or timm:NAME (a timm model, fused with resnet_fused.fuse) or hf:resnet-50 / hf:resnet-18 "
                          "(transformers' ResNet built from its config)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default: 64 on GPU, 4 on CPU)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input H=W (default: 224 on GPU, 96 on CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision (default: bf16 on GPU, fp32 on CPU); fp32 allows TF32 on GPU")
    p.add_argument("--mode", choices=("infer", "train"), default="infer",
                   help="infer: eval forward under inference_mode; train: forward, backward, SGD step")
    p.add_argument("--iters", type=positive_int, default=None, help="timed iterations (default: 50 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="untimed iterations first (default: 10 GPU, 1 CPU)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(torchvision model)")
    p.add_argument("--max-autotune", action="store_true",
                   help="also time torch.compile(mode='max-autotune'), and with inductor freezing for infer "
                        "(slow to compile)")
    p.add_argument("--providers", default=None,
                   help="comma-separated providers to run instead of the defaults; any of "
                        + ", ".join(MODEL_PROVIDERS))
    p.add_argument("--recompute-bn-relu", action="store_true",
                   help="fused models keep only the pre-BatchNorm activations for backward in training "
                        "(resnet_fused.nn.set_recompute_bn_relu); see the saved MiB column")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over all processes (resnet_fused.SyncBatchNorm "
                        "for the fused providers, torch.nn.SyncBatchNorm for torchvision's)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when present); under torchrun cpu or cuda, "
                        "each process then taking cuda:LOCAL_RANK")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results and provenance here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.launch = launch
    # Everything a run could fail on is checked here, before any model is built.
    if launch_problem is not None:
        p.error(f"torchrun's environment: {launch_problem}")
    if launch is None and args.sync_bn:
        p.error("argument --sync-bn: synchronizes BatchNorm across processes, so it needs torchrun: "
                f"torchrun --nproc_per_node=N -m {__spec__.name if __spec__ else 'resnet_fused.benchmark'} "
                "--mode train --sync-bn")
    if launch is not None and args.mode != "train":
        p.error(f"argument --mode: under torchrun the main job times DistributedDataParallel training; "
                f"use --mode train (got {args.mode})")
    if (reason := model_error(args.model)) is not None:
        p.error(f"argument --model: {reason}")
    if args.recompute_bn_relu and library_of(args.model) != "torchvision":
        p.error("argument --recompute-bn-relu: keeps only pre-BatchNorm activations in resnet_fused's own "
                f"ResNet blocks; {args.model} is fused by resnet_fused.fuse, which does not recompute")
    if args.mode == "train" and args.batch == 1 and args.image_size is not None \
            and last_stage_size(args.image_size) == 1:
        # Training BatchNorm needs more than one value per channel; the defaults always have it.
        p.error(f"argument --image-size: with --batch 1 in train mode, --image-size {args.image_size} leaves one "
                "value per BatchNorm channel in the last stage (training BatchNorm needs more); use --batch 2 "
                "or more, or --image-size 33 or more")
    if launch is not None and args.device is not None and ":" in args.device:
        p.error(f"argument --device: {torchrun_device_error(args.device, launch)}")
    if args.device is not None and (reason := device_error(args.device)) is not None:
        p.error(f"argument --device: {reason}")
    if launch is not None and (reason := torchrun_device_error(args.device, launch)) is not None:
        p.error(f"argument --device: {reason}")
    # Under torchrun only rank 0 writes the JSON (on its node's file system).
    if args.json is not None and (launch is None or launch.rank == 0) \
            and (reason := json_path_error(args.json)) is not None:
        p.error(f"argument --json: {reason}")
    if args.providers is not None:
        unknown = [name for name in provider_list(args.providers) if name not in MODEL_PROVIDERS]
        if unknown:
            p.error(f"argument --providers: unknown provider(s) {', '.join(unknown)}; "
                    f"choose from {', '.join(MODEL_PROVIDERS)}")
    args.error = p.error  # for what only a built model can tell (nothing_fused_error)
    return args


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")


def _format_backends(used: dict | None) -> str:
    if not used:
        return "-"
    return ", ".join(f"{name} x{count}" for name, count in sorted(used.items()))


class _ProviderProgress:
    """One tqdm bar per provider, counting its model calls (logit check, warm-up, timed) and
    naming the provider and the phase; a no-op when disabled or tqdm is missing."""

    def __init__(self, enabled: bool):
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass
        self.bar, self.phase = None, None

    def start(self, label: str, total: int) -> None:
        if self.tqdm is not None:
            self.bar = self.tqdm(total=total, desc=label, unit="call", file=sys.stderr, leave=False,
                                 dynamic_ncols=True)
            self.phase = None

    def __call__(self, phase: str) -> None:
        if self.bar is not None:
            if phase != self.phase:
                self.phase = phase
                self.bar.set_postfix_str(phase, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.tqdm is not None:
            self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _provider_rows(providers, tv_model, x, args, precision, reference_logits, warmup, iters,
                   torchrun: Torchrun | None) -> list[dict]:
    """One result row per provider, skipped ones included (under torchrun: rank 0's rows; the other
    processes return an empty list)."""
    rows = []
    lead = torchrun is None or torchrun.launch.rank == 0
    progress = _ProviderProgress(enabled=not args.no_progress and lead)
    for index, provider in enumerate(providers, 1):
        label = f"[{index}/{len(providers)}] {provider}"
        if torchrun is None:
            reason = provider_skip_reason(provider, x.device, args.mode)
        else:
            reason = torchrun.skip_reason(provider, args.mode)
        if reason is not None:
            progress.write(f"{label}: skipped ({reason})")
            rows.append(dict(provider=provider, status="skipped", reason=reason))
            continue
        progress.start(label, calls_per_provider(warmup, iters))
        try:
            if torchrun is None:
                rows.append(run_model_provider(provider, tv_model, x, args.mode, precision, reference_logits,
                                               warmup=warmup, rounds=iters, progress=progress,
                                               recompute_bn_relu=args.recompute_bn_relu))
            else:
                rows.append(run_torchrun_provider(provider, tv_model, x, precision, reference_logits, torchrun,
                                                  warmup=warmup, rounds=iters, progress=progress,
                                                  recompute_bn_relu=args.recompute_bn_relu))
        finally:
            progress.close()
    return rows if lead else []


def rank_spread_warning(rows: list[dict], threshold: float = SPREAD_WARN_RATIO) -> str | None:
    """Under torchrun: the warning when one rank's median step is more than threshold times
    another's for any provider (synchronized steps run at the slowest rank's pace), else None."""
    uneven = [(r["provider"], r["rank_spread"], r["slowest_rank"]) for r in rows
              if r.get("status") == "ok" and r["rank_spread"] > threshold]
    if not uneven:
        return None
    listed = ", ".join(f"{provider} {ratio:.2f} (slowest: rank {rank})" for provider, ratio, rank in uneven)
    return (f"uneven ranks: the slowest rank's median step is more than {threshold:.2f}x the fastest's for "
            f"{listed}; the slowest rank sets the pace of every synchronized step, so look for other work on "
            "its GPU or host, or a slower link to it.")


def _print_table(rows, args, *, batch, size, precision, iters, warmup, device, torchrun: Torchrun | None) -> None:
    on_gpu = device.type == "cuda"
    dlogit = "max|dlogit|*" if args.mode == "train" else "max|dlogit|"
    if torchrun is None:
        print(f"\n{args.model} {args.mode} batch={batch} {size}x{size} {precision} on {_device_name(device)} "
              f"(median of {iters} after {warmup} warm-up, p20/p80: its 20th/80th percentiles, spread: p80/p20, "
              f"! above {SPREAD_WARN_RATIO}; speedup vs torchvision-eager, same run)")
    else:
        launch = torchrun.launch
        print(f"\n{args.model} {args.mode}, DistributedDataParallel over {launch.world_size} processes "
              f"({launch.nodes} node(s), {torchrun.backend}{', SyncBatchNorm' if args.sync_bn else ''}), "
              f"batch={batch} per process ({batch * launch.world_size} in all) {size}x{size} {precision} on "
              f"{_device_name(device)} (median of {iters} after {warmup} warm-up on the slowest rank, p20/p80: "
              f"its 20th/80th percentiles, spread: p80/p20, ! above {SPREAD_WARN_RATIO}; img/s: all processes "
              "together; ranks: the slowest rank's median over the fastest's; speedup vs torchvision-eager, "
              "same run)")
    header = (f"{'provider':<42}{'ms/iter':>10}{'p20':>9}{'p80':>9}{'spread':>8}{'img/s':>10}{'speedup':>9}"
              f"{dlogit:>13}")
    if torchrun is not None:
        header += f"{'ranks':>8}"
    if on_gpu:
        header += f"{'peak MiB':>10}"
    if args.mode == "train":
        header += f"{'saved MiB':>11}"
    print(header + "  fused ops ran on")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['provider']:<42}skipped: {r['reason']}")
            continue
        mark = "!" if r["wide_spread"] else " "
        line = (f"{r['provider']:<42}{r['median_ms']:>10.2f}{r['p20_ms']:>9.2f}{r['p80_ms']:>9.2f}"
                f"{r['spread']:>7.2f}{mark}{r['images_per_s']:>10.1f}"
                f"{r['speedup_vs_eager']:>8.2f}x{r['max_abs_logit_diff']:>13.2e}")
        if torchrun is not None:
            line += f"{r['rank_spread']:>7.2f}" + ("!" if r["rank_spread"] > SPREAD_WARN_RATIO else " ")
        if on_gpu:
            line += f"{r['peak_memory_mib']:>10.0f}"
        if args.mode == "train":
            line += f"{r['saved_mib']:>11.1f}" if r.get("saved_mib") is not None else f"{'-':>11}"
        print(line + f"  {_format_backends(r['backends_used'])}")
    if args.mode == "train":
        print("* max|dlogit|: the eval-mode logits against torchvision eager's, checked once before training "
              "(the timed training steps change the weights and are not compared)"
              + ("; the largest over the ranks, each on its own input" if torchrun is not None else ""))
        print("saved MiB: activation memory one forward keeps for backward (autograd's saved tensors, "
              "parameters excluded; - for compiled models)"
              + ("; fused models with --recompute-bn-relu" if args.recompute_bn_relu else ""))
    if torchrun is not None:
        syncs = sorted({(r["sync_bn"], r["gradient_sync"]) for r in rows if r["status"] == "ok"}, key=str)
        for sync_bn, gradient_sync in syncs:
            print(f"gradients: {gradient_sync}" + (f"; BatchNorm: {sync_bn}" if sync_bn else ""))


def main(argv=None) -> int:
    args = _parse(argv)
    launch = args.launch
    use_cuda = torch.cuda.is_available() if args.device is None else torch.device(args.device).type == "cuda"
    if launch is None:
        device = torch.device(args.device or ("cuda" if use_cuda else "cpu"))
    else:
        device = torch.device("cuda", launch.local_rank) if use_cuda else torch.device("cpu")
    on_gpu = device.type == "cuda"
    batch = args.batch if args.batch is not None else (64 if on_gpu else 4)
    size = args.image_size if args.image_size is not None else (224 if on_gpu else 96)
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    iters = args.iters if args.iters is not None else (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    configure_device(device)
    if args.providers:
        providers = provider_list(args.providers)
    else:
        providers = default_providers(device, args.compile, args.max_autotune)
    lead = launch is None or launch.rank == 0
    if not on_gpu and lead:
        print("No CUDA GPU here: the fused CUDA and Triton backends need one, so only the reference "
              "backend (pure PyTorch) runs against torchvision. These CPU numbers say nothing about the "
              "fused kernels.", file=sys.stderr)

    tv_model = torchvision_model(args.model, device)
    if (reason := nothing_fused_error(args.model, tv_model)) is not None:
        args.error(f"argument --model: {reason}")
    if library_of(args.model) != "torchvision" and lead:
        print(resnet_fused.fuse_summary(fused_copy(tv_model)), file=sys.stderr)
    # Under torchrun each process trains on its own images, as with a DistributedSampler.
    x = model_input(batch, size, device, seed=0 if launch is None else launch.rank)
    reference_logits = reference_logits_for(tv_model, x, precision)

    with Torchrun(launch, device, args.sync_bn) if launch is not None else contextlib.nullcontext() as torchrun:
        rows = _provider_rows(providers, tv_model, x, args, precision, reference_logits, warmup, iters, torchrun)
    if not lead:
        return 0
    eager = next((r for r in rows if r["provider"] == EAGER and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok":
            row["spread"] = spread(row)
            row["wide_spread"] = row["spread"] > SPREAD_WARN_RATIO
            if eager is not None:
                row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
    threads, cpus = torch.get_num_threads(), os.cpu_count()
    warning = timing_warning(rows, device.type, SPREAD_WARN_RATIO, threads, cpus)
    uneven = rank_spread_warning(rows) if launch is not None else None

    _print_table(rows, args, batch=batch, size=size, precision=precision, iters=iters, warmup=warmup, device=device,
                 torchrun=torchrun)
    for text in (warning, uneven):
        if text is not None:
            sys.stdout.flush()
            print(f"WARNING: {text}", file=sys.stderr)
    if args.json:
        meta = dict(
            model=args.model, mode=args.mode, batch=batch, image_size=size, precision=precision, iters=iters,
            recompute_bn_relu=args.recompute_bn_relu,
            warmup=warmup, device=_device_name(device), torch=torch.__version__,
            torchvision=torchvision.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if on_gpu else None, resnet_fused=resnet_fused.__version__,
            python=platform.python_version(), backends=resnet_fused.available_backends(),
            command=command_line(argv, run_as_main=__name__ == "__main__",
                                 module=__spec__.name if __spec__ else None, argv0=sys.argv[0], launch=launch),
            logit_check="max_abs_logit_diff: eval-mode logits against torchvision eager's on the same input, "
                        "checked once per provider before any timed step"
                        + (" (before training changes the weights)" if args.mode == "train" else ""),
            threads=threads, interop_threads=torch.get_num_interop_threads(), cpu_count=cpus,
            omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
            spread_warn_ratio=SPREAD_WARN_RATIO, timing_warning=warning,
        )
        if launch is not None:
            meta.update(
                launcher="torchrun", world_size=launch.world_size, local_world_size=launch.local_world_size,
                nodes=launch.nodes, dist_backend=torchrun.backend, sync_bn=args.sync_bn,
                batch_per_process=batch, global_batch=batch * launch.world_size,
                timings="median_ms, p20_ms, p80_ms: the slowest rank's; images_per_s: all processes together "
                        "(world_size x batch_per_process / that median); rank_spread: the slowest rank's "
                        "median over the fastest's; per_rank: each rank's own",
                rank_spread_warning=uneven,
            )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
