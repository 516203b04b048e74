"""The main job's argument checks (`python -m resnet_fused.benchmark`): every bad invocation
ends as an argparse error (one `error: argument --X: ...` line after the usage, exit code 2, no
traceback) before any model is built, and a count of 0 is an error, not the default."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision

from cli_errors import cli_error_line

import resnet_fused
from resnet_fused import benchmark as mb


@pytest.fixture
def no_model_built(monkeypatch):
    """Fails the test if the main job gets as far as building a model."""
    def build(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")
    monkeypatch.setattr(mb, "torchvision_model", build)


def _error_line(argv, capsys) -> str:
    """Runs the main job in-process with argv; returns its one error line."""
    return cli_error_line(mb.main, argv, capsys)


@pytest.mark.parametrize("option", ["--batch", "--image-size", "--iters"])
@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_counts_must_be_positive_integers(option, value, capsys, no_model_built):
    line = _error_line([option, value], capsys)
    assert f"argument {option}: expected a positive integer, got '{value}'" in line


def test_warmup_may_be_zero_but_not_negative(capsys, no_model_built):
    line = _error_line(["--warmup", "-1"], capsys)
    assert "argument --warmup: expected an integer of 0 or more, got '-1'" in line
    assert mb.nonnegative_int("0") == 0


def test_unknown_model_gets_the_closest_builder_suggested(capsys, no_model_built):
    line = _error_line(["--model", "resnet51"], capsys)
    assert "argument --model: unknown model 'resnet51' (did you mean resnet50?)" in line
    assert "choose from " + ", ".join(mb.fused_model_names()) in line
    assert "did you mean resnet50?" in _error_line(["--model", "ResNet50"], capsys)
    assert "did you mean" not in _error_line(["--model", "zzz"], capsys)


def test_model_with_nothing_fused_is_refused_instead_of_given_a_speedup(capsys, no_model_built):
    line = _error_line(["--model", "vgg16"], capsys)
    assert "argument --model: torchvision's vgg16 has no ResNet blocks" in line
    assert "no speedup to measure" in line


def test_model_names_are_the_builders_and_each_one_fuses():
    """--model accepts exactly resnet_fused's builders, and from_torchvision, what the main job's
    fused providers run, turns each one's torchvision model into fused blocks (built on the meta
    device: no memory, no weights); a model it accepts can never run with nothing fused."""
    names = mb.fused_model_names()
    assert names == [name for name in resnet_fused.__all__ if name in names]
    assert {"resnet18", "resnet50", "resnext50_32x4d", "wide_resnet101_2"} <= set(names) and len(names) == 10
    fused_classes = (resnet_fused.ResNet, resnet_fused.nn.BasicBlock, resnet_fused.nn.Bottleneck)
    for name in names + ["vgg16"]:
        with torch.device("meta"):
            model = getattr(torchvision.models, name)()
        fused = resnet_fused.from_torchvision(model, inplace=True)
        count = sum(isinstance(module, fused_classes) for module in fused.modules())
        assert (count > 0) == (name in names), (name, count)
        assert (mb.model_error(name) is None) == (name in names)


def test_unknown_device_is_refused(capsys, no_model_built):
    line = _error_line(["--device", "tpu"], capsys)
    assert "argument --device: expected cpu, cuda or cuda:N, got 'tpu'" in line


def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys, no_model_built):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error_line(["--device", "cuda"], capsys)
    assert "argument --device: cuda asked for, but torch sees no CUDA GPU here" in line
    assert "use --device cpu" in line


def test_cuda_index_past_the_gpus_present(monkeypatch, capsys, no_model_built):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = _error_line(["--device", "cuda:1"], capsys)
    assert "argument --device: cuda:1 asked for, but torch sees 1 CUDA GPU(s) here (cuda:0 to cuda:0)" in line
    assert mb.device_error("cuda:0") is None and mb.device_error("cpu") is None


def test_json_directory_is_checked_before_the_run(tmp_path, capsys, no_model_built):
    missing = tmp_path / "no" / "such" / "dir" / "out.json"
    line = _error_line(["--json", str(missing)], capsys)
    assert f"argument --json: directory {missing.parent} does not exist" in line
    line = _error_line(["--json", str(tmp_path)], capsys)
    assert f"argument --json: {tmp_path} is a directory" in line
    assert mb.json_path_error(str(tmp_path / "out.json")) is None


def test_unknown_providers_are_named(capsys, no_model_built):
    line = _error_line(["--providers", "fused-reference,fused-foo"], capsys)
    assert "argument --providers: unknown provider(s) fused-foo; choose from fused-cuda" in line
    assert mb.provider_list("fused-reference") == [mb.EAGER, "fused-reference"]


def test_training_at_batch_1_needs_more_than_one_value_per_batchnorm_channel(capsys, no_model_built):
    line = _error_line(["--mode", "train", "--batch", "1", "--image-size", "32"], capsys)
    assert "argument --image-size: with --batch 1 in train mode, --image-size 32 leaves one value" in line
    # The last stage's size: 224 -> 7 (torchvision's), 33 -> 2 (enough at batch 1).
    assert [mb.last_stage_size(s) for s in (224, 96, 33, 32, 1)] == [7, 3, 2, 1, 1]


@pytest.mark.parametrize("option, needs", [
    ("--cuda-graphs", "torch.cuda.graph captures what a CUDA stream runs"),
    ("--reduce-overhead", "mode='reduce-overhead' is torch.compile's CUDA graphs"),
])
def test_gpu_only_options_are_refused_on_the_cpu(option, needs, monkeypatch, capsys, no_model_built):
    """--cuda-graphs and --reduce-overhead on the CPU, asked for (--device cpu) or the only device
    present: an error naming the option, not a run that silently skips what was asked for."""
    line = _error_line([option, "--device", "cpu"], capsys)
    assert f"argument {option}: {needs}, so it needs a CUDA GPU, but the main job runs on the CPU (--device cpu)" \
        in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _error_line([option], capsys)
    assert f"argument {option}: {needs}" in line and "(torch sees no CUDA GPU here)" in line


@pytest.mark.parametrize("argv, expected", [
    (["--batch", "0"], "error: argument --batch: expected a positive integer, got '0'"),
    (["--json", "/nonexistent/dir/out.json"], "error: argument --json: directory /nonexistent/dir does not exist"),
    (["--cuda-graphs", "--device", "cpu"], "error: argument --cuda-graphs: torch.cuda.graph captures"),
])
def test_command_line_exits_2_with_one_line_and_no_traceback(argv, expected):
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.benchmark", *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("usage: python -m resnet_fused.benchmark")
    last = proc.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("python -m resnet_fused.benchmark: " + expected), proc.stderr
    assert "Traceback" not in proc.stderr


# --model timm:NAME / hf:NAME: other libraries' ResNets, fused with resnet_fused.fuse.

def test_other_libraries_names_are_checked_before_building(capsys, no_model_built):
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    assert "timm has no model 'resnet5O' (did you mean timm:resnet50?)" in _error_line(
        ["--model", "timm:resnet5O"], capsys)
    line = _error_line(["--model", "hf:resnet-34"], capsys)
    assert "unknown transformers ResNet 'resnet-34'; choose from hf:resnet-50, hf:resnet-18" in line
    line = _error_line(["--model", "timm:resnet18", "--recompute-bn-relu", "--mode", "train"], capsys)
    assert "argument --recompute-bn-relu:" in line and "resnet_fused.fuse" in line


def test_other_library_model_with_nothing_fused_is_refused(capsys):
    pytest.importorskip("timm")
    line = _error_line(["--model", "timm:vgg11", "--batch", "2", "--image-size", "32", "--no-progress"], capsys)
    assert "argument --model: resnet_fused.fuse finds no conv + BatchNorm unit in timm:vgg11" in line


@pytest.mark.parametrize("model,units", [("timm:resnet18", 20), ("hf:resnet-18", 20)])
def test_other_library_models_run_fused(model, units, tmp_path, capsys):
    """A timm and a transformers ResNet-18 fused by resnet_fused.fuse: every unit runs on the
    reference backend, the logits match the unfused model's, and fuse's summary is printed."""
    pytest.importorskip(model.partition(":")[0].replace("hf", "transformers"))
    out = tmp_path / "run.json"
    assert mb.main(["--model", model, "--batch", "2", "--image-size", "32", "--iters", "1", "--warmup", "0",
                    "--providers", "fused-reference,torchvision-eager", "--no-progress", "--json", str(out)]) == 0
    import json

    rows = {r["provider"]: r for r in json.loads(out.read_text())["results"]}
    fused = rows["fused-reference"]
    assert fused["status"] == "ok" and fused["max_abs_logit_diff"] < 1e-4
    assert fused["backends_used"] == {"reference": units}
    assert f"{units} of {units} conv+BatchNorm pairs fused" in capsys.readouterr().err
