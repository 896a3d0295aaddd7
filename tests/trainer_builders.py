"""Tiny trainers built offline for the trainer-adapter tests: a word-level tokenizer made in
code, a 3-layer Llama, a 2-layer ViT, random data. Nothing is downloaded."""

from __future__ import annotations

import copy
from typing import Any

import torch


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)} | {"<pad>": 60, "<eos>": 61, "<unk>": 62, "<bos>": 63}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", bos_token="<bos>")


def token_rows(count: int = 8, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(count):
        ids = torch.randint(0, 60, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def text_dataset(count: int = 8) -> Any:
    from datasets import Dataset

    generator = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 60, (10,), generator=generator)) for _ in range(count)]
    return Dataset.from_dict({"text": texts})


def image_rows(count: int = 8) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": torch.tensor(i % 3)}
            for i in range(count)]


def llama(**overrides: Any) -> Any:
    from transformers import LlamaForCausalLM

    from pytest_gradckpt.zoo.peft_models import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides))


def vit_lora() -> Any:
    """LoRA on a tiny ViT classifier: patch embeddings frozen, adapters on q/v, the head trained."""
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64, num_labels=3))
    return get_peft_model(vit, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                          modules_to_save=["classifier"]))


def arguments(output_dir: str, cls: Any = None, **settings: Any) -> Any:
    from transformers import TrainingArguments

    values: dict[str, Any] = dict(output_dir=output_dir, per_device_train_batch_size=2, report_to=[], use_cpu=True)
    values.update(settings)
    return (cls or TrainingArguments)(**values)


def plain_step_gradients(model: Any, batch: dict[str, torch.Tensor], checkpoint_kwargs: dict[str, Any] | None,
                         seed: int = 0) -> dict[str, torch.Tensor | None]:
    """Ground truth: one forward/backward of ``model`` (a copy) in plain transformers, with its own
    ``gradient_checkpointing_enable(checkpoint_kwargs)`` or without checkpointing (None)."""
    model = copy.deepcopy(model)
    model.train()
    if checkpoint_kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def stacked(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
