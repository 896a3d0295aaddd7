"""check_trainer on accelerate (a model and Accelerator as prepared) and Lightning (a LightningModule
with FSDPStrategy's activation_checkpointing_policy, applied by Lightning's own function): per
trainer one correct configuration that passes and one hazard that is caught, against ground
truth in plain torch, and the objects left as they were."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
from torch.utils.checkpoint import checkpoint

import pytest_gradckpt as gc
from tests import trainer_builders as build

# --------------------------------------------------------------------------- accelerate


def _prepared(impl):
    pytest.importorskip("peft")
    accelerate = pytest.importorskip("accelerate")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pytest_gradckpt.trainers.accelerate import Prepared
    from pytest_gradckpt.zoo.peft_models import llama_lora

    model, _ = llama_lora()
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
                                   checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl))
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    loader = torch.utils.data.DataLoader(build.token_rows(), batch_size=2)
    model, loader = accelerator.prepare(model, loader)
    return Prepared(accelerator, model, loader)


def _accelerate_ground_truth(impl):
    """Plain torch: the LoRA step with the same wrappers, against the step without them."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pytest_gradckpt.zoo.peft_models import llama_lora

    model, _ = llama_lora()
    batch = build.stacked(build.token_rows()[:2])
    truth = build.plain_step_gradients(model, batch, None)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer),
                                   checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=impl))
    model.train()
    torch.manual_seed(0)  # the same dropout masks as the step without wrappers
    model(**batch).loss.backward()
    wrapped = [p.grad for p in model.parameters() if p.requires_grad]
    return list(truth.values()), wrapped


def test_accelerate_non_reentrant_wrappers_pass_and_leave_everything_as_it_was():
    truth, wrapped = _accelerate_ground_truth(CheckpointImpl.NO_REENTRANT)
    for expected, got in zip(truth, wrapped, strict=True):  # ground truth: the wrappers are correct here
        torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-5)
    prepared = _prepared(CheckpointImpl.NO_REENTRANT)
    weights = copy.deepcopy(prepared.model.state_dict())
    step, models = prepared.accelerator.step, len(prepared.accelerator._models)
    [result] = gc.check_trainer(prepared).results
    assert result.outcome == "pass", result.message
    assert "NO_REENTRANT" in result.strategy
    assert result.metrics["recomputed_units"]
    assert all(torch.equal(weights[n], t) for n, t in prepared.model.state_dict().items())
    assert all(p.grad is None for p in prepared.model.parameters())
    assert (prepared.accelerator.step, len(prepared.accelerator._models)) == (step, models)


def test_accelerate_reentrant_wrappers_on_frozen_embedding_lora_are_caught():
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"), \
            pytest.raises(RuntimeError, match="does not require grad"):  # ground truth: nothing to differentiate
        _accelerate_ground_truth(CheckpointImpl.REENTRANT)
    [result] = gc.check_trainer(_prepared(CheckpointImpl.REENTRANT)).results
    assert result.outcome == "silent"
    assert "checkpoint_impl=CheckpointImpl.NO_REENTRANT" in result.message


# --------------------------------------------------------------------------- Lightning


def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _module(norm):
    pl = _lightning()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = torch.nn.Linear(16, 16), norm(16)

        def forward(self, x):
            return torch.tanh(self.norm(self.lin(x)))

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.blocks = torch.nn.Sequential(*[Block() for _ in range(3)])
            self.head = torch.nn.Linear(16, 1)

        def forward(self, x):
            return self.head(self.blocks(x)).squeeze(-1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Net(), Block


def _data():
    generator = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 16, generator=generator), torch.randn(16, generator=generator))
    return torch.utils.data.DataLoader(dataset, batch_size=4)


def _fit(norm):
    _lightning()
    from lightning.pytorch.strategies import FSDPStrategy

    from pytest_gradckpt.trainers.lightning import Fit

    module, block = _module(norm)
    return Fit(module, FSDPStrategy(activation_checkpointing_policy={block}), _data(), accumulate_grad_batches=2)


def _lightning_ground_truth(module):
    """Plain torch: one batch with each block under torch.utils.checkpoint, and without."""
    x, y = next(iter(_data()))
    plain, checkpointed = copy.deepcopy(module).train(), copy.deepcopy(module).train()
    torch.nn.functional.mse_loss(plain(x), y).backward()
    hidden = x
    for block in checkpointed.blocks:
        hidden = checkpoint(block, hidden, use_reentrant=False)
    torch.nn.functional.mse_loss(checkpointed.head(hidden).squeeze(-1), y).backward()
    same_grads = all(torch.allclose(a.grad, b.grad, rtol=1.3e-6, atol=1e-5)
                     for a, b in zip(plain.parameters(), checkpointed.parameters(), strict=True))
    same_buffers = all(torch.equal(a, b) for a, b in zip(plain.buffers(), checkpointed.buffers(), strict=True))
    return same_grads, same_buffers


def test_lightning_policy_on_layernorm_blocks_passes():
    fit = _fit(torch.nn.LayerNorm)
    assert _lightning_ground_truth(fit.module) == (True, True)
    before = copy.deepcopy(fit.module.state_dict())
    [result] = gc.check_trainer(fit).results
    assert result.outcome == "pass", result.message
    assert result.strategy == "FSDPStrategy(activation_checkpointing_policy={Block})"
    assert result.metrics["recomputed_units"]
    assert not any("_checkpoint_wrapped_module" in n for n, _ in fit.module.named_parameters())
    assert all(torch.equal(before[n], t) for n, t in fit.module.state_dict().items())


def test_lightning_policy_on_batchnorm_blocks_updates_statistics_twice():
    fit = _fit(torch.nn.BatchNorm1d)
    assert _lightning_ground_truth(fit.module) == (True, False)  # ground truth: gradients equal, statistics not
    [result] = gc.check_trainer(fit).results
    assert result.outcome == "buffers"
    assert "blocks.0.norm" in result.message
    assert "out of FSDPStrategy.activation_checkpointing_policy" in result.message


def test_lightning_fit_names_an_unknown_accelerator():
    import dataclasses

    fit = dataclasses.replace(_fit(torch.nn.LayerNorm), accelerator="tpu")
    with pytest.raises(gc.GradckptUsageError, match=r"Fit\(accelerator='tpu'\); use 'auto', 'cuda' or 'cpu'"):
        gc.check_trainer(fit)
