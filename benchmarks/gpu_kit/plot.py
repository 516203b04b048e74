"""The report's PNG, from the report dict alone: speedup per ResNet-50 layer and images/s per provider."""

from __future__ import annotations

from pathlib import Path

from .summary import model_groups, ok_rows

BARS_WIDTH = 0.8  # the width of a group of bars side by side, one per provider


def _bar_width(n_providers: int) -> float:
    return BARS_WIDTH / max(n_providers, 1)


def _bar_x(group: int, k: int, n_providers: int) -> float:
    """The centre of provider k's bar in group `group` (groups are 1 apart)."""
    return group + (k - (n_providers - 1) / 2) * _bar_width(n_providers)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def render_plot(report: dict, path: Path) -> str | None:
    """Writes the PNG; returns None, or why no plot was written (e.g. matplotlib missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no PNG: matplotlib is not installed ({exc}); pip install matplotlib, then " \
               f"python benchmarks/gpu_report.py --render {report['stem']}.json"
    import bench_layers as bl

    fig, axes = plt.subplots(3, 1, figsize=(14, 13))
    ops = ok_rows(report.get("ops", []))
    batch = max((r["case"]["batch"] for r in ops), default=None)

    def medians(op_names):
        table: dict = {}
        for r in ops:
            case = bl.OpCase.from_dict(r["case"])
            if case.op in op_names and case.batch == batch and case.layer is not None:
                table.setdefault(case.layer, {}).setdefault(case.provider, {})[case.op] = r["median_ms"]
        return table

    panels = ((axes[0], ("eval",), "eval"), (axes[1], ("train_fwd", "train_bwd"), "training forward + backward"))
    for ax, op_names, title in panels:
        table = medians(op_names)
        layers = list(table)
        providers = [p for p in ("fused-triton", "fused-cuda", "fused-reference", "compile-unit", "conv-alone")
                     if any(p in table[layer] for layer in layers)]
        plotted = False
        for k, p in enumerate(providers):
            xs, ys = [], []
            for i, layer in enumerate(layers):
                cells, eager = table[layer].get(p, {}), table[layer].get("eager-unit", {})
                if all(o in cells and o in eager for o in op_names):
                    xs.append(_bar_x(i, k, len(providers)))
                    ys.append(sum(eager[o] for o in op_names) / sum(cells[o] for o in op_names))
            if xs:
                ax.bar(xs, ys, width=_bar_width(len(providers)), label=p)
                plotted = True
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"speedup over the eager unit per ResNet-50 layer: {title}, batch {batch}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([layer.name for layer in layers], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("eager ms / provider ms")
        if plotted:
            ax.legend(fontsize=8)
        else:
            _no_data(ax, "no per-layer measurements in this run")
    ax = axes[2]
    groups = [(label, rows) for label, rows in model_groups(report).items() if ok_rows(rows)]
    providers = list(dict.fromkeys(r["provider"] for _, rows in groups for r in ok_rows(rows)))
    for k, p in enumerate(providers):
        xs, ys = [], []
        for i, (_, rows) in enumerate(groups):
            r = next((r for r in ok_rows(rows) if r["provider"] == p), None)
            if r:
                xs.append(_bar_x(i, k, len(providers)))
                ys.append(r["images_per_s"])
        ax.bar(xs, ys, width=_bar_width(len(providers)), label=p)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([label for label, _ in groups], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("images/s")
    ax.set_title("images/s per provider")
    if providers:
        ax.legend(fontsize=7)
    else:
        _no_data(ax, "no model measurements in this run")
    p = report["provenance"]
    fig.suptitle(f"resnet_fused on {(p.get('gpu') or {}).get('name', 'CPU (smoke)')}, commit "
                 f"{(p.get('git_commit') or '?')[:10]}, {p['date_utc'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
