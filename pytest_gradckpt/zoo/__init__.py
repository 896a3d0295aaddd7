"""The built-in model zoo: tiny models built offline with random weights.

Four families: plain torch models for the classic hazards, PEFT LoRA/QLoRA on a tiny
Llama, diffusers UNets, and every transformers architecture the installed version offers (found from its
auto mappings, never hand-listed). Entries are cheap to list; building happens on use.

Example:
    >>> from pytest_gradckpt import zoo
    >>> zoo.entry("dropout_mask").family
    'plain'
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from collections.abc import Callable
from typing import Any

from pytest_gradckpt.errors import GradckptUsageError

ALL_SCENARIOS = ("train", "accumulate", "autograd_grad", "autocast", "eval_mode", "frozen_inputs")


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One zoo model: ``build()`` returns ``(model, inputs)`` or raises ``NotTiny`` with the reason."""

    name: str
    family: str
    build: Callable[[], tuple[Any, Any]]
    scenarios: tuple[str, ...]
    description: str = ""
    #: True: run each step in a child process (some strategy crashes the interpreter on this model);
    #: "auto": the plugin's default, isolated where a forked child is cheap
    isolate: bool | str = "auto"


#: What ``make check`` runs by default: one of each kind of hazard, a few minutes at most.
REPRESENTATIVE = ("dropout_mask", "batchnorm", "reused_block", "lora", "lora_modules_to_save", "qlora",
                  "llama", "gpt2", "bert", "t5", "mistral", "qwen2", "qwen2_vl", "llava")


def _plain() -> list[ZooEntry]:
    from pytest_gradckpt.zoo import plain

    return [
        ZooEntry("dropout_mask", "plain", plain.dropout_mask_net, ALL_SCENARIOS + ("fsdp2",),
                 "embedding, residual blocks with dropout and a keyword mask"),
        ZooEntry("batchnorm", "plain", plain.batchnorm_net, ("train", "eval_mode"),
                 "blocks with BatchNorm: recompute updates running statistics again"),
        ZooEntry("reused_block", "plain", plain.reused_block_net, ("train", "accumulate", "autograd_grad", "ddp"),
                 "a block reused inside one forward"),
    ]


def _peft() -> list[ZooEntry]:
    if importlib.util.find_spec("peft") is None:
        return []
    from pytest_gradckpt.zoo import peft_models

    entries = [
        ZooEntry("lora", "peft", peft_models.llama_lora, ("train", "accumulate", "autograd_grad", "eval_mode"),
                 "LoRA on a tiny Llama: frozen base and embeddings, adapters on layers 1-2, lora_dropout"),
        ZooEntry("lora_modules_to_save", "peft", lambda: peft_models.llama_lora(modules_to_save=True), ("train",),
                 "LoRA with a trainable LM head: reentrant loses every LoRA gradient with no error"),
    ]
    if importlib.util.find_spec("transformers") is not None:
        entries += [ZooEntry(f"{model_type}_lora", "peft",
                             functools.partial(peft_models.vision_language_lora, model_type),
                             ("train", "accumulate", "autograd_grad"),
                             f"LoRA on a tiny {model_type}'s language model, its vision tower frozen")
                    for model_type in ("qwen2_vl", "llava")]
    if importlib.util.find_spec("bitsandbytes") is not None:
        entries.append(ZooEntry("qlora", "peft", peft_models.llama_qlora, ("train",),
                                "bitsandbytes 4-bit nf4 base, prepare_model_for_kbit_training, LoRA"))
    return entries


def _diffusers() -> list[ZooEntry]:
    if importlib.util.find_spec("diffusers") is None:
        return []
    from pytest_gradckpt.zoo import diffusers_models

    return [
        ZooEntry("unet_2d_condition", "diffusers", diffusers_models.unet_2d_condition, ("train",),
                 "diffusers UNet2DConditionModel: cross-attention blocks, its own switch"),
        # Reentrant checkpointing of its down blocks crashes the interpreter (segmentation fault,
        # torch 2.13): each step runs in a child process, so the crash is that strategy's verdict.
        ZooEntry("unet_2d", "diffusers", diffusers_models.unet_2d, ("train",),
                 "diffusers UNet2DModel: resnet and attention blocks, its own switch", isolate=True),
    ]


def _transformers() -> list[ZooEntry]:
    if importlib.util.find_spec("transformers") is None:
        return []
    from pytest_gradckpt.zoo import transformers_models as tm

    return [ZooEntry(a.model_type, "transformers", functools.partial(tm.build, a), ("train",),
                     a.describe()) for a in tm.architectures()]


def entries(include_transformers: bool = True) -> dict[str, ZooEntry]:
    """Every zoo entry by name: plain, PEFT, then every transformers architecture."""
    found = _plain() + _peft() + _diffusers() + (_transformers() if include_transformers else [])
    return {e.name: e for e in found}


def entry(name: str) -> ZooEntry:
    """One entry by name; unknown names list what is available."""
    found = entries(include_transformers=name not in {e.name for e in _plain() + _peft() + _diffusers()})
    if name not in found:
        raise GradckptUsageError(f"unknown zoo model {name!r}; available: {', '.join(found)}")
    return found[name]


def select(names: list[str] | None) -> list[ZooEntry]:
    """``None`` -> :data:`REPRESENTATIVE`; ``["all"]`` -> everything; otherwise those names.

    Example:
        >>> [e.name for e in select(["dropout_mask", "batchnorm"])]
        ['dropout_mask', 'batchnorm']
    """
    wanted = list(REPRESENTATIVE) if names is None else names
    everything = wanted == ["all"]
    light = {e.name for e in _plain() + _peft() + _diffusers()}
    available = entries(include_transformers=everything or not set(wanted) <= light)
    if everything:
        return list(available.values())
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise GradckptUsageError(f"--gradckpt-models: unknown zoo model(s) {', '.join(map(repr, unknown))}; "
                                 f"available: all, {', '.join(available)}")
    return [available[n] for n in wanted]
