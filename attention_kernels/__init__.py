"""Attention kernels: Triton flash attention, fused dual (NASA) attention and shared-key dual attention (joint-attention
DiTs with a negative prompt), with an exact SDPA fallback.

Imports nothing else of swiftstep; `triton` is imported only when a Triton path runs.
"""

from .attention import (attention, attention_8bit, dual_attention, last_path, prefix_dual_attention, select_8bit_path,
                        select_path)

__all__ = ["attention", "attention_8bit", "dual_attention", "last_path", "prefix_dual_attention", "select_8bit_path",
           "select_path"]
