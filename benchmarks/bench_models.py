"""Model-level cases shared by test_bench_models.py and gpu_report.py. The timing, the
providers and the logit check are the main job's (resnet_fused/benchmark/)."""

from __future__ import annotations

import dataclasses

import torch

from resnet_fused import benchmark as mb

# Without host overhead (GPU only): both models captured in a CUDA graph, and
# torch.compile's mode="reduce-overhead".
GRAPH_PROVIDERS = ("fused-auto-cuda-graph", "torchvision-eager-cuda-graph", "torchvision-compile-reduce-overhead")
INFER_PROVIDERS = (
    mb.EAGER, "fused-cuda", "fused-triton", "fused-auto", "torchvision-compile",
    "torchvision-compile-max-autotune", "torchvision-compile-max-autotune-freezing", *GRAPH_PROVIDERS,
)
TRAIN_PROVIDERS = (mb.EAGER, "fused-cuda", "fused-triton", "fused-auto", "torchvision-compile",
                   "torchvision-compile-max-autotune", *GRAPH_PROVIDERS)
CPU_PROVIDERS = (mb.EAGER, "fused-reference", "fused-cuda", "fused-triton")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model setting, timed for each of its providers on the same input."""

    model: str
    mode: str        # "infer": eval forward, inference_mode; "train": forward, backward, SGD step
    batch: int
    image_size: int
    precision: str   # autocast dtype: bf16, fp16, or fp32 (TF32 allowed on a GPU)
    providers: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.model}-{self.mode}-b{self.batch}-{self.image_size}px-{self.precision}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**{**d, "providers": tuple(d["providers"])})


def gpu_configs() -> list[ModelConfig]:
    """The GPU benchmark matrix: resnet50 at 224 (inference at batch 1/32/256 in bf16, fp16,
    fp32/TF32; a bf16 AMP training step at 256), resnet18 and resnet101 as secondary."""
    out = []
    for batch in (256, 32, 1):
        for precision in ("bf16", "fp16", "fp32"):
            out.append(ModelConfig("resnet50", "infer", batch, 224, precision, INFER_PROVIDERS))
    out.append(ModelConfig("resnet50", "train", 256, 224, "bf16", TRAIN_PROVIDERS))
    for name in ("resnet18", "resnet101"):
        out.append(ModelConfig(name, "infer", 256, 224, "bf16", INFER_PROVIDERS))
        out.append(ModelConfig(name, "train", 256, 224, "bf16", TRAIN_PROVIDERS))
    return out


def cpu_configs() -> list[ModelConfig]:
    """Small CPU cases: the harness and the reference path, not a performance claim."""
    return [
        ModelConfig("resnet18", "infer", 2, 64, "fp32", CPU_PROVIDERS),
        ModelConfig("resnet50", "infer", 2, 64, "fp32", CPU_PROVIDERS),
        ModelConfig("resnet18", "train", 2, 64, "fp32", CPU_PROVIDERS),
    ]


def skip_reason(config: ModelConfig, provider: str, device: torch.device) -> str | None:
    reason = mb.provider_skip_reason(provider, device, config.mode)
    if reason is None and provider.startswith("torchvision-compile") and device.type != "cuda":
        reason = "torch.compile providers are GPU cases (inductor's CPU compile of a ResNet outlasts the CPU smoke)"
    return reason


def prepare(config: ModelConfig, device: torch.device):
    """(torchvision model, input, torchvision eager's logits): shared by the config's providers."""
    tv_model = mb.torchvision_model(config.model, device)
    x = mb.model_input(config.batch, config.image_size, device)
    return tv_model, x, mb.reference_logits_for(tv_model, x, config.precision)
