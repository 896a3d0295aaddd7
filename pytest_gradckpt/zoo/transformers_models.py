"""Every transformers architecture that supports gradient checkpointing, made tiny from its
config class with random weights. Nothing is hand-listed and nothing is downloaded: the
installed transformers' auto mappings say which architectures exist, and each one that
cannot be made tiny or cannot run is reported with the reason."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

import torch

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
}
MAX_PARAMETERS = 3_000_000
SEQUENCE = 16
BATCH = 2


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One transformers architecture: its model type and the head class used for it."""

    model_type: str
    class_name: str
    task: str  # "causal_lm" | "masked_lm" | "seq2seq"


def architectures() -> list[Architecture]:
    """Every model type in the installed transformers' causal-LM, masked-LM and seq2seq
    auto mappings, once each (causal LM preferred).

    Example:
        >>> any(a.model_type == "llama" for a in architectures())
        True
    """
    from transformers.models.auto import modeling_auto

    found: dict[str, Architecture] = {}
    for task, mapping in (("causal_lm", modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("seq2seq", modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                          ("masked_lm", modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)):
        for model_type, class_name in mapping.items():
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            found.setdefault(model_type, Architecture(model_type, class_name, task))
    return sorted(found.values(), key=lambda a: a.model_type)


class NotTiny(Exception):
    """This architecture cannot be made tiny or cannot run here; the message says why."""


def tiny_config(model_type: str, task: str = "causal_lm") -> Any:
    """The architecture's default config with every size attribute shrunk.

    Example:
        >>> tiny_config("gpt2").n_layer
        2
    """
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"default config fails: {type(error).__name__}: {str(error)[:200]}") from None
    overrides = {}
    for name, tiny in TINY.items():
        if isinstance(getattr(config_class, name, None), property):
            continue  # derived from other sizes (e.g. Falcon's head_dim)
        try:
            value = getattr(default, name, None)
        except Exception:  # noqa: BLE001 - e.g. per-layer attributes that are ambiguous globally
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > tiny:
            overrides[name] = tiny
    if getattr(default, "sub_configs", None):
        raise NotTiny(f"composite config with sub-models ({', '.join(default.sub_configs)})")
    try:
        config = config_class(**overrides)
    except Exception as error:  # noqa: BLE001 - any rejection is a reason to report
        raise NotTiny(f"config rejects tiny sizes: {type(error).__name__}: {error}") from None
    # Dropout stays as the config has it: recompute must redraw exactly the same masks.
    config.use_cache = False
    if task == "seq2seq" and getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = getattr(config, "pad_token_id", None) or 0
    if hasattr(config, "pad_token_id") and config.pad_token_id is not None and config.pad_token_id >= 128:
        config.pad_token_id = 0
    for name in ("bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 128:
            setattr(config, name, 1)
    return config


def _inputs(model: Any, task: str) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (BATCH, SEQUENCE), generator=generator)
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids.clone()}
    parameters = inspect.signature(model.forward).parameters
    if "use_cache" in parameters:
        inputs["use_cache"] = False
    if "attention_mask" in parameters:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def build(architecture: Architecture) -> tuple[Any, dict[str, Any]]:
    """``(model, inputs)`` for a tiny random-weight instance; raises :class:`NotTiny` with the reason."""
    import transformers

    model_class = getattr(transformers, architecture.class_name, None)
    if model_class is None:
        raise NotTiny(f"{architecture.class_name} is not importable from transformers")
    if not getattr(model_class, "supports_gradient_checkpointing", False):
        raise NotTiny(f"{architecture.class_name}.supports_gradient_checkpointing is False")
    config = tiny_config(architecture.model_type, architecture.task)
    torch.manual_seed(0)
    try:
        model = model_class(config)
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"cannot build from a tiny config: {type(error).__name__}: {str(error)[:200]}") from None
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_PARAMETERS:
        raise NotTiny(f"{count:,} parameters even with tiny sizes (limit {MAX_PARAMETERS:,})")
    inputs = _inputs(model, architecture.task)
    try:
        model.train()
        output = model(**inputs)
        if not isinstance(getattr(output, "loss", None), torch.Tensor):
            raise NotTiny("computes no loss from labels")
        output.loss.backward()
    except NotTiny:
        raise
    except Exception as error:  # noqa: BLE001
        raise NotTiny(f"a training step fails without checkpointing: {type(error).__name__}: {str(error)[:200]}"
                      ) from None
    model.zero_grad(set_to_none=True)
    return model, inputs


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
