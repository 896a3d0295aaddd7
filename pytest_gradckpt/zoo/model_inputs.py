"""Inputs for a tiny transformers model, built from its config and its forward's signature.

A processor would normally supply them: pixel values shaped the way the vision tower wants,
and as many image (or audio) tokens in the text as the tower yields features. Here the
*shape* comes from a small table of input conventions (:data:`PIXEL_CONVENTIONS`, chosen by
the forward's parameters), and the *number of placeholder tokens* is measured by running the
model's own ``get_image_features``/``get_audio_features`` once, so no model is listed by name.

Example:
    >>> from pytest_gradckpt.zoo.tiny_configs import tiny_config
    >>> import transformers
    >>> model = transformers.LlavaForConditionalGeneration(tiny_config("llava"))
    >>> inputs = inputs_for(model, "image_text_to_text")
    >>> sorted(inputs)
    ['attention_mask', 'input_ids', 'labels', 'pixel_values']
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from pytest_gradckpt.zoo.tiny_configs import SPECIAL_BASE, VOCAB, NotTiny

SEQUENCE = 16
BATCH = 2
NUM_LABELS = 2


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1)


def _parameters(model: Any) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _text_ids(length: int = SEQUENCE, *, below: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, below, (BATCH, length), generator=_generator())


def _with_common(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    parameters = _parameters(model)
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    if "attention_mask" in parameters and "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for name in _required(model.forward) - set(inputs):
        if name.endswith("input_ids"):  # a second text input (InstructBLIP's Q-Former prompt)
            inputs[name] = _text_ids()
            mask = name.replace("input_ids", "attention_mask")
            if mask in parameters:
                inputs[mask] = torch.ones_like(inputs[name])
    return inputs


# ----------------------------------------------------------------------------- text tasks

def _language_modeling(model: Any) -> dict[str, Any]:
    ids = _text_ids()
    return _with_common(model, {"input_ids": ids, "labels": ids.clone()})


def _classification(model: Any, per_token: bool = False) -> dict[str, Any]:
    """Text with a class label per sequence, or per token."""
    shape = (BATCH, SEQUENCE) if per_token else (BATCH,)
    labels = torch.randint(0, model.config.num_labels, shape, generator=_generator())
    return _with_common(model, {"input_ids": _text_ids(), "labels": labels})


# ----------------------------------------------------------------------------- images

def _vision_config(config: Any) -> Any:
    """The (sub-)config that sizes the image: the vision tower's, an encoder's, or the model's."""
    if getattr(config, "vision_config", None) is not None:
        return config.vision_config
    encoder = getattr(config, "encoder", None)
    return encoder if getattr(encoder, "image_size", None) is not None else config


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _image(config: Any) -> torch.Tensor:
    vision = _vision_config(config)
    side = _side(getattr(vision, "image_size", 32))
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", None) or 3
    return torch.randn(BATCH, channels, side, side, generator=_generator())


def _pixels_plain(model: Any) -> dict[str, Any]:
    """(batch, channels, size, size): CLIP/SigLIP towers (Llava, PaliGemma, Gemma 3...)."""
    return {"pixel_values": _image(model.config)}


def _pixels_any_resolution(model: Any) -> dict[str, Any]:
    """(batch, tiles, channels, size, size) plus ``image_sizes`` (LLaVA-NeXT, OneVision): the
    grid is one tile of the tiny image (see ``tiny_configs``), so a base view plus one tile."""
    image = _image(model.config)
    side = image.shape[-1]
    return {"pixel_values": torch.stack([image, image], dim=1), "image_sizes": torch.tensor([[side, side]] * BATCH)}


def _pixels_grid(model: Any) -> dict[str, Any]:
    """Flattened patches plus ``image_grid_thw`` (Qwen2-VL and its descendants): a 4 x 4 patch
    grid per image, merged 2 x 2 into 4 image tokens."""
    vision = _vision_config(model.config)
    patch = _side(getattr(vision, "patch_size", 14))
    temporal = _side(getattr(vision, "temporal_patch_size", 1) or 1)
    channels = getattr(vision, "in_channels", None) or getattr(vision, "num_channels", None) or 3
    merge = getattr(vision, "spatial_merge_size", 2) or 1
    side = 2 * merge
    pixels = torch.randn(BATCH * side * side, channels * temporal * patch * patch, generator=_generator())
    return {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, side, side]] * BATCH)}


def _pixels_per_sample_images(model: Any) -> dict[str, Any]:
    """(batch, images, channels, size, size) plus a pixel mask (Idefics 2/3, SmolVLM)."""
    image = _image(model.config).unsqueeze(1)
    return {"pixel_values": image,
            "pixel_attention_mask": torch.ones(BATCH, 1, *image.shape[-2:], dtype=torch.bool)}


def _pixels_tiled(model: Any) -> dict[str, Any]:
    """(batch, images, tiles, channels, size, size) with the aspect-ratio inputs of a one-tile
    image (Mllama: the text attends to the image through cross-attention layers)."""
    tiles = getattr(_vision_config(model.config), "max_num_tiles", 1)
    image = _image(model.config)
    pixels = torch.zeros(BATCH, 1, tiles, *image.shape[1:])
    pixels[:, 0, 0] = image
    mask = torch.zeros(BATCH, 1, tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    return {"pixel_values": pixels, "aspect_ratio_ids": torch.ones(BATCH, 1, dtype=torch.long),
            "aspect_ratio_mask": mask}


#: Which pixel layout a model wants, chosen by a parameter its forward has (first match wins).
PIXEL_CONVENTIONS: tuple[tuple[str, Callable[[Any], dict[str, Any]]], ...] = (
    ("image_grid_thw", _pixels_grid),
    ("aspect_ratio_ids", _pixels_tiled),
    ("pixel_attention_mask", _pixels_per_sample_images),
    ("pixel_values", _pixels_plain),
)


def _pixels(model: Any) -> dict[str, Any]:
    if getattr(model.config, "image_grid_pinpoints", None):
        return _pixels_any_resolution(model)
    parameters = _parameters(model)
    for parameter, convention in PIXEL_CONVENTIONS:
        if parameter in parameters:
            return convention(model)
    raise NotTiny("takes no pixel_values")


def _feature_count(features: Any, width: int) -> int:
    """How many placeholder tokens the features fill: their elements over the text width."""
    if hasattr(features, "pooler_output") and features.pooler_output is not None and not isinstance(
            features, torch.Tensor):
        features = features.pooler_output
    if isinstance(features, dict):
        features = next(iter(features.values()))
    if isinstance(features, torch.Tensor):
        return features.numel() // width
    if isinstance(features, (list, tuple)):
        return sum(_feature_count(f, width) for f in features)
    raise NotTiny(f"get_image_features returns {type(features).__name__}: placeholder count unknown")


def _token_id(config: Any, kind: str) -> int | None:
    """The placeholder id of ``kind`` ("image", "audio") the config names, if any."""
    for name in (f"{kind}_token_id", f"{kind}_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _placeholder_ids(config: Any, token: int, count: int) -> list[int]:
    """``count`` placeholders, between the start/end markers the model looks for."""
    start = next((getattr(config, n) for n in ("vision_start_token_id", "boi_token_id", "image_start_token_id")
                  if isinstance(getattr(config, n, None), int)), None)
    end = next((getattr(config, n) for n in ("vision_end_token_id", "eoi_token_id", "image_end_token_id")
                if isinstance(getattr(config, n, None), int)), None)
    return ([start] if start is not None else []) + [token] * count + ([end] if end is not None else [])


def _required(function: Callable[..., Any]) -> set[str]:
    return {name for name, p in inspect.signature(function).parameters.items()
            if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _pixel_extras(model: Any, pixels: dict[str, Any]) -> dict[str, Any]:
    """``image_sizes`` where a tower requires them (Pixtral towers: Mistral 3, LightOnOCR); never
    where optional (LLaVA's tower would take them as a Pixtral tower's)."""
    tower = getattr(model, "get_image_features", None)
    if tower is not None and "image_sizes" in _required(tower) and "image_sizes" not in pixels:
        side = pixels["pixel_values"].shape[-1]
        return {**pixels, "image_sizes": torch.tensor([[side, side]] * BATCH)}
    return pixels


def _placeholder_count(model: Any, inputs: dict[str, Any], kind: str = "image") -> int:
    """Placeholder tokens per sample: the features ``get_<kind>_features`` yields from
    ``inputs`` (its first entry is the pixels or audio features), over the batch."""
    width = model.get_input_embeddings().embedding_dim
    getter = getattr(model, f"get_{kind}_features", None)
    if getter is None:
        raise NotTiny(f"has no get_{kind}_features to count its {kind} tokens with")
    first, *rest = inputs
    with torch.no_grad():
        try:
            extra = {k: inputs[k] for k in rest if k in inspect.signature(getter).parameters}
            features = getter(inputs[first], **extra)
        except Exception as error:  # noqa: BLE001
            raise NotTiny(f"get_{kind}_features fails on tiny {kind} inputs: {type(error).__name__}: "
                          f"{str(error)[:200]}") from None
    per_sample, remainder = divmod(_feature_count(features, width), BATCH)
    if remainder or not per_sample:
        raise NotTiny(f"{kind} features do not split evenly over the batch")
    return per_sample


def _image_text(model: Any) -> dict[str, Any]:
    """Pixels plus text holding one placeholder per image feature (models that splice image
    features into the text), or plus plain text (models that attend to the image another way:
    BLIP-2's queries, an encoder-decoder's cross-attention)."""
    config = model.config
    pixels = _pixels(model)
    parameters = _parameters(model)
    token = _token_id(config, "image")
    if token is not None:
        pixels = _pixel_extras(model, pixels)
    text = _text_ids(below=SPECIAL_BASE)  # below the special ids: no placeholder appears by accident
    if "input_ids" not in parameters:  # a vision encoder-decoder: the labels are the text
        return {**pixels, "labels": text}
    if token is None:
        return _with_common(model, {"input_ids": text, "labels": text.clone(), **pixels})
    # a model that cross-attends to the image marks it with one token; the others splice in
    # one token per image feature
    count = 1 if "cross_attention_mask" in parameters else _placeholder_count(model, pixels, "image")
    placeholders = torch.tensor(_placeholder_ids(config, token, count)).expand(BATCH, -1)
    ids = torch.cat([placeholders, text], dim=1)
    if "cross_attention_mask" in parameters:
        tiles = pixels["aspect_ratio_mask"].shape[-1]
        pixels = {**pixels, "cross_attention_mask": torch.ones(BATCH, ids.shape[1], 1, tiles, dtype=torch.long)}
    labels = ids.clone()
    labels[:, : placeholders.shape[1]] = -100  # no loss on the image, as collators do
    inputs = {"input_ids": ids, "labels": labels, **pixels}
    if "token_type_ids" in parameters:
        inputs["token_type_ids"] = (ids == token).long()  # Gemma 3 / PaliGemma: image tokens attend both ways
    if "mm_token_type_ids" in parameters:
        inputs["mm_token_type_ids"] = (ids == token).long()
    return _with_common(model, inputs)


def _image_classification(model: Any) -> dict[str, Any]:
    labels = torch.randint(0, model.config.num_labels, (BATCH,), generator=_generator())
    return {**_pixels_plain(model), "labels": labels}


# ----------------------------------------------------------------------------- audio

def _audio_features(model: Any) -> torch.Tensor:
    """Log-mel features: (batch, mel bins, frames) for Whisper-style encoders, (batch, frames,
    features) for Speech2Text-style ones (their conv front-end reads the last axis)."""
    config = model.config
    frames = 2 * getattr(config, "max_source_positions", 32)
    if hasattr(config, "num_mel_bins"):
        return torch.randn(BATCH, config.num_mel_bins, frames, generator=_generator())
    width = getattr(config, "input_feat_per_channel", 80) * getattr(config, "input_channels", 1)
    return torch.randn(BATCH, frames, width, generator=_generator())


def _audio_text(model: Any) -> dict[str, Any]:
    """Audio features plus text holding one placeholder per audio feature (Qwen2-Audio,
    Voxtral): the audio tower's features are spliced into the text."""
    audio = getattr(model.config, "audio_config", model.config)
    frames = 2 * getattr(audio, "max_source_positions", 32)
    features = {"input_features": torch.randn(BATCH, getattr(audio, "num_mel_bins", 80), frames,
                                              generator=_generator())}
    wanted = _parameters(model) | set(inspect.signature(getattr(model, "get_audio_features", model.forward)).parameters)
    for mask in ("feature_attention_mask", "input_features_mask"):
        if mask in wanted:
            features[mask] = torch.ones(BATCH, frames, dtype=torch.long)
    token = _token_id(model.config, "audio")
    if token is None:
        raise NotTiny("the config names no audio token id")
    count = _placeholder_count(model, features, "audio")
    ids = torch.cat([torch.full((BATCH, count), token), _text_ids(below=SPECIAL_BASE)], dim=1)
    labels = ids.clone()
    labels[:, :count] = -100
    return _with_common(model, {"input_ids": ids, "labels": labels, **features})


def _speech_seq2seq(model: Any) -> dict[str, Any]:
    if "input_ids" in _parameters(model) and hasattr(model.config, "audio_config"):
        return _audio_text(model)  # an audio-language model listed as speech to text (Voxtral)
    if "input_features" not in _parameters(model):
        raise NotTiny("takes no input_features")
    labels = _text_ids(SEQUENCE // 2)
    return {"input_features": _audio_features(model), "labels": labels}


#: Task -> input builder.
BUILDERS: dict[str, Callable[[Any], dict[str, Any]]] = {
    "causal_lm": _language_modeling,
    "seq2seq": _language_modeling,
    "masked_lm": _language_modeling,
    "image_text_to_text": _image_text,
    "sequence_classification": _classification,
    "token_classification": functools.partial(_classification, per_token=True),
    "image_classification": _image_classification,
    "speech_seq2seq": _speech_seq2seq,
}


def inputs_for(model: Any, task: str) -> dict[str, Any]:
    """Training inputs (labels included) for ``model`` built for ``task``; a composite model
    that takes images gets them whatever mapping it came from.

    Example:
        >>> import transformers
        >>> from pytest_gradckpt.zoo.tiny_configs import tiny_config
        >>> model = transformers.BertForSequenceClassification(tiny_config("bert"))
        >>> inputs = inputs_for(model, "sequence_classification")
        >>> inputs["input_ids"].shape, inputs["labels"].shape
        (torch.Size([2, 16]), torch.Size([2]))
    """
    parameters = _parameters(model)
    if task in ("causal_lm", "seq2seq"):
        if "pixel_values" in parameters and hasattr(model.config, "vision_config"):
            task = "image_text_to_text"
        elif "input_features" in parameters and hasattr(model.config, "audio_config"):
            return _audio_text(model)
    return BUILDERS[task](model)
