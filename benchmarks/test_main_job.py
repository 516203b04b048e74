"""CPU smoke of the main job (`python -m resnet_fused.benchmark`, or the `resnet-fused-benchmark`
console script), as a user runs it: the table with its spread columns, the plain statement that the
fused kernels need a GPU, the train-mode label of the logit check, and the --json file; plus unit
tests of the spread warning (on synthetic timings), the progress count and the recorded command.
Plain tests, not benchmarks: no timing is checked."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resnet_fused import benchmark as mb

SMALL_RUN = ["--model", "resnet18", "--batch", "2", "--image-size", "64", "--iters", "2", "--warmup", "1"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _check_spread(result):
    """The spread fields agree with the timings and with the warning (whatever the timings were)."""
    meta = result["meta"]
    assert meta["spread_warn_ratio"] == mb.SPREAD_WARN_RATIO
    assert isinstance(meta["threads"], int) and meta["threads"] >= 1
    ok = [row for row in result["results"] if row["status"] == "ok"]
    for row in ok:
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert math.isclose(row["spread"], row["p80_ms"] / row["p20_ms"])
        assert row["wide_spread"] == (row["spread"] > mb.SPREAD_WARN_RATIO)
    wide = [row["provider"] for row in ok if row["wide_spread"]]
    if wide:
        assert all(provider in meta["timing_warning"] for provider in wide)
    else:
        assert meta["timing_warning"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the main job")
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_main_job_on_cpu(tmp_path, mode):
    out = tmp_path / "result.json"
    args = [*SMALL_RUN, "--mode", mode, "--no-progress", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.benchmark", *args],
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "No CUDA GPU here: the fused CUDA and Triton backends need one" in proc.stderr
    result = json.loads(out.read_text())
    rows = {row["provider"]: row for row in result["results"] if row.get("status") != "skipped"}
    skipped = {row["provider"]: row["reason"] for row in result["results"] if row.get("status") == "skipped"}
    assert {"fused-reference", "torchvision-eager"} <= set(rows)
    assert all("GPU" in reason for provider, reason in skipped.items() if provider in ("fused-cuda", "fused-triton"))
    for row in rows.values():
        assert row["images_per_s"] > 0
    # Same weights, same input: the fused model is the same network (float32 rounding only).
    assert rows["fused-reference"]["max_abs_logit_diff"] < 1e-3
    assert rows["fused-reference"]["backends_used"] == {"reference": 20}  # all 20 units of resnet18 ran fused ops
    for provider in rows:
        assert provider in proc.stdout, f"{provider} missing from the printed table"

    header = next(line for line in proc.stdout.splitlines() if line.startswith("provider"))
    for column in ("ms/iter", "p20", "p80", "spread", "speedup"):
        assert column in header
    _check_spread(result)
    if result["meta"]["timing_warning"] is not None:  # timing noise decides whether it is there; not checked
        assert "WARNING: noisy timings" in proc.stderr and "run nothing else on the machine" in proc.stderr
    assert result["meta"]["command"] == "python -m resnet_fused.benchmark " + " ".join(args)

    # In train mode the logit column is the eval check made before training, and the table says so.
    footnote = "* max|dlogit|: the eval-mode logits against torchvision eager's, checked once before training"
    if mode == "train":
        assert "max|dlogit|*" in header and footnote in proc.stdout
        assert "before training" in result["meta"]["logit_check"]
    else:
        assert "max|dlogit|*" not in header and footnote not in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the main job")
def test_console_script_records_its_name_and_shows_progress(tmp_path):
    script = shutil.which("resnet-fused-benchmark", path=str(Path(sys.executable).parent)) \
        or shutil.which("resnet-fused-benchmark")
    if script is None:
        pytest.skip("the resnet-fused-benchmark console script is not installed (pip install -e .)")
    out = tmp_path / "result.json"
    args = ["--model", "resnet18", "--batch", "2", "--image-size", "32", "--iters", "2", "--warmup", "1",
            "--providers", "fused-reference", "--json", str(out)]  # progress on
    proc = subprocess.run([script, *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(out.read_text())["meta"]["command"] == "resnet-fused-benchmark " + " ".join(args)
    # Per-call progress, naming the provider (torchvision-eager is put first as the baseline).
    total = mb.calls_per_provider(1, 2)
    assert "[1/2] torchvision-eager:" in proc.stderr and "[2/2] fused-reference:" in proc.stderr
    assert f"/{total} [" in proc.stderr  # the bar counts the provider's calls, warm-up included
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=600).stdout
    assert help_text.startswith("usage: resnet-fused-benchmark")


def _row(provider, p20, p80, status="ok"):
    return dict(provider=provider, status=status, p20_ms=p20, median_ms=(p20 + p80) / 2, p80_ms=p80)


def test_timing_warning_decision():
    tight = [_row("fused-reference", 10.0, 11.0), _row("torchvision-eager", 20.0, 24.0),
             dict(provider="fused-cuda", status="skipped", reason="no GPU")]
    assert mb.timing_warning(tight) is None
    # The threshold itself is not wide; just above it is.
    assert mb.timing_warning([_row("a", 10.0, 10.0 * mb.SPREAD_WARN_RATIO)]) is None
    assert mb.timing_warning([_row("a", 10.0, 10.0 * mb.SPREAD_WARN_RATIO + 0.01)]) is not None
    assert mb.timing_warning(tight, threshold=1.05) is not None

    # The case: one provider's timings swing many times.
    noisy = tight + [_row("torchvision-compile", 35.5, 679.0)]
    text = mb.timing_warning(noisy, "cpu", threads=2, cpus=2)
    assert "torchvision-compile 19.13" in text
    assert "fused-reference" not in text and "fused-cuda" not in text  # only the wide rows are named
    assert "OMP_NUM_THREADS=1" in text and "torch.set_num_threads" in text and "2 threads on 2 CPUs" in text
    alone = mb.timing_warning(noisy, "cpu", threads=1, cpus=2)  # one thread already: other work is the cause
    assert "other work on the machine" in alone and "OMP_NUM_THREADS" not in alone
    gpu_text = mb.timing_warning(noisy, "cuda")
    assert "torchvision-compile" in gpu_text and "OMP_NUM_THREADS" not in gpu_text

    assert mb.spread(_row("a", 10.0, 12.5)) == 1.25
    assert mb.spread(_row("a", 0.0, 1.0)) == math.inf


def test_recorded_command():
    args = ["--model", "resnet18", "--json", "my results.json"]
    module_run = mb.command_line(None, run_as_main=True, module="resnet_fused.benchmark",
                                 argv0="/x/resnet_fused/benchmark.py")
    assert module_run.startswith("python -m resnet_fused.benchmark")
    assert mb.program_name(False, "resnet_fused.benchmark", "/venv/bin/resnet-fused-benchmark") \
        == "resnet-fused-benchmark"
    assert mb.program_name(False, None, r"C:\venv\Scripts\resnet-fused-benchmark.exe".replace("\\", "/")) \
        == "resnet-fused-benchmark"
    assert mb.program_name(True, None, "resnet_fused/benchmark.py") == "python resnet_fused/benchmark.py"
    old = sys.argv
    sys.argv = ["/venv/bin/resnet-fused-benchmark", *args]
    try:
        assert mb.command_line(None, run_as_main=False, module="resnet_fused.benchmark", argv0=sys.argv[0]) \
            == "resnet-fused-benchmark --model resnet18 --json 'my results.json'"
    finally:
        sys.argv = old
    # Called from Python: that call is recorded, not the caller's command line.
    assert mb.command_line(args, run_as_main=False, module="resnet_fused.benchmark", argv0="pytest") \
        == f"resnet_fused.benchmark.main({args!r})"


def test_progress_counts_every_model_call():
    device = torch.device("cpu")
    tv_model = mb.torchvision_model("resnet18", device)
    x = mb.model_input(2, 32, device)
    reference_logits = mb.reference_logits_for(tv_model, x, "fp32")
    phases = []
    row = mb.run_model_provider("fused-reference", tv_model, x, "train", "fp32", reference_logits,
                                warmup=2, rounds=3, progress=phases.append)
    assert row["rounds"] == 3
    assert phases == ["check"] + ["warm-up"] * 3 + ["timed"] * 3
    assert len(phases) == mb.calls_per_provider(2, 3)


# --cuda-graphs and --reduce-overhead: GPU-only providers. On the CPU, what can be checked is the
# plumbing: the provider lists, the skip reasons, and the capture's order with a stand-in torch.cuda.

GPU_ONLY = (*mb.CUDA_GRAPH_PROVIDERS, "torchvision-compile-reduce-overhead", "fused-auto-compile-reduce-overhead")


def test_cuda_graph_and_reduce_overhead_providers():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert set(GPU_ONLY) <= set(mb.MODEL_PROVIDERS)
    for provider in GPU_ONLY:
        assert "CUDA GPU" in mb.provider_skip_reason(provider, cpu), provider
    assert mb.provider_skip_reason("torchvision-eager-cuda-graph", cpu) == \
        "CUDA graphs need a CUDA GPU (torch.cuda.graph captures the kernels a CUDA stream runs)"
    assert mb.provider_skip_reason("torchvision-compile-reduce-overhead", cpu) == \
        "mode='reduce-overhead' is torch.compile's CUDA graphs, so it needs a CUDA GPU"
    # The fused ones run on their backend; compiled ones in the mode their name says.
    assert [mb.provider_backend(p) for p in GPU_ONLY] == ["auto", "triton", "cuda", None, None, "auto"]
    assert [mb.uses_cuda_graph(p) for p in GPU_ONLY] == [True] * 4 + [False] * 2
    assert {mb.COMPILE_MODES[p] for p in GPU_ONLY[4:]} == {"reduce-overhead"}
    # The defaults are the same as before unless asked for; the flags add both sides of the comparison.
    assert mb.default_providers(cpu) == ["fused-cuda", "fused-triton", "fused-reference", "fused-reference-frozen",
                                         mb.EAGER]
    assert mb.default_providers(cpu, mode="train") == ["fused-cuda", "fused-triton", "fused-reference", mb.EAGER]
    assert mb.provider_skip_reason("fused-reference-frozen", cpu, "train") == \
        "resnet_fused.freeze folds the BatchNorm for inference only"
    assert mb.default_providers(gpu, cuda_graphs=True, reduce_overhead=True)[-4:] == [
        "fused-auto-cuda-graph", "torchvision-eager-cuda-graph", "fused-auto-compile-reduce-overhead",
        "torchvision-compile-reduce-overhead"]


def test_gpu_only_providers_named_on_the_cpu_are_skipped_with_their_reason(tmp_path):
    out = tmp_path / "run.json"
    assert mb.main(["--model", "resnet18", "--batch", "2", "--image-size", "32", "--iters", "1", "--warmup", "0",
                    "--providers", ",".join(GPU_ONLY), "--device", "cpu", "--no-progress", "--json", str(out)]) == 0
    rows = {row["provider"]: row for row in json.loads(out.read_text())["results"]}
    assert rows[mb.EAGER]["status"] == "ok"
    for provider in GPU_ONLY:
        assert rows[provider]["status"] == "skipped" and "GPU" in rows[provider]["reason"], rows[provider]


class FakeCuda:
    """torch.cuda's streams and graphs as capture uses them, recording the order of the calls;
    a graph's replay runs nothing (the CPU cannot), it only counts."""

    def __init__(self, log: list):
        self.log, self.current, self.replays = log, "default", 0
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.log.append(("side waits for", other.name))

        class Current:
            name = "default"

            def wait_stream(self, other):
                fake.log.append(("default waits for", "side"))

        class CUDAGraph:
            def replay(self):
                fake.replays += 1

        self.Stream, self.CUDAGraph, self._current = Stream, CUDAGraph, Current()

    def current_stream(self):
        return self._current

    @contextlib.contextmanager
    def stream(self, stream):
        self.current = "side"
        yield
        self.current = "default"

    @contextlib.contextmanager
    def graph(self, graph):
        self.current = "capturing"
        yield
        self.current = "default"


def test_capture_warms_up_on_a_side_stream_then_captures_one_step():
    log = []
    cuda = FakeCuda(log)

    def step():
        log.append(("step on", cuda.current))
        return object()  # stands for the static output tensor
    replay = mb.capture(step, warmup=3, cuda=cuda)
    assert log == [("side waits for", "default"), *[("step on", "side")] * 3, ("default waits for", "side"),
                   ("step on", "capturing")]
    out = replay()
    assert replay() is out and cuda.replays == 2 and len(log) == 6  # replays run no Python step
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        mb.capture(step, warmup=0, cuda=cuda)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_cuda_graph_provider_captures_the_main_jobs_step(mode, monkeypatch):
    """The CUDA-graph providers' step (model_step) through run_model_provider on the CPU, with
    the stand-in torch.cuda: warm-up steps, then the captured one, whose output each replay
    returns; in inference the captured logits are checked against torchvision eager's."""
    cudas = []

    def fake_capture(step, warmup):
        cudas.append(FakeCuda([]))
        return mb.capture(step, warmup=warmup, cuda=cudas[-1])
    monkeypatch.setattr(mb.providers, "capture", fake_capture)
    device = torch.device("cpu")
    tv_model = mb.torchvision_model("resnet18", device)
    x = mb.model_input(2, 32, device)
    reference_logits = mb.reference_logits_for(tv_model, x, "fp32")
    phases = []
    row = mb.run_model_provider("torchvision-eager-cuda-graph", tv_model, x, mode, "fp32", reference_logits,
                                warmup=2, rounds=3, progress=phases.append)
    assert len(cudas) == 1 and cudas[0].replays == 1 + 2 + 3  # the first, warm-up and timed steps: replays
    assert phases == ["check"] + ["warm-up"] * 3 + ["timed"] * 3
    assert row["status"] == "ok" and row["max_abs_logit_diff"] < 1e-4
    if mode == "train":
        assert row["saved_mib"] > 0


def test_reduce_overhead_compiles_in_that_mode_and_marks_each_step(monkeypatch):
    """build_model compiles the reduce-overhead providers with mode="reduce-overhead" (torch.compile
    recorded, not run), and their step tells inductor's CUDA graphs that a new step begins; a
    captured step's autocast has its cache off, as torch.cuda.graph requires."""
    modes, marks = [], []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    tv_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1000))
    x = torch.randn(2, 3, 8, 8)
    for provider in ("torchvision-compile-reduce-overhead", "fused-auto-compile-reduce-overhead"):
        model = mb.build_model(provider, tv_model)
        step = mb.model_step(provider, model, x, "train", mb.autocast_for(x.device, "fp32"))
        step(), step()
    assert modes == ["reduce-overhead"] * 2 and len(marks) == 4
    mb.model_step(mb.EAGER, tv_model, x, "infer", mb.autocast_for(x.device, "fp32"))()
    assert len(marks) == 4  # other providers' steps do not mark
    with mb.autocast_for(x.device, "bf16", cache_enabled=False)():
        assert not torch.is_autocast_cache_enabled()
    with mb.autocast_for(x.device, "bf16")():
        assert torch.is_autocast_cache_enabled()
