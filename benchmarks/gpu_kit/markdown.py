"""The report's markdown, from the report dict alone."""

from __future__ import annotations

from .plan import EAGER
from .summary import best, model_groups, ok_rows, ratio, targets


def _f(value, fmt: str, missing: str = "—") -> str:
    """value formatted, or `missing` when it is None."""
    return missing if value is None else format(value, fmt)


def _cell(text: str, limit: int) -> str:
    """text fit for one markdown table cell."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}x"


# What each fused provider's per-layer time is compared with, in column order, and the column's name.
BASELINES = {"eager-unit": "eager", "compile-unit": "compile", "conv-alone": "conv alone"}


def _op_tables(report: dict) -> list[str]:
    """One table per (op, batch, dtype): each layer's median per provider, the fused providers'
    speedups, a total over ResNet-50's layers, and the largest difference from the eager unit."""
    import bench_layers as bl

    rows = report.get("ops", [])
    lines = []
    order = [p for p in ("conv-alone", "eager-unit", "compile-unit", "fused-reference", "fused-triton", "fused-cuda")
             if any(r["provider"] == p and r["status"] == "ok" for r in rows)]
    names = {"conv-alone": "conv alone", "eager-unit": "eager unit", "compile-unit": "compile unit"}
    groups: dict[tuple, dict] = {}
    for row in rows:
        case = bl.OpCase.from_dict(row["case"])
        where = case.layer if case.layer is not None else case.shape
        groups.setdefault((case.op, case.batch, case.dtype), {}).setdefault(where, {})[case.provider] = row
    titles = {"eval": "conv + BN (+ add) (+ ReLU), eval", "train_fwd": "training forward",
              "train_bwd": "training backward (dgrad + wgrad + BN backward)", "add_relu": "add_relu (memory-bound)"}
    for (op, batch, dtype), by_where in groups.items():
        present = [p for p in order if any(p in cells and cells[p]["status"] == "ok" for cells in by_where.values())]
        if not present:
            continue
        rate = "GB/s" if op == "add_relu" else "TFLOP/s"
        lines += ["", f"### {titles[op]}: batch {batch}, {dtype}", ""]
        header = ["layer", "shape", "x"] if op != "add_relu" else ["output shape"]
        header += [f"{names.get(p, p)} ms ({rate})" for p in present]
        comparisons = [(p, base) for p in present if p.startswith("fused-") for base in BASELINES if base in present]
        header += [f"{p} vs {BASELINES[base]}" for p, base in comparisons]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        totals = {p: 0.0 for p in present}
        complete = {p: True for p in present}
        for where, cells in by_where.items():
            if op == "add_relu":
                row = [f"{batch}x{where[0]}x{where[1]}x{where[1]}"]
                count = 1
            else:
                row = [where.name, f"{where.c_in}->{where.c_out} {where.kernel}x{where.kernel}/{where.stride} "
                                   f"@{where.h_in} {where.epilogue}", str(where.count)]
                count = where.count
            med = {}
            for p in present:
                cell = cells.get(p)
                if cell and cell["status"] == "ok":
                    med[p] = cell["median_ms"]
                    totals[p] += count * cell["median_ms"]
                    rate_value = cell.get("gbps") if op == "add_relu" else cell.get("tflops")
                    row.append(f"{cell['median_ms']:.3f} ({_f(rate_value, '.3g')})")
                else:
                    complete[p] = False
                    row.append("skipped" if cell and cell["status"] == "skipped" else ("error" if cell else "—"))
            row += [_x(ratio(med.get(base), med.get(p))) for p, base in comparisons]
            lines.append("| " + " | ".join(row) + " |")
        if op != "add_relu":
            row = ["**total**", "sum over these rows of x times ms", ""]
            row += [f"**{totals[p]:.2f}**" if complete[p] else "incomplete" for p in present]
            row += [f"**{totals[base] / totals[p]:.2f}x**" if complete[p] and complete[base] and totals[p] else "—"
                    for p, base in comparisons]
            lines.append("| " + " | ".join(row) + " |")
        diffs = []
        for p in present:
            if p in ("eager-unit", "conv-alone"):
                continue
            vals = [(c[p]["max_abs_diff"], c[p]["reference_max_abs"]) for c in by_where.values()
                    if p in c and c[p]["status"] == "ok" and c[p].get("max_abs_diff") is not None]
            if vals:
                worst = max(vals, key=lambda v: v[0] / (v[1] or 1.0))
                diffs.append(f"{p} {worst[0]:.3g} (of max |eager| {worst[1]:.3g})")
        if diffs:
            lines += ["", "Largest |difference| from the eager unit's outputs over these layers: "
                      + "; ".join(diffs) + "."]
    return lines


def render_markdown(report: dict) -> str:
    lines = _run_summary(report) + _build_and_tests(report) + _targets(report) + _models(report)
    if report.get("ops"):
        lines += ["", "## ResNet-50 layers", "",
                  "Each cell: median ms (TFLOP/s, convolution FLOPs only; the backward counts dgrad + wgrad; "
                  "add_relu: GB/s of reading x and residual and writing y). Speedup = other's ms / fused ms, so "
                  "above 1 means the fused unit is faster; 'vs conv alone' is against cuDNN's convolution "
                  "without BN or ReLU, the floor. x: how many ResNet-50 layers share the shape."]
        lines += _op_tables(report)
    lines += _not_measured(report)
    if report.get("plot"):
        lines += ["", f"![speedup per ResNet-50 layer and images/s per provider]({report['plot']})"]
    elif report.get("plot_note"):
        lines += ["", f"Plot: {report['plot_note']}"]
    return "\n".join(lines) + "\n"


def _run_summary(report: dict) -> list[str]:
    """The title, the provenance, the phases and the backends."""
    p = report["provenance"]
    gpu = p.get("gpu")
    device = gpu["name"] if gpu else "CPU (smoke run: no GPU, so no fused-kernel numbers)"
    lines = [
        f"# resnet_fused report: {device}, {p['date_utc'][:10]}",
        "",
        f"Written by `benchmarks/gpu_report.py`; do not edit by hand. Every number is in `{report['stem']}.json`.",
        "",
        f"- commit `{p.get('git_commit') or 'unknown (not a git checkout)'}`"
        + (" with uncommitted changes (listed in the JSON)" if p.get("git_dirty") else ""),
        f"- GPU: {device}" + (f", compute capability {gpu['capability']}, {gpu['memory_gib']} GiB, "
                              f"driver {p.get('driver')}" if gpu else ""),
        f"- torch {p['torch']} (CUDA {p.get('cuda')}, cuDNN {p.get('cudnn')}), torchvision {p['torchvision']}, "
        f"triton {p['triton']}, Python {p['python']}",
        f"- command: `{p['command']}`",
        f"- run: {report['settings']['mode']}, budget {report['settings']['budget_s']:.0f} s, took "
        f"{report.get('elapsed_s', 0):.0f} s"
        + ("" if report.get("complete") else " (**incomplete: the run stopped early**)"),
        "",
        "The timeline: each phase's planned most seconds (build and warm share one step, side by side), "
        "what it took, and how many Triton kernels it still compiled (misses in Triton's on-disk cache).",
        "",
        "| phase | status | planned s | seconds | Triton kernels compiled | note |",
        "|---|---|---|---|---|---|",
    ]
    for ph in report["phases"]:
        note = "; ".join(filter(None, [ph.get("note"), *ph.get("notes", [])]))
        cases = ph.get("cases")
        if cases:
            counted = f"{cases['ok']} ok, {cases['skipped']} skipped, {cases['error']} errors"
            note = f"{counted}; {note}" if note else counted
        lines.append(f"| {ph['name']} | {ph['status']} | {_f(ph.get('planned_s'), '.0f')} | "
                     f"{_f(ph.get('seconds'), '.0f')} | {_f(ph.get('triton_kernels_compiled'), 'd')} | "
                     f"{_cell(note, 300)} |")
    backends = p.get("backends")
    if backends:
        lines += ["", "Backends: " + ", ".join(f"{k}: {'usable' if v is None else v}" for k, v in backends.items())]
    return lines


def _build_and_tests(report: dict) -> list[str]:
    lines = []
    if report.get("build"):
        b = report["build"]
        lines += ["", "## Build", "",
                  f"The CUDA extension was {b.get('how', 'built here')}: `{b['command']}` ({b.get('env')}): "
                  f"{b['status']} in {b['seconds']} s; cuda backend afterwards: "
                  f"{b.get('cuda_backend_after') or 'usable'}. Log: `{b['log']}`."]
    w = report.get("warm")
    if w:
        g, c = w["triton_gate"], w["compile_baseline"]
        lines += ["", "## Warm-up", "",
                  f"Triton compile gate (`{g['command']}`, {g['jobs']} jobs): exit status {g['returncode']}, "
                  f"{_f(g.get('unique_compiles'), 'd')} kernels for {g.get('target')} in {_f(g.get('seconds'), '.0f')} s, "
                  f"{_f(g.get('cache_hits'), 'd')} of them already cached. torch.compile's baseline: {c['warmed']} "
                  f"compiled, {c['error']} errors, {c['not_reached']} not reached. Log: `{w['log']}`."]
        lines += [f"- `{_cell(e, 300)}`" for e in w["errors"]]
    lines += _verify(report.get("verify"))
    for name, title in (("smoke", "GPU smoke tests (gpu_smoke)"), ("tests", "The rest of the GPU test suite")):
        t = report.get(name)
        if not t:
            continue
        counts = ", ".join(f"{n} {k}" for k, n in t["counts"].items()) or "no summary line"
        lines += ["", f"## {title}", "", f"`{t['command']}`: **{t['status']}** ({counts}) in {t['seconds']} s "
                                         f"(limit {t.get('time_limit_s')} s). Log: `{t['log']}`."]
        if not t.get("on_gpu"):
            lines.append("No GPU here: the GPU tests skip.")
        verdicts = t.get("backends") or {}
        if verdicts:
            lines += ["", "| backend | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
            for backend, v in sorted(verdicts.items()):
                n = v["counts"]
                lines.append(f"| {backend} | {n.get('passed', 0)} | {n.get('failed', 0)} | {n.get('error', 0)} | "
                             f"{n.get('skipped', 0)} |")
        for f in t["failed"][:40]:
            lines.append(f"- `{f[:200]}`")
    for provider, why in (report.get("excluded") or {}).items():
        lines += ["", f"**{provider} is not benchmarked**: {why}."]
    return lines


def _verify(v: dict | None) -> list[str]:
    """The verifier's verdicts (what `auto` trusts) and its per-layer timings and choices."""
    if not v:
        return []
    lines = ["", "## Verification (python -m resnet_fused.verify)", "",
             f"`{v['command']}`: **{v['status']}** in {v['seconds']} s (limit {v.get('time_limit_s')} s). "
             f"Log: `{v['log']}`" + (f"; JSON: `{v['json']}`." if v.get("json") else f". {v.get('note', '')}")]
    if v.get("backends"):
        lines += ["", "| backend | verdict | worst error / allowed | seconds | first reason |", "|---|---|---|---|---|"]
        for name, b in sorted(v["backends"].items()):
            reasons = b.get("reasons") or []
            lines.append(f"| {name} | {b['verdict']} | {_f(b.get('worst_ratio'), '.3f')} | {_f(b.get('seconds'), '.0f')}"
                         f" | {_cell(reasons[0], 200) if reasons else ''} |")
    timings = v.get("timings") or {}
    if timings:
        providers = sorted({p for row in timings.values() for p in row["ms"]})
        lines += ["", "| layer shape | " + " | ".join(f"{p} ms" for p in providers) + " | auto runs |",
                  "|---" * (len(providers) + 2) + "|"]
        for row in sorted(timings.values(), key=lambda r: r["label"]):
            lines.append(f"| {row['label']} | " + " | ".join(_f(row["ms"].get(p), ".3f") for p in providers)
                         + f" | {row['backend']} |")
    return lines


def _targets(report: dict) -> list[str]:
    lines = ["", "## Targets (resnet50, bf16, batch 256, 224x224)", "",
             "| target | measured | status |", "|---|---|---|"]
    for tg in targets(report):
        measured = tg["measured"] or f"needs {tg['missing']}"
        lines.append(f"| {tg['target']} | {measured} | {tg['status']} |")
    return lines


def _models(report: dict) -> list[str]:
    """One table per model configuration: each provider's rate, speedups, memory and logit check."""
    lines = []
    groups = model_groups(report)
    if groups:
        lines += ["", "## Models", "", "img/s from the median step; speedups are ratios of medians from this run. "
                  "max abs dlogit: against torchvision eager's eval logits on the same input, before any training "
                  "step. Peak: `torch.cuda.max_memory_allocated` during the timed steps (it includes the "
                  "torchvision model kept as the source of the weights). First call s: the logit check and the "
                  "first step, where torch.compile, Triton autotuning and cuDNN's search happen."]
    for label, rows in groups.items():
        eager = next((r for r in ok_rows(rows) if r["provider"] == EAGER), None)
        best_compile = best(rows, [r["provider"] for r in rows if r["provider"].startswith("torchvision-compile")])
        lines += ["", f"### {label}", "",
                  "| provider | img/s | ms/step (p20-p80) | vs eager | vs best compile | peak MiB | max abs dlogit | "
                  "fused ops ran on | first call s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['provider']} | {r['status']}: {_cell(r.get('reason', ''), 200)} | | | | | | | |")
                continue
            used = ", ".join(f"{k} x{v}" for k, v in sorted((r.get("backends_used") or {}).items())) or "—"
            lines.append(
                f"| {r['provider']} | {r['images_per_s']:,.1f} | "
                f"{r['median_ms']:.2f} ({r['p20_ms']:.2f}-{r['p80_ms']:.2f}) | "
                f"{_x(ratio(r['images_per_s'], eager and eager['images_per_s']))} | "
                f"{_x(ratio(r['images_per_s'], best_compile and best_compile['images_per_s']))} | "
                f"{_f(r.get('peak_memory_mib'), ',.0f')} | {r['max_abs_logit_diff']:.2e} | {used} | "
                f"{r['warmup_s']:.1f} |")
    return lines


def _not_measured(report: dict) -> list[str]:
    """The rows that were skipped or failed, counted by (kind, provider, status, reason)."""
    not_run: dict[tuple, int] = {}
    for r in report.get("models", []) + report.get("ops", []):
        if r["status"] != "ok":
            key = (r["kind"], r["provider"], r["status"], (r.get("reason") or "")[:240])
            not_run[key] = not_run.get(key, 0) + 1
    if not not_run:
        return []
    lines = ["", "## Not measured", "", "| kind | provider | status | cases | reason |", "|---|---|---|---|---|"]
    for (kind, provider, status, reason), n in not_run.items():
        lines.append(f"| {kind} | {provider} | {status} | {n} | {_cell(reason, 240)} |")
    return lines
