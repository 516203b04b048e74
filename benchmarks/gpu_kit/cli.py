"""The command line of benchmarks/gpu_report.py: its arguments, and a run's phases in order
(the build beside the warm-up, the smoke tests, the benchmark phases of plan.SCHEDULE, the
rest of the GPU suite), the report rewritten after each."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from . import BENCHMARKS, worker
from .budget import DEFAULT_BUDGET_S, TIMELINE, Budget
from .isolation import run_worker_phase
from .phases import excluded_providers, finish_build, run_pytest, run_verify, start_build
from .plan import PHASES, SCHEDULE, phase_cases
from .provenance import provenance
from .report import LOGS, SCHEMA, output_paths, report_stem, write_report
from .warm import BUILD_JOBS, cache_entries, run_warm, triton_cache_dir

DESCRIPTION = """\
GPU evidence in one command: build the extension while the Triton kernels compile, verify
the fused backends (python -m resnet_fused.verify) and run the gpu_smoke tests, run the model
and per-layer benchmarks (a backend without a passed verdict, or whose smoke failed,
excluded), then the rest of the GPU tests, and write a report with its provenance."""


def parse(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_report.py", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: benchmarks/results/, or a new temporary folder with --cpu-smoke)")
    p.add_argument("--quick", action="store_true",
                   help="half the budget (each step of the timeline halved): the headline cases only")
    p.add_argument("--budget", type=float, default=None, help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}, "
                                                               "--quick: half)")
    p.add_argument("--build", choices=("auto", "always", "never"), default="auto",
                   help="build the CUDA extension with pip install --no-build-isolation --no-deps -e . "
                        "(auto: only when it does not load)")
    p.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma-separated subset of {','.join(PHASES)} (default: all)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="no GPU needed: the whole pipeline on tiny CPU cases (checks this script; "
                        "no performance claim)")
    p.add_argument("--render", type=Path, default=None, metavar="JSON",
                   help="only rewrite the markdown and PNG next to an existing report JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.worker:
        return worker.main(args.worker, args.results)
    if args.render:
        report = json.loads(args.render.read_text())
        write_report(report, args.render.parent, plot=True)
        print(f"[gpu_report] rewrote {args.render.with_suffix('.md')}", file=sys.stderr)
        return 0
    return run(args, argv)


def run(args, argv: list[str]) -> int:
    """The whole run: every selected phase within the budget, then the report with its plot."""
    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    if not on_gpu and not args.cpu_smoke:
        print("gpu_report: no CUDA GPU here. Run it on a GPU machine, or pass --cpu-smoke to check the pipeline "
              "on tiny CPU cases.", file=sys.stderr)
        return 2
    budget_s = args.budget or (DEFAULT_BUDGET_S / 2 if args.quick else DEFAULT_BUDGET_S)
    budget = Budget(budget_s)
    phases = {p.strip() for p in args.phases.split(",") if p.strip()}
    unknown = phases - set(PHASES)
    if unknown:
        print(f"gpu_report: unknown phases {sorted(unknown)}", file=sys.stderr)
        return 2

    prov, gpu = provenance(argv)
    if args.cpu_smoke:
        prov["gpu"] = gpu = None
    stem = report_stem(gpu, prov["date_utc"], phases)
    if args.out:
        out_dir = args.out
    else:
        out_dir = BENCHMARKS / "results" if on_gpu else Path(tempfile.mkdtemp(prefix="resnet_fused-cpu-smoke-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, stem)
    for log in LOGS:
        paths[log].unlink(missing_ok=True)
    mode = "cpu-smoke" if args.cpu_smoke else ("quick" if args.quick else "full")
    scale = 0.5 if args.quick else 1.0
    settings = dict(mode=mode, budget_s=budget_s, phases=sorted(phases), build=args.build,
                    timeline_s={k: v * scale for k, v in TIMELINE.items()},
                    ops_target_seconds=0.1 if on_gpu else 0.02,
                    models_target_seconds=(1.0 if args.quick else 2.0) if on_gpu else 0.05)
    cache_dir = triton_cache_dir()
    report = dict(schema=SCHEMA, stem=stem, complete=False, provenance=prov, settings=settings, phases=[],
                  build=None, warm=None, verify=None, smoke=None, tests=None, models=[], ops=[], excluded={},
                  triton_cache=dict(dir=str(cache_dir), entries_at_start=cache_entries(cache_dir)))
    print(f"[gpu_report] {mode} run, budget {budget_s:.0f} s, writing {out_dir / stem}.{{json,md,png}}",
          file=sys.stderr)

    def record_phase(name, record, t0, entries_before):
        record = dict(name=name, **record)
        record.setdefault("seconds", round(time.time() - t0, 1))
        record["planned_s"] = settings["timeline_s"].get("build+warm" if name in ("build", "warm") else name)
        record["triton_kernels_compiled"] = cache_entries(cache_dir) - entries_before
        report["phases"].append(record)
        report["elapsed_s"] = time.time() - budget.start
        write_report(report, out_dir)
        print(f"[gpu_report] {name}: {record['status']} in {record['seconds']:.0f} s", file=sys.stderr)

    def phase(name, fn, *fargs):
        t0, entries = time.time(), cache_entries(cache_dir)
        print(f"[gpu_report] {name} ({budget.left():.0f} s left)", file=sys.stderr)
        try:
            record = fn(*fargs)
        except Exception as exc:  # a phase's failure is recorded; the next phase runs
            record = dict(status="error", note=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        record_phase(name, record, t0, entries)

    def skipped(name, why):
        report["phases"].append(dict(name=name, status="skipped", note=why))

    def deadline(step):
        return budget.share(1.0, cap=settings["timeline_s"][step])

    # The build runs in the background beside the warm-up (the two share the CPU cores).
    t0, entries = time.time(), cache_entries(cache_dir)
    build_proc = None
    if "build" in phases and on_gpu:
        build_proc, build_record = start_build(args.build, paths, report, gpu, BUILD_JOBS if "warm" in phases else None)
        if build_proc is None:
            record_phase("build", build_record, t0, entries)
    elif "build" in phases:
        skipped("build", "no GPU: the CUDA extension is not built in a CPU smoke run")
    step_deadline = deadline("build+warm")
    if "warm" in phases:
        phase("warm", run_warm, step_deadline, paths, report, gpu, build_proc is not None)
    if build_proc is not None:
        # The build may use the rest of the step's time, and more when no other phase follows.
        end = step_deadline if phases - {"build"} else budget.share(1.0)
        try:
            record = finish_build(build_proc, build_record, end, paths, report)
        except Exception as exc:
            record = dict(status="error", note=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        record_phase("build", record, t0, entries)
    if "verify" in phases:
        phase("verify", run_verify, deadline("verify"), paths, report, on_gpu)
    if "smoke" in phases:
        marker = "gpu_smoke" if on_gpu else "gpu_smoke and needs_cuda"  # CPU: the pipeline, not the tests
        phase("smoke", run_pytest, "smoke", marker, deadline("smoke"), paths, report, on_gpu)
    if phases & {"verify", "smoke"}:
        # fails closed (see excluded_providers): a phase not run clears nothing
        report["excluded"] = excluded_providers(report.get("verify"), report.get("smoke"))
    device = "cuda" if on_gpu else "cpu"
    for name, kind in SCHEDULE:
        if kind not in phases:
            continue
        if args.quick and name.endswith("-extra"):
            skipped(name, "--quick: the headline cases only")
            continue
        cases = phase_cases(name, kind, on_gpu, args.quick)
        end = deadline(name) if name in settings["timeline_s"] else budget.share(0.5 if "tests" in phases else 1.0)
        phase(name, run_worker_phase, kind, cases, device, end, paths, settings, report, report["excluded"])
    if "tests" in phases:
        marker = "needs_cuda and not gpu_smoke" if "smoke" in phases else "needs_cuda"
        phase("tests", run_pytest, "tests", marker, budget.share(1.0), paths, report, on_gpu)
    report["complete"] = True
    report["elapsed_s"] = time.time() - budget.start
    logs = [paths[log].name for log in LOGS if paths[log].exists()]
    report["files"] = [f"{stem}.json", f"{stem}.md", *logs]
    if (report.get("verify") or {}).get("json"):
        report["files"].append(report["verify"]["json"])
    write_report(report, out_dir, plot=True)
    if report.get("plot"):
        report["files"].append(report["plot"])
        write_report(report, out_dir)
    print(f"[gpu_report] done in {report['elapsed_s']:.0f} s: {out_dir / stem}.md", file=sys.stderr)
    return 0
