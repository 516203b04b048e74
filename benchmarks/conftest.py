"""Fixtures shared by the pytest-benchmark suites.

    python -m pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

Each case warms up (torch.compile, Triton autotuning, cuDNN's algorithm search) before
pytest-benchmark's timed rounds; on a GPU every timed call ends with a synchronize and
the L2 cache is flushed before it (outside the timed region). No test asserts a time.
"""

import pytest
import torch

from resnet_fused.benchmark import configure_device, synchronize


@pytest.fixture(scope="session")
def device():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    configure_device(device)
    return device


@pytest.fixture(scope="session")
def on_gpu(device):
    return device.type == "cuda"


@pytest.fixture(scope="session")
def flush_l2(device):
    """setup= for benchmark.pedantic: evicts L2 so no round reuses the last one's cache lines."""
    if device.type != "cuda":
        return None
    buffer = torch.empty(256 * 2**20, dtype=torch.int8, device=device)

    def flush():
        buffer.zero_()
        synchronize(device)
    return flush


@pytest.fixture(scope="session")
def timed(device):
    """timed(fn): fn followed by a device synchronize, so pytest-benchmark's wall clock covers the GPU work."""
    def wrap(fn):
        def run():
            fn()
            synchronize(device)
        return run
    return wrap


@pytest.fixture
def record_median(benchmark):
    """record_median(**rates) after the timed rounds: adds median_ms and, from it, each rate to
    extra_info; rates maps a name to the amount per call (e.g. tflops=FLOPs/1e12) that the
    median turns into a rate."""
    def record(**rates):
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        median = stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        for name, amount in rates.items():
            if amount is not None:
                benchmark.extra_info[name] = amount / median
    return record
