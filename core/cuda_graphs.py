"""CUDA-graph capture shared by the MAR head (`core.head_graph`) and the fast path (`pipelines.fast_path`), and the
audit that checks a region is safe to capture before any capture starts.

A graph records kernels, not Python: whatever the region reads from the host is frozen at capture time, and some
operations cannot be captured at all. `CaptureAudit` runs the region once (the warm-up run, or an eager run on the
CPU in tests) and raises `CaptureHazard` naming the first operation that would break or silently go stale:
- a host synchronisation (`.item()`, `bool(tensor)`, `nonzero`, data-dependent shapes): CUDA refuses it while
  capturing and the failed capture can leave the stream unusable;
- a random draw: a replay would reuse the same numbers (the callers pre-draw every noise sample in eager order);
- a tensor made from host data (`torch.tensor(list)`) or copied between devices: the copy is either refused
  (pageable memory) or frozen into the graph with the values of capture time.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make the host wait for the device, or whose output size depends on tensor values.
_SYNC = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2",
         "unique_consecutive", "equal", "bincount", "histc", "repeat_interleave", "allclose"}
_RANDOM = ("rand", "normal", "bernoulli", "multinomial", "uniform", "exponential", "poisson", "cauchy",
           "geometric", "log_normal", "random_")
_HOST_DATA = {"lift_fresh", "lift_fresh_copy"}


class CaptureHazard(RuntimeError):
    """An operation in a region meant for CUDA-graph capture that a capture would refuse or freeze."""


class CaptureAudit(TorchDispatchMode):
    """Raises `CaptureHazard` on the first operation of the dispatched region that a CUDA graph cannot hold (see
    the module docstring). `ops` counts every operation seen (for tests: the audit saw the region)."""

    def __init__(self, where: str = "the captured region"):
        super().__init__()
        self.where = where
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        why = ""
        if name in _SYNC:
            why = "it waits for the device (a host synchronisation or a data-dependent shape)"
        elif name.startswith(_RANDOM):
            why = "it draws random numbers (a replay would reuse them; draw them before the region)"
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ())):
            why = "boolean-mask indexing has a data-dependent shape (use torch.where or masked_fill)"
        elif name in _HOST_DATA:
            why = "it makes a tensor from host data (frozen at capture time; make it a buffer filled before)"
        elif name in ("_to_copy", "copy_", "_copy_from"):
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() > 0}
            target = kwargs.get("device")
            if target is not None:
                devices.add(torch.device(target))
            if len({d.type for d in devices}) > 1:
                why = f"it copies between {sorted(d.type for d in devices)} (do transfers before the region)"
        if why:
            raise CaptureHazard(f"{self.where} cannot be captured in a CUDA graph: aten.{name} — {why}.")
        self.ops += 1
        return func(*args, **kwargs)


def capture(fn, pool=None, prepare=None, audit: str | None = "the captured region"):
    """Warm `fn()` up once on a side stream (cuBLAS/cuDNN workspaces, autotuning), then capture it. `prepare()`
    runs before the warm-up and before the capture, outside the graph (e.g. to reset a device-side counter). The
    warm-up runs under `CaptureAudit(audit)` (pass None to skip, e.g. for torch.compile'd regions), so a region
    that cannot be captured raises `CaptureHazard` before any capture starts.

    Returns `(graph, outputs)`: `graph.replay()` reruns every kernel on the same memory, so inputs must live in
    buffers allocated before the capture and outputs are read right after each replay. `pool` (a
    `torch.cuda.graph_pool_handle()`) lets graphs that never run concurrently share intermediate memory."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if prepare is not None:
            prepare()
        with CaptureAudit(audit) if audit else contextlib.nullcontext():
            fn()
    torch.cuda.current_stream().wait_stream(side)
    if prepare is not None:
        prepare()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        outputs = fn()
    return graph, outputs
