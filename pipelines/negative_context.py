"""The negative prompt every installed NASA/NAG processor reads, shared by the cross-attention processors
(`nasa_processor.py`) and the joint-attention ones (`nasa_joint.py`), so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core import nasa


@dataclass
class NegativeContext:
    """What every installed processor reads: the negative text context, its mask and the guidance settings."""

    guidance: nasa.NegativeGuidance = field(default_factory=nasa.NegativeGuidance)
    encoder_hidden_states: torch.Tensor | None = None  # [1 or B, L−, C]
    attention_mask: torch.Tensor | None = None  # [1 or B, L−], 1 = attend, 0 = ignore
    _kv: dict = field(default_factory=dict, repr=False)  # id(attn) → (K−, V−): constant over the sampling steps

    @property
    def mode(self) -> str:
        return self.guidance.mode

    @property
    def alpha(self) -> float:
        return self.guidance.alpha

    def set_negative(self, encoder_hidden_states: torch.Tensor | None, attention_mask: torch.Tensor | None = None):
        if encoder_hidden_states is not None and encoder_hidden_states.ndim != 3:
            raise ValueError(f"negative `encoder_hidden_states` must be [B, L, C], got {tuple(encoder_hidden_states.shape)}.")
        if attention_mask is not None and (encoder_hidden_states is None or
                                           attention_mask.shape[-1] != encoder_hidden_states.shape[1]):
            raise ValueError("negative `attention_mask` must be [B, L−] with the negative prompt's length L−.")
        self.encoder_hidden_states, self.attention_mask = encoder_hidden_states, attention_mask
        self._kv.clear()

    def combine(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        return self.guidance.combine(z_pos, z_neg)


def negative_rows(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """A negative input with 1 or B rows, repeated to the model batch `batch` (each prompt's images share its row)."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0]:
        raise ValueError(f"negative `{name}` has batch {t.shape[0]}, which does not divide the model batch {batch}.")
    return t.repeat_interleave(batch // t.shape[0], dim=0)
