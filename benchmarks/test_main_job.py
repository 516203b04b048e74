"""CPU smoke of the main job (`python -m resnet_fused.benchmark`), as a user runs it: the table,
the plain statement that the fused kernels need a GPU, and the --json file. A plain test, not a
benchmark (no timing is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of the main job")
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_main_job_on_cpu(tmp_path, mode):
    out = tmp_path / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_fused.benchmark", "--model", "resnet18", "--mode", mode, "--batch", "2",
         "--image-size", "64", "--iters", "2", "--warmup", "1", "--no-progress", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
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
