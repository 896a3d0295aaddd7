"""LLaMA-Factory's own checkpointing, run from LLaMA-Factory's code when it is installed.

LLaMA-Factory switches checkpointing on in ``prepare_model_for_training`` (module
``llamafactory.model.model_utils.checkpointing``): its checkpoint function skips layers without
trainable parameters and marks the hidden state of the others as requiring grad; ``use_reentrant_gc``
(default True) picks reentrant or not, and ``use_unsloth_gc`` swaps in its offloading autograd
function (hidden states to host memory, layer recomputed in backward on ``"cuda"``: CUDA only).

That module needs only ``transformers``, ``peft`` and LLaMA-Factory's ``extras``; the package
``llamafactory.model`` above it imports the whole loader (and TRL classes newer TRL no longer has),
so the module is imported without running that package's ``__init__``. Nothing is copied.
"""

from __future__ import annotations

import types
from typing import Any

from pytest_gradckpt.pipeline.units import ModelInfo
from pytest_gradckpt.strategies import Strategy
from pytest_gradckpt.strategies.one_module import import_one_module, library_refusal

MODULE = "llamafactory.model.model_utils.checkpointing"


def checkpointing_module() -> Any:
    """LLaMA-Factory's checkpointing module, or raise ImportError saying why it cannot be had.

    Example:
        >>> try:
        ...     checkpointing_module().prepare_model_for_training.__name__
        ... except ImportError as error:
        ...     "not installed" in str(error) or "cannot import" in str(error)
        'prepare_model_for_training'
    """
    return import_one_module(MODULE, "llamafactory.model", "llamafactory",
                             "LLaMA-Factory is not installed (pip install llamafactory)")


class LlamaFactoryCheckpointing(Strategy):
    """LLaMA-Factory's ``prepare_model_for_training`` with checkpointing on, as its training run calls it.

    Example:
        >>> LlamaFactoryCheckpointing(use_unsloth_gc=True).name
        'llamafactory_unsloth_gc'
    """

    def __init__(self, use_unsloth_gc: bool = False, use_reentrant_gc: bool = True):
        self.use_unsloth_gc, self.use_reentrant_gc = use_unsloth_gc, use_reentrant_gc
        self.name = "llamafactory_unsloth_gc" if use_unsloth_gc else (
            "llamafactory_gc" if use_reentrant_gc else "llamafactory_gc_non_reentrant")
        self.description = (f"LLaMA-Factory's prepare_model_for_training (use_unsloth_gc={use_unsloth_gc}, "
                            f"use_reentrant_gc={use_reentrant_gc})")

    def applies_to(self, info: ModelInfo) -> str | None:
        cuda_only = "use_unsloth_gc moves hidden states back to 'cuda' in backward: it runs on CUDA only"
        return library_refusal(checkpointing_module, info, "LLaMA-Factory", cuda_only if self.use_unsloth_gc else None)

    def apply(self, info: ModelInfo) -> None:
        arguments = types.SimpleNamespace(  # the fields of LLaMA-Factory's ModelArguments that it reads
            upcast_layernorm=False, upcast_lmhead_output=False, disable_gradient_checkpointing=False,
            use_unsloth_gc=self.use_unsloth_gc, use_reentrant_gc=self.use_reentrant_gc)
        checkpointing_module().prepare_model_for_training(info.hf_model, arguments)


#: LLaMA-Factory's switches: pass to ``gc.check(..., strategies=STRATEGIES)`` (``skipped`` with the
#: reason where LLaMA-Factory is absent, and ``use_unsloth_gc`` off CUDA).
STRATEGIES: list[Strategy] = [LlamaFactoryCheckpointing(), LlamaFactoryCheckpointing(use_reentrant_gc=False),
                              LlamaFactoryCheckpointing(use_unsloth_gc=True)]
