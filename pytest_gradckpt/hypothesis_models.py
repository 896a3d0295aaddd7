"""Hypothesis strategies for property tests of checkpointing: small model configurations,
frozen-parameter masks and batch shapes, plus a builder that turns a configuration
into ``(model, inputs)``.

Example:
    >>> from hypothesis import given
    >>> from pytest_gradckpt.hypothesis_models import small_models
    >>> @given(small_models())
    ... def test_builds(made):
    ...     model, inputs = made
    ...     assert model(inputs).shape[0] == inputs.shape[0]
    >>> test_builds()
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import strategies as st


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A small residual stack: ``depth`` blocks of ``width``, with optional dropout,
    BatchNorm, a block reused in one forward, and frozen blocks (``frozen[i]``)."""

    depth: int
    width: int
    dropout: float
    batchnorm: bool
    reuse_first_block: bool
    frozen: tuple[bool, ...]


@st.composite
def frozen_masks(draw: Any, size: int) -> tuple[bool, ...]:
    """Which of ``size`` blocks are frozen; at least one stays trainable.

    Example:
        >>> from hypothesis import find
        >>> find(frozen_masks(3), lambda mask: mask[0])
        (True, False, False)
    """
    mask = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    if all(mask):
        mask[draw(st.integers(0, size - 1))] = False
    return tuple(mask)


@st.composite
def model_configs(draw: Any, max_depth: int = 4, max_width: int = 12) -> ModelConfig:
    """Random :class:`ModelConfig` values.

    Example:
        >>> from hypothesis import find
        >>> find(model_configs(), lambda c: c.batchnorm).depth
        2
    """
    depth = draw(st.integers(2, max_depth))
    return ModelConfig(
        depth=depth,
        width=draw(st.integers(2, max_width)),
        dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
        batchnorm=draw(st.booleans()),
        reuse_first_block=draw(st.booleans()),
        frozen=draw(frozen_masks(depth)),
    )


def batch_shapes(max_batch: int = 6) -> st.SearchStrategy[int]:
    """Batch sizes; at least 2 so BatchNorm has statistics to compute.

    Example:
        >>> from hypothesis import find
        >>> find(batch_shapes(), lambda b: True)
        2
    """
    return st.integers(2, max_batch)


def build(config: ModelConfig, batch: int, seed: int = 0) -> tuple[Any, Any]:
    """``(model, inputs)`` for ``config``; the same arguments always build the same model.

    Example:
        >>> model, inputs = build(ModelConfig(2, 4, 0.0, False, False, (False, True)), batch=3)
        >>> model(inputs).shape
        torch.Size([3, 4])
    """
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(config.width, config.width)
            self.norm = nn.BatchNorm1d(config.width) if config.batchnorm else nn.Identity()
            self.dropout = nn.Dropout(config.dropout)

        def forward(self, hidden: torch.Tensor) -> torch.Tensor:
            return hidden + self.dropout(torch.tanh(self.norm(self.linear(hidden))))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(config.width, config.width)
            self.blocks = nn.ModuleList(Block() for _ in range(config.depth))
            self.head = nn.Linear(config.width, config.width)
            for block, frozen in zip(self.blocks, config.frozen, strict=True):
                block.requires_grad_(not frozen)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            hidden = self.stem(features)
            for block in self.blocks:
                hidden = block(hidden)
            if config.reuse_first_block:
                hidden = self.blocks[0](hidden)
            return self.head(hidden)

    torch.manual_seed(seed)
    model = Stack()
    inputs = torch.randn(batch, config.width, generator=torch.Generator().manual_seed(seed + 1))
    return model, inputs


@st.composite
def small_models(draw: Any) -> tuple[Any, Any]:
    """``(model, inputs)`` pairs built from :func:`model_configs` and :func:`batch_shapes`."""
    return build(draw(model_configs()), draw(batch_shapes()))
