"""Small models the project's own tests share."""

from __future__ import annotations

import torch


class TwoBlocks(torch.nn.Module):
    """Two Linear blocks in a ModuleList, then ``finish`` (a hook for misbehaving subclasses)."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(2))

    def finish(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return self.finish(hidden)
