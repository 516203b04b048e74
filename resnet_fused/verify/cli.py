"""`python -m resnet_fused.verify`: check the fused backends on this device, time them against
PyTorch's own kernels per layer shape, and store the verdict `auto` reads (cache.py).

Each backend runs in a worker process of its own with a time limit (worker.py): an exception,
a CUDA error, an abort, a segfault or a hang becomes that backend's verdict, never this
command's end. Exit code 0 when every checked backend passed, 1 when any failed, crashed or
timed out, 2 for a bad argument.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..benchmark.cli import _int_at_least, model_error, nonnegative_int, positive_int
from . import cache
from .worker import PROGRESS_PREFIX

FUSED_BACKENDS = ("cuda", "triton")
PRECISION_NAMES = ("bf16", "fp16", "fp32")
MODE_NAMES = ("infer", "train")
# Per device type: the models, precisions, batch and image size checked by default. On CPU the
# Triton interpreter (about a second per small op): float32, small images.
DEFAULTS = {
    "cuda": dict(model="resnet50,resnet18", precision="bf16,fp16,fp32", batch=32, image_size=224, timeout=600),
    "cpu": dict(model="resnet50,resnet18", precision="fp32", batch=2, image_size=16, timeout=300),
}
_TAIL_LINES = 30


def _csv(choices: tuple[str, ...] | None, what: str):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",")]
        if not text.strip() or any(not t for t in items):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        if choices is not None:
            unknown = [t for t in items if t not in choices]
            if unknown:
                raise argparse.ArgumentTypeError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m resnet_fused.verify",
        description="Check resnet_fused's fused kernels on this GPU against float64 and time them against "
                    "PyTorch's own kernels per layer; `auto` then runs the faster per layer. Writes the verdict "
                    f"to the cache (${cache.CACHE_DIR_ENV_VAR}, default ~/.cache/resnet_fused).")
    p.add_argument("--device", default=None,
                   help="cuda, cuda:N or cpu (default: cuda when a GPU is present, else cpu: the Triton "
                        "interpreter, float32, small shapes, no timing)")
    p.add_argument("--backends", type=_csv(FUSED_BACKENDS, "backend"), default=None,
                   help="the fused backends to check (default: every one; cuda needs a GPU)")
    p.add_argument("--model", type=_csv(None, "model"), default=None,
                   help="models whose layer shapes are checked: the main job's names, timm:NAME, hf:resnet-50 "
                        f"(default: {DEFAULTS['cuda']['model']})")
    p.add_argument("--precision", type=_csv(PRECISION_NAMES, "precision"), default=None,
                   help="bf16, fp16 (autocast), fp32 (with TF32 on and off); default: all three on a GPU, fp32 on CPU")
    p.add_argument("--mode", type=_csv(MODE_NAMES, "mode"), default=list(MODE_NAMES),
                   help="infer, train (default: both)")
    p.add_argument("--batch", type=positive_int, default=None, help="batch size (default: 32 on a GPU, 2 on CPU)")
    p.add_argument("--image-size", type=_int_at_least(8, "an integer of 8 or more"), default=None,
                   help="input height and width (default: 224 on a GPU, 16 on CPU)")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="seconds each backend's checks may take before it is judged 'timed out' (default: 600 on "
                        "a GPU, 300 on CPU)")
    p.add_argument("--seed", type=nonnegative_int, default=None, help="random inputs' seed (default: a fresh one)")
    p.add_argument("--json", type=Path, default=None, help="also write the verdicts and timings to this file")
    p.add_argument("--no-cache", action="store_true", help="do not write the verdict to the cache")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no work, each an argparse error naming the argument; fills defaults."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cuda", "cpu") or (device.type == "cpu" and device.index):
        p.error(f"argument --device: expected cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("argument --device: cuda was asked for but no CUDA GPU is visible (use --device cpu for the "
                    "Triton interpreter's checks)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            p.error(f"argument --device: {args.device} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    args.device = str(device)
    defaults = DEFAULTS[device.type]
    args.backends_named = args.backends is not None  # an unavailable backend asked for by name fails the run
    if args.backends is None:
        args.backends = list(FUSED_BACKENDS) if device.type == "cuda" else ["triton"]
    elif device.type == "cpu" and "cuda" in args.backends:
        p.error("argument --backends: the cuda backend runs on a GPU only (--device cuda)")
    args.model = args.model or defaults["model"].split(",")
    for name in args.model:
        if (reason := model_error(name)) is not None:
            p.error(f"argument --model: {reason}")
    args.precision = args.precision or defaults["precision"].split(",")
    if device.type == "cpu" and set(args.precision) - {"fp32"}:
        p.error("argument --precision: on --device cpu only fp32 (the Triton interpreter checks float32; "
                "bf16 and fp16 need a GPU)")
    args.batch = args.batch or defaults["batch"]
    args.image_size = args.image_size or defaults["image_size"]
    if "train" in args.mode and args.batch < 2:
        p.error("argument --batch: training BatchNorm needs at least 2 values per channel: --batch 2 or more "
                "(or --mode infer)")
    args.timeout = args.timeout or defaults["timeout"]
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    if args.json is not None:
        parent = args.json.resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            p.error(f"argument --json: directory {str(parent)!r} does not exist or is not writable")


def _precisions(args) -> list[str]:
    """fp32 is checked with TF32 off and, on a GPU, on."""
    out = []
    for name in args.precision:
        out.append(name)
        if name == "fp32" and args.device.startswith("cuda"):
            out.append("fp32-tf32")
    return out


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def run_backend(backend: str, spec: dict, timeout: float, progress) -> dict:
    """One backend's worker: its result, or a crashed / timed out verdict with its output's tail."""
    env = dict(os.environ)
    if spec["device"] == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="resnet_fused_verify_") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(dict(spec, backend=backend)))
        # In this process's group (no new session): whoever kills this command's group (a
        # time limit, Ctrl-C) kills the worker too, never leaving it on the GPU.
        proc = subprocess.Popen([sys.executable, "-m", "resnet_fused.verify.worker", str(spec_path), str(result_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
        tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)

        def read():
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    done, total = (int(v) for v in line.split()[-2:])
                    progress(backend, done, total)
                else:
                    tail.append(line.rstrip("\n"))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start = time.monotonic()
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        seconds = round(time.monotonic() - start, 1)
        output = "\n".join(tail)
        if timed_out:
            return dict(backend=backend, verdict="timed out", seconds=seconds, output_tail=output,
                        reasons=[f"the checks did not finish within {timeout:g} s"])
        result = None
        if proc.returncode == 0:
            try:
                result = json.loads(result_path.read_text())
            except (OSError, ValueError):
                result = None
        if result is None:
            return dict(backend=backend, verdict="crashed", seconds=seconds, output_tail=output,
                        reasons=[f"the worker process ended with {_signal_name(proc.returncode)}"
                                 + ("" if proc.returncode else " and no result")])
        return dict(result, seconds=seconds)


def merge_timings(results: dict[str, dict]) -> dict:
    """Per layer shape (auto's shape key): each provider's ms and the choice among the passed
    backends and the reference."""
    merged: dict[str, dict] = {}
    for name, result in results.items():
        if result.get("verdict") != "passed":
            continue
        for key, entry in (result.get("timings") or {}).items():
            row = merged.setdefault(key, dict(label=entry["label"], ms={}))
            row["ms"][name] = entry["ms"][name]
            row["ms"].setdefault("reference", entry["ms"]["reference"])
    for row in merged.values():
        row["backend"] = min(row["ms"], key=row["ms"].get)
    return merged


def _finite(value):
    """JSON has no inf/nan: such a ratio is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def table(record: dict) -> str:
    lines = ["backend  verdict     worst error/allowed  seconds  notes"]
    for name, result in record["backends"].items():
        worst = result.get("worst_ratio")
        worst_text = f"{worst:.3f}" if isinstance(worst, (int, float)) else "-"
        note = "; ".join(result.get("reasons") or [])[:200]
        fallbacks = [layer for layer in result.get("layers") or [] if layer.get("fallback")]
        if fallbacks:  # not a failure: auto runs those layers on the reference, as an explicit backend does
            note = (note + "; " if note else "") + (f"{len(fallbacks)} checked layer(s) not covered, the reference "
                                                    f"runs them (first: {fallbacks[0]['label']}: {fallbacks[0]['fallback']})")
        lines.append(f"{name:8} {result['verdict']:11} {worst_text:>19}  {result.get('seconds', '-'):>7}  {note}")
        if result["verdict"] in ("crashed", "timed out") and result.get("output_tail"):
            lines += ["    | " + line for line in result["output_tail"].splitlines()[-10:]]
    timings = record.get("timings") or {}
    if timings:
        providers = sorted({p for row in timings.values() for p in row["ms"]})
        lines += ["", "layer shape".ljust(52) + "".join(f"{p + ' ms':>14}" for p in providers) + "  choice"]
        for row in sorted(timings.values(), key=lambda r: r["label"]):
            lines.append(row["label"][:52].ljust(52) + "".join(
                f"{row['ms'][p]:14.3f}" if p in row["ms"] else f"{'-':>14}" for p in providers) + f"  {row['backend']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    device = torch.device(args.device)
    spec = dict(device=args.device, models=args.model, precisions=_precisions(args), modes=args.mode,
                batch=args.batch, image_size=args.image_size, seed=args.seed, timing=device.type == "cuda")
    key = cache.device_key(device)
    print(f"resnet_fused.verify: {', '.join(args.backends)} on {key['device']} "
          f"({', '.join(args.model)}; {', '.join(spec['precisions'])}; {', '.join(args.mode)}; batch {args.batch}, "
          f"{args.image_size}x{args.image_size}; seed {args.seed})", flush=True)
    bars = {}

    def progress(backend, done, total):
        if args.no_progress:
            return
        from tqdm import tqdm

        bar = bars.get(backend)
        if bar is None:
            bar = bars[backend] = tqdm(total=total, desc=f"verify {backend}", unit="check", file=sys.stderr,
                                        disable=None)  # None: off when stderr is not a terminal
        bar.update(done - bar.n)

    results: dict[str, dict] = {}

    def publish() -> dict:
        """The record of the backends checked so far, written to the cache and --json after each
        backend: a run cut short (a time limit) keeps the verdicts it reached."""
        record = dict(checked=dict(models=args.model, precisions=spec["precisions"], modes=args.mode,
                                   batch=args.batch, image_size=args.image_size, seed=args.seed),
                      backends={name: {k: v for k, v in r.items() if k != "timings"} for name, r in results.items()},
                      timings=merge_timings(results))
        if not args.no_cache:
            previous = cache.read(key) or {}
            stored = dict(record, backends={**(previous.get("backends") or {}), **record["backends"]},
                          timings={**(previous.get("timings") or {}), **record["timings"]})
            record["cache_file"] = str(cache.write(key, _finite(stored)))
        if args.json is not None:
            args.json.write_text(json.dumps(_finite(dict(record, key=key)), indent=1))
        return record

    record = None
    for backend in args.backends:
        results[backend] = run_backend(backend, spec, args.timeout, progress)
        if backend in bars:
            bars.pop(backend).close()
        record = publish()
    print(table(record))
    if "cache_file" in record:
        print(f"verdict written to {record['cache_file']}")
    bad = [n for n, r in results.items() if r["verdict"] in ("failed", "crashed", "timed out")
           or (r["verdict"] == "unavailable" and args.backends_named)]
    return 1 if bad else 0
