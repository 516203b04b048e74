"""The plan: which cases each phase runs, in priority order, and the most seconds each may take."""

from __future__ import annotations

import dataclasses

EAGER = "torchvision-eager"
FUSED_MODEL_PROVIDERS = ("fused-cuda", "fused-triton", "fused-auto")

# What --phases selects from, in the order they run. build and warm run side by side (the
# nvcc build on a few cores, the Triton compiles on the rest); verify is python -m
# resnet_fused.verify, whose verdict (the one `auto` reads) clears a fused backend for the
# benchmarks; smoke is the gpu_smoke test selection, the deeper check, whose failures also
# exclude a backend; tests is the rest of the GPU suite, last, with whatever time is left.
PHASES = ("build", "warm", "verify", "smoke", "models", "ops", "tests")
# The benchmark phases, (name, kind), in order; budget.TIMELINE caps the core ones. The headline
# cases first; --quick skips the "-extra" ones, which mostly wait for later windows
# (--phases models,ops).
SCHEDULE = (("models-core", "models"), ("ops-core", "ops"), ("models-extra", "models"), ("ops-extra", "ops"))


def phase_cases(name: str, kind: str, on_gpu: bool, quick: bool) -> list[dict]:
    """The cases of the benchmark phase `name` (of kind "models" or "ops")."""
    return model_plan(name, on_gpu, quick) if kind == "models" else op_plan(name, on_gpu, quick)


def model_plan(phase: str, on_gpu: bool, quick: bool) -> list[dict]:
    """[{config, provider}] for a models phase."""
    from bench_models import ModelConfig

    def entries(config, providers):
        return [dict(config=config.to_dict(), provider=p) for p in providers]

    fused_and_eager = (EAGER, "fused-cuda", "fused-triton", "fused-auto")
    if not on_gpu:
        smoke = ("torchvision-eager", "fused-reference", "fused-cuda", "fused-triton")
        if phase == "models-core":
            return (entries(ModelConfig("resnet18", "infer", 2, 64, "fp32", smoke), smoke)
                    + entries(ModelConfig("resnet18", "train", 2, 64, "fp32", smoke), smoke))
        return entries(ModelConfig("resnet18", "infer", 1, 64, "fp32", smoke[:2]), smoke[:2])
    if phase == "models-core":
        # The headline: resnet50, bf16, batch 256 at 224, inference then a training step. The
        # fused providers and eager first; torch.compile (default mode) last, its compile slow.
        core = (EAGER, "fused-triton", "fused-cuda")
        infer = ModelConfig("resnet50", "infer", 256, 224, "bf16", ())
        train = ModelConfig("resnet50", "train", 256, 224, "bf16", ())
        return (entries(infer, core) + entries(train, core) + entries(infer, ["torchvision-compile"])
                + entries(train, ["torchvision-compile"]))
    infer = ModelConfig("resnet50", "infer", 256, 224, "bf16", ())
    train = dataclasses.replace(infer, mode="train")
    plan = entries(infer, ["fused-auto"]) + entries(train, ["fused-auto"])
    plan += entries(infer, ["torchvision-compile-max-autotune-freezing"])
    plan += entries(train, ["torchvision-compile-max-autotune"])
    for batch in (32, 1):
        plan += entries(ModelConfig("resnet50", "infer", batch, 224, "bf16", ()), fused_and_eager)
    for precision in ("fp16", "fp32"):
        plan += entries(ModelConfig("resnet50", "infer", 256, 224, precision, ()), fused_and_eager)
    for name in ("resnet18", "resnet101"):
        for mode in ("infer", "train"):
            plan += entries(ModelConfig(name, mode, 256, 224, "bf16", ()), fused_and_eager)
    for batch in (32, 1):
        plan += entries(ModelConfig("resnet50", "infer", batch, 224, "bf16", ()), ["torchvision-compile"])
    # Without host overhead: where it weighs most (small batches), then a training step.
    graphs = ("fused-auto-cuda-graph", "torchvision-eager-cuda-graph")
    for batch in (1, 32):
        plan += entries(ModelConfig("resnet50", "infer", batch, 224, "bf16", ()),
                        graphs + ("torchvision-compile-reduce-overhead",))
    plan += entries(train, graphs)
    plan += entries(ModelConfig("resnet50", "infer", 256, 224, "bf16", ()), ["torchvision-compile-max-autotune"])
    return plan


def op_plan(phase: str, on_gpu: bool, quick: bool) -> list[dict]:
    """[OpCase dict] for an ops phase."""
    import bench_layers as bl

    if not on_gpu:
        layers = bl.cpu_layers()
        if phase == "ops-core":
            return [c.to_dict() for c in bl.op_cases(layers[:2], (2,), "fp32", bl.CPU_PROVIDERS)]
        smoke_providers = ("conv-alone", "eager-unit", "fused-reference")
        return [c.to_dict() for c in bl.op_cases(layers[2:], (1,), "fp32", smoke_providers, ops=("eval",))]
    layers = bl.resnet_conv_layers("resnet50", image_size=224)
    main_providers = ("conv-alone", "eager-unit", "fused-triton", "fused-cuda")
    if phase == "ops-core":
        return [c.to_dict() for c in bl.op_cases(layers, (256,), "bf16", main_providers)]
    cases = bl.op_cases(layers, (256,), "bf16", ("compile-unit",))
    cases += bl.op_cases(layers, (32,), "bf16", main_providers)
    cases += bl.op_cases(layers, (32,), "bf16", ("compile-unit",))
    return [c.to_dict() for c in cases]


def row_base(kind: str, spec: dict) -> dict:
    """The fields every report row of a planned case starts with (kind "ops" or "models")."""
    if kind == "ops":
        import bench_layers as bl

        case = bl.OpCase.from_dict(spec)
        return dict(kind="op", case=case.to_dict(), id=case.id, provider=case.provider)
    from bench_models import ModelConfig

    config = ModelConfig.from_dict(spec["config"])
    return dict(kind="model", config=config.to_dict(), provider=spec["provider"],
                id=f"{config.label}-{spec['provider']}")
