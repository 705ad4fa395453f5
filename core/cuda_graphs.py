"""CUDA-graph capture shared by the MAR head (`core.head_graph`) and the fast path (`pipelines.fast_path`)."""

from __future__ import annotations

import torch


def capture(fn, pool=None, prepare=None):
    """Warm `fn()` up once on a side stream (cuBLAS/cuDNN workspaces, autotuning), then capture it. `prepare()`
    runs before the warm-up and before the capture, outside the graph (e.g. to reset a device-side counter).

    Returns `(graph, outputs)`: `graph.replay()` reruns every kernel on the same memory, so inputs must live in
    buffers allocated before the capture and outputs are read right after each replay. `pool` (a
    `torch.cuda.graph_pool_handle()`) lets graphs that never run concurrently share intermediate memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if prepare is not None:
            prepare()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    if prepare is not None:
        prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs
