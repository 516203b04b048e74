"""The main job: how much faster is the fused ResNet, and is it still the same network?

    python -m resnet_fused.benchmark [--model resnet50] [--batch 32] [--precision bf16]
                                     [--mode infer|train] [--json results.json]

Runs on the best device present. For each provider (the fused model on each usable
backend, torchvision eager, optionally torch.compile of torchvision) it times
inference or a training step (median of --iters, after --warmup untimed runs; CUDA
events on GPU) and reports images/s, the speedup over torchvision eager measured in
the same run, and the largest |logit difference| against torchvision on the same input.
On CPU only the reference path can run: the fused kernels need a GPU, and this says so.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time

import torch
import torchvision

import resnet_fused

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m resnet_fused.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="builder name, e.g. resnet18, resnet50, resnext50_32x4d")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 64 on GPU, 4 on CPU)")
    p.add_argument("--image-size", type=int, default=None, help="input H=W (default: 224 on GPU, 96 on CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision (default: bf16 on GPU, fp32 on CPU); fp32 allows TF32 on GPU")
    p.add_argument("--mode", choices=("infer", "train"), default="infer")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 50 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 10 GPU, 1 CPU)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(torchvision model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results and provenance here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _timer(device):
    """Returns run(fn, iters) -> list of per-iteration seconds."""
    if device.type == "cuda":
        def run(fn, iters):
            times = []
            for _ in range(iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return times
    else:
        def run(fn, iters):
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return times
    return run


def _step_fn(model, x, mode, autocast):
    if mode == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast():
                return model(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device) % model.fc.out_features

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        return loss
    return train


def _providers(device, args):
    """(name, backend or None for torchvision, compile?) for what can run here."""
    out = []
    reasons = resnet_fused.available_backends()
    if device.type == "cuda":
        for backend in ("cuda", "triton"):
            if reasons[backend] is None:
                out.append((f"fused-{backend}", backend, False))
        out.append(("fused-auto", "auto", False))
    else:
        out.append(("fused-reference", "reference", False))
    out.append(("torchvision-eager", None, False))
    if args.compile:
        out.append(("torchvision-compile", None, True))
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    batch = args.batch or (64 if on_gpu else 4)
    size = args.image_size or (224 if on_gpu else 96)
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    iters = args.iters or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    dtype = PRECISIONS[precision]
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        print("No CUDA GPU: timing the reference path on CPU. The fused CUDA and Triton kernels need a GPU; "
              f"backends here: {resnet_fused.available_backends()}", file=sys.stderr)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    torch.manual_seed(0)
    tv_model = getattr(torchvision.models, args.model)()
    with torch.no_grad():
        # Freshly initialized BatchNorm (mean 0, var 1, gamma 1, beta 0) would make the logit
        # check trivially exact; give every BN the non-trivial statistics a trained model has.
        for m in tv_model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    tv_model = tv_model.to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast():
        tv_model.eval()
        reference_logits = tv_model(x).float()
    state = copy.deepcopy(tv_model.state_dict())

    timer = _timer(device)
    providers = _providers(device, args)
    rows = []
    try:
        from tqdm import tqdm
        bar = tqdm(providers, desc=f"{args.model} {args.mode} b{batch} {precision}", disable=args.no_progress,
                   file=sys.stderr)
    except ImportError:
        bar = providers
    for name, backend, compiled in bar:
        if backend is None:
            model = copy.deepcopy(tv_model)
        else:
            model = resnet_fused.from_torchvision(tv_model)
        model.load_state_dict(state)
        if compiled:
            model = torch.compile(model)
        ctx = resnet_fused.use_backend(backend) if backend else contextlib.nullcontext()
        with ctx:
            model.eval()
            with torch.no_grad(), autocast():
                diff = (model(x).float() - reference_logits).abs().max().item()
            step = _step_fn(model, x, args.mode, autocast)
            timer(step, warmup)
            times = timer(step, iters)
        median = statistics.median(times)
        rows.append(dict(provider=name, median_ms=median * 1e3, images_per_s=batch / median, max_abs_diff=diff))
    eager = next(r for r in rows if r["provider"] == "torchvision-eager")
    for row in rows:
        row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]

    print(f"\n{args.model} {args.mode} batch={batch} {size}x{size} {precision} on "
          f"{torch.cuda.get_device_name(device) if on_gpu else platform.processor() or 'CPU'}")
    print(f"{'provider':<22}{'ms/iter':>10}{'img/s':>10}{'speedup':>9}{'max|dlogit|':>13}")
    for r in rows:
        print(f"{r['provider']:<22}{r['median_ms']:>10.2f}{r['images_per_s']:>10.1f}"
              f"{r['speedup_vs_eager']:>8.2f}x{r['max_abs_diff']:>13.2e}")
    if args.json:
        meta = dict(
            model=args.model, mode=args.mode, batch=batch, image_size=size, precision=precision, iters=iters,
            warmup=warmup, device=torch.cuda.get_device_name(device) if on_gpu else "cpu",
            torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
            resnet_fused=resnet_fused.__version__, python=platform.python_version(),
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
