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


class DropoutBlock(torch.nn.Module):
    """A residual MLP block with dropout inside: a checkpointed copy must replay its masks."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 4 * width), torch.nn.Linear(4 * width, width)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.dropout(self.down(torch.nn.functional.gelu(self.up(hidden))))


class DropoutNet(torch.nn.Module):
    """Three :class:`DropoutBlock` s (dropout inside every checkpointed region)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(DropoutBlock(width) for _ in range(3))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class _NoisyBackward(torch.autograd.Function):
    """Identity forward; backward adds noise of bf16 size that differs between runs, the way a
    CUDA kernel accumulating with atomics sums in whatever order its threads finish.

    The noise is seeded (reproducible as a sequence) but never repeats between runs, and it
    draws from its own generator, so torch's global RNG (dropout) is untouched."""

    draws = 0

    @staticmethod
    def forward(ctx, hidden):  # noqa: ANN001, ANN205 - autograd.Function signature
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        _NoisyBackward.draws += 1
        generator = torch.Generator().manual_seed(_NoisyBackward.draws)
        noise = torch.rand(grad.shape, generator=generator) * 2 - 1
        # Additive, scaled to the tensor's largest element: like a different summation order,
        # it moves small elements by far more than their own rounding.
        return grad + (noise * 2 ** -8 * grad.abs().max().float()).to(grad.dtype)


class NoisyBackwardNet(torch.nn.Module):
    """bf16 blocks with a nondeterministic backward between them (CPU stand-in for CUDA atomics)."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh()) for _ in range(depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = _NoisyBackward.apply(block(hidden))
        return hidden


def noisy_backward_net() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = NoisyBackwardNet().to(torch.bfloat16)
    inputs = torch.randn(16, 64, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    return model, inputs.requires_grad_()
