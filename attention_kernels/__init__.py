"""Attention kernels: Triton flash attention and fused dual (NASA) attention, with an exact SDPA fallback.

Imports nothing else of swiftstep; `triton` is imported only when a Triton path runs.
"""

from .attention import attention, attention_8bit, dual_attention, last_path, select_8bit_path, select_path

__all__ = ["attention", "attention_8bit", "dual_attention", "last_path", "select_8bit_path", "select_path"]
