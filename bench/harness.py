"""What every bench script shares: the command-line switches and a synchronised median timer."""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="tiny CPU models or real architectures")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=10)
    return p


def median_seconds(fn, device: str, repeats: int) -> float:
    """Median wall time of `fn()` after one warm-up call (allocations, cuDNN autotune), synchronising CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "CPU"
