"""Train a ResNet with resnet_fused's fused blocks, on one process or many (torchrun).

    python examples/train.py --data /data/imagenet --model resnet50
    torchrun --nproc_per_node=8 examples/train.py --data /data/imagenet --model resnet50 --sync-bn
    python examples/train.py --synthetic --model resnet18 --epochs 1      # no data needed

--data holds train/ and val/ in torchvision's ImageFolder layout (DIR/train/CLASS/IMAGE). The
models are torchvision's ResNets: change the import marked `the swap` to
`import torchvision.models as models` and the same script trains torchvision's unfused model.

The recipe is the usual one for ResNets on ImageNet: SGD with momentum 0.9 and weight decay
1e-4, learning rate 0.1 per 256 images, cosine (or step) decay per step after an optional linear
warm-up, label smoothing 0.1, random resized crops and flips, bf16 autocast and channels_last on
GPUs. --batch is the global batch: torchrun's processes each take batch / WORLD_SIZE.

Checkpoints lose nothing: every --save-every steps and at each epoch's end, rank 0 writes
model, optimizer, scheduler, GradScaler, the epoch and step, every rank's random number
generators and the sampler's position, to a temporary file that it fsyncs and then renames.
--resume continues from the newest complete checkpoint in --checkpoint-dir (a truncated or
corrupted file is skipped with a warning, and the previous one used) or starts afresh when there
is none, so the same command restarts a crashed job (also torchrun --max-restarts). Each sample's
augmentation is drawn from a seed of (--seed, epoch, index), so a resumed run sees the images
the uninterrupted one would have seen, whatever --workers is. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import itertools
import math
import os
import random
import re
import sys
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

import resnet_fused as models  # the swap: `import torchvision.models as models` trains torchvision's ResNets

MODEL_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")
CHECKPOINT_FORMAT = "resnet_fused/examples/train.py checkpoint 1"
CHECKPOINT_NAME = re.compile(r"^step-(\d{8,})\.pt$")
TEMPORARY_NAME = re.compile(r"^\.step-\d{8,}\.pt\.tmp-\d+$")
# Resuming with any of these different from the checkpoint's would not continue the same run.
RESUME_MUST_MATCH = ("model", "num_classes", "dtype", "batch")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# Arguments: everything a run could fail on is checked before any work, so that a mistake costs
# one line and overwrites nothing.

class ArgumentParser(argparse.ArgumentParser):
    """Under torchrun every process checks the same arguments; only local rank 0 of each node
    prints the error (quiet elsewhere), and every process exits with 2."""

    quiet = False

    def error(self, message):
        if self.quiet:
            sys.exit(2)
        super().error(message)


def _int_at_least(minimum: int, expected: str):
    """An argparse type for an integer >= minimum (this script stands alone: no helper imported)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _int_at_least(1, "a positive integer")
nonnegative_int = _int_at_least(0, "an integer of 0 or more")


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}")
    return value


def keep_count(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected 2 or more (a torn newest checkpoint leaves the one before it), "
                                         f"got {text!r}")
    return value


def launch_from_env(env=None) -> tuple[int, int, int] | None:
    """(rank, local rank, world size) as torchrun sets them, or None without torchrun."""
    env = os.environ if env is None else env
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    return rank, int(env.get("LOCAL_RANK", rank)), world


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    source = data.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", metavar="DIR", help="ImageFolder layout: DIR/train/CLASS/IMAGE, DIR/val/CLASS/IMAGE")
    source.add_argument("--synthetic", action="store_true",
                        help="random images and labels, a fixed function of --seed (accuracy stays at chance)")
    data.add_argument("--synthetic-size", type=positive_int, default=1024, metavar="N",
                      help="synthetic training images (default 1024; a quarter as many for validation)")
    data.add_argument("--num-classes", type=positive_int, default=None,
                      help="default: the class folders of --data, 1000 with --synthetic")
    data.add_argument("--image-size", type=positive_int, default=224, help="training crop (default 224)")
    data.add_argument("--workers", type=nonnegative_int, default=None,
                      help="DataLoader workers per process (default: 8, fewer if the CPUs per process are fewer)")

    model = p.add_argument_group("model")
    model.add_argument("--model", default="resnet50", help="builder: " + ", ".join(MODEL_NAMES))
    model.add_argument("--backend", default="auto", help="resnet_fused backend: auto, reference, triton, cuda")
    model.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes")
    model.add_argument("--device", choices=("cpu", "cuda"), default=None,
                       help="default: cuda when present; under torchrun each process takes cuda:LOCAL_RANK")
    model.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="parameters and inputs; float64 (without --amp) makes runs reproducible to the bit")
    model.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                       help="autocast precision (default: bf16 on GPU, off on CPU); fp16 with a GradScaler")
    model.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="channels_last activations and weights (default: on GPU)")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=positive_int, default=90)
    opt.add_argument("--batch", type=positive_int, default=256,
                     help="global batch, split evenly over the processes (default 256)")
    opt.add_argument("--lr", type=nonnegative_float, default=None,
                     help="peak learning rate (default 0.1 x batch / 256)")
    opt.add_argument("--momentum", type=nonnegative_float, default=0.9)
    opt.add_argument("--weight-decay", type=nonnegative_float, default=1e-4)
    opt.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                     help="cosine decay to 0, or x0.1 every --step-epochs (per step, after the warm-up)")
    opt.add_argument("--step-epochs", type=positive_int, default=30)
    opt.add_argument("--warmup-epochs", type=nonnegative_int, default=0, help="linear learning-rate warm-up")
    opt.add_argument("--label-smoothing", type=nonnegative_float, default=0.1)
    opt.add_argument("--seed", type=nonnegative_int, default=0)

    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", default="checkpoints", metavar="DIR",
                      help="on a file system every node sees, to resume multi-node runs (default ./checkpoints)")
    ckpt.add_argument("--save-every", type=nonnegative_int, default=1000, metavar="STEPS",
                      help="also save every this many steps (0: at epoch ends only)")
    ckpt.add_argument("--keep", type=keep_count, default=2, help="newest checkpoints kept (default 2, at least 2)")
    ckpt.add_argument("--resume", action="store_true",
                      help="continue from the newest complete checkpoint in --checkpoint-dir (start afresh if none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None, env=None) -> argparse.Namespace:
    p = build_parser()
    try:
        launch = launch_from_env(env)
    except ValueError:
        launch = None
        p.error("torchrun's environment: expected integers in RANK, LOCAL_RANK and WORLD_SIZE")
    p.quiet = launch is not None and launch[1] != 0
    args = p.parse_args(argv)
    args.rank, args.local_rank, args.world_size = launch if launch is not None else (0, 0, 1)
    args.distributed = launch is not None

    if args.model not in MODEL_NAMES or not hasattr(models, args.model):
        close = difflib.get_close_matches(args.model.lower(), MODEL_NAMES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        p.error(f"argument --model: unknown model {args.model!r}{hint}; choose from {', '.join(MODEL_NAMES)}")
    if hasattr(models, "available_backends"):
        backends = models.available_backends()
        if args.backend not in backends:
            p.error(f"argument --backend: expected one of {', '.join(backends)}, got {args.backend!r}")
        if backends[args.backend] is not None:
            p.error(f"argument --backend: {args.backend} cannot run here: {backends[args.backend]}")
    elif args.backend != "auto":
        p.error("argument --backend: the models are not resnet_fused's (see the import at the top)")

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda asked for, but torch sees no CUDA GPU here; use --device cpu")
    if args.device == "cuda" and args.local_rank >= torch.cuda.device_count():
        p.error(f"argument --device: process LOCAL_RANK={args.local_rank} needs cuda:{args.local_rank}, but torch "
                f"sees {torch.cuda.device_count()} GPU(s); start at most that many processes per node")
    if args.amp is None:
        args.amp = "bf16" if args.device == "cuda" and args.dtype == "float32" else "off"
    if args.amp != "off" and args.dtype == "float64":
        p.error(f"argument --amp: --amp {args.amp} computes in {args.amp}, which defeats --dtype float64; "
                "use --amp off")
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"

    if args.batch % args.world_size:
        p.error(f"argument --batch: {args.batch} images do not split evenly over WORLD_SIZE={args.world_size} "
                f"processes; use a multiple of {args.world_size} (--batch is the global batch)")
    args.rank_batch = args.batch // args.world_size
    if args.workers is None:
        local_processes = int((env or os.environ).get("LOCAL_WORLD_SIZE", 1))
        args.workers = min(8, (os.cpu_count() or 1) // max(1, local_processes))
    if args.lr is None:
        args.lr = 0.1 * args.batch / 256

    if args.data is not None:
        args.classes = image_folder_classes(p, args.data)
        if args.num_classes is None:
            args.num_classes = len(args.classes)
        elif args.num_classes != len(args.classes):
            p.error(f"argument --num-classes: {args.data}/train has {len(args.classes)} class folders, "
                    f"not {args.num_classes}")
    elif args.num_classes is None:
        args.num_classes = 1000
    train_images = args.synthetic_size if args.synthetic else None
    if train_images is not None and train_images < args.batch:
        p.error(f"argument --synthetic-size: {train_images} images make no batch of {args.batch}; "
                f"use --synthetic-size {args.batch} or more")

    check_checkpoint_dir(p, args)
    return args


def image_folder_classes(p: ArgumentParser, root: str) -> list[str]:
    """The class folders of root/train (root/val must have no others), or an argparse error."""
    layout = "expected DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE (torchvision's ImageFolder layout)"
    if not os.path.isdir(root):
        p.error(f"argument --data: {root} {'is not a directory' if os.path.exists(root) else 'does not exist'}; "
                f"{layout}")
    found = {}
    for split in ("train", "val"):
        path = os.path.join(root, split)
        if not os.path.isdir(path):
            p.error(f"argument --data: {root} has no {split}/ folder; {layout}")
        found[split] = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        if not found[split]:
            p.error(f"argument --data: {path} has no class folders; {layout}")
    extra = sorted(set(found["val"]) - set(found["train"]))
    if extra:
        p.error(f"argument --data: {root}/val has class folders that train/ lacks: {', '.join(extra[:5])}")
    return found["train"]


def check_checkpoint_dir(p: ArgumentParser, args: argparse.Namespace) -> None:
    """No checkpoint is ever overwritten by a new run; a resumed run continues the same training."""
    directory = args.checkpoint_dir
    args.resume_from = None
    if os.path.exists(directory) and not os.path.isdir(directory):
        p.error(f"argument --checkpoint-dir: {directory} is a file, not a directory")
    existing = list_checkpoints(directory)
    if existing and not args.resume:
        p.error(f"argument --checkpoint-dir: {directory} already holds checkpoints (newest: "
                f"{os.path.basename(existing[0][1])}); add --resume to continue from them, or choose another "
                "directory")
    if os.path.isdir(directory) and not os.access(directory, os.W_OK):
        p.error(f"argument --checkpoint-dir: cannot write to {directory}")
    if not (args.resume and existing):
        return
    path, state, skipped = load_newest_checkpoint(directory)
    args.skipped_checkpoints = skipped
    if path is None:
        reasons = "; ".join(f"{os.path.basename(k)}: {why}" for k, why in skipped)
        p.error(f"argument --resume: no complete checkpoint in {directory} ({reasons})")
    config = state["config"]
    wanted = dict(model=args.model, num_classes=args.num_classes, dtype=args.dtype, batch=args.batch)
    for key in RESUME_MUST_MATCH:
        if config[key] != wanted[key]:
            option = key.replace("_", "-")
            p.error(f"argument --{option}: the checkpoint {path} is of --{option} {config[key]}, not {wanted[key]}; "
                    f"give --{option} {config[key]} to resume it, or another --checkpoint-dir")
    args.resume_from = (path, state)


# ---------------------------------------------------------------------------------------------
# Checkpoints: written atomically by rank 0; on resume the newest complete one is used.

def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoint files in directory, newest first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name)) for name in os.listdir(directory)
             if (m := CHECKPOINT_NAME.match(name))]
    return sorted(found, reverse=True)


def checkpoint_problem(path: str) -> str | None:
    """Why the file at path is not a complete checkpoint, or None. torch.save writes a zip archive
    whose central directory is at the end and every member carries a CRC-32: a truncated file has no
    central directory, a corrupted one fails a CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as exc:
        return f"not a complete archive ({exc}): truncated or partly written"
    if bad is not None:
        return f"corrupted: {bad} fails its CRC check"
    return None


def load_newest_checkpoint(directory: str) -> tuple[str | None, dict | None, list[tuple[str, str]]]:
    """(path, state) of the newest complete checkpoint (None, None if there is none), and the newer
    files skipped, each with its problem."""
    skipped = []
    for _, path in list_checkpoints(directory):
        problem = checkpoint_problem(path)
        if problem is None:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a complete archive that is no checkpoint of ours
                problem = f"cannot be loaded: {exc}"
            else:
                if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
                    return path, state, skipped
                problem = "not a checkpoint of this script"
        skipped.append((path, problem))
    return None, None, skipped


def save_checkpoint(directory: str, state: dict, keep: int) -> str:
    """Writes state as DIR/step-<global step>.pt: a temporary file, fsynced, renamed over the name
    (atomic on POSIX file systems), the directory fsynced; then only the `keep` newest remain. A crash
    at any point leaves the previous checkpoints complete."""
    name = f"step-{state['global_step']:08d}.pt"
    path = os.path.join(directory, name)
    temporary = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    # Files newer than this one are left from a run that went further before a crash (possibly torn);
    # they are replaced when this run gets there.
    older = [p for step, p in list_checkpoints(directory) if step <= state["global_step"]]
    for stale in older[keep:]:
        os.remove(stale)
    return path


def rng_state(device: torch.device) -> dict:
    """This process's random number generators: torch's CPU and CUDA ones, Python's, NumPy's."""
    state = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=None,
                 cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    with contextlib.suppress(ImportError):
        import numpy as np
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if state["numpy"] is not None:
        with contextlib.suppress(ImportError):
            import numpy as np
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def seed_process(seed: int, rank: int) -> None:
    """Each rank's own random streams, for whatever randomness the training step draws (dropout,
    stochastic depth, mixup): different on every rank, the same from run to run."""
    torch.manual_seed(seed * 1_000_003 + 1 + rank)
    random.seed(seed * 1_000_003 + 1 + rank)
    with contextlib.suppress(ImportError):
        import numpy as np
        np.random.seed((seed * 1_000_003 + 1 + rank) % 2**32)


# ---------------------------------------------------------------------------------------------
# Data

class SyntheticImages(Dataset):
    """Normalized-looking random images with random labels, each a fixed function of (seed, index):
    the same data on every process and in every run."""

    def __init__(self, size: int, num_classes: int, image_size: int, seed: int):
        self.size, self.num_classes, self.image_size, self.seed = size, num_classes, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = torch.randn(3, self.image_size, self.image_size, generator=g)
        return image, int(torch.randint(self.num_classes, (), generator=g))


class SeededPerSample(Dataset):
    """Runs dataset[index] (its transforms included) with torch's CPU generator and Python's random
    seeded from (seed, epoch, index) alone, restoring them afterwards: the augmentation of a sample
    does not depend on which worker loads it or on what was loaded before, so a run resumed mid-epoch
    augments as the uninterrupted run did. Set `epoch` before each epoch's DataLoader iterator."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + index) % 2**63
        cpu_state, python_state = torch.get_rng_state(), random.getstate()
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(python_state)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, drop_last) that can start part-way into an epoch:
    set_position(epoch, samples_seen) skips the first samples_seen samples of the epoch's global
    order. The same permutation under any world size, so the position is in global samples."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, samples_seen: int) -> None:
        self.set_epoch(epoch)
        self.start = samples_seen // self.num_replicas

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def datasets(args) -> tuple[Dataset, Dataset]:
    """(train, val). Training images get the usual random resized crop and flip; validation
    images are resized by 256/224 of --image-size and center-cropped."""
    if args.synthetic:
        train = SyntheticImages(args.synthetic_size, args.num_classes, args.image_size, args.seed)
        val = SyntheticImages(max(1, args.synthetic_size // 4), args.num_classes, args.image_size, args.seed + 1)
        return SeededPerSample(train, args.seed), val
    from torchvision import transforms as T
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = torchvision.datasets.ImageFolder(os.path.join(args.data, "train"), T.Compose([
        T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize]))
    resize = round(args.image_size * 256 / 224)
    val = torchvision.datasets.ImageFolder(os.path.join(args.data, "val"), T.Compose([
        T.Resize(resize), T.CenterCrop(args.image_size), T.ToTensor(), normalize]))
    # ImageFolder numbers the classes of each split by its own folders; use train's numbering for val.
    val.samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
    val.targets = [label for _, label in val.samples]
    return SeededPerSample(train, args.seed), val


# ---------------------------------------------------------------------------------------------
# Model and training

def build_model(args, device: torch.device) -> torch.nn.Module:
    """The same initial weights on every process (DistributedDataParallel also broadcasts rank 0's)."""
    torch.manual_seed(args.seed)
    model = getattr(models, args.model)(num_classes=args.num_classes)
    if args.sync_bn:
        convert = getattr(models, "convert_sync_batchnorm", torch.nn.SyncBatchNorm.convert_sync_batchnorm)
        model = convert(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    return model.to(device=device, dtype=getattr(torch, args.dtype), memory_format=memory_format)


def average_gradients(model: torch.nn.Module) -> None:
    """DistributedDataParallel's averaging, done after backward through one flat buffer (for
    SyncBatchNorm on CPU, which DDP refuses)."""
    params = [p for p in model.parameters() if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad.copy_(g.view_as(p.grad))


def lr_factor(step: int, args, steps_per_epoch: int) -> float:
    """The learning rate at optimizer step `step` over the peak: linear warm-up, then cosine decay
    to 0 or x0.1 every --step-epochs."""
    warmup = args.warmup_epochs * steps_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if args.schedule == "step":
        return 0.1 ** (step // (args.step_epochs * steps_per_epoch))
    total = args.epochs * steps_per_epoch
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device, dtype, memory_format, autocast) -> dict:
    """Loss, top-1 and top-5 accuracy over the validation set (each process its own share,
    summed over all of them)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # images, loss sum, top-1, top-5 hits
    for images, targets in loader:
        images = images.to(device, dtype, non_blocking=True).contiguous(memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        k = min(5, logits.size(1))
        hits = logits.topk(k, dim=1).indices == targets[:, None]
        totals += torch.stack([torch.tensor(len(targets), device=device),
                               F.cross_entropy(logits.float(), targets, reduction="sum"),
                               hits[:, 0].sum(), hits.any(dim=1).sum()]).double()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train()
    n, loss, top1, top5 = totals.tolist()
    return dict(images=int(n), loss=loss / max(n, 1), top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1))


def log(args, text: str, file=None) -> None:
    if args.rank == 0:
        print(text, file=file or sys.stdout, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda", args.local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    if args.distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        return train(args, device)
    finally:
        if args.distributed:
            dist.destroy_process_group()


def train(args, device: torch.device) -> int:
    if hasattr(models, "set_backend"):
        models.set_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    train_set, val_set = datasets(args)
    sampler = ResumableSampler(train_set, args.world_size, args.rank, args.seed)
    steps_per_epoch = len(sampler) // args.rank_batch
    loader_args = dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                       persistent_workers=False)
    val_loader = DataLoader(Subset(val_set, range(args.rank, len(val_set), args.world_size)),
                            batch_size=args.rank_batch, shuffle=False, **loader_args)

    model = build_model(args, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, args, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    # The position, and the running sum of this epoch's training losses (over every process's steps)
    epoch, samples_seen, global_step, history, epoch_loss_sum = 0, 0, 0, [], 0.0
    if args.resume_from is not None:
        path, state = args.resume_from
        for skipped, problem in args.skipped_checkpoints:
            log(args, f"warning: skipping {skipped}: {problem}", file=sys.stderr)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the checkpoint's run had no GradScaler (no fp16)
            scaler.load_state_dict(state["scaler"])
        epoch, samples_seen = state["sampler"]["epoch"], state["sampler"]["samples_seen"]
        global_step, history = state["global_step"], state["history"]
        epoch_loss_sum = state["epoch_loss_sum"] if args.rank == 0 else 0.0  # summed over the ranks at epoch end
        ranks = state["rng"]
        if len(ranks) != args.world_size:
            log(args, f"note: the checkpoint was written by {len(ranks)} processes, this run has {args.world_size}: "
                      "the same samples follow in the same order, but per-process BatchNorm batches and random "
                      "streams differ from the original run's")
        if args.rank < len(ranks):
            set_rng_state(ranks[args.rank], device)
        else:
            seed_process(args.seed, args.rank)
        log(args, f"resumed from {path}: epoch {epoch + 1}, {samples_seen} images into it, step {global_step}")
        args.resume_from = state = None  # the state now lives in the model and optimizer
    else:
        seed_process(args.seed, args.rank)
        if args.resume:
            log(args, f"no checkpoint in {args.checkpoint_dir}: starting afresh")
    if steps_per_epoch == 0:
        log(args, f"train.py: error: {len(train_set)} training images make no batch of {args.batch}", file=sys.stderr)
        return 2
    if args.rank == 0:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
        for name in os.listdir(args.checkpoint_dir):  # partial files of a crash while saving
            if TEMPORARY_NAME.match(name):
                os.remove(os.path.join(args.checkpoint_dir, name))

    after_backward = None
    if args.distributed and args.sync_bn and device.type == "cpu":
        # DDP refuses SyncBatchNorm in a CPU module; the gradients are averaged after backward instead.
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, 0)
        train_model = model
        after_backward = lambda: average_gradients(model)  # noqa: E731
    elif args.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = model

    def checkpoint(epoch_now: int, samples_now: int, loss_sum: float) -> None:
        """loss_sum: this process's sum of its training losses so far this epoch."""
        ranks = [None] * args.world_size
        if args.distributed:
            dist.all_gather_object(ranks, (rng_state(device), loss_sum))
        else:
            ranks[0] = (rng_state(device), loss_sum)
        if args.rank != 0:
            return
        state = dict(
            format=CHECKPOINT_FORMAT, global_step=global_step,
            config=dict(model=args.model, num_classes=args.num_classes, dtype=args.dtype, batch=args.batch,
                        image_size=args.image_size, sync_bn=args.sync_bn, seed=args.seed, epochs=args.epochs,
                        world_size=args.world_size, data="synthetic" if args.synthetic else args.data),
            model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), sampler=dict(epoch=epoch_now, samples_seen=samples_now, seed=args.seed),
            rng=[rng for rng, _ in ranks], epoch_loss_sum=sum(loss for _, loss in ranks), history=history,
        )
        path = save_checkpoint(args.checkpoint_dir, state, args.keep)
        log(args, f"saved {path}")

    backend = models.get_backend() if hasattr(models, "get_backend") else "torchvision"
    log(args, f"{args.model} ({models.__name__}, backend {backend}) on {args.world_size} process(es), "
              f"{device.type}{' ' + dist.get_backend() if args.distributed else ''}: batch {args.batch} "
              f"({args.rank_batch} per process), {steps_per_epoch} steps per epoch, {args.epochs} epochs, "
              f"lr {args.lr:g} {args.schedule}, {args.dtype}, amp {args.amp}"
              + (", SyncBatchNorm" if args.sync_bn else ""))
    progress_bar = None
    if args.rank == 0 and not args.no_progress:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm as progress_bar
    train_model.train()
    while epoch < args.epochs:
        sampler.set_position(epoch, samples_seen)
        train_set.epoch = epoch
        loader = DataLoader(train_set, batch_size=args.rank_batch, sampler=sampler, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed + epoch), **loader_args)
        done = samples_seen // args.batch
        bar = progress_bar(total=steps_per_epoch, initial=done, desc=f"epoch {epoch + 1}/{args.epochs}",
                           unit="step", file=sys.stderr, dynamic_ncols=True) if progress_bar else None
        loss_sum = torch.tensor(epoch_loss_sum, dtype=torch.float64, device=device)
        steps, t0 = 0, time.perf_counter()
        for images, targets in loader:
            images = images.to(device, dtype, non_blocking=True).contiguous(memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(train_model(images), targets, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if after_backward is not None:
                after_backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            steps += 1
            samples_seen += args.batch
            loss_sum += loss.detach().double()
            if bar is not None:
                bar.update(1)
                if steps % 10 == 0 or samples_seen // args.batch == steps_per_epoch:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.4g}", refresh=False)
            if args.save_every and global_step % args.save_every == 0 and samples_seen // args.batch < steps_per_epoch:
                checkpoint(epoch, samples_seen, loss_sum.item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if args.distributed:
            dist.all_reduce(loss_sum)
            # DDP broadcasts rank 0's BatchNorm statistics before each forward, so after the last step the
            # other ranks' differ: evaluate (and checkpoint) rank 0's model everywhere.
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        metrics = evaluate(model, val_loader, device, dtype, memory_format, autocast)
        record = dict(epoch=epoch + 1, train_loss=loss_sum.item() / (steps_per_epoch * args.world_size),
                      images_per_s=steps * args.batch / seconds if steps else None,
                      **{f"val_{k}": v for k, v in metrics.items()})
        history.append(record)
        speed = f"{record['images_per_s']:.1f} images/s (all processes)" if steps else "no steps left"
        log(args, f"epoch {epoch + 1}/{args.epochs}: train loss {record['train_loss']:.4f}, {speed}; "
                  f"val loss {metrics['loss']:.4f}, top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% "
                  f"({metrics['images']} images)")
        epoch, samples_seen, epoch_loss_sum = epoch + 1, 0, 0.0
        checkpoint(epoch, samples_seen, 0.0)
    log(args, f"done: {args.epochs} epochs, {global_step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
