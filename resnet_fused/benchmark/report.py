"""What the main job shows and writes: the progress bar, the table, the warnings and the JSON."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch
import torchvision

import resnet_fused

from .timing import SPREAD_WARN_RATIO


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")


def _format_backends(used: dict | None) -> str:
    if not used:
        return "-"
    return ", ".join(f"{name} x{count}" for name, count in sorted(used.items()))


class ProviderProgress:
    """One tqdm bar per provider, counting its model calls (logit check, warm-up, timed) and
    naming the provider and the phase; a no-op when disabled or tqdm is missing."""

    def __init__(self, enabled: bool):
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
                self.tqdm = tqdm
            except ImportError:
                pass
        self.bar, self.phase = None, None

    def start(self, label: str, total: int) -> None:
        if self.tqdm is not None:
            self.bar = self.tqdm(total=total, desc=label, unit="call", file=sys.stderr, leave=False,
                                 dynamic_ncols=True)
            self.phase = None

    def __call__(self, phase: str) -> None:
        if self.bar is not None:
            if phase != self.phase:
                self.phase = phase
                self.bar.set_postfix_str(phase, refresh=False)
            self.bar.update(1)

    def write(self, text: str) -> None:
        if self.tqdm is not None:
            self.tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _title(args, settings, torchrun) -> str:
    s = settings
    if torchrun is None:
        return (f"\n{args.model} {args.mode} batch={s.batch} {s.size}x{s.size} {s.precision} on "
                f"{device_name(s.device)} (median of {s.iters} after {s.warmup} warm-up, p20/p80: its 20th/80th "
                f"percentiles, spread: p80/p20, ! above {SPREAD_WARN_RATIO}; speedup vs torchvision-eager, same run)")
    launch = torchrun.launch
    return (f"\n{args.model} {args.mode}, DistributedDataParallel over {launch.world_size} processes "
            f"({launch.nodes} node(s), {torchrun.backend}{', SyncBatchNorm' if args.sync_bn else ''}), "
            f"batch={s.batch} per process ({s.batch * launch.world_size} in all) {s.size}x{s.size} {s.precision} on "
            f"{device_name(s.device)} (median of {s.iters} after {s.warmup} warm-up on the slowest rank, p20/p80: "
            f"its 20th/80th percentiles, spread: p80/p20, ! above {SPREAD_WARN_RATIO}; img/s: all processes "
            "together; ranks: the slowest rank's median over the fastest's; speedup vs torchvision-eager, "
            "same run)")


def print_table(rows: list[dict], args, settings, torchrun) -> None:
    """The result table on stdout, one line per provider (skipped ones with their reason), and
    its footnotes."""
    on_gpu = settings.device.type == "cuda"
    dlogit = "max|dlogit|*" if args.mode == "train" else "max|dlogit|"
    print(_title(args, settings, torchrun))
    header = (f"{'provider':<42}{'ms/iter':>10}{'p20':>9}{'p80':>9}{'spread':>8}{'img/s':>10}{'speedup':>9}"
              f"{dlogit:>13}")
    if torchrun is not None:
        header += f"{'ranks':>8}"
    if on_gpu:
        header += f"{'peak MiB':>10}"
    if args.mode == "train":
        header += f"{'saved MiB':>11}"
    print(header + "  fused ops ran on")
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['provider']:<42}skipped: {r['reason']}")
            continue
        mark = "!" if r["wide_spread"] else " "
        line = (f"{r['provider']:<42}{r['median_ms']:>10.2f}{r['p20_ms']:>9.2f}{r['p80_ms']:>9.2f}"
                f"{r['spread']:>7.2f}{mark}{r['images_per_s']:>10.1f}"
                f"{r['speedup_vs_eager']:>8.2f}x{r['max_abs_logit_diff']:>13.2e}")
        if torchrun is not None:
            line += f"{r['rank_spread']:>7.2f}" + ("!" if r["rank_spread"] > SPREAD_WARN_RATIO else " ")
        if on_gpu:
            line += f"{r['peak_memory_mib']:>10.0f}"
        if args.mode == "train":
            line += f"{r['saved_mib']:>11.1f}" if r.get("saved_mib") is not None else f"{'-':>11}"
        print(line + f"  {_format_backends(r['backends_used'])}")
    if args.mode == "train":
        print("* max|dlogit|: the eval-mode logits against torchvision eager's, checked once before training "
              "(the timed training steps change the weights and are not compared)"
              + ("; the largest over the ranks, each on its own input" if torchrun is not None else ""))
        print("saved MiB: activation memory one forward keeps for backward (autograd's saved tensors, "
              "parameters excluded; - for compiled models)"
              + ("; fused models with --recompute-bn-relu" if args.recompute_bn_relu else ""))
    if torchrun is not None:
        syncs = sorted({(r["sync_bn"], r["gradient_sync"]) for r in rows if r["status"] == "ok"}, key=str)
        for sync_bn, gradient_sync in syncs:
            print(f"gradients: {gradient_sync}" + (f"; BatchNorm: {sync_bn}" if sync_bn else ""))


def print_warnings(*texts: str | None) -> None:
    for text in texts:
        if text is not None:
            sys.stdout.flush()
            print(f"WARNING: {text}", file=sys.stderr)


def run_meta(args, settings, torchrun, *, command: str, threads: int, cpus: int | None,
             warning: str | None, uneven: str | None) -> dict:
    """The JSON's meta: the run's settings, the versions and machine, and how to read the rows."""
    s, on_gpu = settings, settings.device.type == "cuda"
    meta = dict(
        model=args.model, mode=args.mode, batch=s.batch, image_size=s.size, precision=s.precision, iters=s.iters,
        recompute_bn_relu=args.recompute_bn_relu,
        warmup=s.warmup, device=device_name(s.device), torch=torch.__version__,
        torchvision=torchvision.__version__, cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if on_gpu else None, resnet_fused=resnet_fused.__version__,
        python=platform.python_version(), backends=resnet_fused.available_backends(),
        command=command,
        logit_check="max_abs_logit_diff: eval-mode logits against torchvision eager's on the same input, "
                    "checked once per provider before any timed step"
                    + (" (before training changes the weights)" if args.mode == "train" else ""),
        threads=threads, interop_threads=torch.get_num_interop_threads(), cpu_count=cpus,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        spread_warn_ratio=SPREAD_WARN_RATIO, timing_warning=warning,
    )
    if torchrun is not None:
        launch = torchrun.launch
        meta.update(
            launcher="torchrun", world_size=launch.world_size, local_world_size=launch.local_world_size,
            nodes=launch.nodes, dist_backend=torchrun.backend, sync_bn=args.sync_bn,
            batch_per_process=s.batch, global_batch=s.batch * launch.world_size,
            timings="median_ms, p20_ms, p80_ms: the slowest rank's; images_per_s: all processes together "
                    "(world_size x batch_per_process / that median); rank_spread: the slowest rank's "
                    "median over the fastest's; per_rank: each rank's own",
            rank_spread_warning=uneven,
        )
    return meta


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(dict(meta=meta, results=rows), f, indent=2)
    print(f"wrote {path}", file=sys.stderr)
