"""python -m resnet_fused.verify (the on-device verifier), its verdict cache, and `auto` reading it.

On CPU the verifier runs the real Triton kernels in the interpreter (--device cpu). Faults are
injected into the worker process through a sitecustomize module on its PYTHONPATH that patches
the Triton backend before the checks run: wrong values (a dropped epsilon, a channel offset),
an abort and a hang. `auto`'s choices are checked on CPU tensors with the Triton backend as the
candidate (its CPU verdict standing in for a GPU's) and the verifier's timings seeded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from cli_errors import cli_error_line

from resnet_fused import backends
from resnet_fused.backends import auto
from resnet_fused.verify import cache, cli

CPU = torch.device("cpu")
# The smallest verifier run that covers ResNet-18's layer types in both modes.
SMALL = ["--device", "cpu", "--model", "resnet18", "--batch", "2", "--image-size", "16", "--no-progress"]

FAULTS = textwrap.dedent("""\
    import os
    fault = os.environ.get("RESNET_FUSED_TEST_FAULT")
    if fault:
        import time
        import resnet_fused.backends.triton as triton_backend
        conv = triton_backend._k_conv
        real_conv, real_apply = conv.conv_forward, triton_backend.bn_apply
        if fault == "dropped_eps":  # BatchNorm's epsilon left out of the training op's apply pass
            triton_backend.bn_apply = lambda z, m, v, w, b, r, eps, relu: real_apply(z, m, v, w, b, r, 0.0, relu)
        elif fault == "channel_offset":  # one output channel off by 1e-3
            def shifted(*args, **kwargs):
                out = real_conv(*args, **kwargs)
                first = out[0] if isinstance(out, tuple) else out
                first[:, 0] += 1e-3
                return out
            conv.conv_forward = shifted
        elif fault == "abort":
            conv.conv_forward = lambda *args, **kwargs: os.abort()
        elif fault == "hang":
            def hang(*args, **kwargs):
                while True:
                    time.sleep(1)
            conv.conv_forward = hang
    """)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An empty verdict cache of the test's own; auto's verdicts forgotten before and after."""
    directory = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV_VAR, str(directory))
    backends.clear_verdicts()
    backends.clear_auto_choices()
    yield directory
    backends.clear_verdicts()
    backends.clear_auto_choices()


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """auto considers the Triton backend for CPU tensors (the interpreter standing in for a GPU)."""
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"the Triton backend is unavailable here: {reason}")
    monkeypatch.setattr(backends, "_auto_candidates", lambda x: ("triton",))
    monkeypatch.delenv(backends.TIMING_ENV_VAR, raising=False)
    backends.set_backend("auto")


def _verify(argv, json_path) -> tuple[int, dict]:
    code = cli.main([*argv, "--json", str(json_path)])
    return code, json.loads(json_path.read_text())


def _eval_call():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(16, 8, 3, 3)
    v = torch.rand(16) + 0.5
    return ("conv_bn_eval", x, w, v, v, None, [1, 1], [1, 1], [1, 1], 1, True)


# ---------------------------------------------------------------------------------------
# The verifier on the real kernels, and on faulty ones.


@pytest.mark.slow
def test_interpreter_verify_passes_and_a_fresh_process_reads_the_verdict(cache_dir, tmp_path, capsys):
    if backends.unavailable_reason("triton") is not None:
        pytest.skip(backends.unavailable_reason("triton"))
    code, report = _verify(SMALL, tmp_path / "verify.json")
    out = capsys.readouterr().out
    assert code == 0, out
    verdict = report["backends"]["triton"]
    assert verdict["verdict"] == "passed" and 0 <= verdict["worst_ratio"] <= 1, verdict
    labels = [layer["label"] for layer in verdict["layers"]]
    # ResNet-18's layer types in both modes, each run by the kernels (no fallback), and the model
    assert {"infer", "train"} <= {label.split()[0] for label in labels}
    assert any("conv 7x7/2" in label for label in labels) and any("+res" in label for label in labels)
    assert any(label.startswith("resnet18: model") for label in labels)
    assert not [layer for layer in verdict["layers"] if layer["fallback"]]
    assert "triton   passed" in out
    # A fresh process: auto's reading of the cache for this device says triton passed.
    code = ("import torch; from resnet_fused import backends; "
            "print(sorted(backends._verified_on(torch.device('cpu'))))")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['triton']"


@pytest.mark.slow
@pytest.mark.parametrize("fault, mode, timeout, verdict, reason", [
    ("dropped_eps", "train", 300, "failed", "conv_bn_train"),
    ("channel_offset", "infer", 300, "failed", "conv_bn_eval"),
    ("abort", "infer", 300, "crashed", "SIGABRT"),
    ("hang", "infer", 12, "timed out", "did not finish within 12 s"),
])
def test_a_faulty_backend_is_refused_and_auto_never_runs_it(cache_dir, tmp_path, monkeypatch, triton_on_cpu, capsys,
                                                          fault, mode, timeout, verdict, reason):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    monkeypatch.setenv("RESNET_FUSED_TEST_FAULT", fault)
    code, report = _verify([*SMALL, "--mode", mode, "--timeout", str(timeout)], tmp_path / "verify.json")
    found = report["backends"]["triton"]
    assert code == 1 and found["verdict"] == verdict, found
    assert any(reason in r for r in found["reasons"]), found["reasons"]
    if verdict != "failed":  # the worker's output tail comes with a crash or a hang
        assert "output_tail" in found
    # The stored verdict keeps auto off the backend: no timing, the reference runs.
    monkeypatch.setattr(auto, "_time_backend", lambda *a: pytest.fail("auto timed a refused backend"))
    backends.clear_verdicts()
    assert backends.resolved_backend(*_eval_call()) == "reference"


# ---------------------------------------------------------------------------------------
# auto and the verdict.


def _record(passed: bool, timings: dict | None = None) -> dict:
    return dict(backends=dict(triton=dict(verdict="passed" if passed else "failed", reasons=[])),
                timings=timings or {})


def _timing(call, ms: dict) -> dict:
    """A verifier timing entry for an inference call (grad mode is part of the key)."""
    with torch.no_grad():
        key = repr(auto._shape_key(call[0], call[1:]))
    return {key: dict(label="test", ms=ms, backend=min(ms, key=ms.get))}


def test_auto_picks_per_shape_from_the_verifiers_timings(cache_dir, triton_on_cpu, monkeypatch):
    """A passed verdict with timings: each timed shape runs the faster of triton and the
    reference by the verifier's figures, without timing; an untimed shape is timed here."""
    fast_triton, fast_reference = _eval_call(), _eval_call()
    fast_reference[1].resize_(3, 8, 6, 6)  # another shape
    timings = {**_timing(fast_triton, dict(triton=1.0, reference=2.0)),
               **_timing(fast_reference, dict(triton=2.0, reference=1.0))}
    cache.write(cache.device_key(CPU), _record(True, timings))
    timed = []
    monkeypatch.setattr(auto, "_time_backend", lambda op, args, backend: timed.append(backend.NAME) or
                        {"triton": 0.5, "reference": 1.0}[backend.NAME])
    with torch.no_grad():
        assert backends.resolved_backend(*fast_triton) == "triton"
        assert backends.resolved_backend(*fast_reference) == "reference"
        assert timed == []
        untimed = _eval_call()
        untimed[1].resize_(4, 8, 6, 6)
        assert backends.resolved_backend(*untimed) == "triton"
    assert timed == ["triton", "reference"]


def test_auto_never_picks_a_backend_whose_verdict_failed(cache_dir, triton_on_cpu, monkeypatch):
    call = _eval_call()
    cache.write(cache.device_key(CPU), _record(False, _timing(call, dict(triton=0.1, reference=9.0))))
    monkeypatch.setattr(auto, "_time_backend", lambda *a: pytest.fail("auto timed a refused backend"))
    with torch.no_grad():
        assert backends.resolved_backend(*call) == "reference"


def test_verified_backends_says_why_auto_skips_a_backend(monkeypatch):
    """On a GPU (stood in for): None for a passed backend, the command for one not verified, the
    unavailability reason for one that cannot run; off a GPU, that auto runs the reference."""
    monkeypatch.setattr(backends, "_verified_on", lambda device: frozenset({"triton"}))
    monkeypatch.setattr(backends, "unavailable_reason", lambda name: "no extension" if name == "cuda" else None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    assert backends.verified_backends("cuda:0") == {"cuda": "no extension", "triton": None}
    monkeypatch.setattr(backends, "_verified_on", lambda device: frozenset())
    assert backends.verified_backends("cuda:0")["triton"] == "not verified on Some GPU: run python -m resnet_fused.verify"
    assert all("reference on cpu tensors" in r for r in backends.verified_backends("cpu").values())


def test_auto_without_a_verdict_runs_the_reference_and_warns_once(cache_dir, triton_on_cpu):
    call = _eval_call()
    with pytest.warns(RuntimeWarning, match=r"python -m resnet_fused\.verify"):
        assert backends.resolved_backend(*call) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolved_backend(*call) == "reference"


@pytest.mark.parametrize("verdict", ["passed", "failed", "none"])
def test_auto_reads_the_verdict_under_torch_compile(cache_dir, triton_on_cpu, monkeypatch, verdict):
    """The verdict's first reading may happen while torch.compile traces (fullgraph: no graph
    break for the file): the compiled unit runs the verified backend, else the reference. (The
    'triton' here runs the reference's ops: the interpreter's kernels do not run under
    torch.compile's fake tensors.)"""
    from types import SimpleNamespace

    import resnet_fused

    monkeypatch.setitem(backends.BACKENDS, "triton", (SimpleNamespace(
        NAME="triton", NAMESPACE="resnet_fused", DIRECT=None, DIRECT_WITH_GRAD=None,
        unavailable_reason=lambda: None, unsupported_reason=lambda *a: None), None))
    monkeypatch.setattr(auto, "_time_backend", lambda op, args, backend: {"triton": 1.0, "reference": 2.0}[backend.NAME])
    if verdict != "none":
        cache.write(cache.device_key(CPU), _record(verdict == "passed"))
    unit = resnet_fused.nn.ConvBNReLU2d(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 6, 6)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no verdict: auto's warning
        y = torch.compile(unit, fullgraph=True, backend="aot_eager")(x)
        ran = backends.resolved_backend("conv_bn_eval", x, unit.conv.weight, unit.bn.running_var,
                                        unit.bn.running_var, None, [1, 1], [1, 1], [1, 1], 1, True)
    assert ran == ("triton" if verdict == "passed" else "reference")
    torch.testing.assert_close(y, torch.relu(unit.bn(unit.conv(x))))


def test_explicit_backend_needs_no_verdict(cache_dir, triton_on_cpu):
    call = _eval_call()
    with backends.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no verdict, no warning: the user chose
        assert backends.resolved_backend(*call) == "triton"


# ---------------------------------------------------------------------------------------
# The cache file.


def test_a_verdict_of_another_key_is_ignored(cache_dir):
    key = cache.device_key(CPU)
    cache.write(key, _record(True))
    assert cache.passed_backends(cache.read(key)) == {"triton"}
    for field, value in (("triton", "0.0.0-other"), ("kernels", "0" * 64), ("torch", "1.0")):
        other = dict(key, **{field: value})
        assert cache.read(other) is None, field  # another file: nothing found, nothing raised


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "foreign", "another_key", "not_a_dict"])
def test_a_damaged_verdict_file_is_ignored_with_one_warning(cache_dir, triton_on_cpu, damage):
    key = cache.device_key(CPU)
    path = cache.write(key, _record(True))
    text = path.read_text()
    path.write_text({
        "corrupt": "\x00\xff garbage {",
        "truncated": text[: len(text) // 2],
        "foreign": json.dumps(dict(format=99, backends={})),
        "another_key": json.dumps(dict(json.loads(text), key=dict(key, triton="other"))),
        "not_a_dict": "[1, 2, 3]",
    }[damage])
    cache._warned.clear()
    with pytest.warns(RuntimeWarning, match="ignoring the verdict file"):
        assert cache.read(key) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.read(key) is None  # once per file
    # auto on such a file: the reference, no traceback
    backends.clear_verdicts()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert backends.resolved_backend(*_eval_call()) == "reference"


def test_concurrent_writers_leave_one_whole_file(cache_dir):
    """Two processes writing the same key's verdict 25 times each while this one reads it: every
    read sees a whole file, and the last is one writer's record; no temporary file is left."""
    key = cache.device_key(CPU)
    writer = textwrap.dedent("""\
        import sys, torch
        from resnet_fused.verify import cache
        key = cache.device_key(torch.device("cpu"))
        for i in range(25):
            cache.write(key, dict(backends=dict(triton=dict(verdict="passed", writer=int(sys.argv[1]), i=i)),
                                  timings={}))
    """)
    env = dict(os.environ, **{cache.CACHE_DIR_ENV_VAR: str(cache_dir)})
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(n)], env=env, stderr=subprocess.PIPE, text=True)
             for n in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a partial file would warn
        while any(p.poll() is None for p in procs):
            cache.read(key)
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    final = cache.read(key)
    assert final["backends"]["triton"]["i"] == 24 and final["backends"]["triton"]["writer"] in range(2)
    assert [f.name for f in cache_dir.iterdir()] == [cache.verdict_path(key).name]


# ---------------------------------------------------------------------------------------
# The command line.


@pytest.mark.parametrize("argv, argument", [
    (["--model", "resnet5"], "--model"),
    (["--model", "timm:no_such_net"], "--model"),
    (["--backends", "cudnn"], "--backends"),
    (["--batch", "0"], "--batch"),
    (["--batch", "1", "--mode", "train"], "--batch"),
    (["--image-size", "two"], "--image-size"),
    (["--mode", "serve"], "--mode"),
    (["--precision", "fp8"], "--precision"),
    (["--timeout", "-1"], "--timeout"),
    (["--device", "tpu"], "--device"),
    (["--json", "/nonexistent-dir/verify.json"], "--json"),
])
def test_bad_arguments_get_one_argparse_line(argv, argument, capsys):
    line = cli_error_line(cli.main, ["--device", "cpu", *argv] if "--device" not in argv else argv, capsys)
    assert f"argument {argument}" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
@pytest.mark.parametrize("argv, argument", [
    (["--device", "cuda"], "--device"),
    (["--device", "cpu", "--backends", "cuda"], "--backends"),
    (["--device", "cpu", "--precision", "bf16"], "--precision"),
])
def test_gpu_only_requests_on_a_cpu_machine(argv, argument, capsys):
    assert f"argument {argument}" in cli_error_line(cli.main, argv, capsys)


def test_unwritable_json_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores the mode
        pytest.skip("this user can write anywhere")
    line = cli_error_line(cli.main, ["--device", "cpu", "--json", str(locked / "v.json")], capsys)
    assert "argument --json" in line


def test_the_module_runs_as_a_command():
    """`python -m resnet_fused.verify` with a bad argument: exit 2 and one line, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.verify", "--batch", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("argument --batch: expected a positive integer, got '0'")
