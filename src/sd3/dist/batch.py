"""`Batch`: the one contract between whatever encodes (a loader rank, or the same process at world
size 1) and the model ranks that train on it."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class Batch:
    latents: Tensor
    """(B, C, h, w) autoencoder latents, zero-centred and scaled."""
    text: tuple[Tensor, ...]
    """One (B, L_i, D_i) token-state tensor per text encoder (`encoders.text` order), padding zeroed."""
    text_mask: tuple[Tensor, ...]
    """One (B, L_i) bool tensor per text encoder: True where a real token is."""
    pooled: Tensor
    """(B, P) pooled text vector."""
    step: int
    """The global micro-step this batch is for (the sampler's step)."""
    rows: Tensor
    """(B,) int64 global row ids the samples came from (after corrupt-row replacement)."""

    @property
    def size(self) -> int:
        return self.latents.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, latents=move(self.latents), text=tuple(map(move, self.text)),
                       text_mask=tuple(map(move, self.text_mask)), pooled=move(self.pooled))

    def select(self, index: slice) -> Batch:
        """The samples `index` (a slice) of this batch, as views."""
        return replace(self, latents=self.latents[index], text=tuple(t[index] for t in self.text),
                       text_mask=tuple(m[index] for m in self.text_mask), pooled=self.pooled[index],
                       rows=self.rows[index])

    def split(self, parts: int) -> list[Batch]:
        """Split evenly along the batch (one piece per model rank a loader feeds)."""
        if self.size % parts:
            raise ValueError(f"batch of {self.size} does not split evenly into {parts} parts")
        n = self.size // parts
        return [self.select(slice(i * n, (i + 1) * n)) for i in range(parts)]

    def trim_text(self) -> Batch:
        """Cut every text stream to its longest real caption in this batch (never to zero tokens)."""
        text, mask = [], []
        for states, m in zip(self.text, self.text_mask):
            longest = max(int(m.sum(dim=1).max()), 1) if m.numel() else 1
            text.append(states[:, :longest])
            mask.append(m[:, :longest])
        return replace(self, text=tuple(text), text_mask=tuple(mask))
