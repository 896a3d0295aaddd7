"""PEFT LoRA and QLoRA on a tiny Llama, built offline from a config with random weights."""

from __future__ import annotations

from typing import Any

import torch


def tiny_llama_config(**overrides: Any) -> Any:
    """A 3-layer Llama config small enough for CPU tests.

    Example:
        >>> tiny_llama_config().num_hidden_layers
        3
    """
    from transformers import LlamaConfig

    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, attention_dropout=0.0)
    values.update(overrides)
    return LlamaConfig(**values)


def llama_inputs(vocab: int = 64, batch: int = 2, length: int = 12) -> dict[str, Any]:
    """Random token ids with labels, no KV cache.

    Example:
        >>> sorted(llama_inputs())
        ['input_ids', 'labels', 'use_cache']
    """
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def _lora_config(**overrides: Any) -> Any:
    from peft import LoraConfig

    # Adapters on layers 1 and 2 only: layer 0 is frozen, so frozen-layer skipping is exercised.
    # init_lora_weights=False makes B non-zero, so both A and B get gradients at step one.
    values: dict[str, Any] = dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                  layers_to_transform=[1, 2], init_lora_weights=False)
    values.update(overrides)
    return LoraConfig(**values)


def llama_lora(modules_to_save: bool = False) -> tuple[Any, dict[str, Any]]:
    """LoRA on a tiny Llama: frozen base and embeddings, dropout in the adapters.

    With ``modules_to_save`` the LM head is trainable too; then raw reentrant
    checkpointing loses every LoRA gradient without any error.
    """
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    config = _lora_config(modules_to_save=["lm_head"] if modules_to_save else None)
    return get_peft_model(model, config), llama_inputs()


def llama_qlora() -> tuple[Any, dict[str, Any]]:
    """QLoRA: bitsandbytes 4-bit nf4 base, ``prepare_model_for_kbit_training``, LoRA adapters.

    The model is quantized by ``from_pretrained`` from a temporary directory, the
    supported path; nothing is downloaded.
    """
    import tempfile

    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).save_pretrained(folder)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                 dtype=torch.float32, device_map={"": "cpu"})
    # Checkpointing is the engine's to switch on, per strategy: do not let PEFT do it here.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, _lora_config(layers_to_transform=None)), llama_inputs()


def vision_language_lora(model_type: str) -> tuple[Any, dict[str, Any]]:
    """LoRA on the language model of a tiny vision-language model, its vision tower frozen:
    the fine-tuning recipe of LLaMA-Factory and TRL for Qwen2-VL or LLaVA. The vision tower's
    blocks then run on grad-free pixels with no trainable parameter, so a strategy that skips
    frozen layers must skip a whole stack while checkpointing the other.

    Example:
        >>> model, inputs = vision_language_lora("llava")
        >>> any("vision_tower" in n for n, p in model.named_parameters() if p.requires_grad)
        False
    """
    from peft import get_peft_model

    from pytest_gradckpt.zoo.transformers_models import architectures, build

    architecture = next(a for a in architectures() if a.model_type == model_type)
    model, inputs = build(architecture)
    # Only the language model's attention gets adapters; get_peft_model freezes the rest,
    # the vision tower and projector included.
    config = _lora_config(target_modules=r".*language_model.*\.(q_proj|v_proj)", layers_to_transform=None)
    return get_peft_model(model, config), inputs
