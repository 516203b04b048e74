"""A step captured in a CUDA graph (the main job's "...-cuda-graph" providers): replaying it
launches every kernel of the step at once, so its time has no host overhead left in it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(step: Callable[[], T], *, warmup: int = 3, cuda=torch.cuda) -> Callable[[], T]:
    """`step` captured in a CUDA graph, the way torch's CUDA-graph guide does it: `warmup` calls on
    a side stream first (lazy initialization, cuDNN's algorithm search, autotuning and the
    optimizer's momentum buffers happen there, not in the capture, and backward must have run
    once before it is captured), then one call captured. Returns `replay`, which reruns the
    captured kernels and returns what the captured call returned: static tensors that every
    replay overwrites. The step's inputs are static too: every replay reads the tensors the
    capture read (a loop with new data would copy each batch into them first).

    cuda: where Stream, stream, current_stream, CUDAGraph and graph come from (torch.cuda; a
    stand-in lets a CPU test follow the order of the calls). warmup must be at least 1."""
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (backward must run before it is captured), got {warmup}")
    side = cuda.Stream()
    side.wait_stream(cuda.current_stream())
    with cuda.stream(side):
        for _ in range(warmup):
            step()
    cuda.current_stream().wait_stream(side)
    graph = cuda.CUDAGraph()
    with cuda.graph(graph):
        static_output = step()

    def replay() -> T:
        graph.replay()
        return static_output
    return replay
