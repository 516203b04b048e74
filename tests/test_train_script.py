"""examples/train.py, the reference training script, run as users run it (CPU, gloo, float64,
resnet18 on 32x32 synthetic images, 8 per global batch):

  * 2 processes under torchrun: logs, checkpoints, and a run whose rank 0 is killed with SIGKILL
    right after a checkpoint, then resumed, ends bit for bit where the uninterrupted run ends
    (weights, running statistics, optimizer, scheduler, every rank's random state); the same
    when that checkpoint is then truncated on disk (the one before it is used);
  * 2 processes with --sync-bn equal one process on the same global batch, to float64 rounding;
  * ImageFolder data: the augmentation of a sample does not depend on the DataLoader workers;
  * bad input (a missing data folder, a checkpoint of another model, a world size that does not
    divide the batch, checkpoints a new run would overwrite): one argparse error line, exit code
    2, nothing written.

One run of each 2-process configuration serves several tests (module fixtures): a torchrun
start costs seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_errors import cli_error_line

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "examples" / "train.py"
# 24 images at 8 per step: 3 steps per epoch. With --save-every 2 the checkpoints are steps 2 (mid-epoch),
# 3 (epoch end), 4 (mid-epoch) and 6 (the end).
TINY = ["--synthetic", "--model", "resnet18", "--num-classes", "10", "--image-size", "32", "--synthetic-size", "24",
        "--batch", "8", "--epochs", "2", "--dtype", "float64", "--workers", "0", "--lr", "0.02", "--no-progress",
        "--device", "cpu"]
KILL_AFTER_STEP = 4

# Runs train.py's main with two test hooks. KILL_AFTER_STEP=N: rank 0 kills itself with SIGKILL as soon as
# the checkpoint of step N is saved. Input noise: in training, each rank adds noise drawn from its own global
# random generator to its inputs, as dropout would draw it, so that a resumed run matches the uninterrupted
# one only if every rank's random state was saved and restored.
HARNESS = '''
import importlib.util, os, signal, sys
import torch

script, *argv = sys.argv[1:]
spec = importlib.util.spec_from_file_location("train", script)
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
kill_after = int(os.environ.get("KILL_AFTER_STEP", "0"))
save_checkpoint, build_model = train.save_checkpoint, train.build_model


def save_then_die(directory, state, keep):
    path = save_checkpoint(directory, state, keep)
    if state["global_step"] == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def noisy_model(args, device):
    model = build_model(args, device)

    def add_noise(module, inputs):
        if module.training:
            return (inputs[0] + 0.1 * torch.randn_like(inputs[0]),)
    model.register_forward_pre_hook(add_noise)
    return model


train.save_checkpoint, train.build_model = save_then_die, noisy_model
sys.exit(train.main(argv))
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return dict(env, OMP_NUM_THREADS="1", **extra)


def _torchrun(args: list[str], *, harness: Path | None = None, **env) -> subprocess.CompletedProcess:
    program = [str(harness), str(TRAIN_SCRIPT)] if harness else [str(TRAIN_SCRIPT)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           *program, *args], env=_env(**env), capture_output=True, text=True, timeout=600)


def _newest(directory: Path) -> tuple[str, dict]:
    names = sorted(p.name for p in directory.glob("step-*.pt"))
    return names[-1], torch.load(directory / names[-1], weights_only=True)


def _files(directory: Path) -> dict[str, str]:
    """Every file in directory with a digest of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train_script_under_test", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_module():
    return _load_train_module()


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """2-process runs: uninterrupted; killed after the step-4 checkpoint; that run resumed; and
    resumed after its step-4 checkpoint was truncated to half its size."""
    tmp = tmp_path_factory.mktemp("resume")
    harness = tmp / "harness.py"
    harness.write_text(HARNESS)
    dirs = {name: tmp / name for name in ("whole", "killed", "truncated")}
    runs = {"whole": _torchrun([*TINY, "--save-every", "2", "--checkpoint-dir", str(dirs["whole"])],
                               harness=harness, KILL_AFTER_STEP="0")}
    runs["killed"] = _torchrun([*TINY, "--save-every", "2", "--checkpoint-dir", str(dirs["killed"])],
                               harness=harness, KILL_AFTER_STEP=str(KILL_AFTER_STEP))
    after_kill = sorted(p.name for p in dirs["killed"].iterdir())
    shutil.copytree(dirs["killed"], dirs["truncated"])
    torn = dirs["truncated"] / f"step-{KILL_AFTER_STEP:08d}.pt"
    torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
    for name in ("killed", "truncated"):
        runs[f"{name}_resumed"] = _torchrun([*TINY, "--save-every", "2", "--checkpoint-dir", str(dirs[name]),
                                             "--resume"], harness=harness, KILL_AFTER_STEP="0")
    return dict(runs=runs, dirs=dirs, after_kill=after_kill)


def _assert_same_training(expected: dict, actual: dict) -> None:
    """Bit for bit: weights and running statistics, optimizer and scheduler state, every rank's random
    state, the position; the history's evaluation equal and its training loss to rounding (a resumed
    epoch sums its losses in another order)."""
    assert expected["model"].keys() == actual["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(value, actual["model"][key]), f"model {key} differs"
    assert expected["optimizer"]["param_groups"] == actual["optimizer"]["param_groups"]
    assert expected["optimizer"]["state"].keys() == actual["optimizer"]["state"].keys()
    for index, state in expected["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], actual["optimizer"]["state"][index]["momentum_buffer"]), index
    assert expected["scheduler"] == actual["scheduler"]
    assert len(expected["rng"]) == len(actual["rng"])
    for rank, (a, b) in enumerate(zip(expected["rng"], actual["rng"])):
        assert torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"] and a["numpy"] == b["numpy"], rank
    assert (expected["global_step"], expected["sampler"]) == (actual["global_step"], actual["sampler"])
    assert len(expected["history"]) == len(actual["history"])
    for a, b in zip(expected["history"], actual["history"]):
        val_a, val_b = ({k: v for k, v in h.items() if k.startswith("val_")} for h in (a, b))
        assert val_a == val_b
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12)


def test_two_processes_train_evaluate_log_and_checkpoint(resumed_runs):
    """The uninterrupted 2-process run: its log (setup, throughput, top-1/top-5 per epoch), the
    newest 2 checkpoints kept, the final one complete with both ranks' random states."""
    run, directory = resumed_runs["runs"]["whole"], resumed_runs["dirs"]["whole"]
    assert run.returncode == 0, run.stderr[-4000:]
    lines = run.stdout.splitlines()
    assert "on 2 process(es), cpu gloo: batch 8 (4 per process), 3 steps per epoch, 2 epochs" in lines[0]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    for line in epochs:
        assert "images/s (all processes)" in line and "top-1" in line and "top-5" in line and "(6 images)" in line
    saved = [line.removeprefix("saved ") for line in lines if line.startswith("saved ")]
    assert [Path(p).name for p in saved] == [f"step-{s:08d}.pt" for s in (2, 3, 4, 6)]
    assert sorted(p.name for p in directory.iterdir()) == ["step-00000004.pt", "step-00000006.pt"]
    name, state = _newest(directory)
    assert state["global_step"] == 6 and state["sampler"] == dict(epoch=2, samples_seen=0, seed=0)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["config"]["world_size"] == 2 and state["config"]["model"] == "resnet18"


def test_sigkill_after_a_checkpoint_then_resume_ends_exactly_as_uninterrupted(resumed_runs):
    runs, dirs = resumed_runs["runs"], resumed_runs["dirs"]
    killed = runs["killed"]
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-4000:]
    assert "epoch 1/2" in killed.stdout and "epoch 2/2" not in killed.stdout  # it died in the second epoch
    # Nothing after the kill, no partial file: the step-3 checkpoint (epoch end) and the step-4 one.
    assert resumed_runs["after_kill"] == ["step-00000003.pt", "step-00000004.pt"]
    resumed = runs["killed_resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resumed from {dirs['killed'] / 'step-00000004.pt'}: epoch 2, 8 images into it, step 4" in resumed.stdout
    assert "epoch 1/2" not in resumed.stdout and "epoch 2/2" in resumed.stdout
    _, expected = _newest(dirs["whole"])
    name, actual = _newest(dirs["killed"])
    assert name == "step-00000006.pt"
    _assert_same_training(expected, actual)


def test_truncated_checkpoint_is_skipped_and_the_previous_one_used(resumed_runs):
    runs, dirs = resumed_runs["runs"], resumed_runs["dirs"]
    resumed = runs["truncated_resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    torn = dirs["truncated"] / "step-00000004.pt"
    assert f"warning: skipping {torn}: not a complete archive" in resumed.stderr
    assert f"resumed from {dirs['truncated'] / 'step-00000003.pt'}: epoch 2, 0 images into it, step 3" \
        in resumed.stdout
    _, expected = _newest(dirs["whole"])
    _, actual = _newest(dirs["truncated"])
    _assert_same_training(expected, actual)


def test_checkpoint_problems_are_detected(tmp_path, train_module):
    """What makes a file not a complete checkpoint: truncation anywhere, a flipped byte inside a
    tensor (the zip member's CRC), and a file that is not one at all."""
    path = tmp_path / "step-00000001.pt"
    torch.save(dict(format=train_module.CHECKPOINT_FORMAT, weights=torch.arange(4096.0)), path)
    data = path.read_bytes()
    assert train_module.checkpoint_problem(str(path)) is None
    for cut in (len(data) // 3, len(data) - 1):
        path.write_bytes(data[:cut])
        assert "not a complete archive" in train_module.checkpoint_problem(str(path))
    flipped = bytearray(data)
    flipped[data.index(b"data/0") + 1000] ^= 0xFF
    path.write_bytes(bytes(flipped))
    assert "fails its CRC check" in train_module.checkpoint_problem(str(path))
    path.write_bytes(b"not a checkpoint")
    assert train_module.checkpoint_problem(str(path)) is not None


@pytest.fixture(scope="module")
def sync_bn_runs(tmp_path_factory):
    """The same training with --sync-bn on 2 processes (4 images each) and on one process (all 8)."""
    tmp = tmp_path_factory.mktemp("sync_bn")
    args = [*TINY, "--epochs", "1", "--sync-bn"]
    two = _torchrun([*args, "--checkpoint-dir", str(tmp / "two")])
    one = subprocess.run([sys.executable, str(TRAIN_SCRIPT), *args, "--checkpoint-dir", str(tmp / "one")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    return dict(two=two, one=one, dirs=dict(two=tmp / "two", one=tmp / "one"))


def test_two_processes_with_sync_bn_equal_one_process_on_the_global_batch(sync_bn_runs):
    """Each step's global batch is the same 8 images either way (DistributedSampler deals the
    epoch's permutation out in turn), BatchNorm normalizes over all 8 (SyncBatchNorm), and the
    gradients are averaged over the processes: the same training, to float64 rounding. (Plain
    BatchNorm under DDP normalizes each process's 4 images alone: another network function.)"""
    for run in sync_bn_runs.values():
        if isinstance(run, subprocess.CompletedProcess):
            assert run.returncode == 0, run.stderr[-4000:]
    assert "on 2 process(es), cpu gloo" in sync_bn_runs["two"].stdout
    assert "SyncBatchNorm" in sync_bn_runs["two"].stdout
    _, two = _newest(sync_bn_runs["dirs"]["two"])
    _, one = _newest(sync_bn_runs["dirs"]["one"])
    assert (two["global_step"], two["config"]["world_size"], one["config"]["world_size"]) == (3, 2, 1)
    worst = 0.0
    for key, expected in one["model"].items():
        actual = two["model"][key]
        if not expected.is_floating_point():
            assert torch.equal(actual, expected), key  # num_batches_tracked
            continue
        worst = max(worst, ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item())
    for index, state in one["optimizer"]["state"].items():
        expected, actual = state["momentum_buffer"], two["optimizer"]["state"][index]["momentum_buffer"]
        worst = max(worst, ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item())
    # float64 rounding (1e-16) grown over 3 steps stays many orders below any real difference: one
    # process's BatchNorm statistics alone, or summed instead of averaged gradients, differ by 1e-2 or more.
    assert worst < 1e-10, worst
    assert one["history"][0]["val_top1"] == two["history"][0]["val_top1"]


@pytest.fixture
def image_folder(tmp_path):
    """2 classes, 4 training images and 1 validation image each, 40x40 PNGs."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    for split, count in (("train", 4), ("val", 1)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_image_folder_augmentation_does_not_depend_on_the_workers(image_folder, tmp_path, train_module,
                                                                  monkeypatch, capsys):
    """One epoch on ImageFolder data (random resized crops and flips) with the images loaded in the
    main process and by 2 workers: the same weights, so each sample's augmentation is drawn from its
    own seed, not from whichever generator loads it (what makes a resumed epoch augment as before)."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = ["--data", str(image_folder), "--model", "resnet18", "--image-size", "32", "--batch", "4",
            "--epochs", "1", "--dtype", "float64", "--lr", "0.05", "--no-progress", "--device", "cpu"]
    states = {}
    for workers in (0, 2):
        directory = tmp_path / f"workers{workers}"
        assert train_module.main([*args, "--workers", str(workers), "--checkpoint-dir", str(directory)]) == 0
        states[workers] = _newest(directory)[1]
    out = capsys.readouterr().out
    assert "2 steps per epoch" in out and "(2 images)" in out  # 8 training images, 2 validation images
    assert states[0]["config"]["num_classes"] == 2
    for key, value in states[0]["model"].items():
        assert torch.equal(value, states[2]["model"][key]), key


def _error_line(train_module, argv, capsys) -> str:
    """Runs the script in-process; returns its one error line (argparse's: usage, then the error)."""
    return cli_error_line(train_module.main, argv, capsys)


@pytest.fixture
def no_launch(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_missing_data_folder(tmp_path, train_module, capsys, no_launch):
    missing, ckpt = tmp_path / "imagenet", tmp_path / "ckpt"
    line = _error_line(train_module, ["--data", str(missing), "--checkpoint-dir", str(ckpt)], capsys)
    assert f"argument --data: {missing} does not exist; expected DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE" in line
    (missing / "train" / "cat").mkdir(parents=True)
    line = _error_line(train_module, ["--data", str(missing), "--checkpoint-dir", str(ckpt)], capsys)
    assert f"argument --data: {missing} has no val/ folder" in line
    assert not ckpt.exists()


def test_world_size_that_does_not_divide_the_batch(tmp_path, train_module, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ckpt = tmp_path / "ckpt"
    line = _error_line(train_module, [*TINY, "--checkpoint-dir", str(ckpt)], capsys)
    assert "argument --batch: 8 images do not split evenly over WORLD_SIZE=3 processes; use a multiple of 3" in line
    assert not ckpt.exists()
    # The other processes of the job exit with 2 too, without repeating the line.
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        train_module.main([*TINY, "--checkpoint-dir", str(ckpt)])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_checkpoint_of_another_model_and_checkpoints_a_new_run_would_overwrite(resumed_runs, tmp_path, train_module,
                                                                               capsys, no_launch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resumed_runs["dirs"]["whole"], ckpt)
    before = _files(ckpt)
    other = [*TINY, "--model", "resnet34", "--checkpoint-dir", str(ckpt)]
    line = _error_line(train_module, [*other, "--resume"], capsys)
    assert (f"argument --model: the checkpoint {ckpt / 'step-00000006.pt'} is of --model resnet18, not resnet34; "
            "give --model resnet18 to resume it, or another --checkpoint-dir") in line
    line = _error_line(train_module, [*TINY, "--checkpoint-dir", str(ckpt)], capsys)
    assert (f"argument --checkpoint-dir: {ckpt} already holds checkpoints (newest: step-00000006.pt); add --resume "
            "to continue from them, or choose another directory") in line
    assert _files(ckpt) == before


def test_command_line_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--data", str(tmp_path / "missing"),
                           "--checkpoint-dir", str(tmp_path / "ckpt"), "--device", "cpu"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("usage: train.py")
    assert proc.stderr.rstrip("\n").splitlines()[-1].startswith("train.py: error: argument --data: ")
    assert not (tmp_path / "ckpt").exists()


def test_the_swap_is_one_line(tmp_path, train_module, monkeypatch, capsys):
    """The script with its one marked import changed to torchvision.models trains torchvision's
    model; one epoch of it ends where the fused model's ends, to float64 rounding."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    source = TRAIN_SCRIPT.read_text()
    swap = "import resnet_fused as models  # the swap"
    assert source.count(swap) == 1 and source.count("import resnet_fused") == 1
    swapped = tmp_path / "train_torchvision.py"
    swapped.write_text(source.replace(swap, "import torchvision.models as models  # the swap"))
    spec = importlib.util.spec_from_file_location("train_torchvision", swapped)
    torchvision_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torchvision_module)
    states = {}
    for name, module in (("fused", train_module), ("torchvision", torchvision_module)):
        directory = tmp_path / name
        assert module.main([*TINY, "--epochs", "1", "--checkpoint-dir", str(directory)]) == 0
        states[name] = _newest(directory)[1]
    out = capsys.readouterr().out
    assert "resnet18 (resnet_fused, backend auto)" in out and "resnet18 (torchvision.models, backend torchvision)" in out
    fused, torchvision_state = states["fused"]["model"], states["torchvision"]["model"]
    assert fused.keys() == torchvision_state.keys()
    for key, expected in torchvision_state.items():
        actual = fused[key]
        if expected.is_floating_point():
            assert (actual - expected).norm() <= 1e-10 * expected.norm(), key
        else:
            assert torch.equal(actual, expected), key
