"""Per-layer cases shared by test_bench_ops.py and gpu_report.py: the ResNet-50 conv layer
shapes, the providers that run one conv + BatchNorm (+ residual) (+ ReLU) unit, and the
counts (FLOPs, bytes) that turn a time into TFLOP/s or GB/s.

Ops:
  eval       conv + BN (running statistics) (+ residual) (+ ReLU), inference_mode
  train_fwd  the training forward: conv + batch statistics + running-statistics update
             (+ residual) (+ ReLU), autograd recording on
  train_bwd  its backward alone: gradients of x, the conv weight, gamma, beta (and the
             residual) from one retained graph
  add_relu   relu(x + residual), the memory-bound op (shapes: the bottleneck outputs)

Providers:
  fused-cuda, fused-triton, fused-reference   resnet_fused.ops on that backend
  eager-unit     nn.Conv2d + nn.BatchNorm2d (+ residual) + ReLU(inplace), as torchvision's
                 Bottleneck runs them; channels_last (add_relu: torch.relu(x + residual))
  conv-alone     F.conv2d alone (cuDNN on a GPU): the floor a fused unit is measured against
  compile-unit   torch.compile of the eager unit
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import resnet_fused

OPS = ("eval", "train_fwd", "train_bwd", "add_relu")
FUSED = ("fused-cuda", "fused-triton", "fused-reference")
GPU_PROVIDERS = ("conv-alone", "eager-unit", "compile-unit", "fused-triton", "fused-cuda")
CPU_PROVIDERS = ("conv-alone", "eager-unit", "fused-reference", "fused-triton", "fused-cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """One distinct conv layer of a ResNet, with what follows its BatchNorm:
    'relu', 'add_relu' (the block's last conv: + identity, then ReLU) or 'none' (downsample)."""

    name: str        # the first layer with this shape, e.g. "layer2.0.conv2"
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    h_in: int        # input height = width
    epilogue: str
    count: int = 1   # how many layers of the network share this shape and epilogue

    @property
    def h_out(self) -> int:
        return (self.h_in + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def label(self) -> str:
        return f"{self.c_in}x{self.c_out}-k{self.kernel}s{self.stride}-h{self.h_in}-{self.epilogue}"

    def conv_flops(self, batch: int) -> float:
        """Multiply-adds x 2 of the forward convolution."""
        return 2.0 * batch * self.c_out * self.h_out ** 2 * self.c_in * self.kernel ** 2


def resnet_conv_layers(arch: str = "resnet50", image_size: int = 224) -> list[ConvLayer]:
    """Every distinct conv layer of torchvision's `arch` at image_size, in network order,
    traced from the model itself (on the meta device: no weights, no compute)."""
    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    seen: list[tuple[str, nn.Conv2d, int]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, m, args[0].shape[-1])))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    model.eval()(torch.empty(1, 3, image_size, image_size, device="meta"))
    for h in hooks:
        h.remove()
    layers: dict[tuple, ConvLayer] = {}
    for name, conv, h_in in seen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if leaf == "0" and parent_name.endswith("downsample"):
            epilogue = "none"
        elif (isinstance(parent, torchvision.models.resnet.Bottleneck) and leaf == "conv3") or (
                isinstance(parent, torchvision.models.resnet.BasicBlock) and leaf == "conv2"):
            epilogue = "add_relu"
        else:
            epilogue = "relu"
        key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0], h_in,
               epilogue)
        if key in layers:
            layers[key] = dataclasses.replace(layers[key], count=layers[key].count + 1)
        else:
            layers[key] = ConvLayer(name, *key)
    return list(layers.values())


def cpu_layers() -> list[ConvLayer]:
    """Three small real ResNet-50 shapes (at 32x32 input) covering the three epilogues and a
    stride-2 conv: the CPU smoke cases."""
    wanted = ("layer1.0.conv2", "layer2.0.conv3", "layer2.0.downsample.0")
    return [layer for layer in resnet_conv_layers("resnet50", image_size=32) if layer.name in wanted]


def add_relu_shapes(layers: list[ConvLayer]) -> list[tuple[int, int]]:
    """(channels, height) of the distinct residual-add outputs."""
    return list(dict.fromkeys((layer.c_out, layer.h_out) for layer in layers if layer.epilogue == "add_relu"))


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One timed cell: an op on one layer (or one add_relu shape) at one batch, by one provider."""

    op: str
    batch: int
    dtype: str
    provider: str
    layer: ConvLayer | None = None        # conv ops
    shape: tuple[int, int] | None = None  # add_relu: (channels, height)

    @property
    def id(self) -> str:
        where = self.layer.label if self.layer is not None else f"{self.shape[0]}x{self.shape[1]}"
        return f"{self.op}-b{self.batch}-{self.dtype}-{where}-{self.provider}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OpCase:
        d = dict(d)
        if d.get("layer") is not None:
            d["layer"] = ConvLayer(**d["layer"])
        if d.get("shape") is not None:
            d["shape"] = tuple(d["shape"])
        return cls(**d)

    def flops(self) -> float | None:
        """Convolution FLOPs (BatchNorm and ReLU are not counted); the backward computes the
        data and the weight gradient: twice the forward's."""
        if self.layer is None:
            return None
        forward = self.layer.conv_flops(self.batch)
        return 2 * forward if self.op == "train_bwd" else forward

    def bytes_moved(self) -> float | None:
        """add_relu's compulsory traffic: read x and residual, write y."""
        if self.op != "add_relu":
            return None
        c, h = self.shape
        return 3.0 * self.batch * c * h * h * DTYPES[self.dtype].itemsize


def op_cases(layers: list[ConvLayer], batches, dtype: str, providers, ops=OPS) -> list[OpCase]:
    """The cases in report order: per op, per batch, per layer, every provider (conv-alone
    has no add_relu case; add_relu has no conv-alone or compile of a conv)."""
    cases = []
    for op in ops:
        for batch in batches:
            if op == "add_relu":
                for shape in add_relu_shapes(layers):
                    cases += [OpCase(op, batch, dtype, p, shape=shape) for p in providers if p != "conv-alone"]
            else:
                for layer in layers:
                    cases += [OpCase(op, batch, dtype, p, layer=layer) for p in providers]
    return cases


def skip_reason(case: OpCase, device: torch.device) -> str | None:
    """Why this case cannot run here, or None."""
    backend = case.provider.removeprefix("fused-") if case.provider in FUSED else None
    if backend in ("cuda", "triton"):
        if device.type != "cuda":
            return f"the fused {backend} kernels need a CUDA GPU (the Triton interpreter is for tests, not timing)"
        return resnet_fused.available_backends()[backend]
    if case.provider == "compile-unit" and device.type != "cuda":
        return "torch.compile units are GPU cases (inductor's CPU compile alone outlasts the CPU smoke)"
    return None


@dataclasses.dataclass
class Unit:
    """A ready-to-time provider: run() is the timed call and returns what is compared with the
    eager unit's outputs; context() is entered around warm-up, checks and timing."""

    run: Callable[[], tuple]
    context: Callable[[], contextlib.AbstractContextManager]
    comparable: bool = True  # False: computes something else (conv-alone), no diff against eager


class EagerUnit(nn.Module):
    """The tail of a torchvision block, as it runs: bn(conv(x)) [+= identity] then ReLU in place."""

    def __init__(self, layer: ConvLayer, dtype: torch.dtype):
        super().__init__()
        self.conv = nn.Conv2d(layer.c_in, layer.c_out, layer.kernel, layer.stride, layer.padding, bias=False)
        self.conv.to(dtype=dtype, memory_format=torch.channels_last)
        self.bn = nn.BatchNorm2d(layer.c_out)  # float32 parameters, as under autocast
        self.relu = nn.ReLU(inplace=True) if layer.epilogue != "none" else None

    def forward(self, x, residual=None):
        out = self.bn(self.conv(x))
        if residual is not None:
            out += residual
        return self.relu(out) if self.relu is not None else out


def make_tensors(case: OpCase, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs and parameters shared by every provider of a case (providers copy them)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]

    def randn(*shape, scale=1.0):
        t = torch.randn(*shape, generator=gen) * scale
        return t.to(device=device, dtype=dtype)

    def uniform(n, lo, hi):
        return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)

    if case.op == "add_relu":
        c, h = case.shape
        return dict(x=randn(case.batch, c, h, h).contiguous(memory_format=torch.channels_last),
                    residual=randn(case.batch, c, h, h).contiguous(memory_format=torch.channels_last))
    layer = case.layer
    fan_in = layer.c_in * layer.kernel ** 2
    out_shape = (case.batch, layer.c_out, layer.h_out, layer.h_out)
    t = dict(
        x=randn(case.batch, layer.c_in, layer.h_in, layer.h_in).contiguous(memory_format=torch.channels_last),
        weight=randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel, scale=fan_in ** -0.5)
        .contiguous(memory_format=torch.channels_last),
        bn_weight=uniform(layer.c_out, 0.5, 1.5), bn_bias=uniform(layer.c_out, -0.5, 0.5),
        running_mean=uniform(layer.c_out, -0.5, 0.5), running_var=uniform(layer.c_out, 0.5, 1.5),
    )
    if layer.epilogue == "add_relu":
        t["residual"] = randn(*out_shape).contiguous(memory_format=torch.channels_last)
    if case.op == "train_bwd":
        t["grad_y"] = randn(*out_shape).contiguous(memory_format=torch.channels_last)
    return t


def _leaf(t: torch.Tensor | None, requires_grad: bool) -> torch.Tensor | None:
    """A private copy (same layout) of a shared tensor."""
    if t is None:
        return None
    return t.detach().clone().requires_grad_(requires_grad and t.is_floating_point())


def make_unit(case: OpCase, tensors: dict[str, torch.Tensor]) -> Unit:
    """The provider's callable for this case, on private copies of `tensors`. For train_bwd the
    forward runs here, once; run() then computes the gradients from the retained graph."""
    training = case.op in ("train_fwd", "train_bwd")
    provider = case.provider
    if case.op == "add_relu":
        x, residual = _leaf(tensors["x"], False), _leaf(tensors["residual"], False)
        if provider in FUSED:
            backend = provider.removeprefix("fused-")
            return Unit(lambda: (resnet_fused.ops.add_relu(x, residual),),
                        lambda: _contexts(resnet_fused.use_backend(backend), torch.inference_mode()))

        def eager(a, b):
            return torch.relu(a + b)
        if provider == "compile-unit":
            torch._dynamo.reset()
            eager = torch.compile(eager, dynamic=False)
        elif provider != "eager-unit":
            raise ValueError(f"no add_relu for provider {provider!r}")
        return Unit(lambda: (eager(x, residual),), torch.inference_mode)

    layer = case.layer
    x = _leaf(tensors["x"], training)
    residual = _leaf(tensors.get("residual"), training)
    weight = _leaf(tensors["weight"], training)
    grad_inputs = [x]

    if provider == "conv-alone":
        def forward():
            return F.conv2d(x, weight, None, layer.stride, layer.padding)
        grad_inputs.append(weight)
        context, comparable = contextlib.nullcontext, False
    elif provider in FUSED:
        backend = provider.removeprefix("fused-")
        bn = {k: _leaf(tensors[k], training and k.startswith("bn_"))
              for k in ("bn_weight", "bn_bias", "running_mean", "running_var")}

        def forward():
            return resnet_fused.ops.conv_bn_relu(
                x, weight, **bn, training=training, stride=layer.stride, padding=layer.padding, residual=residual,
                relu=layer.epilogue != "none")
        grad_inputs += [weight, bn["bn_weight"], bn["bn_bias"]]
        context, comparable = (lambda: resnet_fused.use_backend(backend)), True
    elif provider in ("eager-unit", "compile-unit"):
        module = EagerUnit(layer, DTYPES[case.dtype]).to(x.device).train(training)
        with torch.no_grad():
            module.conv.weight.copy_(tensors["weight"])
            for name, key in (("weight", "bn_weight"), ("bias", "bn_bias"), ("running_mean", "running_mean"),
                              ("running_var", "running_var")):
                getattr(module.bn, name).copy_(tensors[key])
        module.conv.weight.requires_grad_(training)
        module.bn.weight.requires_grad_(training)
        module.bn.bias.requires_grad_(training)
        if provider == "compile-unit":
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic shapes
            module = torch.compile(module, dynamic=False)
        unit_module = module

        def forward():
            return unit_module(x, residual)
        inner = module._orig_mod if provider == "compile-unit" else module
        grad_inputs += [inner.conv.weight, inner.bn.weight, inner.bn.bias]
        context, comparable = contextlib.nullcontext, True
    else:
        raise ValueError(f"unknown provider {provider!r}")
    if residual is not None and provider != "conv-alone":
        grad_inputs.append(residual)

    if case.op == "eval":
        return Unit(lambda: (forward(),), lambda: _contexts(context(), torch.inference_mode()), comparable)
    if case.op == "train_fwd":
        return Unit(lambda: (forward(),), context, comparable)
    with context():
        y = forward()
    grad_y = tensors["grad_y"]

    def backward():
        return torch.autograd.grad(y, grad_inputs, grad_y, retain_graph=True)
    return Unit(backward, context, comparable)


@contextlib.contextmanager
def _contexts(*managers):
    with contextlib.ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def max_abs_diff(outputs: tuple, reference: tuple) -> tuple[float, float]:
    """(largest |output - reference| over all output tensors, largest |reference|)."""
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outputs, reference, strict=True))
    scale = max(b.float().abs().max().item() for b in reference)
    return diff, scale


def reference_outputs(case: OpCase, device: torch.device, tensors: dict[str, torch.Tensor]) -> tuple:
    """The eager unit's outputs for this case: what every other provider is compared with."""
    unit = make_unit(dataclasses.replace(case, provider="eager-unit"), tensors)
    with unit.context():
        return tuple(t.detach().clone() for t in unit.run())


def run_case(case: OpCase, device: torch.device, tensors: dict[str, torch.Tensor], reference: tuple | None = None,
             *, target_seconds: float = 0.2, min_rounds: int = 10, max_rounds: int = 200) -> dict:
    """Warms the provider up (compile, autotune: timed apart as warmup_s), checks it against
    `reference`, then times about target_seconds of calls (median; L2 flushed before each
    call on a GPU). Returns one result row."""
    from resnet_fused.benchmark import measure, rounds_for, summarize, synchronize

    unit = make_unit(case, tensors)
    with unit.context():
        t0 = time.perf_counter()
        outputs = unit.run()
        synchronize(device)
        warmup_s = time.perf_counter() - t0
        diff = scale = None
        if reference is not None and unit.comparable and case.provider != "eager-unit":
            diff, scale = max_abs_diff(outputs, reference)
        del outputs
        t0 = time.perf_counter()
        for _ in range(3):
            unit.run()
        synchronize(device)
        rounds = rounds_for((time.perf_counter() - t0) / 3, target_seconds, min_rounds, max_rounds)
        times = measure(unit.run, device, rounds, flush_l2=True)
    row = dict(kind="op", case=case.to_dict(), id=case.id, status="ok", **summarize(times), warmup_s=warmup_s,
               max_abs_diff=diff, reference_max_abs=scale)
    row.update(throughput(case, row["median_ms"]))
    return row


def throughput(case: OpCase, median_ms: float) -> dict:
    """TFLOP/s for the conv ops, GB/s for add_relu."""
    out = {}
    if case.flops() is not None:
        out["tflops"] = case.flops() / (median_ms / 1e3) / 1e12
    if case.bytes_moved() is not None:
        out["gbps"] = case.bytes_moved() / (median_ms / 1e3) / 1e9
    return out
