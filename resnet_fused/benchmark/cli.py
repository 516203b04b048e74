"""The main job's command line: its arguments, every check a run could fail on (made before any
model is built, each an argparse error naming the argument), and the command recorded in the JSON."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import shlex
import sys

import torch
import torchvision

import resnet_fused

from .models import HF_RESNETS, fused_model_names, library_of
from .providers import EAGER, MODEL_PROVIDERS, PRECISIONS
from .torchrun import NO_CUDA_GRAPHS, Launch, launch_from_env

MODULE = __package__  # resnet_fused.benchmark: what `python -m` runs


def program_name(run_as_main: bool, module: str | None, argv0: str) -> str:
    """How the main job was started, as a user would type it: `python -m resnet_fused.benchmark`
    (run_as_main, module: the -m module name), `python path/to/benchmark/__main__.py` (run_as_main,
    no module), or the console script's name (resnet-fused-benchmark: argv0's basename)."""
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
        return f"{MODULE}.main({list(argv)!r})"
    args = list(argv) if argv is not None else sys.argv[1:]
    program = program_name(run_as_main, module, argv0)
    if launch is not None:
        nodes = f"--nnodes={launch.nodes} " if launch.nodes > 1 else ""
        torchrun = f"torchrun {nodes}--nproc_per_node={launch.local_world_size} "
        program = torchrun + (program.removeprefix("python ") if program.startswith("python ")
                              else "--no-python " + program)
    return " ".join([program, *map(shlex.quote, args)])


@dataclasses.dataclass(frozen=True)
class Invocation:
    """How this process started the main job: run_as_main when Python ran it as its program
    (`python -m`, module the -m name, or by path), else a call of main() (the console script,
    or Python code)."""

    run_as_main: bool = False
    module: str | None = None

    def program(self) -> str:
        return program_name(self.run_as_main, self.module, sys.argv[0])

    def command(self, argv: list[str] | None, launch: Launch | None) -> str:
        return command_line(argv, run_as_main=self.run_as_main, module=self.module, argv0=sys.argv[0],
                            launch=launch)


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


def runs_on_cuda(device: str | None) -> bool:
    """Whether the main job runs on a GPU for --device `device` (None: cuda when torch sees one)."""
    return torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"


def cpu_only_error(what: str, device: str | None) -> str:
    """The error for a GPU-only option (`what` needs a CUDA GPU) when the job runs on the CPU."""
    where = "--device cpu" if device is not None else "torch sees no CUDA GPU here"
    return f"{what}, so it needs a CUDA GPU, but the main job runs on the CPU ({where}); leave the option out"


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


def _parser(invocation: Invocation, description: str) -> _ArgumentParser:
    p = _ArgumentParser(prog=invocation.program(), description=description)
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
    p.add_argument("--cuda-graphs", action="store_true",
                   help="GPU only: also time the fused (auto) and torchvision eager models captured in a CUDA "
                        "graph (torch.cuda.graph) and replayed, the whole step (inference, or forward, backward "
                        "and SGD step): their time without host overhead")
    p.add_argument("--reduce-overhead", action="store_true",
                   help="GPU only: also time torch.compile(mode='reduce-overhead') (inductor's CUDA graphs) of "
                        "torchvision's and of the fused model")
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
    return p


def parse_args(argv: list[str] | None, invocation: Invocation, description: str) -> argparse.Namespace:
    """The checked arguments, args.launch (this process's place under torchrun, or None) and
    args.error (for what only a built model can tell: nothing_fused_error)."""
    try:
        launch, launch_problem = launch_from_env(), None
    except ValueError as exc:
        launch, launch_problem = None, str(exc)
    p = _parser(invocation, description)
    p.quiet = launch is not None and launch.local_rank != 0
    args = p.parse_args(argv)
    args.launch = launch
    if launch_problem is not None:
        p.error(f"torchrun's environment: {launch_problem}")
    for problem in _problems(args, launch):
        p.error(problem)
    args.error = p.error
    return args


def _problems(args: argparse.Namespace, launch: Launch | None):
    """Everything a run could fail on, each as `argument --X: why`, checked before any model is
    built (a generator: the parser stops at the first)."""
    if launch is None and args.sync_bn:
        yield ("argument --sync-bn: synchronizes BatchNorm across processes, so it needs torchrun: "
               f"torchrun --nproc_per_node=N -m {MODULE} --mode train --sync-bn")
    if launch is not None and args.mode != "train":
        yield (f"argument --mode: under torchrun the main job times DistributedDataParallel training; "
               f"use --mode train (got {args.mode})")
    if (reason := model_error(args.model)) is not None:
        yield f"argument --model: {reason}"
    if args.recompute_bn_relu and library_of(args.model) != "torchvision":
        yield ("argument --recompute-bn-relu: keeps only pre-BatchNorm activations in resnet_fused's own "
               f"ResNet blocks; {args.model} is fused by resnet_fused.fuse, which does not recompute")
    if args.mode == "train" and args.batch == 1 and args.image_size is not None \
            and last_stage_size(args.image_size) == 1:
        # Training BatchNorm needs more than one value per channel; the defaults always have it.
        yield (f"argument --image-size: with --batch 1 in train mode, --image-size {args.image_size} leaves one "
               "value per BatchNorm channel in the last stage (training BatchNorm needs more); use --batch 2 "
               "or more, or --image-size 33 or more")
    if launch is not None and args.device is not None and ":" in args.device:
        yield f"argument --device: {torchrun_device_error(args.device, launch)}"
    if args.device is not None and (reason := device_error(args.device)) is not None:
        yield f"argument --device: {reason}"
    if launch is not None and (reason := torchrun_device_error(args.device, launch)) is not None:
        yield f"argument --device: {reason}"
    if args.cuda_graphs and launch is not None:
        yield f"argument --cuda-graphs: {NO_CUDA_GRAPHS}; run it without torchrun"
    if args.cuda_graphs and not runs_on_cuda(args.device):
        yield "argument --cuda-graphs: " + cpu_only_error("torch.cuda.graph captures what a CUDA stream runs",
                                                          args.device)
    if args.reduce_overhead and not runs_on_cuda(args.device):
        yield "argument --reduce-overhead: " + cpu_only_error("mode='reduce-overhead' is torch.compile's CUDA graphs",
                                                              args.device)
    # Under torchrun only rank 0 writes the JSON (on its node's file system).
    if args.json is not None and (launch is None or launch.rank == 0) \
            and (reason := json_path_error(args.json)) is not None:
        yield f"argument --json: {reason}"
    if args.providers is not None:
        unknown = [name for name in provider_list(args.providers) if name not in MODEL_PROVIDERS]
        if unknown:
            yield (f"argument --providers: unknown provider(s) {', '.join(unknown)}; "
                   f"choose from {', '.join(MODEL_PROVIDERS)}")
