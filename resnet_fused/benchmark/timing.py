"""How the main job times a step and reads its timings: CUDA events on a GPU, medians with their
20th/80th percentiles, and the warning when their spread is too wide to trust."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, rounds: int, flush_l2: bool = False,
            progress: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of fn over `rounds` calls (warm fn up first: nothing here compiles).

    On a GPU each call sits between two CUDA events and the host synchronizes once at the
    end, so the times are the GPU's (plus any launch gaps the host leaves). With
    flush_l2, a 256 MiB buffer is zeroed before each call, outside the events, so no
    call finds its inputs in L2 from the previous one. progress, if given, is called after
    each call, outside the timed region (on a GPU: once the host has queued the call)."""
    if device.type != "cuda":
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if progress is not None:
                progress()
        return times
    l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
    for start, end in zip(starts, ends, strict=True):
        if l2_flush is not None:
            l2_flush.zero_()
        start.record()
        fn()
        end.record()
        if progress is not None:
            progress()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends, strict=True)]


def rounds_for(seconds_per_call: float, target_seconds: float, lo: int, hi: int) -> int:
    """How many timed rounds fill about target_seconds, within [lo, hi]."""
    return int(min(hi, max(lo, target_seconds / max(seconds_per_call, 1e-6))))


def summarize(times: list[float]) -> dict:
    """Median and 20th/80th percentiles, in milliseconds."""
    ordered = sorted(times)

    def pct(q):
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3
    return dict(median_ms=statistics.median(ordered) * 1e3, p20_ms=pct(0.2), p80_ms=pct(0.8), rounds=len(times))


# Above this p80/p20 ratio the main job warns that its timings are noisy. On a quiet machine with
# one thread per core the ratio stays within a few percent; CPU thread oversubscription or
# other work on the machine spreads it 1.3 to 3 times (and moves the median 5 to 20 times).
# At 1.25 the middle 60% of the timings span 25%: as wide as the differences the speedup
# column is meant to resolve, so past it the medians and the speedups are not to be trusted.
SPREAD_WARN_RATIO = 1.25


def spread(row: dict) -> float:
    """p80/p20 of a timed result row (1.0: every timing the same)."""
    return row["p80_ms"] / row["p20_ms"] if row["p20_ms"] > 0 else float("inf")


def timing_warning(rows: list[dict], device_type: str = "cpu", threshold: float = SPREAD_WARN_RATIO,
                   threads: int | None = None, cpus: int | None = None) -> str | None:
    """The warning the main job gives when any timed row's p80/p20 exceeds threshold, with a hint
    how to get stable numbers on device_type; None when every spread is within it. threads and
    cpus (torch's intra-op threads, the machine's CPUs) go into the CPU hint when given."""
    wide = [(r["provider"], spread(r)) for r in rows if r.get("status") == "ok" and spread(r) > threshold]
    if not wide:
        return None
    listed = ", ".join(f"{provider} {ratio:.2f}" for provider, ratio in wide)
    text = (f"noisy timings: p80/p20 exceeds {threshold:.2f} for {listed}; the medians and the speedup "
            "column can be off by that much. ")
    if device_type == "cpu":
        text += "For stable CPU numbers, run nothing else on the machine"
        if threads == 1:
            text += (" (torch already ran one thread here, so other work on the machine is the likely cause); "
                     "more --iters also help.")
        else:
            used = f" (torch used {threads} threads on {cpus} CPUs here)" if threads and cpus else ""
            text += (f" and do not oversubscribe its cores{used}: set OMP_NUM_THREADS=1 (or "
                     "torch.set_num_threads(1)) when the machine is shared, at most the number of physical "
                     "cores when it is not; more --iters also help.")
    else:
        text += ("For stable GPU numbers, run nothing else on the GPU or the host, and give it more --iters "
                 "and --warmup.")
    return text


def calls_per_provider(warmup: int, rounds: int) -> int:
    """How many model calls prepare_provider and run_model_provider make for one provider: the
    logit check, the first step, max(warmup, 1) warm-up steps, then `rounds` timed steps (what
    their progress callback counts)."""
    return 2 + max(warmup, 1) + rounds


def max_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def release_memory(device: torch.device) -> None:
    """Frees what the previous provider held, so peak memory is per provider."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
