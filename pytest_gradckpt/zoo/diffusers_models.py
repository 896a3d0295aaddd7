"""Tiny diffusers UNets, built offline from their config with random weights.

Their own switch is ``enable_gradient_checkpointing()``; diffusers checkpoints resnets and
attention blocks inside each down/up block, so its units differ from the blocks the engine
chooses (``down_blocks.*``, ``up_blocks.*``): the ``native`` strategy is judged by the units
observed recomputed.
"""

from __future__ import annotations

from typing import Any

import torch


def _diffusers(name: str) -> Any:
    """A diffusers model class; an installed diffusers that cannot be imported beside these
    versions (e.g. transformers 4.57 pins an older huggingface_hub) makes the entry skip with why."""
    try:
        import diffusers
    except ImportError as error:
        from pytest_gradckpt.zoo.transformers_models import NotTiny

        raise NotTiny(f"diffusers cannot be imported beside the installed packages: {error}") from None
    return getattr(diffusers, name)


def unet_2d() -> tuple[Any, dict[str, Any]]:
    """``UNet2DModel`` (unconditional), 2 down and 2 up blocks, one with attention.

    Example:
        >>> model, inputs = unet_2d()
        >>> model(**inputs).sample.shape
        torch.Size([2, 3, 16, 16])
    """
    UNet2DModel = _diffusers("UNet2DModel")

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8)
    generator = torch.Generator().manual_seed(1)
    return model, {"sample": torch.randn(2, 3, 16, 16, generator=generator), "timestep": torch.tensor([10, 20])}


def unet_2d_condition() -> tuple[Any, dict[str, Any]]:
    """``UNet2DConditionModel`` (text-conditioned, as in Stable Diffusion), cross-attention blocks.

    Example:
        >>> model, inputs = unet_2d_condition()
        >>> model(**inputs).sample.shape
        torch.Size([2, 4, 16, 16])
    """
    UNet2DConditionModel = _diffusers("UNet2DConditionModel")

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                 attention_head_dim=8,
                                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    generator = torch.Generator().manual_seed(1)
    return model, {"sample": torch.randn(2, 4, 16, 16, generator=generator), "timestep": torch.tensor([10, 20]),
                   "encoder_hidden_states": torch.randn(2, 6, 16, generator=generator)}
