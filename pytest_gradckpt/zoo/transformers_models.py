"""Every transformers architecture that supports gradient checkpointing, made tiny from its
config class with random weights. Nothing is hand-listed and nothing is downloaded: the
installed transformers' auto mappings say which architectures exist, and each one that
cannot be made tiny or cannot run is reported with the reason."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import torch

from pytest_gradckpt.zoo.model_inputs import inputs_for
from pytest_gradckpt.zoo.tiny_configs import NotTiny, tiny_config

__all__ = ["Architecture", "NotTiny", "architectures", "build", "survey", "tiny_config"]

#: Limits of a tiny build: parameters (towers whose sizes are lists stay larger), and seconds
#: for the first plain training step, warm-up included: Kimi Linear's reference kernels take
#: 6-7 s, a third of the full sweep; Hiera, the slowest of the rest, about 1 s.
MAX_PARAMETERS = 10_000_000
MAX_STEP_SECONDS = 3.0

#: The auto mappings the zoo takes architectures from, in order of preference: a model type
#: found in several is built with the head of the first whose tiny build runs, so the head
#: that trains most of the model (every tower) is the one checked.
MAPPINGS: tuple[tuple[str, str], ...] = (
    ("speech_seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),  # Whisper: speech to text, not its decoder alone
    ("image_text_to_text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),  # Llama 4: with its vision tower
    ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("masked_lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("token_classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("image_classification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One transformers architecture: its model type and the head classes offered for it,
    ``(class name, task)`` in order of preference."""

    model_type: str
    heads: tuple[tuple[str, str], ...]

    def describe(self) -> str:
        heads = " or ".join(f"{name} ({task})" for name, task in self.heads)
        return f"{heads}, tiny random weights" + (": the first that runs" if len(self.heads) > 1 else "")


def architectures() -> list[Architecture]:
    """Every model type in the installed transformers' auto mappings of :data:`MAPPINGS`, once
    each, with the head of the first mapping that has it.

    Example:
        >>> any(a.model_type == "llama" for a in architectures())
        True
    """
    from transformers.models.auto import modeling_auto

    heads: dict[str, list[tuple[str, str]]] = {}
    for task, mapping_name in MAPPINGS:
        for model_type, class_name in getattr(modeling_auto, mapping_name, {}).items():
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            offered = heads.setdefault(model_type, [])
            if class_name not in (name for name, _ in offered):
                offered.append((class_name, task))
    return [Architecture(model_type, tuple(offered)) for model_type, offered in sorted(heads.items())]


def build(architecture: Architecture) -> tuple[Any, dict[str, Any]]:
    """``(model, inputs)`` for a tiny random-weight instance of the first head that runs;
    raises :class:`NotTiny` with the first head's reason when none does."""
    reasons = []
    for class_name, task in architecture.heads:
        try:
            return _build_head(architecture.model_type, class_name, task)
        except NotTiny as reason:
            reasons.append(str(reason))
    raise NotTiny(reasons[0])


def _config_for(model_class: type, config: Any) -> Any:
    """The config ``model_class`` takes: the composite one, or the sub-config of its type (a
    text-only head of a vision-language model type, e.g. ``Llama4ForCausalLM``)."""
    wanted = getattr(model_class, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if isinstance(sub, wanted):
            return sub
    return config


def _build_head(model_type: str, class_name: str, task: str) -> tuple[Any, dict[str, Any]]:
    """A tiny ``class_name`` and its inputs, once a training step without checkpointing has
    shown that it runs, computes a loss and stays within the zoo's size and time limits."""
    model_class = _checkpointable_class(class_name)
    config = _config_for(model_class, tiny_config(model_type, task))
    _within_parameter_limit(_meta_parameter_count(model_class, config))
    torch.manual_seed(0)
    try:
        model = model_class(config)
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"cannot build from a tiny config: {type(error).__name__}: {str(error)[:200]}") from None
    _within_parameter_limit(sum(p.numel() for p in model.parameters()))
    try:
        inputs = inputs_for(model, task)
    except NotTiny:
        raise
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"cannot build inputs: {type(error).__name__}: {str(error)[:200]}") from None
    _prove_training_step(model, inputs)
    # The model that is checked is a fresh one with the same weights: the step above may leave
    # state behind (running statistics, RecurrentGemma's recurrent state still attached to
    # that step's graph on transformers 4.57).
    torch.manual_seed(0)
    return model_class(config), inputs


def _checkpointable_class(class_name: str) -> type:
    import transformers

    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise NotTiny(f"{class_name} is not importable from transformers")
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise NotTiny(f"{class_name}.supports_gradient_checkpointing is False")
    return model_class


def _meta_parameter_count(model_class: type, config: Any) -> int:
    """The parameter count of a build on the meta device (no memory, no time): some towers stay
    large even from a tiny config (a 1B-parameter audio tokenizer). 0 when that build fails:
    the real build then reports what fails."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in model_class(config).parameters())
    except Exception:  # noqa: BLE001
        return 0


def _within_parameter_limit(count: int) -> None:
    if count > MAX_PARAMETERS:
        raise NotTiny(f"{count:,} parameters even with tiny sizes (limit {MAX_PARAMETERS:,})")


def _prove_training_step(model: Any, inputs: dict[str, Any]) -> None:
    """One training step without checkpointing: the model must compute a loss from its labels,
    and fast enough for the zoo (a step over the limit would make every check slow)."""
    try:
        model.train()
        started = time.perf_counter()
        output = model(**inputs)
        if not isinstance(getattr(output, "loss", None), torch.Tensor):
            raise NotTiny("computes no loss from labels")
        output.loss.backward()
        seconds = time.perf_counter() - started
    except NotTiny:
        raise
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"a training step fails without checkpointing: {type(error).__name__}: {str(error)[:200]}"
                      ) from None
    if seconds > MAX_STEP_SECONDS:
        raise NotTiny(f"one tiny training step takes {seconds:.1f} s (limit {MAX_STEP_SECONDS} s)")


@functools.lru_cache(maxsize=None)
def survey() -> dict[str, str | None]:
    """Every architecture -> None if it runs tiny, else the reason it cannot."""
    outcome: dict[str, str | None] = {}
    for architecture in architectures():
        try:
            build(architecture)
            outcome[architecture.model_type] = None
        except NotTiny as reason:
            outcome[architecture.model_type] = str(reason)
    return outcome
