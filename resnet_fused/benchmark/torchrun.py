"""Under torchrun: every provider trains as DistributedDataParallel on every process, and rank 0
combines the ranks' timings into one row."""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable

import torch
import torch.distributed as dist

import resnet_fused

from .providers import provider_backend, provider_skip_reason, uses_cuda_graph
from .run import prepare_provider
from .timing import SPREAD_WARN_RATIO, max_memory_mib, measure, release_memory, summarize

# Why the CUDA-graph providers do not run under torchrun: DDP's gradient all-reduce would have
# to be captured with them, which NCCL allows only under conditions this job does not set up.
NO_CUDA_GRAPHS = "CUDA graphs are not captured under torchrun (DDP's all-reduce would be captured with the step)"


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
        """provider_skip_reason on every process (and no CUDA graphs): skipped if any process
        cannot run it (the processes must run the same providers, or their collectives would not
        match)."""
        own = provider_skip_reason(provider, self.device, mode)
        if own is None and uses_cuda_graph(provider):
            own = NO_CUDA_GRAPHS
        reasons = [None] * self.launch.world_size
        dist.all_gather_object(reasons, own)
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
