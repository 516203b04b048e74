"""Host-overhead benchmarks (host_overhead.py): each fused unit and the eager modules it
replaces, on tensors so small that the time is the host's.

    python -m pytest benchmarks/test_bench_host_overhead.py --benchmark-only
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py      # the side-by-side table with ratios

pytest-benchmark groups each pair (group = the case), so its table shows eager and fused
beside each other. No test asserts a time.
"""

from __future__ import annotations

import pytest
import torch

import host_overhead as ho

import resnet_fused

PAIRS = {pair.name: pair for pair in ho.all_pairs()}


@pytest.mark.parametrize("side", ["eager", "fused"])
@pytest.mark.parametrize("case", list(PAIRS))
def test_host_overhead(benchmark, case, side):
    pair = PAIRS[case]
    fn = pair.eager if side == "eager" else pair.fused
    benchmark.group = f"host overhead: {case}"
    benchmark.extra_info.update(case=case, side=side, label=pair.eager_label if side == "eager" else pair.fused_label)
    with resnet_fused.use_backend("reference"):
        benchmark(fn)


def test_table_smoke(capsys):
    """The side-by-side table runs and names every case (a few calls each: no timing claim)."""
    previous = torch.get_num_threads()
    try:
        assert ho.main(["--rounds", "1", "--calls", "2"]) == 0
    finally:
        torch.set_num_threads(previous)
    out = capsys.readouterr().out
    for case in PAIRS:
        assert case in out
