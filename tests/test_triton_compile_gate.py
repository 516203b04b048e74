"""The compile gate (resnet_fused.backends.triton.aot) on CI's CPU: a representative subset
of the kernels and autotune configs the Triton backend launches for ResNet-50's layers,
compiled with the installed Triton for sm_90 (H100/H200) and sm_80 (A100), and the properties
the design depends on asserted from the compiler's own output (ptxas -v, the PTX, the TTGIR).

The full set runs from the command line:
    python -m resnet_fused.backends.triton.aot --subset all --layouts nhwc,nchw --json report.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists(),
                       reason=f"this Triton has no NVIDIA toolchain under {NVIDIA_BIN}"),
    # The kernels need Triton >= 3.6 (pyproject); torch 2.6's pinned Triton 3.2 cannot compile them.
    pytest.mark.skipif(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 6),
                       reason=f"the Triton kernels need Triton >= 3.6, this is {triton.__version__}"),
]

CONV_KERNELS = {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"}


@pytest.fixture(scope="module", params=["sm_90", "sm_80"])
def report(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "resnet_fused.backends.triton.aot", "--subset", "ci", "--target",
                           request.param, "--sass", "1x1-forward", "--json", str(out)], env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"the gate wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def _where(row) -> str:
    return f"{row['kernel']} {row['layer']} {row['op']} {row['dtype']} {row['layout']} {row['config']}"


def test_everything_compiles(report):
    failed = [f"{_where(r)}: {r['error']}" for r in report["rows"] if "error" in r]
    assert not failed, "\n".join(failed)
    assert report["rows"], "no launches recorded"
    print(report["stdout"])


def _arch(report) -> int:
    return int(report["target"].removeprefix("sm_"))


def test_every_gemm_uses_the_tensor_cores(report):
    """sm_90: bf16/fp16 GEMMs on wgmma, fp32 on TF32 wgmma (fp32: TF32 allowed, PyTorch's
    default for convolutions), no fallback to mma.sync. sm_80: mma.sync, TF32 for fp32. Exact
    float32 (fp32x, TF32 off) on neither: FMA on the CUDA cores, never rounded to TF32."""
    rows = [r for r in report["rows"] if r["gemm"]]
    exact = [r for r in rows if r["dtype"] == "fp32x"]
    assert {r["kernel"] for r in exact} >= CONV_KERNELS
    rounded = [_where(r) for r in exact if r["wgmma"] or r["mma_sync"]]
    assert not rounded, "exact float32 GEMMs on the tensor cores (TF32):\n" + "\n".join(rounded)
    gemms = [r for r in rows if r["dtype"] != "fp32x"]
    assert {r["kernel"] for r in gemms} >= CONV_KERNELS
    if _arch(report) >= 90:
        bad = [_where(r) for r in gemms if not r["wgmma"] or r["mma_sync"]]
        bad_tf32 = [_where(r) for r in gemms if r["dtype"] == "fp32" and not r["wgmma_tf32"]]
    else:
        bad = [_where(r) for r in gemms if not r["mma_sync"] or r["wgmma"]]
        bad_tf32 = [_where(r) for r in gemms if r["dtype"] == "fp32" and not r["mma_sync_tf32"]]
    assert not bad, f"GEMMs not on {report['target']}'s tensor-core instruction:\n" + "\n".join(bad)
    assert not bad_tf32, "fp32 GEMMs without TF32:\n" + "\n".join(bad_tf32)


def test_kept_configs_fit_shared_memory(report):
    over = [f"{_where(r)}: {r['shared_bytes']} B" for r in report["rows"] if r["shared_bytes"] > report["smem_limit"]]
    assert not over, f"configs over {report['smem_limit']} B of shared memory:\n" + "\n".join(over)


def test_each_kernel_and_layer_has_a_spill_free_config(report):
    """Per op too: the chain's forward (the BatchNorm + ReLU prologue) is the forward kernel
    specialized with PROLOGUE, and must not hide behind the plain forward's configs."""
    best = defaultdict(lambda: float("inf"))
    for r in report["rows"]:
        key = (r["kernel"], r["layer"], r["op"], r["dtype"], r["layout"], r["index"])
        best[key] = min(best[key], r["spill_store_bytes"])
    spilling = {k: v for k, v in best.items() if v > 0}
    assert not spilling, f"no spill-free config (least spill bytes): {spilling}"


def test_3x3_conv_kernels_have_one_pipelined_k_loop(report):
    """One scf.for over (tap, channel block) per 3x3 conv kernel, its loads cp.async (the
    software pipeline's); nested per-tap loops drained the pipeline at every tap."""
    rows = [r for r in report["rows"] if r["kernel"] in CONV_KERNELS and r["layer"].startswith("3x3")]
    assert rows
    nested = [f"{_where(r)}: {r['k_loops']} loops" for r in rows if r["k_loops"] != 1]
    assert not nested, "\n".join(nested)
    unpipelined = [_where(r) for r in rows if not r["cp_async"]]
    assert not unpipelined, "K loops without cp.async:\n" + "\n".join(unpipelined)


def test_strided_dgrad_runs_per_phase(report):
    """The 3x3/2 layer's dgrad launches one grid slice per phase (2 x 2) and still compiles to
    one pipelined K loop (checked above): each phase loops over its own 1-4 taps, not 9 masked."""
    rows = [r for r in report["rows"] if r["kernel"] == "_conv_dgrad_kernel" and r["layer"].startswith("3x3/2")]
    assert rows
    unphased = [f"{_where(r)}: grid {r['grid']}" for r in rows if r["grid"][1] != 4]
    assert not unphased, "\n".join(unphased)


def test_configs_per_launch_are_bounded(report):
    """Pruning leaves at most MAX_CONFIGS configs per kernel launch (each is a compile and a
    benchmark on the first step)."""
    from resnet_fused.backends.triton.kernels.configs import MAX_CONFIGS

    configs = defaultdict(set)
    for r in report["rows"]:
        configs[(r["kernel"], r["layer"], r["op"], r["launch"], r["dtype"], r["layout"], r["index"])].add(
            json.dumps(r["config"], sort_keys=True))
    over = {k: len(v) for k, v in configs.items() if len(v) > MAX_CONFIGS}
    assert not over, over


def test_wgrad_and_the_statistics_reductions_fill_the_gpu(report):
    """wgrad's split and the first stage of the training reductions give at least one program
    per SM of the target's GPU (H100: 132, A100: 108) on the 56x56 layers."""
    from resnet_fused.backends.triton.kernels.configs import TARGET_SMS

    sms = TARGET_SMS[_arch(report)]
    small = [f"{_where(r)}: {r['programs']} programs" for r in report["rows"]
             if r["kernel"] == "_conv_wgrad_kernel" and r["programs"] < sms]
    assert not small, "\n".join(small)
    # Each reduction is two launches of one kernel: the groups of tiles, then the groups in order.
    stage1 = {}
    for r in report["rows"]:
        if r["kernel"] in ("_chan_merge_kernel", "_sum_partials_kernel") and "@56" in r["layer"]:
            key = (r["kernel"], r["layer"], r["op"], r["dtype"], r["layout"])
            stage1[key] = max(stage1.get(key, 0), r["programs"])
    assert stage1
    small = {k: v for k, v in stage1.items() if v < sms}
    assert not small, small


def test_aot_compiles_are_the_jits(tmp_path):
    """The gate's specializations are the JIT's: for every launch of one layer's training
    forward (the autotuned conv, both statistics stages, the apply pass), the binary the gate
    compiles has the Triton cache key that JITFunction.warmup computes for the same launch. So
    the gate pointed at a GPU machine's Triton cache (--cache-dir) warms exactly what the first
    step would compile."""
    script = (
        "from resnet_fused.backends.triton import aot\n"
        "rows, jobs = aot.enumerate_jobs([aot.RESNET50['3x3 64->64 @56']], ['bf16'], ['nhwc'], ['train'], 256, 90)\n"
        "for job in jobs.values():\n"
        "    print(job['kernel'], aot.compile_one(job)['hash'] == aot.jit_hash(job))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    results = [ln.split() for ln in lines if ln.strip()]
    assert {k for k, _ in results} >= {"_conv_fwd_kernel", "_chan_merge_kernel", "_bn_apply_kernel"}, proc.stdout
    assert all(ok == "True" for _, ok in results), proc.stdout


def test_1x1_forward_on_nhwc_loads_by_tma(report):
    """Where a conv is a plain GEMM (1x1, stride 1, dense NHWC), the forward's tiles arrive by
    TMA on sm_90 (UTMALDG in the SASS), still feeding wgmma; sm_80 has no TMA, and Triton lowers
    the descriptors to cp.async (LDGSTS). Not the recompute chain's forward: its BatchNorm +
    ReLU prologue takes the pointer path (cp.async), checked here too."""
    rows = [r for r in report["rows"] if r["kernel"] == "_conv_fwd_kernel" and r["layer"].startswith("1x1 ")
            and r["layout"] == "nhwc"]
    plain = [r for r in rows if r["op"] != "chain"]
    chain = [r for r in rows if r["op"] == "chain"]
    assert plain and chain
    def tensor_cores(r, instruction):  # exact float32 runs FMA (test_every_gemm_uses_the_tensor_cores)
        return r[instruction] or r["dtype"] == "fp32x"

    if _arch(report) >= 90:
        bad = [_where(r) for r in plain if not (r["tma"] and r["sass"]["UTMALDG"] and tensor_cores(r, "wgmma"))]
        bad += [_where(r) for r in chain if not (r["cp_async"] and tensor_cores(r, "wgmma"))]
    else:
        bad = [_where(r) for r in plain + chain if not (r["sass"]["LDGSTS"] and tensor_cores(r, "mma_sync"))]
    assert not bad, "\n".join(bad)


def test_int64_index_variant_compiles(report):
    """The int64-index variant (launched for tensors of 2**31 elements or more) compiles too: the
    1x1 forward on TMA (whose descriptor offsets must stay int32) and the phased strided dgrad,
    every op of both layers (errors fail test_everything_compiles)."""
    rows = [r for r in report["rows"] if r["index"] == "int64"]
    assert {r["kernel"] for r in rows} >= CONV_KERNELS
    tma = [r for r in rows if r["kernel"] == "_conv_fwd_kernel" and r["layer"].startswith("1x1 ") and r["op"] != "chain"]
    assert tma
    failed = [f"{_where(r)}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    if _arch(report) >= 90:
        assert all(r["tma"] for r in tma), [_where(r) for r in tma if not r["tma"]]
    phased = [r for r in rows if r["kernel"] == "_conv_dgrad_kernel" and r["layer"].startswith("3x3/2")]
    assert phased and all(r["grid"][1] == 4 for r in phased)
