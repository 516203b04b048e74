"""The main job's providers: what each one runs (the fused model on a backend, torchvision's model,
eager, compiled or captured in a CUDA graph), whether it can run here, and its timed step."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

import resnet_fused

from .graphs import capture
from .models import fused_copy

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Every model provider. "fused-*" are resnet_fused models on one backend; the rest are
# torchvision's model, eager or compiled. Each "...-cuda-graph" is a provider above captured
# in a CUDA graph and replayed (graphs.capture); "...-compile-reduce-overhead" is compiled with
# mode="reduce-overhead" (inductor's CUDA graphs).
FUSED_PROVIDERS = ("fused-cuda", "fused-triton", "fused-auto", "fused-reference")
# The fused model after resnet_fused.freeze (BatchNorm folded into the conv weights: inference
# only, within float32 rounding of torchvision's logits rather than its bits).
FROZEN_PROVIDERS = ("fused-auto-frozen", "fused-reference-frozen")
TORCHVISION_PROVIDERS = (
    "torchvision-eager",
    "torchvision-compile",                     # torch.compile(model), default mode
    "torchvision-compile-max-autotune",        # mode="max-autotune"
    "torchvision-compile-max-autotune-freezing",  # and torch._inductor.config.freezing (inference only)
    "torchvision-compile-reduce-overhead",     # mode="reduce-overhead"
)
CUDA_GRAPH_PROVIDERS = ("fused-auto-cuda-graph", "fused-triton-cuda-graph", "fused-cuda-cuda-graph",
                        "torchvision-eager-cuda-graph")
FUSED_COMPILE_PROVIDERS = ("fused-auto-compile-reduce-overhead",)
MODEL_PROVIDERS = (FUSED_PROVIDERS + FROZEN_PROVIDERS + TORCHVISION_PROVIDERS + CUDA_GRAPH_PROVIDERS
                   + FUSED_COMPILE_PROVIDERS)
EAGER = "torchvision-eager"

# torch.compile's mode per compiled provider (None: the default mode).
COMPILE_MODES = {
    "torchvision-compile": None,
    "torchvision-compile-max-autotune": "max-autotune",
    "torchvision-compile-max-autotune-freezing": "max-autotune",
    "torchvision-compile-reduce-overhead": "reduce-overhead",
    "fused-auto-compile-reduce-overhead": "reduce-overhead",
}
GRAPH_WARMUP_STEPS = 3  # steps run on a side stream before the capture, as torch's CUDA-graph guide does


def provider_backend(provider: str) -> str | None:
    """The resnet_fused backend a provider runs on (None: torchvision's model)."""
    if not provider.startswith("fused-"):
        return None
    return provider.removeprefix("fused-").split("-")[0]  # backend names have no hyphen


def uses_cuda_graph(provider: str) -> bool:
    """Whether the provider's step is captured in a CUDA graph and replayed (graphs.capture)."""
    return provider in CUDA_GRAPH_PROVIDERS


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
        if (reason := resnet_fused.available_backends()[backend]) is not None:
            return reason
    if uses_cuda_graph(provider) and device.type != "cuda":
        return "CUDA graphs need a CUDA GPU (torch.cuda.graph captures the kernels a CUDA stream runs)"
    if COMPILE_MODES.get(provider, "") == "reduce-overhead" and device.type != "cuda":
        return "mode='reduce-overhead' is torch.compile's CUDA graphs, so it needs a CUDA GPU"
    if provider.endswith("-freezing") and mode != "infer":
        return "inductor freezing applies to inference only"
    if provider in FROZEN_PROVIDERS and mode != "infer":
        return "resnet_fused.freeze folds the BatchNorm for inference only"
    return None


def default_providers(device: torch.device, compile_default: bool = False, max_autotune: bool = False,
                      cuda_graphs: bool = False, reduce_overhead: bool = False, mode: str = "infer") -> list[str]:
    """The providers the main job compares by default on this device (skipped ones included,
    so the table says why they did not run). On a CPU inference compares the reference path
    unfrozen (torchvision's bits) and frozen (resnet_fused.freeze)."""
    out = ["fused-cuda", "fused-triton", "fused-auto" if device.type == "cuda" else "fused-reference"]
    if device.type != "cuda" and mode == "infer":
        out.append("fused-reference-frozen")
    out.append(EAGER)
    if compile_default:
        out.append("torchvision-compile")
    if max_autotune:
        out += ["torchvision-compile-max-autotune", "torchvision-compile-max-autotune-freezing"]
    if cuda_graphs:
        out += ["fused-auto-cuda-graph", "torchvision-eager-cuda-graph"]
    if reduce_overhead:
        out += ["fused-auto-compile-reduce-overhead", "torchvision-compile-reduce-overhead"]
    return out


def autocast_for(device: torch.device, precision: str,
                 cache_enabled: bool = True) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for `precision` (fp32: none; TF32 is a global switch).
    cache_enabled=False for a step captured in a CUDA graph, as torch requires of autocast there."""
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return contextlib.nullcontext
    if not cache_enabled:
        return lambda: torch.autocast(device.type, dtype=dtype, cache_enabled=False)
    return lambda: torch.autocast(device.type, dtype=dtype)


def configure_device(device: torch.device) -> None:
    """Eager at its strongest on a GPU: cuDNN autotuning, TF32 for float32 (the
    'fp32/TF32' precision; the fused kernels follow the same flags)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def build_model(provider: str, tv_model: torch.nn.Module, recompute_bn_relu: bool = False,
                wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> torch.nn.Module:
    """A fresh model for `provider` with tv_model's parameters and buffers (tv_model is left as it is).
    recompute_bn_relu: fused models keep only the pre-BatchNorm activations in training. wrap, if
    given, is applied before torch.compile (DistributedDataParallel goes inside the compiled model,
    so that compile splits the graph at DDP's gradient buckets)."""
    wrap = wrap or (lambda model: model)
    if provider in FROZEN_PROVIDERS:
        model = wrap(resnet_fused.freeze(fused_copy(tv_model).eval(), inplace=True))
    elif provider_backend(provider) is not None:
        model = wrap(resnet_fused.nn.set_recompute_bn_relu(fused_copy(tv_model), recompute_bn_relu))
    else:
        model = wrap(copy.deepcopy(tv_model))
    if provider not in COMPILE_MODES:
        return model
    # Each compiled provider starts from an empty dynamo cache: every new model instance adds
    # cache entries for the same forward code, and past torch._dynamo's recompile limit it
    # would silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(model, mode=COMPILE_MODES[provider])


def provider_context(provider: str) -> contextlib.AbstractContextManager:
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
    DistributedDataParallel cannot). For a CUDA-graph provider, that step captured after
    GRAPH_WARMUP_STEPS warm-up steps (graphs.capture; autocast must then be made with
    cache_enabled=False), x and the training target its static inputs: each call replays it."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    new_graph_step = COMPILE_MODES.get(provider) == "reduce-overhead"

    def context():
        if new_graph_step:
            # Inductor's CUDA graphs overwrite the last replay's outputs: each step says it is a new one.
            torch.compiler.cudagraph_mark_step_begin()
        return provider_context(provider)
    if mode == "infer":
        model.eval()

        def infer():
            with context(), torch.inference_mode(), autocast():
                return model(x)
        step = infer
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)

        def train():
            with context():
                # set_to_none: in a capture, backward then allocates the gradients from the graph's
                # pool, and each replay writes them afresh.
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = torch.nn.functional.cross_entropy(model(x), target)
                loss.backward()
                if after_backward is not None:
                    after_backward()
                opt.step()
            return loss
        step = train
    return capture(step, warmup=GRAPH_WARMUP_STEPS) if uses_cuda_graph(provider) else step

