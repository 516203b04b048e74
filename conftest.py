"""How `python -m pytest` spreads the suite over the machine's cores (pytest-xdist).

With pytest-xdist installed (the test extras), a plain `python -m pytest` runs on one worker
process per core (at most 8), each with an equal share of the cores for its threads, so no
worker oversubscribes them; results do not depend on the thread count (docs/testing.md).
`-n 0` runs in one process, `-n N` on N workers. Benchmark runs (`--benchmark-only`,
`--benchmark-json`, ...) stay in one process: pytest-benchmark does not time under xdist.

The scheduler hands out one test at a time, except that the modules in ONE_WORKER_MODULES go
whole to one worker: their tests share a module-scoped set-up that takes tens of seconds
(a compile gate, a two-process run), which would otherwise run once per worker. Tests marked
`slow` are handed out first, so that no long test starts last.
"""

import os

import pytest

ONE_WORKER_MODULES = (
    "tests/test_triton_compile_gate.py",  # the compile gate, once per target
    "tests/test_cuda_sass_gate.py",       # the extension's SASS, read once
    "tests/test_train_script.py",         # the training script's two-process runs
    "tests/test_distributed.py",          # one two-process gloo run
    "benchmarks/test_gpu_report.py",      # the GPU kit's CPU smoke run
)
MAX_AUTO_WORKERS = 8  # each worker holds torch, the models and their compiles: 1-7 GiB
_SCHEDULE_ENV = "RESNET_FUSED_PYTEST_SCHEDULE"  # set by the controller; a pytest run in a worker stays serial


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _benchmarking(config) -> bool:
    return any(config.getoption(name, None) for name in ("benchmark_only", "benchmark_json", "benchmark_save",
                                                           "benchmark_autosave", "benchmark_compare"))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`-n auto` unless the command gives -n; this file's scheduler unless it gives --dist."""
    option = config.option
    if not hasattr(option, "numprocesses"):  # xdist absent, or `-p no:xdist`
        return
    if (option.collectonly or option.usepdb or _benchmarking(config) or os.environ.get(_SCHEDULE_ENV)
            or os.environ.get("PYTEST_XDIST_WORKER")):
        return
    if option.dist != "no":  # the command chose a schedule
        return
    if option.numprocesses is None:
        option.numprocesses = "auto"
    if option.numprocesses == 0:
        return
    option.dist = "loadscope"  # the family of the scheduler below, which replaces xdist's
    os.environ[_SCHEDULE_ENV] = "modules"


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_AUTO_WORKERS, _usable_cores()))


def pytest_xdist_make_scheduler(config, log):
    if os.environ.get(_SCHEDULE_ENV) != "modules":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModulesScheduling(LoadScopeScheduling):
        """Each test is its own unit of work, except the ONE_WORKER_MODULES, each one unit."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return OneWorkerModulesScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """Slow tests first (a stable sort: every worker collects the same order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _workers > 1:
    # An equal share of the cores per worker, for torch here and for the processes tests start.
    _threads = str(max(1, _usable_cores() // _workers))
    os.environ["OMP_NUM_THREADS"] = _threads
    import torch

    torch.set_num_threads(int(_threads))
