"""Unsloth's ``use_gradient_checkpointing="unsloth"``, run from Unsloth's own code when it is installed.

Unsloth turns it on in two steps (``unsloth.models._utils.apply_unsloth_gradient_checkpointing``
for ``max_seq_length >= 512``, then its loader's ``prepare_model_for_training``):
``unsloth_zoo.gradient_checkpointing.patch_unsloth_smart_gradient_checkpointing(dtype)`` makes
``transformers.modeling_utils.checkpoint`` (and torch's ``checkpoint``/``CheckpointFunction``) its
``unsloth_checkpoint``, which always takes the reentrant path through its
``UnslothCheckpointFunction``: the input hidden state of each layer is copied to pinned host
memory in forward (when over 2 MiB; float32 is stored as bfloat16 unless
``UNSLOTH_OFFLOAD_FP32=exact``) and brought back to the GPU to recompute the layer in backward.
Then the model's checkpointing switch binds that function to its layers.

The built-in runs exactly those functions of the installed ``unsloth_zoo``, on the engine's copy
of the model: the patch, then the model's ``gradient_checkpointing_enable`` with
``use_reentrant=True`` (what Unsloth's trainer calls while the patch holds). Unsloth patches the
process for good; here the three names it replaced are put back once the copy's layers hold
``unsloth_checkpoint`` (which calls its autograd function directly), so other strategies and
tests in the same process run torch's own checkpoint. The module is imported without
``unsloth_zoo``'s package ``__init__`` (which needs the whole ``unsloth`` package and a GPU);
``unsloth_zoo.gradient_checkpointing`` itself needs only torch, ``packaging`` and ``filelock``.
Its buffers live on CUDA: off CUDA the strategy is ``skipped``.
"""

from __future__ import annotations

from typing import Any

import torch

from pytest_gradckpt.pipeline.units import ModelInfo
from pytest_gradckpt.strategies import Strategy
from pytest_gradckpt.strategies.one_module import import_one_module, library_refusal

MODULE = "unsloth_zoo.gradient_checkpointing"


def checkpointing_module() -> Any:
    """``unsloth_zoo.gradient_checkpointing``, or raise ImportError saying why it cannot be had.

    Example:
        >>> try:
        ...     checkpointing_module().unsloth_checkpoint.__name__
        ... except ImportError as error:
        ...     "not installed" in str(error) or "cannot import" in str(error)
        True
    """
    return import_one_module(MODULE, "unsloth_zoo", "unsloth_zoo",
                             "Unsloth is not installed (pip install unsloth unsloth_zoo; it needs a CUDA GPU)")


def _patched_names() -> list[tuple[Any, str]]:
    import torch.utils.checkpoint
    import transformers.modeling_utils

    return [(torch.utils.checkpoint, "checkpoint"), (torch.utils.checkpoint, "CheckpointFunction"),
            (transformers.modeling_utils, "checkpoint")]


class UnslothCheckpointing(Strategy):
    """Unsloth's smart offloaded checkpointing (``use_gradient_checkpointing="unsloth"``).

    Example:
        >>> UnslothCheckpointing().name
        'unsloth_gc'
    """

    name = "unsloth_gc"
    description = ("Unsloth's use_gradient_checkpointing='unsloth' (unsloth_zoo's patch_unsloth_smart_gradient_"
                   "checkpointing + gradient_checkpointing_enable: hidden states offloaded to host, layers recomputed)")

    def applies_to(self, info: ModelInfo) -> str | None:
        return library_refusal(checkpointing_module, info, "Unsloth",
                               "Unsloth's checkpointing keeps its offload buffers on CUDA: it runs on CUDA only")

    def apply(self, info: ModelInfo) -> None:
        module = checkpointing_module()
        dtype = next((p.dtype for p in info.model.parameters() if p.is_floating_point()), torch.float32)
        saved = [(owner, name, getattr(owner, name)) for owner, name in _patched_names()]
        try:
            module.patch_unsloth_smart_gradient_checkpointing(dtype=dtype)
            _enable(info.hf_model)
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)


def _enable(hf_model: Any) -> None:
    """The model's own switch, as Unsloth's trainer calls it while its patch holds; the flags
    ``prepare_model_for_training`` sets along the ``.model`` chain for ``"unsloth"``."""
    enable = getattr(hf_model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inner = hf_model
    while inner is not None:
        inner._offloaded_gradient_checkpointing = True
        inner = getattr(inner, "model", None)
        inner = inner if isinstance(inner, torch.nn.Module) else None
    hf_model.config.use_cache = False


#: Unsloth's switch: pass to ``gc.check(..., strategies=STRATEGIES)`` (``skipped`` with the reason
#: where Unsloth is absent or the model is not on CUDA).
STRATEGIES: list[Strategy] = [UnslothCheckpointing()]
