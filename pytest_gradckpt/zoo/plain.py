"""Plain torch models that exercise the classic checkpointing hazards. Each factory
returns ``(model, inputs)``; weights are seeded, so every call builds the same model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MaskedDropoutBlock(nn.Module):
    """Residual MLP block with dropout and a keyword-only mask: RNG and kwargs must survive recompute."""

    def __init__(self, width: int, dropout: float = 0.2):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        update = self.dropout(self.down(torch.nn.functional.gelu(self.up(self.norm(hidden)))))
        if mask is not None:
            update = update * mask
        return hidden + update


class DropoutMaskNet(nn.Module):
    """Embedding -> blocks(hidden, mask=mask) -> norm -> head."""

    def __init__(self, vocab: int = 32, width: int = 16, depth: int = 4, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(MaskedDropoutBlock(width, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = block(hidden, mask=mask)
        return self.head(self.norm(hidden))


class BatchNormBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.relu(self.norm(self.linear(hidden)))


class BatchNormNet(nn.Module):
    """Blocks with BatchNorm: recomputing them updates the running statistics a second time."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(BatchNormBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(features)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


class TanhBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + torch.tanh(self.linear(hidden))


class TanhNet(nn.Module):
    """A deterministic stack (no dropout, no BatchNorm), with a trainable stem and head.

    With ``reuse_first_block`` the first block runs again after the others, in the same
    forward (weight sharing): DDP with reentrant checkpointing gets that wrong, and it must
    still recompute exactly once per call.
    """

    def __init__(self, width: int = 16, depth: int = 4, reuse_first_block: bool = False):
        super().__init__()
        self.reuse_first_block = reuse_first_block
        self.stem = nn.Linear(width, width)
        self.blocks = nn.ModuleList(TanhBlock(width) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.stem(features)
        for block in self.blocks:
            hidden = block(hidden)
        if self.reuse_first_block:
            hidden = self.blocks[0](hidden)
        return self.head(hidden)


class ReusedBlockNet(TanhNet):
    """Three blocks, the first of which runs twice in one forward."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__(width, depth, reuse_first_block=True)


def dropout_mask_net(batch: int = 4, length: int = 8) -> tuple[nn.Module, dict[str, Any]]:
    """Dropout plus a keyword mask.

    Example:
        >>> model, inputs = dropout_mask_net()
        >>> model(**inputs).shape
        torch.Size([4, 8, 32])
    """
    torch.manual_seed(0)
    model = DropoutMaskNet()
    generator = torch.Generator().manual_seed(1)
    inputs = {"ids": torch.randint(0, 32, (batch, length), generator=generator),
              "mask": (torch.rand(batch, length, 1, generator=generator) > 0.3).float()}
    return model, inputs


def batchnorm_net(batch: int = 8) -> tuple[nn.Module, torch.Tensor]:
    """BatchNorm blocks.

    Example:
        >>> model, features = batchnorm_net()
        >>> model(features).shape
        torch.Size([8, 4])
    """
    torch.manual_seed(0)
    return BatchNormNet(), torch.randn(batch, 16, generator=torch.Generator().manual_seed(1))


def reused_block_net(batch: int = 4) -> tuple[nn.Module, torch.Tensor]:
    """A block reused inside one forward.

    Example:
        >>> model, features = reused_block_net()
        >>> model(features).shape
        torch.Size([4, 4])
    """
    torch.manual_seed(0)
    return ReusedBlockNet(), torch.randn(batch, 16, generator=torch.Generator().manual_seed(1))


def tanh_net(batch: int = 4) -> tuple[nn.Module, torch.Tensor]:
    """A plain deterministic stack.

    Example:
        >>> model, features = tanh_net()
        >>> model(features).shape
        torch.Size([4, 4])
    """
    torch.manual_seed(0)
    return TanhNet(), torch.randn(batch, 16, generator=torch.Generator().manual_seed(1))
