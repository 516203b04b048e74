"""The main job: how much faster is the fused ResNet, and is it still the same network?

    python -m resnet_fused.benchmark [--model resnet50] [--batch 64] [--precision bf16]
                                     [--mode infer|train] [--compile] [--max-autotune]
                                     [--cuda-graphs] [--reduce-overhead] [--json PATH]

Runs on the best device present. For each provider (the fused model on each fused backend,
on `auto`, torchvision eager at its strongest: channels_last and the same precision, and
optionally torch.compile of torchvision) it times inference or a full training step
(forward, backward, SGD step) and prints the median time with its 20th/80th percentiles and
their ratio (a warning, with a hint, when that spread is wide), images/s, the speedup over
torchvision eager measured in the same run, the largest |logit difference| against torchvision
on the same input (eval mode, checked before any timed step), the peak GPU memory, and which
backend the fused ops actually ran on. On a GPU, --cuda-graphs adds the fused and the eager
model captured in a CUDA graph and replayed, and --reduce-overhead torch.compile's
mode="reduce-overhead" of both: their times without host overhead.

Under torchrun (`torchrun --nproc_per_node=N -m resnet_fused.benchmark --mode train`) every
provider trains as DistributedDataParallel on N processes (NCCL on GPUs, gloo on CPU; --sync-bn
synchronizes BatchNorm), and rank 0 prints the global images/s and the spread between the ranks.

On CPU only the reference path can run: the fused CUDA and Triton kernels need a GPU, and
the output says so. The pieces (one module per concern: providers, graphs, models, run, timing,
torchrun, cli, report) are shared with the pytest-benchmark suites and the GPU report in
benchmarks/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys

import torch

import resnet_fused

from .cli import (Invocation, command_line, device_error, json_path_error, last_stage_size, model_error,
                  nonnegative_int, nothing_fused_error, parse_args, positive_int, program_name, provider_list,
                  runs_on_cuda, torchrun_device_error)
from .._utils import device_guard
from .graphs import capture
from .models import (HF_RESNETS, LogitsOf, fused_copy, fused_model_names, library_of, model_input,
                     randomize_batchnorm, torchvision_model)
from .providers import (COMPILE_MODES, CUDA_GRAPH_PROVIDERS, EAGER, FUSED_COMPILE_PROVIDERS, FUSED_PROVIDERS,
                        MODEL_PROVIDERS, PRECISIONS, TORCHVISION_PROVIDERS, autocast_for, build_model,
                        configure_device, default_providers, model_step, provider_backend, provider_skip_reason,
                        uses_cuda_graph)
from .report import ProviderProgress, print_table, print_warnings, run_meta, write_json
from .run import (prepare_provider, record_backends, reference_logits_for, run_model_provider,
                  saved_activation_bytes)
from .timing import (SPREAD_WARN_RATIO, calls_per_provider, max_memory_mib, measure, release_memory, rounds_for,
                     spread, summarize, synchronize, timing_warning)
from .torchrun import (Launch, Torchrun, Wrapped, average_gradients, broadcast_state, combine_ranks, launch_from_env,
                       rank_spread_warning, run_torchrun_provider)

__all__ = [
    "COMPILE_MODES", "CUDA_GRAPH_PROVIDERS", "EAGER", "FUSED_COMPILE_PROVIDERS", "FUSED_PROVIDERS", "HF_RESNETS",
    "MODEL_PROVIDERS", "PRECISIONS", "SPREAD_WARN_RATIO", "TORCHVISION_PROVIDERS", "Invocation", "Launch",
    "LogitsOf", "Settings", "Torchrun", "Wrapped", "autocast_for", "average_gradients", "broadcast_state",
    "build_model", "calls_per_provider", "capture", "combine_ranks", "command_line", "configure_device",
    "default_providers", "device_error", "fused_copy", "fused_model_names", "json_path_error", "last_stage_size",
    "launch_from_env", "library_of", "main", "max_memory_mib", "measure", "model_error", "model_input",
    "model_step", "nonnegative_int", "nothing_fused_error", "positive_int", "prepare_provider", "program_name",
    "provider_backend", "provider_list", "provider_skip_reason", "randomize_batchnorm", "rank_spread_warning",
    "record_backends", "reference_logits_for", "release_memory", "rounds_for", "run_main_job",
    "run_model_provider", "run_torchrun_provider", "saved_activation_bytes", "spread", "summarize",
    "synchronize", "timing_warning", "torchrun_device_error", "torchvision_model", "uses_cuda_graph",
]


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's device and the sizes whose defaults depend on it (GPU / CPU)."""

    device: torch.device
    batch: int
    size: int
    precision: str
    iters: int
    warmup: int


def main(argv: list[str] | None = None) -> int:
    """The main job's command line, called from Python or the resnet-fused-benchmark script
    (argv None: sys.argv[1:]). Returns 0; bad arguments exit with 2 (argparse)."""
    return run_main_job(argv, Invocation())


def run_main_job(argv: list[str] | None, invocation: Invocation) -> int:
    """main, told how it was started (the program in the usage line and the recorded command)."""
    args = parse_args(argv, invocation, __doc__.split("\n\n")[0])
    launch = args.launch
    settings = _settings(args)
    configure_device(settings.device)
    providers = provider_list(args.providers) if args.providers else default_providers(
        settings.device, args.compile, args.max_autotune, args.cuda_graphs, args.reduce_overhead, args.mode)
    lead = launch is None or launch.rank == 0
    if settings.device.type != "cuda" and lead:
        print("No CUDA GPU here: the fused CUDA and Triton backends need one, so only the reference "
              "backend (pure PyTorch) runs against torchvision. These CPU numbers say nothing about the "
              "fused kernels.", file=sys.stderr)
    # On the run's device throughout: CUDA events, the side stream, graph captures and Triton
    # launches use the current device, which --device cuda:N does not otherwise change.
    with device_guard(settings.device):
        tv_model, x, reference_logits = _inputs(args, settings, lead)
        with Torchrun(launch, settings.device, args.sync_bn) if launch is not None \
                else contextlib.nullcontext() as torchrun:
            rows = _provider_rows(providers, tv_model, x, args, settings, reference_logits, torchrun)
    if not lead:
        return 0
    _add_spread_and_speedup(rows)
    threads, cpus = torch.get_num_threads(), os.cpu_count()
    warning = timing_warning(rows, settings.device.type, SPREAD_WARN_RATIO, threads, cpus)
    uneven = rank_spread_warning(rows) if launch is not None else None
    print_table(rows, args, settings, torchrun)
    print_warnings(warning, uneven)
    if args.json:
        meta = run_meta(args, settings, torchrun, command=invocation.command(argv, launch), threads=threads,
                        cpus=cpus, warning=warning, uneven=uneven)
        write_json(args.json, meta, rows)
    return 0


def _settings(args) -> Settings:
    """The device (under torchrun: cuda:LOCAL_RANK or the CPU) and the defaults for it."""
    use_cuda = runs_on_cuda(args.device)
    if args.launch is None:
        device = torch.device(args.device or ("cuda" if use_cuda else "cpu"))
    else:
        device = torch.device("cuda", args.launch.local_rank) if use_cuda else torch.device("cpu")
    on_gpu = device.type == "cuda"

    def pick(value, gpu, cpu):
        return value if value is not None else (gpu if on_gpu else cpu)
    return Settings(device, batch=pick(args.batch, 64, 4), size=pick(args.image_size, 224, 96),
                    precision=args.precision or ("bf16" if on_gpu else "fp32"), iters=pick(args.iters, 50, 5),
                    warmup=pick(args.warmup, 10, 1))


def _inputs(args, settings: Settings, lead: bool):
    """(the unfused model, the input, torchvision eager's logits on it), shared by every provider.
    A timm: or hf: model in which fuse finds nothing is an argparse error here, once it is built."""
    tv_model = torchvision_model(args.model, settings.device)
    if (reason := nothing_fused_error(args.model, tv_model)) is not None:
        args.error(f"argument --model: {reason}")
    if library_of(args.model) != "torchvision" and lead:
        print(resnet_fused.fuse_summary(fused_copy(tv_model)), file=sys.stderr)
    # Under torchrun each process trains on its own images, as with a DistributedSampler.
    x = model_input(settings.batch, settings.size, settings.device,
                    seed=0 if args.launch is None else args.launch.rank)
    return tv_model, x, reference_logits_for(tv_model, x, settings.precision)


def _provider_rows(providers, tv_model, x, args, settings: Settings, reference_logits,
                   torchrun: Torchrun | None) -> list[dict]:
    """One result row per provider, skipped ones included (under torchrun: rank 0's rows; the other
    processes return an empty list)."""
    rows = []
    lead = torchrun is None or torchrun.launch.rank == 0
    progress = ProviderProgress(enabled=not args.no_progress and lead)
    timing = dict(warmup=settings.warmup, rounds=settings.iters, progress=progress,
                  recompute_bn_relu=args.recompute_bn_relu)
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
        progress.start(label, calls_per_provider(settings.warmup, settings.iters))
        try:
            if torchrun is None:
                rows.append(run_model_provider(provider, tv_model, x, args.mode, settings.precision,
                                               reference_logits, **timing))
            else:
                rows.append(run_torchrun_provider(provider, tv_model, x, settings.precision, reference_logits,
                                                  torchrun, **timing))
        finally:
            progress.close()
    return rows if lead else []


def _add_spread_and_speedup(rows: list[dict]) -> None:
    """Each timed row's spread (p80/p20, wide past SPREAD_WARN_RATIO) and speedup over
    torchvision eager from the same run."""
    eager = next((r for r in rows if r["provider"] == EAGER and r["status"] == "ok"), None)
    for row in rows:
        if row["status"] == "ok":
            row["spread"] = spread(row)
            row["wide_spread"] = row["spread"] > SPREAD_WARN_RATIO
            if eager is not None:
                row["speedup_vs_eager"] = eager["median_ms"] / row["median_ms"]
