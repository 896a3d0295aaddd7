"""accelerate's FSDP paths on CPU, against plain torch.

- accelerate 1.15's FSDP2 ``activation_checkpointing`` (its own ``fsdp2_apply_ac``) wraps each layer
  with ``checkpoint_wrapper(layer, preserve_rng_state=False)``: with dropout the recompute draws new
  masks, so the gradients are not the step's. ``check_trainer`` must say ``mismatch`` and name the
  setting; without dropout the same wrappers are exact and it must say ``pass``.
- A model FSDP (1 or 2) has wrapped cannot be deep-copied; the check steps a copy without FSDP
  (``trainers.unshard``), whose gradients must equal the plain model's.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from transformers import LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.trainers.accelerate import Prepared  # noqa: E402
from pytest_gradckpt.trainers.unshard import is_sharded, unsharded_copy  # noqa: E402
from pytest_gradckpt.zoo.peft_models import llama_inputs, tiny_llama_config  # noqa: E402


def _rows():
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def _with_accelerates_fsdp2_checkpointing(model):
    from accelerate.utils.fsdp_utils import fsdp2_apply_ac

    plugin = accelerate.FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        activation_checkpointing=True)
    return fsdp2_apply_ac(types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin)), model)


def _gradients(model, batch):
    model.train()
    torch.manual_seed(0)
    model(**batch).loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dropout, outcome", [(0.1, "mismatch"), (0.0, "pass")])
def test_accelerate_fsdp2_checkpointing_without_rng_state(dropout, outcome):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(attention_dropout=dropout))
    batch = llama_inputs(batch=2)
    truth = _gradients(copy.deepcopy(model), batch)
    wrapped = _with_accelerates_fsdp2_checkpointing(copy.deepcopy(model))
    got = _gradients(wrapped, batch)
    same = all(torch.allclose(a, b, rtol=1.3e-6, atol=1e-5) for a, b in zip(truth, got, strict=True))
    assert same == (dropout == 0.0)  # ground truth: only dropout's redrawn masks make them differ

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    prepared, loader = accelerator.prepare(_with_accelerates_fsdp2_checkpointing(model),
                                           torch.utils.data.DataLoader(_rows(), batch_size=2))
    [result] = gc.check_trainer(Prepared(accelerator, prepared, loader)).results
    assert "preserve_rng_state=False" in result.strategy
    assert result.outcome == outcome, result.message
    if outcome == "mismatch":
        assert "keeping preserve_rng_state=True" in result.message


@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _sharded(version, amp_forward=False):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    if amp_forward:  # what Accelerator.prepare_model does under mixed precision, before FSDP wraps the model
        from accelerate.utils import convert_outputs_to_fp32

        model._original_forward = model.forward
        model.forward = types.MethodType(convert_outputs_to_fp32(model.forward.__func__), model)
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        model = FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                                         use_orig_params=True, device_id=torch.device("cpu"))
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    return model


@pytest.mark.parametrize("amp_forward", [False, True])
@pytest.mark.parametrize("version", [1, 2])
def test_unsharded_copy_trains_like_the_plain_model(one_rank, version, amp_forward):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    batch = llama_inputs()
    truth = dict(zip([n for n, _ in plain.named_parameters()], _gradients(plain, batch), strict=True))
    sharded = _sharded(version, amp_forward)
    sharded(**batch).loss.backward()  # the sharded model has run (FSDP's lazy init done) before it is copied
    before = [p.grad for p in sharded.parameters()]
    twin = copy.deepcopy(unsharded_copy(sharded))  # the check deep-copies it for every run
    assert is_sharded(sharded) and not is_sharded(twin)
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in twin.modules()) == 3
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # tied stays tied
    got = {n.replace("_checkpoint_wrapped_module.", ""): g for n, g in zip(
        [n for n, _ in twin.named_parameters()], _gradients(twin, batch), strict=True)}
    assert sorted(got) == sorted(truth)
    for name, expected in truth.items():
        torch.testing.assert_close(got[name], expected, rtol=1.3e-6, atol=1e-5)
    assert all(a is b for a, b in zip(before, [p.grad for p in sharded.parameters()], strict=True))


def test_an_fsdp_model_that_cannot_be_copied_is_refused_by_name(one_rank):
    sharded = _sharded(1)
    sharded.module.model.layers[0]._checkpoint_wrapped_module.handle = torch.cuda  # a Python module: no copy
    with pytest.raises(gc.GradckptUsageError, match=r"attribute model.layers.0._checkpoint_wrapped_module.handle "
                                                    r"\(module\) fails to copy \(TypeError: cannot pickle"):
        unsharded_copy(sharded)
