"""Attention kernels: Triton flash attention and fused dual (NASA) attention, with an exact SDPA fallback.

Imports nothing else of swiftstep; `triton` is imported only when a Triton path runs.
"""

from .attention import attention, dual_attention, last_path, select_path

__all__ = ["attention", "dual_attention", "last_path", "select_path"]
