"""One backend's checks, in a process of its own (the verifier's parent survives whatever happens
here): `python -m resnet_fused.verify.worker SPEC.json RESULT.json`.

Prints `resnet_fused.verify progress DONE TOTAL` lines for the parent's progress bar and writes
its findings to RESULT.json; an exception, a CUDA error or a crash leaves no result, and the
parent reports the output's tail.
"""

from __future__ import annotations

import json
import sys

PROGRESS_PREFIX = "resnet_fused.verify progress"


def run(spec: dict) -> dict:
    import torch

    from .. import backends
    from ..benchmark.models import model_input
    from . import checks

    backend = spec["backend"]
    result = dict(backend=backend, verdict="passed", reasons=[], worst_ratio=0.0, layers=[], timings={})
    reason = backends.unavailable_reason(backend)
    if reason is not None:
        return dict(result, verdict="unavailable", reasons=[reason])
    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The models' layer calls, recorded on the reference backend.
    models, calls = [], []
    for model_name in spec["models"]:
        base, fused = checks.build_models(model_name, device)
        x = model_input(spec["batch"], spec["image_size"], device, seed=spec["seed"])
        models.append((model_name, base, fused, x))
        for precision in spec["precisions"]:
            for mode in spec["modes"]:
                calls += checks.record_layer_calls(fused, x, precision, mode)
    types = checks.layer_types(calls)
    timed = list(dict.fromkeys(calls)) if spec["timing"] else []  # models share layer calls
    total = len(types) + len(models) * len(spec["precisions"]) + len(timed)
    done = 0

    def progress():
        nonlocal done
        done += 1
        print(f"{PROGRESS_PREFIX} {done} {total}", flush=True)

    findings = []
    for i, call in enumerate(types):
        findings.append(checks.check_layer(call, backend, device, spec["seed"] + i))
        progress()
    # The whole-model comparison only for a backend whose ops all passed: a failed op already
    # decides the verdict, and the model check is the slow part (the interpreter's on CPU).
    ops_failed = any(found.failures for found in findings)
    for model_name, base, fused, x in models:
        for precision in spec["precisions"]:
            if not ops_failed:
                found = checks.check_model(base, fused, backend, x, precision)
                found.label = f"{model_name}: {found.label}"
                findings.append(found)
            progress()
    for found in findings:
        result["layers"].append(dict(label=found.label, worst_ratio=found.worst, worst_tensor=found.worst_tensor,
                                     failures=found.failures, fallback=found.fallback))
        result["worst_ratio"] = max(result["worst_ratio"], found.worst)
        result["reasons"] += [f"{found.label}: {failure}" for failure in found.failures]
    if result["reasons"]:
        result["verdict"] = "failed"
    elif all(found.fallback for found in findings):
        result["verdict"] = "failed"
        result["reasons"] = [f"the backend ran none of the checked layers ({findings[0].fallback})"]
    if result["verdict"] == "passed":
        for i, call in enumerate(timed):
            key, ms = checks.time_layer(call, [backend, "reference"], device, spec["seed"] + i)
            result["timings"][key] = dict(label=call.label, ms=ms)
            progress()
    return result


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    result = run(spec)
    with open(result_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
