"""A phase's cases in worker subprocesses (worker.py), so that a crash costs one case, not the run.

Kernels that have never run on a GPU may fault, and a CUDA error poisons its process: the
worker exits, the case is recorded as an error with the log's tail, and a fresh worker goes
on with the remaining cases. A provider that crashed MAX_CRASHES_PER_PROVIDER times is
skipped for the rest of the phase.
"""

from __future__ import annotations

import json
import signal
import sys
import time

from . import SCRIPT
from .plan import row_base
from .processes import run_logged, tail, worker_env
from .worker import STICKY_EXIT_STATUS, read_events

WORKER_GRACE_S = 20         # a worker past its phase's deadline by this much is killed
MAX_CRASHES_PER_PROVIDER = 2


def run_worker_phase(kind: str, cases: list, device: str, phase_deadline: float, paths: dict, settings: dict,
                     report: dict, excluded: dict[str, str] | None = None) -> dict:
    """Runs cases in worker subprocesses until done or out of time. Returns the phase record;
    the rows go into report['ops' | 'models'] in plan order. excluded: {provider: why} skipped
    from the start (a backend whose smoke tests failed)."""
    pending = list(enumerate(cases))
    rows: dict[int, dict] = {}
    excluded = dict(excluded or {})
    crashes: dict[str, int] = {}
    workers = 0
    notes = []
    status = "done"
    abort_reason = "out of time: the phase's time limit was reached"

    def count_crash(provider: str, what: str) -> None:
        crashes[provider] = crashes.get(provider, 0) + 1
        if crashes[provider] >= MAX_CRASHES_PER_PROVIDER:
            excluded[provider] = f"skipped: {provider} {what} {crashes[provider]} times in this phase"

    if phase_deadline - time.time() < 5:
        pending_now, pending = pending, []  # not worth a worker's start-up
        rows.update((i, dict(row_base(kind, c), status="skipped", reason=abort_reason)) for i, c in pending_now)
        status = "partial"
    while pending:
        workers += 1
        plan_path = paths["dir"] / f".{paths['stem']}-{kind}-plan.json"
        results_path = paths["dir"] / f".{paths['stem']}-{kind}-results.jsonl"
        results_path.unlink(missing_ok=True)
        plan_path.write_text(json.dumps(dict(kind=kind, device=device, deadline=phase_deadline, excluded=excluded,
                                             target_seconds=settings[f"{kind}_target_seconds"], cases=pending)))
        cmd = [sys.executable, str(SCRIPT), "--worker", str(plan_path), "--results", str(results_path)]
        log_offset = paths["benchmarks_log"].stat().st_size if paths["benchmarks_log"].exists() else 0
        rc, _ = run_logged(cmd, paths["benchmarks_log"], phase_deadline - time.time() + WORKER_GRACE_S, worker_env())
        started, finished = None, set()
        for event in read_events(results_path):
            if event["event"] == "env":
                report["provenance"].setdefault("backends", event["backends"])
            elif event["event"] == "start":
                started = event["index"]
            elif event["event"] == "result":
                rows[event["index"]] = event["row"]
                finished.add(event["index"])
        plan_path.unlink(missing_ok=True)
        results_path.unlink(missing_ok=True)
        pending = [(i, c) for i, c in pending if i not in finished]
        if rc == 0:
            break
        lost = started if started is not None and started not in finished else None
        if lost is not None:
            spec = dict(pending)[lost]
            if rc is None:
                what = "had not finished at the phase's time limit and was killed"
            elif rc < 0:
                what = f"died of signal {signal.Signals(-rc).name}"
            else:
                what = f"died (exit status {rc})"
            rows[lost] = dict(row_base(kind, spec), status="error",
                              reason=f"the worker process {what} during this case",
                              log_tail=tail(paths["benchmarks_log"], 3000, since=log_offset))
            pending = [(i, c) for i, c in pending if i != lost]
            if rc is not None:
                count_crash(rows[lost]["provider"], "crashed the worker process")
        else:
            # A sticky CUDA error recorded by the worker itself, or a worker that died between
            # cases / before its first case.
            last = max(finished) if finished else None
            if rc == STICKY_EXIT_STATUS and last is not None:
                count_crash(rows[last]["provider"], "raised a CUDA error that ends its process")
            elif rc is None:
                notes.append("the worker was killed at the phase's time limit between cases")
            else:
                notes.append(f"a worker exited with status {rc} outside any case; log tail: "
                             f"{tail(paths['benchmarks_log'], 1500, since=log_offset)}")
                status = "error"
                if not finished:
                    # It cannot even start: another try would fail the same way.
                    abort_reason = f"not run: the worker process exited with status {rc} before its first case"
                    break
        if rc is None or time.time() > phase_deadline:
            break
        if workers > 2 + 2 * MAX_CRASHES_PER_PROVIDER * 3:
            abort_reason = "not run: too many worker restarts in this phase"
            break
    for index, spec in pending:
        rows[index] = dict(row_base(kind, spec), status="skipped", reason=abort_reason)
    if pending:
        status = "partial" if status == "done" else status
    target = report["ops" if kind == "ops" else "models"]
    target.extend(rows[i] for i in sorted(rows))
    counts = {s: sum(1 for r in rows.values() if r["status"] == s) for s in ("ok", "skipped", "error")}
    return dict(status=status, workers=workers, cases=counts, notes=notes)
