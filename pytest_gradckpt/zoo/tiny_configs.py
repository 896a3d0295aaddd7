"""Any transformers config made tiny: every size attribute shrunk, every sub-config (text,
vision, audio) shrunk the same way, special token ids moved inside the tiny vocabulary.

Nothing here knows a model by name. A composite config (a vision or audio tower beside a
language model) is rebuilt from its own class with each sub-config rebuilt from the composite's
defaults for it (``sub_configs_defaults``) plus the tiny sizes, recursively.

Example:
    >>> config = tiny_config("llava")
    >>> config.text_config.hidden_size, config.vision_config.num_hidden_layers
    (32, 2)
"""

from __future__ import annotations

from typing import Any

#: Size-defining config attributes and the tiny value each is shrunk to (never grown).
TINY: dict[str, int] = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "n_embed": 32, "embed_dim": 32, "dim": 32, "word_embed_proj_dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "n_inner": 64,
    "d_ff": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "ffn_hidden_size": 64,
    "head_dim": 8, "d_kv": 8, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 8, "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "vocab_size": 128, "max_position_embeddings": 64, "n_positions": 64,
    "n_ctx": 64, "max_seq_len": 64, "sliding_window": 16, "attention_window": 16, "block_size": 16,
    "num_buckets": 8, "relative_attention_num_buckets": 8, "type_vocab_size": 2,
    # state-space and linear-attention sizes (Mamba hybrids, gated delta nets)
    "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_num_heads": 4, "mamba_d_state": 16, "ssm_state_size": 16,
    "state_size": 16, "mamba_head_dim": 8, "mamba_chunk_size": 16, "chunk_size": 16,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "moe_shared_expert_intermediate_size": 32, "hc_lowrank": 16, "rotary_dim": 8,
    # vision and audio towers
    "depth": 2, "out_hidden_size": 32, "projection_dim": 32, "text_hidden_size": 32,
    "projector_hidden_size": 32, "encoder_hidden_size": 32, "max_source_positions": 32,
    "max_target_positions": 64, "num_global_layers": 1, "num_key_value_groups": 2, "mm_tokens_per_image": 16,
}

#: Token ids at or above this are ids of the text; special ids (image, audio, pad...) are moved
#: into ``[SPECIAL_BASE, VOCAB)`` so that random text never contains them by accident.
VOCAB = TINY["vocab_size"]
SPECIAL_BASE = 96

#: The patch grid a vision tower is shrunk to, per side, where its image size allows (a
#: CLIP-L tower at 336 px has 24 x 24 patches: 576 image tokens in every sample).
PATCHES_PER_SIDE = 8


class NotTiny(Exception):
    """This architecture cannot be made tiny or cannot run here; the message says why."""


def _is_config(value: Any) -> bool:
    from transformers import PretrainedConfig

    return isinstance(value, PretrainedConfig)


def _size_overrides(config_class: type, default: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for name, tiny in TINY.items():
        if isinstance(getattr(config_class, name, None), property):
            continue  # derived from other sizes (e.g. Falcon's head_dim)
        try:
            value = getattr(default, name, None)
        except Exception:  # noqa: BLE001 - e.g. per-layer attributes that are ambiguous globally
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > tiny:
            overrides[name] = tiny
    overrides.update(_image_size(default))
    return overrides


def _image_size(default: Any) -> dict[str, int]:
    """An image of :data:`PATCHES_PER_SIDE` patches per side, patch size kept (8 is divisible
    by the 2x2 and 4x4 pixel-shuffle and pooling factors vision-language models use)."""
    image, patch = getattr(default, "image_size", None), getattr(default, "patch_size", None)
    if not (isinstance(image, int) and isinstance(patch, int)) or patch <= 0:
        return {}
    return {"image_size": PATCHES_PER_SIDE * patch} if image != PATCHES_PER_SIDE * patch else {}


def _rebuild(config_class: type, init_kwargs: dict[str, Any], special: dict[int, int]) -> Any:
    try:
        default = config_class(**init_kwargs)
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"default config fails: {type(error).__name__}: {str(error)[:200]}") from None
    overrides = _size_overrides(config_class, default)
    for key, spec in (getattr(config_class, "sub_configs_defaults", None) or {}).items():
        sub = getattr(default, key, None)
        if _is_config(sub):
            given = init_kwargs.get(key)
            sub_kwargs = dict(given) if isinstance(given, dict) else dict(spec.init_kwargs)
            overrides[key] = _rebuild(type(sub), sub_kwargs, special)
    try:
        config = config_class(**{**init_kwargs, **overrides})
    except Exception as error:  # noqa: BLE001 - any rejection is a reason to report
        raise NotTiny(f"config rejects tiny sizes: {type(error).__name__}: {str(error)[:300]}") from None
    _move_token_ids(config, special)
    for rule in COHERENCE_RULES:
        try:
            rule(config)
        except NotTiny:
            raise
        except Exception as error:  # noqa: BLE001 - a strict config refusing the coherent value
            raise NotTiny(f"config rejects {rule.__name__.strip('_')}: {type(error).__name__}: "
                          f"{str(error)[:200]}") from None
    return config


# ----------------------------------------------------------------------------- coherence rules
# Sizes that other sizes imply: each rule makes one such relation hold again after shrinking.

def _mrope_fits_the_head(config: Any) -> None:
    """Multimodal RoPE splits half the head dimension into (time, height, width) sections; the
    modeling default [16, 24, 24] needs a 128-wide head."""
    if "mrope_section" not in getattr(config, "ignore_keys_at_rope_validation", ()) or not isinstance(
            getattr(config, "rope_parameters", None), dict):
        return
    heads = vars(config).get("num_attention_heads")
    head_dim = vars(config).get("head_dim") or (config.hidden_size // heads if heads else None)
    if not head_dim:
        return
    sections = config.rope_parameters.get("mrope_section") or [16, 24, 24]
    half, total = head_dim // 2, sum(sections)
    scaled = [max(1, s * half // total) for s in sections]
    scaled[-1] += half - sum(scaled)
    if scaled[-1] < 1:
        raise NotTiny(f"mrope_section {sections} cannot be fitted to a head of {head_dim}")
    config.rope_parameters = {**config.rope_parameters, "mrope_section": scaled}


def _vision_layers_exist(config: Any) -> None:
    """``vision_feature_layer(s)`` name hidden states of the full-size tower; clamp each into the
    tiny tower (embeddings + its layers), keeping how many are taken."""
    vision = getattr(config, "vision_config", None)
    layers = getattr(vision, "num_hidden_layers", None)
    if not isinstance(layers, int):
        return
    for name in ("vision_feature_layer", "vision_feature_layers"):
        value = getattr(config, name, None)
        clamp = lambda i: max(i, -(layers + 1)) if i < 0 else min(i, layers)  # noqa: E731
        if isinstance(value, int) and not isinstance(value, bool):
            setattr(config, name, clamp(value))
        elif isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
            setattr(config, name, [clamp(i) for i in value])


def _image_tokens_match_the_grid(config: Any) -> None:
    """``image_seq_length`` (PaliGemma) is the tower's patch count; any-resolution grids
    (LLaVA-NeXT) list full-size resolutions: one tile of the tiny image instead."""
    vision = getattr(config, "vision_config", None)
    image, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not (isinstance(image, int) and isinstance(patch, int)):
        return
    if isinstance(getattr(config, "image_seq_length", None), int):
        config.image_seq_length = (image // patch) ** 2
    if getattr(config, "image_grid_pinpoints", None):
        config.image_grid_pinpoints = [[image, image]]


def _layer_indices_exist(config: Any) -> None:
    """Lists of layer indices (``intermediate_layers_indices``, ``fullatt_block_indexes``,
    ``cross_attention_layers``...) name layers of the full-size stack: clamp each into the tiny
    one, keeping the list's length where the projector's width depends on it."""
    layers = vars(config).get("num_hidden_layers") or vars(config).get("depth")
    if not isinstance(layers, int):
        return
    for name, value in list(vars(config).items()):
        if not (name.endswith(("indices", "indexes", "_layers")) and isinstance(value, list) and value
                and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
            continue
        setattr(config, name, [max(i, -layers) if i < 0 else min(i, layers - 1) for i in value])
    indices = getattr(config, "intermediate_layers_indices", None)
    if isinstance(indices, list) and isinstance(getattr(config, "vision_output_dim", None), int):
        config.vision_output_dim = config.hidden_size * (len(indices) + 1)  # the tower concatenates them


COHERENCE_RULES = (_mrope_fits_the_head, _vision_layers_exist, _image_tokens_match_the_grid, _layer_indices_exist)


def _move_token_ids(config: Any, special: dict[int, int]) -> None:
    """Token ids outside the tiny vocabulary: ``pad``/``bos``/``eos``-like ones become 0/1 as
    before; image, audio and other special ids get distinct ids at the top of the vocabulary
    (the same original id always maps to the same tiny one, across sub-configs)."""
    for name in list(vars(config)):
        if not (name.endswith("_token_id") or name.endswith("_token_index")):
            continue
        value = getattr(config, name, None)
        if value is None and name in ("image_token_id", "audio_token_id"):
            value = -1 - len(special)  # unset (a processor adds it): a fresh reserved id of its own
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if name == "pad_token_id":
            if value >= VOCAB:
                setattr(config, name, 0)
        elif name in ("bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id"):
            if value >= VOCAB:
                setattr(config, name, 1)
        elif value >= SPECIAL_BASE or value < 0:
            if value not in special:
                special[value] = VOCAB - 1 - len(special)
            if special[value] < SPECIAL_BASE:
                raise NotTiny(f"more special token ids than the tiny vocabulary reserves ({name})")
            setattr(config, name, special[value])


def tiny_config(model_type: str, task: str = "causal_lm") -> Any:
    """The architecture's default config with every size attribute shrunk, in every sub-config.

    Example:
        >>> tiny_config("gpt2").n_layer
        2
    """
    from transformers import CONFIG_MAPPING

    config = _rebuild(CONFIG_MAPPING[model_type], {}, {})
    # Dropout stays as the config has it: recompute must redraw exactly the same masks.
    for part in _all_parts(config):
        part.use_cache = False
    if task in ("seq2seq", "speech_seq2seq") and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    return config


def _all_parts(config: Any) -> list[Any]:
    parts = [config]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if _is_config(sub):
            parts += _all_parts(sub)
    return parts
