"""Host overhead: the Python and dispatch time a fused unit costs per call, beside the eager
modules it replaces, measured on tensors so small that compute is negligible.

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py [--rounds 15] [--json out.json]
    python -m pytest benchmarks/test_bench_host_overhead.py --benchmark-only

Pairs, each timed interleaved in the same process (median of the rounds, one thread):
  unit eval          resnet_fused.nn.ConvBNReLU2d, eval under no_grad, against
                     nn.Sequential(Conv2d, BatchNorm2d, ReLU)
  unit eval frozen   the same unit after resnet_fused.freeze (BatchNorm folded into the conv)
  unit train         the same, training forward + backward
  bottleneck eval    resnet_fused.nn.Bottleneck against torchvision's, eval under no_grad
  bottleneck eval frozen  the same block after resnet_fused.freeze
  triton eval        the Triton backend's own Python for one eval unit (bf16 1x1 256->64 at
                     56x56, meta tensors, launches recorded and not run, as the compile gate
                     does), against the eager unit's eval time from the same run
  triton train fwd   the same for the training forward (conv + statistics + apply)

The CPU runs the reference backend for the first five (what `auto` picks there): on a GPU
these ratios are the host side of a unit, which must stay below the kernels' time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

import resnet_fused

X_SHAPE = (1, 8, 4, 4)       # eval: compute is a few hundred multiply-adds
X_TRAIN_SHAPE = (2, 8, 4, 4)  # training needs more than one value per BatchNorm channel


@dataclasses.dataclass
class Pair:
    name: str
    eager: Callable[[], object]
    fused: Callable[[], object]
    eager_label: str
    fused_label: str
    goal: float  # the fused / eager ratio aimed at


def _unit_modules(training: bool):
    fused = resnet_fused.nn.ConvBNReLU2d(8, 8, 3, padding=1)
    eager = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    eager.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in fused.state_dict().items()})
    return fused.train(training), eager.train(training)


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def unit_eval() -> Pair:
    fused, eager = _unit_modules(False)
    x = torch.randn(X_SHAPE)
    return Pair("unit eval", _no_grad(lambda: eager(x)), _no_grad(lambda: fused(x)),
                "Sequential(Conv2d, BatchNorm2d, ReLU)", "nn.ConvBNReLU2d", 1.25)


def unit_eval_frozen() -> Pair:
    fused, eager = _unit_modules(False)
    frozen = resnet_fused.freeze(fused)
    x = torch.randn(X_SHAPE)
    return Pair("unit eval frozen", _no_grad(lambda: eager(x)), _no_grad(lambda: frozen(x)),
                "Sequential(Conv2d, BatchNorm2d, ReLU)", "freeze(nn.ConvBNReLU2d)", 1.0)


def unit_train() -> Pair:
    fused, eager = _unit_modules(True)
    x = torch.randn(X_TRAIN_SHAPE, requires_grad=True)

    def step(module):
        module(x).sum().backward()

    return Pair("unit train fwd+bwd", lambda: step(eager), lambda: step(fused),
                "Sequential(Conv2d, BatchNorm2d, ReLU)", "nn.ConvBNReLU2d", 1.3)


def _bottlenecks():
    eager = torchvision.models.resnet.Bottleneck(32, 8).eval()
    fused = resnet_fused.nn.Bottleneck(32, 8).eval()
    fused.load_state_dict(eager.state_dict())
    return eager, fused, torch.randn(1, 32, 4, 4)


def bottleneck_eval() -> Pair:
    eager, fused, x = _bottlenecks()
    return Pair("bottleneck eval", _no_grad(lambda: eager(x)), _no_grad(lambda: fused(x)),
                "torchvision Bottleneck", "nn.Bottleneck", 1.25)


def bottleneck_eval_frozen() -> Pair:
    eager, fused, x = _bottlenecks()
    frozen = resnet_fused.freeze(fused)
    return Pair("bottleneck eval frozen", _no_grad(lambda: eager(x)), _no_grad(lambda: frozen(x)),
                "torchvision Bottleneck", "freeze(nn.Bottleneck)", 1.0)


def _triton_launcher(op: str):
    """One call of the Triton backend's op implementation on meta tensors of ResNet-50's
    1x1 256->64 @56 layer (batch 64, bf16, channels_last), its launches recorded, not run; None
    where the Triton backend cannot be imported."""
    try:
        from resnet_fused.backends import triton as triton_backend
        from resnet_fused.backends.triton.kernels import configs, launch
    except Exception:  # noqa: BLE001  (no Triton: the pair is skipped with the reason)
        return None
    if triton_backend._IMPORT_ERROR is not None:
        return None

    def meta(*shape):
        t = torch.empty(shape, dtype=torch.bfloat16, device="meta")
        return t.contiguous(memory_format=torch.channels_last) if len(shape) == 4 else t

    x, w = meta(64, 256, 56, 56), meta(64, 256, 1, 1)
    vec = torch.empty(64, dtype=torch.float32, device="meta")
    geometry = ([1, 1], [0, 0], [1, 1], 1)

    def call():
        with configs.target(90), launch.recording():
            if op == "eval":
                triton_backend.conv_bn_eval(x, w, vec, vec, None, *geometry, True)
            else:
                triton_backend.conv_bn_train(x, w, None, vec, vec, None, *geometry, 1e-5, True)

    return call


def triton_pairs() -> list[Pair]:
    pairs = []
    fused_eval, fused_train = _triton_launcher("eval"), _triton_launcher("train")
    if fused_eval is None:
        return pairs
    unit, eager = _unit_modules(False)
    x = torch.randn(X_SHAPE)
    pairs.append(Pair("triton eval launcher", _no_grad(lambda: eager(x)), fused_eval,
                      "eager unit eval", "Triton conv_bn_eval (recorded)", 0.5))
    _, eager_train = _unit_modules(True)
    xt = torch.randn(X_TRAIN_SHAPE)
    pairs.append(Pair("triton train fwd launcher", lambda: eager_train(xt), fused_train,
                      "eager unit train forward", "Triton conv_bn_train (recorded)", 1.5))
    return pairs


def all_pairs() -> list[Pair]:
    with resnet_fused.use_backend("reference"):
        pairs = [unit_eval(), unit_eval_frozen(), unit_train(), bottleneck_eval(), bottleneck_eval_frozen()]
    return pairs + triton_pairs()


def time_pair(pair: Pair, calls: int = 300, rounds: int = 15, warmup: int = 50) -> dict:
    """Median microseconds per call of each side, rounds interleaved (eager, fused, eager, ...)
    so that a change in machine load hits both."""
    for _ in range(warmup):
        pair.eager(), pair.fused()
    eager, fused = [], []
    for _ in range(rounds):
        for fn, out in ((pair.eager, eager), (pair.fused, fused)):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - start) / calls * 1e6)
    e, f = statistics.median(eager), statistics.median(fused)
    return {"case": pair.name, "eager": pair.eager_label, "fused": pair.fused_label, "eager_us": round(e, 2),
            "fused_us": round(f, 2), "ratio": round(f / e, 3), "goal": pair.goal}


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def run(rounds: int = 15, calls: int = 300) -> dict:
    with resnet_fused.use_backend("reference"):
        rows = [time_pair(pair, calls, rounds) for pair in all_pairs()]
    return {"machine": machine(), "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"{'case':28} {'eager us':>9} {'fused us':>9} {'ratio':>6} {'goal':>6}  fused vs eager"]
    for r in result["rows"]:
        met = "met" if r["ratio"] <= r["goal"] else "NOT met"
        lines.append(f"{r['case']:28} {r['eager_us']:9.1f} {r['fused_us']:9.1f} {r['ratio']:6.2f} "
                     f"{'<=' + format(r['goal'], 'g'):>6}  {r['fused']} vs {r['eager']} ({met})")
    m = result["machine"]
    lines.append(f"torch {m['torch']}, {m['processor']}, {m['cpus']} CPUs, {m['threads']} thread(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/host_overhead.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per pair (median reported)")
    p.add_argument("--calls", type=int, default=300, help="calls per round")
    p.add_argument("--json", help="write the rows and the machine here")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.calls < 1:
        p.error("--rounds and --calls must be positive integers")
    torch.set_num_threads(1)
    result = run(a.rounds, a.calls)
    print(format_table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
