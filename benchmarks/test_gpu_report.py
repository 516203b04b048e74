"""CPU checks of gpu_report.py: one --cpu-smoke run through every phase (tests, models, per-layer
ops; the build is GPU-only), with two injected faults to exercise the crash isolation that a
first GPU run may need: a worker that dies abruptly, and a case that loses its CUDA context.

Plain tests, not benchmarks: `python -m pytest benchmarks/` runs them, `--benchmark-only`
skips them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpu_kit import ROOT, SCRIPT
from gpu_kit.budget import DEFAULT_BUDGET_S, TIMELINE, WARM_COMPILE_S
from gpu_kit.phases import (backend_of_test, backend_verdicts, excluded_providers, junit_outcomes, probe_backends,
                           pytest_summary)
from gpu_kit.plan import model_plan
from gpu_kit.warm import BUILD_JOBS, CORE_OPS, aot_command, aot_jobs
from gpu_kit.plot import render_plot
from gpu_kit.report import SCHEMA, output_paths, report_stem, write_report
from gpu_kit.worker import INJECT_FAULT_ENV

pytestmark = pytest.mark.slow

CRASHING_MODEL_CASE = "resnet18-train-b2-64px-fp32-fused-reference"
LOST_CONTEXT_OP_CASE = "eval-b2-fp32-64x64-k3s1-h8-relu-conv-alone"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env[INJECT_FAULT_ENV] = f"exit:{CRASHING_MODEL_CASE},cuda-error:{LOST_CONTEXT_OP_CASE}"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [path] = [p for p in out.glob("cpu-smoke-*.json") if not p.name.endswith("-verify.json")]
    return json.loads(path.read_text()), path


def _rows(report, kind):
    return report["models" if kind == "model" else "ops"]


def test_every_phase_ran_and_the_report_is_complete(smoke):
    report, path = smoke
    assert report["complete"] and report["schema"] == SCHEMA
    assert [p["name"] for p in report["phases"]] == ["build", "warm", "verify", "smoke", "models-core", "ops-core",
                                                     "models-extra", "ops-extra", "tests"]
    phases = {p["name"]: p for p in report["phases"]}
    assert phases["build"]["status"] == "skipped"
    assert phases["warm"]["status"] == "done", phases["warm"]
    gate = report["warm"]["triton_gate"]
    assert gate["returncode"] == 0 and gate["target"] == "sm_90" and gate["unique_compiles"] >= 1
    assert report["smoke"]["command"].startswith(sys.executable) and "-m 'gpu_smoke and needs_cuda'" in \
        report["smoke"]["command"]
    assert report["tests"]["command"].endswith("pytest tests -m 'needs_cuda and not gpu_smoke' -q -rfE --tb=short "
                                               "-p no:cacheprovider --junitxml=JUNIT.xml")
    for name in ("smoke", "tests"):
        assert report[name]["counts"], f"{name}: the pytest summary line was not parsed"
    # The verifier on the interpreter: triton passed (its verdict and JSON in the report), or is
    # unavailable here (torch 2.11 rejects interpreted kernels), and then excluded; the cuda
    # backend (no GPU) got no verdict, so it is excluded, failing closed.
    verify = report["verify"]
    triton = verify["backends"]["triton"]
    triton_verdict = triton["verdict"]
    if triton_verdict == "unavailable":  # only for that known reason
        assert "TRITON_INTERPRET=1" in triton["reasons"][0], triton
    assert verify["status"] == "passed" and triton_verdict in ("passed", "unavailable"), verify
    assert "-m resnet_fused.verify" in verify["command"] and verify["json"] in report["files"]
    assert "no verdict" in report["excluded"]["fused-cuda"]
    assert set(report["excluded"]) == {"fused-cuda"} | ({"fused-triton"} if triton_verdict != "passed" else set())
    assert all("triton_kernels_compiled" in p for p in report["phases"] if p["status"] != "skipped")
    prov = report["provenance"]
    for key in ("date_utc", "command", "git_commit", "torch", "torchvision", "triton", "cuda", "cudnn", "python",
                "backends"):
        assert key in prov
    assert prov["gpu"] is None and "--cpu-smoke" in prov["command"]
    for name in report["files"]:
        assert (path.parent / name).exists()


def test_rows_carry_times_rates_and_checks(smoke):
    report, _ = smoke
    ok_models = [r for r in _rows(report, "model") if r["status"] == "ok"]
    assert {r["provider"] for r in ok_models} == {"torchvision-eager", "fused-reference"}
    for r in ok_models:
        assert r["images_per_s"] > 0 and r["median_ms"] > 0 and r["rounds"] >= 3
        assert r["max_abs_logit_diff"] < 1e-3
    assert next(r for r in ok_models if r["provider"] == "fused-reference")["backends_used"] == {"reference": 20}
    gpu_only = [r for r in _rows(report, "model") if r["provider"] in ("fused-cuda", "fused-triton")]
    assert gpu_only and all(r["status"] == "skipped" and "GPU" in r["reason"] for r in gpu_only)
    ok_ops = [r for r in _rows(report, "op") if r["status"] == "ok"]
    assert {r["case"]["op"] for r in ok_ops} == {"eval", "train_fwd", "train_bwd", "add_relu"}
    for r in ok_ops:
        assert r["median_ms"] > 0
        assert ("gbps" in r) if r["case"]["op"] == "add_relu" else ("tflops" in r)
        if r["provider"] == "fused-reference":
            assert r["max_abs_diff"] <= 1e-4 * max(1.0, r["reference_max_abs"])


def test_a_worker_that_dies_costs_one_case(smoke):
    report, _ = smoke
    by_id = {r["id"]: r for r in _rows(report, "model")}
    crashed = by_id[CRASHING_MODEL_CASE]
    assert crashed["status"] == "error" and "exit status 70" in crashed["reason"]
    # The next worker ran the cases after it.
    assert by_id["resnet18-infer-b1-64px-fp32-fused-reference"]["status"] == "ok"
    assert next(p for p in report["phases"] if p["name"] == "models-core")["workers"] == 2


def test_a_lost_cuda_context_restarts_the_worker(smoke):
    report, _ = smoke
    rows = _rows(report, "op")
    lost = next(r for r in rows if r["id"] == LOST_CONTEXT_OP_CASE)
    assert lost["status"] == "error" and lost["sticky_cuda_error"]
    after = rows[rows.index(lost) + 1:]
    assert after and all(r["status"] in ("ok", "skipped") for r in after)
    assert next(p for p in report["phases"] if p["name"] == "ops-core")["workers"] == 2


def test_markdown_and_plot(smoke):
    report, path = smoke
    md = path.with_suffix(".md").read_text()
    assert "do not edit by hand" in md
    assert "## Targets (resnet50, bf16, batch 256, 224x224)" in md and "not measured" in md
    assert "| layer | shape | x | conv alone ms (TFLOP/s) | eager unit ms (TFLOP/s) | fused-reference ms" in md
    assert "## Not measured" in md and "exit status 70" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert report["plot"] == path.with_suffix(".png").name and path.with_suffix(".png").stat().st_size > 0
    else:
        assert report["plot"] is None and "matplotlib" in report["plot_note"]


def test_without_matplotlib_the_plot_is_a_note(smoke, tmp_path, monkeypatch):
    report, _ = smoke
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    note = render_plot(report, tmp_path / "plot.png")
    assert "matplotlib is not installed" in note and not (tmp_path / "plot.png").exists()
    write_report(dict(report), tmp_path, plot=True)
    assert "Plot: no PNG: matplotlib is not installed" in (tmp_path / f"{report['stem']}.md").read_text()


def test_render_rewrites_the_markdown_from_the_json(smoke, tmp_path):
    report, path = smoke
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    subprocess.run([sys.executable, str(SCRIPT), "--render", str(copy)], check=True, capture_output=True, timeout=120)
    assert copy.with_suffix(".md").read_text() == path.with_suffix(".md").read_text()


def test_report_names():
    gpu, date = dict(name="NVIDIA H200"), "2030-01-02T03:04:05+00:00"
    assert report_stem(gpu, date, {"build", "warm", "verify", "smoke", "models", "ops", "tests"}) == "nvidia-h200-2030-01-02"
    assert report_stem(None, date, {"ops", "models"}) == "cpu-smoke-2030-01-02-models-ops"
    paths = output_paths(Path("out"), "stem")
    assert [paths[k].name for k in ("build_log", "warm_log", "verify_log", "smoke_log", "tests_log",
                                    "benchmarks_log")] == [
        "stem-build.log", "stem-warm.log", "stem-verify.log", "stem-smoke.log", "stem-tests.log",
        "stem-benchmarks.log"]


def test_pytest_summary():
    log = ("FAILED tests/test_a.py::test_x - AssertionError\nERROR tests/test_b.py::test_y\n"
           "1 failed, 5 passed, 2 skipped, 1 error in 3.21s\n")
    counts, failed = pytest_summary(log)
    assert counts == {"failed": 1, "passed": 5, "skipped": 2, "error": 1}
    assert failed == ["FAILED tests/test_a.py::test_x - AssertionError", "ERROR tests/test_b.py::test_y"]


def test_probe_backends_reads_whether_auto_may_run_each_backend():
    probe = probe_backends()
    assert set(probe["backends"]) >= {"reference", "triton", "cuda"}, probe
    assert set(probe["auto_verified"]) == {"cuda", "triton"}, probe
    if not torch.cuda.is_available():
        assert all("no CUDA device" in reason for reason in probe["auto_verified"].values()), probe


def test_the_planned_window_fits_one_device_call():
    """The planned window (docs/benchmarks.md): the steps' caps and the report's reserve add up to under 9 minutes."""
    assert DEFAULT_BUDGET_S == sum(TIMELINE.values()) + 15 and DEFAULT_BUDGET_S < 540
    assert TIMELINE["smoke"] <= 180 and TIMELINE["models-core"] + TIMELINE["ops-core"] <= 240


VERIFIED = dict(status="passed", backends=dict(cuda=dict(verdict="passed"), triton=dict(verdict="passed")))


def test_smoke_failures_are_charged_to_their_backend(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_ops" name="test_unit[triton-3x3-train-bf16]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_ops" name="test_unit[cuda-3x3-train-bf16]"/>'
        '<testcase classname="tests.test_ops" name="test_unit[reference-1x1-eval-fp32]"/>'
        '<testcase classname="tests.test_backend_cuda" name="test_tf32_conv"><skipped message="s"/></testcase>'
        '<testcase classname="tests.test_compile" name="test_fullgraph[triton]"><error message="e"/></testcase>'
        '<testcase classname="tests.test_models" name="test_resnet50_matches"/>'
        '</testsuite></testsuites>')
    outcomes = junit_outcomes(junit)
    assert outcomes["tests/test_ops.py::test_unit[triton-3x3-train-bf16]"] == "failed"
    assert outcomes["tests/test_compile.py::test_fullgraph[triton]"] == "error"
    assert backend_of_test("tests/test_backend_cuda.py::test_tf32_conv") == "cuda"
    assert backend_of_test("tests/test_models.py::test_resnet50_matches") is None
    verdicts = backend_verdicts(outcomes)
    assert verdicts["triton"]["counts"] == {"failed": 1, "error": 1}
    assert verdicts["cuda"]["counts"] == {"passed": 1, "skipped": 1} and verdicts["shared"]["counts"] == {"passed": 1}
    excluded = excluded_providers(VERIFIED, dict(status="failed", backends=verdicts))
    assert list(excluded) == ["fused-triton"] and "2 gpu_smoke tests" in excluded["fused-triton"]
    assert junit_outcomes(tmp_path / "missing.xml") == {}


def test_a_smoke_phase_that_did_not_finish_clears_no_backend():
    """Fail closed: pytest killed at the phase's deadline writes no junit XML, so no backend has a
    verdict; a phase that raised recorded nothing. Either way both fused backends are excluded
    from the benchmarks, with the reason; a finished phase excludes only the failing backend."""
    for smoke in (dict(status="timed_out", backends={}), None, dict(status="error")):
        excluded = excluded_providers(VERIFIED, smoke)
        assert set(excluded) == {"fused-cuda", "fused-triton"}, smoke
        assert "did not finish" in excluded["fused-cuda"]
    timed_out = dict(status="timed_out", backends=dict(triton=dict(counts={"failed": 1}, failed=["t[triton]"])))
    excluded = excluded_providers(VERIFIED, timed_out)
    assert "1 gpu_smoke tests" in excluded["fused-triton"] and "did not finish" in excluded["fused-cuda"]
    assert excluded_providers(VERIFIED, dict(status="passed", backends={})) == {}


def test_only_the_verifiers_passed_verdict_clears_a_backend():
    """The verdict `auto` reads decides first: a backend that failed, crashed or timed out in
    python -m resnet_fused.verify, or has no verdict (the phase did not run, timed out or
    raised), is excluded even when its smoke tests passed."""
    smoke = dict(status="passed", backends={})
    verify = dict(status="failed", backends=dict(
        cuda=dict(verdict="crashed", reasons=["the worker process ended with killed by SIGSEGV"]),
        triton=dict(verdict="passed", reasons=[])))
    excluded = excluded_providers(verify, smoke)
    assert list(excluded) == ["fused-cuda"] and "crashed" in excluded["fused-cuda"] and "SIGSEGV" in excluded["fused-cuda"]
    for verify in (None, dict(status="timed_out", backends={}), dict(status="error")):
        excluded = excluded_providers(verify, smoke)
        assert set(excluded) == {"fused-cuda", "fused-triton"} and "no verdict" in excluded["fused-triton"], verify


def test_cutlass_headers_from_a_carried_wheel(tmp_path, monkeypatch):
    """A GPU machine without network gets CUTLASS from the wheel carried in .whl/; without
    one, the build goes on without the sm90 kernels and says so."""
    import tempfile
    import zipfile

    import gpu_kit.phases as phases

    monkeypatch.delenv("CUTLASS_DIR", raising=False)
    monkeypatch.setattr(phases.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(phases, "ROOT", tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert "not built" in phases.cutlass_headers({})["note"]
    (tmp_path / ".whl").mkdir()
    with zipfile.ZipFile(tmp_path / ".whl" / "nvidia_cutlass-4.2.0.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("cutlass_library/source/include/cutlass/cutlass.h", "// header")
        wheel.writestr("cutlass_library/__init__.py", "")
    got = phases.cutlass_headers({})
    assert (Path(got["CUTLASS_DIR"]) / "include" / "cutlass" / "cutlass.h").is_file()
    assert not (Path(got["CUTLASS_DIR"]).parent / "__init__.py").exists()


def test_warm_up_compiles_on_the_free_cores_for_the_gpu_at_hand(tmp_path):
    assert aot_jobs(16, building=True, compile_workers=2) == 16 - BUILD_JOBS - 4 and aot_jobs(16, False, 2) == 12
    assert aot_jobs(2, building=True, compile_workers=2) == 1
    cmd = aot_command(dict(capability="9.0"), 8, tmp_path / "cache", tmp_path / "gate.json")
    assert cmd[1:3] == ["-m", "resnet_fused.backends.triton.aot"]
    assert cmd[cmd.index("--target") + 1] == "sm_90" and cmd[cmd.index("--subset") + 1] == "all"
    assert cmd[cmd.index("--batch") + 1] == "256" and cmd[cmd.index("--cache-dir") + 1] == str(tmp_path / "cache")
    assert cmd[cmd.index("--ops") + 1] == ",".join(CORE_OPS) and cmd[cmd.index("--sass") + 1] == "none"
    blackwell = aot_command(dict(capability="10.0"), 8, tmp_path, tmp_path / "g.json")
    assert blackwell[blackwell.index("--target") + 1] == "sm_100"


def test_warm_compiles_fit_the_build_and_warm_step(tmp_path):
    """By the compile gate's own enumeration (`--count`: nothing compiled), the warm phase's
    Triton compiles for an H100/H200 (sm_90; 16 cores, the build and the torch.compile workers
    beside it) take at most the build+warm step at WARM_COMPILE_S each. Every conv of the
    headline's inference and training step is among them (ops-core's cases are the same layers
    and ops)."""
    compile_workers = sum(c["provider"] == "torchvision-compile" for c in model_plan("models-core", True, False))
    cores = aot_jobs(16, building=True, compile_workers=compile_workers)
    cmd = aot_command(dict(capability="9.0"), cores, tmp_path / "cache", tmp_path / "gate.json") + ["--count"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count = json.loads(proc.stdout)
    assert {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"} <= set(count["per_kernel"])
    seconds = count["unique_compiles"] * WARM_COMPILE_S / cores
    assert seconds <= TIMELINE["build+warm"], (
        f"{count['unique_compiles']} compiles on {cores} cores: {seconds:.0f} s, over the step's {TIMELINE['build+warm']} s")
