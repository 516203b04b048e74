"""The main job under torchrun (`torchrun --nproc_per_node=2 -m resnet_fused.benchmark --mode train`):
2 gloo processes on CPU train every provider as DistributedDataParallel (or, with --sync-bn, with
synchronized BatchNorm), and rank 0 alone prints the table and writes the JSON with the world size,
the backend, the global images/s and each rank's timings. Plus its argument checks under torchrun's
environment and the arithmetic that combines the ranks' timings. No timing is checked."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from cli_errors import cli_error_line

from resnet_fused import benchmark as mb

SMALL_RUN = ["--mode", "train", "--model", "resnet18", "--batch", "2", "--image-size", "32", "--iters", "2",
             "--warmup", "0", "--no-progress"]


def _torchrun(args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "resnet_fused.benchmark", *args], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)


def _check_rows(result, sync_bn: bool):
    meta = result["meta"]
    assert (meta["launcher"], meta["world_size"], meta["local_world_size"], meta["nodes"]) == ("torchrun", 2, 2, 1)
    assert (meta["dist_backend"], meta["sync_bn"]) == ("gloo", sync_bn)
    assert (meta["batch"], meta["batch_per_process"], meta["global_batch"]) == (2, 2, 4)
    rows = {row["provider"]: row for row in result["results"]}
    assert {"fused-reference", "torchvision-eager"} <= {p for p, row in rows.items() if row["status"] == "ok"}
    for provider in ("fused-cuda", "fused-triton"):  # skipped on every rank, with the reason
        if provider in rows:
            assert rows[provider]["status"] == "skipped" and "GPU" in rows[provider]["reason"]
    for provider in ("fused-reference", "torchvision-eager"):
        row = rows[provider]
        per_rank = row["per_rank"]
        assert [r["rank"] for r in per_rank] == [0, 1]
        medians = [r["median_ms"] for r in per_rank]
        assert row["median_ms"] == max(medians) and row["slowest_rank"] == medians.index(max(medians))
        assert math.isclose(row["images_per_s"], 2 * 2 / (max(medians) / 1e3))
        assert math.isclose(row["rank_spread"], max(medians) / min(medians))
        assert row["max_abs_logit_diff"] == max(r["max_abs_logit_diff"] for r in per_rank)
        assert row["max_abs_logit_diff"] < 1e-3  # each rank's own input against torchvision, before training
        if sync_bn:
            # On CPU torch's SyncBatchNorm cannot train and DDP refuses any SyncBatchNorm.
            assert row["sync_bn"] == "resnet_fused.SyncBatchNorm"
            assert row["gradient_sync"] == "all_reduce after backward (DDP refuses SyncBatchNorm on CPU)"
        else:
            assert (row["sync_bn"], row["gradient_sync"]) == (None, "DistributedDataParallel")
    # Every unit of the fused resnet18 ran fused ops on the reference backend, synchronized or not.
    assert rows["fused-reference"]["backends_used"] == {"reference": 20}
    assert "speedup_vs_eager" in rows["fused-reference"] and "spread" in rows["fused-reference"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) behaviour of the main job under torchrun")
@pytest.mark.parametrize("sync_bn", [False, True], ids=["ddp", "sync_bn"])
def test_main_job_under_torchrun_two_processes(tmp_path, sync_bn):
    out = tmp_path / "result.json"
    args = [*SMALL_RUN, "--json", str(out)] + (["--sync-bn"] if sync_bn else [])
    proc = _torchrun(args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 0 alone reports: one table, one note about the CPU, one JSON.
    assert proc.stdout.count("\nprovider ") == 1
    assert proc.stderr.count("No CUDA GPU here") == 1 and proc.stderr.count(f"wrote {out}") == 1
    assert "DistributedDataParallel over 2 processes (1 node(s), gloo" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("provider"))
    assert "ranks" in header and "img/s" in header
    gradients = [line for line in proc.stdout.splitlines() if line.startswith("gradients: ")]
    if sync_bn:
        assert gradients == ["gradients: all_reduce after backward (DDP refuses SyncBatchNorm on CPU); "
                             "BatchNorm: resnet_fused.SyncBatchNorm"]
    else:
        assert gradients == ["gradients: DistributedDataParallel"]
    result = json.loads(out.read_text())
    _check_rows(result, sync_bn)
    assert result["meta"]["command"] == "torchrun --nproc_per_node=2 -m resnet_fused.benchmark " + " ".join(args)


def _error_line(argv, capsys) -> str:
    return cli_error_line(mb.main, argv, capsys)


@pytest.fixture
def no_model_built(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")
    monkeypatch.setattr(mb, "torchvision_model", build)


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank 0 of a 2-process torchrun job on one node."""
    values = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_sync_bn_needs_torchrun(capsys, no_model_built, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    line = _error_line(["--mode", "train", "--sync-bn"], capsys)
    assert "argument --sync-bn: synchronizes BatchNorm across processes, so it needs torchrun: " \
           "torchrun --nproc_per_node=N -m resnet_fused.benchmark --mode train --sync-bn" in line


def test_under_torchrun_the_mode_is_train(capsys, no_model_built, torchrun_env):
    line = _error_line([], capsys)
    assert "argument --mode: under torchrun the main job times DistributedDataParallel training; " \
           "use --mode train (got infer)" in line


def test_under_torchrun_each_process_takes_its_local_gpu(capsys, no_model_built, torchrun_env):
    torchrun_env.setattr(torch.cuda, "is_available", lambda: True)
    torchrun_env.setattr(torch.cuda, "device_count", lambda: 1)
    line = _error_line(["--mode", "train", "--device", "cuda:1"], capsys)
    assert "argument --device: under torchrun each process takes cuda:LOCAL_RANK; give cuda or cpu, not cuda:1" in line
    torchrun_env.setenv("RANK", "1")
    torchrun_env.setenv("LOCAL_RANK", "1")
    launch = mb.launch_from_env()
    assert mb.torchrun_device_error(None, launch) == (
        "process LOCAL_RANK=1 needs cuda:1, but torch sees 1 CUDA GPU(s) here; start at most 1 processes per node "
        "(--nproc_per_node) or use --device cpu")
    assert mb.torchrun_device_error("cpu", launch) is None
    # Local rank 1 checks the same arguments and exits with 2, leaving the line to local rank 0.
    with pytest.raises(SystemExit) as exit_info:
        mb.main(["--mode", "train"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_under_torchrun_no_cuda_graphs(capsys, no_model_built, torchrun_env):
    """DDP's all-reduce would be captured with the step: --cuda-graphs is an error under torchrun,
    and a CUDA-graph provider named in --providers is skipped on every rank (Torchrun.skip_reason)."""
    torchrun_env.setattr(torch.cuda, "is_available", lambda: True)
    torchrun_env.setattr(torch.cuda, "device_count", lambda: 2)
    line = _error_line(["--mode", "train", "--cuda-graphs"], capsys)
    assert "argument --cuda-graphs: CUDA graphs are not captured under torchrun" in line
    assert "run it without torchrun" in line

    def gather(out, own):  # every rank gives the same reason
        out[:] = [own] * len(out)
    torchrun_env.setattr(torch.distributed, "all_gather_object", gather)
    torchrun = mb.Torchrun(mb.launch_from_env(), torch.device("cuda", 0), sync_bn=False)
    assert torchrun.skip_reason("torchvision-eager-cuda-graph", "train").startswith(
        "CUDA graphs are not captured under torchrun")
    assert torchrun.skip_reason("torchvision-eager", "train") is None


def test_torchrun_environment_is_read_and_checked(capsys, no_model_built, torchrun_env):
    assert mb.launch_from_env() == mb.Launch(rank=0, local_rank=0, world_size=2, local_world_size=2)
    assert mb.launch_from_env({}) is None
    assert mb.Launch(5, 1, 8, 4).nodes == 2
    torchrun_env.setenv("WORLD_SIZE", "two")
    line = _error_line(["--mode", "train"], capsys)
    assert "torchrun's environment: expected integers in torchrun's variables, got RANK='0', LOCAL_RANK='0', " \
           "WORLD_SIZE='two'" in line
    with pytest.raises(ValueError, match="expected 0 <= RANK < WORLD_SIZE"):
        mb.launch_from_env(dict(RANK="2", WORLD_SIZE="2"))


def _rank_row(rank, median, **extra):
    return dict(rank=rank, host="h", median_ms=median, p20_ms=median * 0.9, p80_ms=median * 1.1, rounds=5,
                images_per_s=4 / (median / 1e3), max_abs_logit_diff=1e-6 * (rank + 1), backends_used={"reference": 20},
                saved_mib=1.0, warmup_s=float(rank), sync_bn=None, gradient_sync="DistributedDataParallel", **extra)


def test_combined_row_takes_the_slowest_rank():
    row = mb.combine_ranks("fused-reference", [_rank_row(0, 10.0), _rank_row(1, 12.5), _rank_row(2, 11.0)], batch=4)
    assert (row["median_ms"], row["p20_ms"], row["p80_ms"], row["slowest_rank"]) == (12.5, 12.5 * 0.9, 12.5 * 1.1, 1)
    assert math.isclose(row["images_per_s"], 3 * 4 / 0.0125) and math.isclose(row["rank_spread"], 1.25)
    assert row["max_abs_logit_diff"] == 3e-6 and row["warmup_s"] == 2.0
    assert [r["rank"] for r in row["per_rank"]] == [0, 1, 2] and "peak_memory_mib" not in row
    gpu = mb.combine_ranks("x", [_rank_row(0, 1.0, peak_memory_mib=100.0, memory_before_mib=50.0),
                                 _rank_row(1, 1.0, peak_memory_mib=120.0, memory_before_mib=40.0)], batch=4)
    assert (gpu["peak_memory_mib"], gpu["memory_before_mib"]) == (120.0, 50.0)
    assert [r["peak_memory_mib"] for r in gpu["per_rank"]] == [100.0, 120.0]


def test_uneven_ranks_warning():
    even = mb.combine_ranks("a", [_rank_row(0, 10.0), _rank_row(1, 12.5)], batch=4)  # exactly at the threshold
    uneven = mb.combine_ranks("b", [_rank_row(0, 10.0), _rank_row(1, 13.0)], batch=4)
    assert mb.rank_spread_warning([even, dict(provider="c", status="skipped", reason="-")]) is None
    text = mb.rank_spread_warning([even, uneven])
    assert "b 1.30 (slowest: rank 1)" in text and "a 1.25" not in text


def test_recorded_torchrun_command():
    one_node, two_nodes = mb.Launch(0, 0, 4, 4), mb.Launch(0, 0, 8, 4)
    kwargs = dict(run_as_main=True, module="resnet_fused.benchmark", argv0="x")
    assert mb.command_line(["--mode", "train"], launch=one_node, **kwargs) \
        == "torchrun --nproc_per_node=4 -m resnet_fused.benchmark --mode train"
    assert mb.command_line(["--mode", "train"], launch=two_nodes, **kwargs) \
        == "torchrun --nnodes=2 --nproc_per_node=4 -m resnet_fused.benchmark --mode train"
    assert mb.command_line(["--mode", "train"], launch=one_node, run_as_main=False, module=None,
                           argv0="/venv/bin/resnet-fused-benchmark") == \
        "resnet_fused.benchmark.main(['--mode', 'train'])"
    old = sys.argv
    sys.argv = ["/venv/bin/resnet-fused-benchmark", "--mode", "train"]
    try:
        assert mb.command_line(None, launch=one_node, run_as_main=False, module=None, argv0=sys.argv[0]) \
            == "torchrun --nproc_per_node=4 --no-python resnet-fused-benchmark --mode train"
    finally:
        sys.argv = old
