"""The same Trainer configuration on each transformers line: LoRA on a tiny Llama (frozen
embeddings), ``gradient_checkpointing=True`` with its kwargs left at the default. On 4.57 the
Trainer's switch defaults to reentrant and adds no input-grad hook to a PeftModel, so all 8
LoRA gradients are lost (torch warns, then backward finds nothing to differentiate); on 5.x it defaults to non-reentrant (and adds the hook). The verdict
must follow plain transformers' ground truth on whichever line is installed
(``make trainers-4.57`` runs this file under 4.57.6)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.zoo.peft_models import llama_lora  # noqa: E402
from tests import trainer_builders as build  # noqa: E402


def _gradients(model, batch, enable):
    """Ground truth: the step in plain transformers, with the switch exactly as Trainer.train calls it."""
    model = copy.deepcopy(model).train()
    if enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_default_checkpointing_on_peft_lora_follows_the_installed_line(tmp_path):
    model, _ = llama_lora()
    rows = build.token_rows()
    batch = build.stacked(rows[:2])
    truth = _gradients(model, batch, False)
    lora = [n for n, g in truth.items() if g is not None and "lora_" in n]
    assert len(lora) == 8
    line_457 = Version(transformers.__version__) < Version("5")
    args = build.arguments(str(tmp_path / "out"), gradient_checkpointing=True)
    [result] = gc.check_trainer(transformers.Trainer(model=model, args=args, train_dataset=rows)).results
    if line_457:
        # Ground truth: torch warns, then backward finds nothing that requires grad: all 8 LoRA gradients lost.
        with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"), \
                pytest.raises(RuntimeError, match="does not require grad"):
            _gradients(model, batch, True)
        assert result.outcome == "silent", result.message
        assert "None of the inputs have requires_grad=True" in result.message
        assert "TrainingArguments.gradient_checkpointing_kwargs={'use_reentrant': False}" in result.message
    else:
        checkpointed = _gradients(model, batch, True)
        for name in truth:  # ground truth: the same configuration trains every LoRA weight on 5.x
            torch.testing.assert_close(checkpointed[name], truth[name], rtol=1.3e-6, atol=1e-5)
        assert result.outcome == "pass", result.message
