"""What a report's rows say: the headline targets, and the row groupings the markdown and the plot share."""

from __future__ import annotations

from .plan import EAGER, FUSED_MODEL_PROVIDERS


def ratio(a, b) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    return None if a is None or b is None or b == 0 else a / b


def ok_rows(rows):
    """The rows that were measured."""
    return [r for r in rows if r.get("status") == "ok"]


def model_groups(report: dict) -> dict[str, list[dict]]:
    """The model rows by configuration ("resnet50 infer, batch 256, 224x224, bf16"), in run order."""
    groups: dict[str, list[dict]] = {}
    for row in report.get("models", []):
        c = row["config"]
        label = f"{c['model']} {c['mode']}, batch {c['batch']}, {c['image_size']}x{c['image_size']}, {c['precision']}"
        groups.setdefault(label, []).append(row)
    return groups


def best(rows, providers):
    """The measured row with the most images/s among `providers`, or None."""
    candidates = [r for r in ok_rows(rows) if r["provider"] in providers]
    return max(candidates, key=lambda r: r["images_per_s"]) if candidates else None


def targets(report: dict) -> list[dict]:
    """The project's performance targets, each with what this run measured (resnet50, bf16, batch 256, 224x224)."""
    def group(mode):
        headline = dict(model="resnet50", mode=mode, batch=256, image_size=224, precision="bf16")
        return [r for r in report.get("models", []) if all(r["config"][k] == v for k, v in headline.items())]

    def provider(rows, name):
        return next((r for r in ok_rows(rows) if r["provider"] == name), None)

    infer, train = group("infer"), group("train")
    fused_i, fused_t = best(infer, FUSED_MODEL_PROVIDERS), best(train, FUSED_MODEL_PROVIDERS)
    eager_i, eager_t = provider(infer, EAGER), provider(train, EAGER)
    frozen = provider(infer, "torchvision-compile-max-autotune-freezing")
    compiled_t = best(train, ("torchvision-compile", "torchvision-compile-max-autotune"))

    def ratio_target(name, goal, fused, base, base_name):
        value = ratio(fused and fused["images_per_s"], base and base["images_per_s"])
        what = f"{fused['provider']} {value:.2f}x {base['provider']}" if value is not None else None
        missing = ", ".join(n for n, r in (("the fused model", fused), (base_name, base)) if r is None)
        return dict(target=name, goal=goal, value=value, measured=what, missing=missing or None)

    def activation(r):
        if r is None or r.get("peak_memory_mib") is None:
            return None
        return r["peak_memory_mib"] - r.get("memory_before_mib", 0.0)

    out = [
        ratio_target("inference >= 2.0x torchvision eager (channels_last, bf16)", 2.0, fused_i, eager_i, "eager"),
        ratio_target("inference >= 1.1x torch.compile max-autotune with freezing", 1.1, fused_i, frozen,
                     "compile max-autotune + freezing"),
        ratio_target("training step >= 1.4x eager AMP channels_last", 1.4, fused_t, eager_t, "eager"),
        ratio_target("training step >= 1.1x torch.compile", 1.1, fused_t, compiled_t, "torch.compile"),
    ]
    mem = ratio(activation(fused_t), activation(eager_t))
    out.append(dict(target="training activation memory <= 0.6x eager's (peak minus the memory held before the step)",
                    goal=0.6, value=mem, lower_is_better=True,
                    measured=f"{fused_t['provider']} {mem:.2f}x" if mem is not None else None,
                    missing=None if mem is not None else "a fused and an eager training step on a GPU"))
    rate = fused_t["images_per_s"] if fused_t else None
    out.append(dict(target="training >= 7,000 images/s (best MLPerf ResNet-50 per-GPU rate on H100)", goal=7000,
                    value=rate, measured=f"{fused_t['provider']} {rate:,.0f} img/s" if rate else None,
                    missing=None if rate else "a fused training step"))
    for t in out:
        if t["value"] is None:
            t["status"] = "not measured"
        elif t.get("lower_is_better"):
            t["status"] = "met" if t["value"] <= t["goal"] else "not met"
        else:
            t["status"] = "met" if t["value"] >= t["goal"] else "not met"
    return out
