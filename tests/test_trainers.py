"""check_trainer on real trainers: transformers' Trainer and TRL's SFTTrainer, each with one
correct configuration that passes and one hazardous one that is caught, every verdict against
ground truth computed in a few lines of plain transformers/torch, and proof that the trainer
is left exactly as it was (no optimizer step, no state change, no file written)."""

from __future__ import annotations

import copy
import functools
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.errors import GradckptUsageError  # noqa: E402
from tests import trainer_builders as build  # noqa: E402


def _trainer(model, args, data):
    from transformers import Trainer

    return Trainer(model=model, args=args, train_dataset=data)


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs + ["."])


def _state(trainer):
    """Everything check_trainer must leave as it was."""
    model = trainer.model
    accelerator = trainer.accelerator
    return {
        "attributes": sorted(vars(trainer)),
        "model": id(model),
        "params": {n: p.detach().clone() for n, p in model.state_dict().items()},
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "requires_grad": [n for n, p in model.named_parameters() if p.requires_grad],
        "training": [m.training for m in model.modules()],
        "checkpointing": getattr(model, "is_gradient_checkpointing", None),
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
        "state": trainer.state.__dict__ and json.dumps(vars(trainer.state), default=str, sort_keys=True),
        "control": dict(vars(trainer.control)),
        "args": json.dumps(trainer.args.to_dict(), default=str, sort_keys=True),
        "optimizer": (trainer.optimizer, trainer.lr_scheduler),
        "accelerator": (len(accelerator._models), len(accelerator._dataloaders), len(accelerator._optimizers),
                        list(accelerator.gradient_state.dataloader_references), accelerator.step),
        "metrics": copy.deepcopy(dict(getattr(trainer, "_metrics", {}))),
        "rng": torch.get_rng_state(),
        "files": _files(trainer.args.output_dir) if os.path.exists(trainer.args.output_dir) else None,
    }


def _assert_same(before, after):
    for key in before:
        if key == "params":
            assert before[key].keys() == after[key].keys()
            assert all(torch.equal(before[key][n], after[key][n]) for n in before[key]), "weights changed"
        elif key == "rng":
            assert torch.equal(before[key], after[key])
        else:
            assert before[key] == after[key], key


def _lost(baseline, checked):
    return sorted(n for n, g in baseline.items() if g is not None and (checked[n] is None or not checked[n].any()))


# --------------------------------------------------------------------------- transformers.Trainer


def test_trainer_correct_configuration_passes_through_its_own_step(tmp_path):
    args = build.arguments(str(tmp_path / "out"), gradient_checkpointing=True, gradient_accumulation_steps=2,
                           gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = _trainer(build.llama(), args, build.token_rows())
    report = gc.check_trainer(trainer)
    [result] = report.results
    assert result.outcome == "pass", result.message
    assert result.metrics["recomputed_units"] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert result.metrics["activation_reduction"] > 0.3
    assert result.metrics["layer_calls"] == {f"model.layers.{i}": 4 for i in range(3)}  # 2 micro-batches, each recomputed


def test_trainer_reentrant_on_vit_lora_is_silent_and_names_the_field(tmp_path):
    # transformers 5.23 adds the input-grad hook only for models whose main input is input_ids:
    # a ViT's patch embeddings stay frozen under LoRA, so reentrant checkpointing loses the adapters.
    model, rows = build.vit_lora(), build.image_rows()
    args = build.arguments(str(tmp_path / "out"), gradient_checkpointing=True,
                           gradient_checkpointing_kwargs={"use_reentrant": True})
    [result] = gc.check_trainer(_trainer(model, args, rows)).results
    batch = build.stacked(rows[:2])
    lost = _lost(build.plain_step_gradients(model, batch, None),
                 build.plain_step_gradients(model, batch, {"use_reentrant": True}))
    assert len(lost) == 8 and all("lora_" in n for n in lost)  # ground truth: every LoRA gradient lost
    assert not _lost(build.plain_step_gradients(model, batch, None),
                     build.plain_step_gradients(model, batch, {"use_reentrant": False}))
    assert result.outcome == "silent"
    assert "8 parameter gradient(s) lost" in result.message
    assert "TrainingArguments.activation_checkpointing_kwargs={'use_reentrant': False}" in result.message


def test_trainer_preserve_rng_state_false_with_dropout_is_a_mismatch(tmp_path):
    model = build.llama(attention_dropout=0.2)
    kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    args = build.arguments(str(tmp_path / "out"), gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    [result] = gc.check_trainer(_trainer(model, args, build.token_rows())).results
    batch = build.stacked(build.token_rows()[:2])
    plain = build.plain_step_gradients(model, batch, None)
    drawn_again = build.plain_step_gradients(model, batch, kwargs)
    kept = build.plain_step_gradients(model, batch, {"use_reentrant": False})
    assert any(not torch.allclose(plain[n], drawn_again[n]) for n in plain)  # ground truth: gradients change
    assert all(torch.allclose(plain[n], kept[n], rtol=1.3e-6, atol=1e-5) for n in plain)
    assert result.outcome == "mismatch"
    assert "Remove preserve_rng_state=False from TrainingArguments.activation_checkpointing_kwargs" in result.message


def test_trainer_is_left_exactly_as_it_was(tmp_path):
    model, rows = build.vit_lora(), build.image_rows()
    args = build.arguments(str(tmp_path / "out"), gradient_checkpointing=True, gradient_accumulation_steps=2,
                           gradient_checkpointing_kwargs={"use_reentrant": True})
    trainer = _trainer(model, args, rows)
    before = _state(trainer)
    assert gc.check_trainer(trainer).results[0].outcome == "silent"
    _assert_same(before, _state(trainer))
    assert gc.check_trainer(trainer).results[0].outcome == "silent"  # and checking again gives the same verdict


def test_trainer_with_checkpointing_off_is_skipped_with_the_field(tmp_path):
    trainer = _trainer(build.llama(), build.arguments(str(tmp_path / "out")), build.token_rows())
    [result] = gc.check_trainer(trainer).results
    assert result.outcome == "skipped"
    assert "set TrainingArguments.activation_checkpointing=True" in result.message


def test_check_trainer_refuses_what_it_cannot_run(tmp_path):
    with pytest.raises(GradckptUsageError, match="no adapter for Linear; supported: transformers.Trainer"):
        gc.check_trainer(torch.nn.Linear(2, 2))
    trainer = _trainer(build.llama(), build.arguments(str(tmp_path / "out"), gradient_checkpointing=True), None)
    with pytest.raises(GradckptUsageError, match="has no train_dataset"):
        gc.check_trainer(trainer)


# --------------------------------------------------------------------------- TRL SFTTrainer


def _sft(tmp_path, lora_dropout, **settings):
    pytest.importorskip("trl")
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    args = build.arguments(str(tmp_path / "sft"), cls=SFTConfig, max_length=16, **settings)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=lora_dropout, init_lora_weights=False)
    return SFTTrainer(model=build.llama(), args=args, train_dataset=build.text_dataset(),
                      processing_class=build.tokenizer(), peft_config=lora)


def test_sft_trainer_default_lora_configuration_passes(tmp_path):
    trainer = _sft(tmp_path, lora_dropout=0.1)  # SFTConfig turns gradient checkpointing on by default
    before = _state(trainer)
    [result] = gc.check_trainer(trainer).results
    assert result.outcome == "pass", result.message
    assert len(result.metrics["recomputed_units"]) == 3
    _assert_same(before, _state(trainer))  # TRL's own metrics included


def test_sft_trainer_preserve_rng_state_false_with_lora_dropout_is_caught(tmp_path):
    kwargs = {"use_reentrant": False, "preserve_rng_state": False}
    trainer = _sft(tmp_path, lora_dropout=0.1, gradient_checkpointing_kwargs=kwargs)
    [result] = gc.check_trainer(trainer).results
    batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items() if k in ("input_ids", "labels")}
    # Ground truth on the same LoRA model built apart from TRL (whose patched forward calls the model it patched)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build.llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                                                    init_lora_weights=False))
    plain = build.plain_step_gradients(lora, batch, None)
    drawn_again = build.plain_step_gradients(lora, batch, kwargs)
    assert all(g is not None for g in plain.values())
    assert any(not torch.allclose(plain[n], drawn_again[n]) for n in plain)  # ground truth: LoRA dropout redrawn
    assert result.outcome == "mismatch"
    assert "Remove preserve_rng_state=False from SFTConfig.activation_checkpointing_kwargs" in result.message


def test_a_forward_patched_over_the_original_is_refused_and_the_original_kept(tmp_path):
    model = build.llama()
    original_forward = model.forward

    @functools.wraps(original_forward)  # the signature the Trainer reads to keep the input columns
    def patched(*args, **kwargs):  # a closure over the original, as TRL's fused LM head keeps one
        return original_forward(*args, **kwargs)

    model.forward = patched
    args = build.arguments(str(tmp_path / "out"), gradient_checkpointing=True)
    trainer = _trainer(model, args, build.token_rows())
    with pytest.raises(GradckptUsageError, match="calls the original instead of the copy"):
        gc.check_trainer(trainer)
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- the fixture

DOWNSTREAM_TRAINER_TEST = '''
import pytest, torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers import ViTConfig, ViTForImageClassification
from peft import LoraConfig, get_peft_model

def rows():
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": i, "labels": i} for i in ids]

def trainer(tmp_path, **settings):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True, **settings)
    return Trainer(model=model, args=args, train_dataset=rows())

def test_our_training_configuration(gradckpt, tmp_path):
    gradckpt.check_trainer(trainer(tmp_path, gradient_checkpointing=True,
                                   gradient_checkpointing_kwargs={"use_reentrant": False}))

def test_a_known_hazard_stays_guarded(gradckpt, tmp_path):
    gradckpt.check_trainer(trainer(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={
        "use_reentrant": False, "preserve_rng_state": False}), expect={"trainer": "mismatch"})

def test_the_hazard_fails_the_test(gradckpt, tmp_path):
    gradckpt.check_trainer(trainer(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={
        "use_reentrant": False, "preserve_rng_state": False}))
'''


def test_fixture_gates_a_trainer_configuration(pytester):
    pytester.makepyfile(test_training=DOWNSTREAM_TRAINER_TEST.replace(
        "LlamaConfig(hidden_size", "LlamaConfig(attention_dropout=0.3, hidden_size"))
    result = pytester.runpytest_subprocess("--gradckpt", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_the_hazard_fails_the_test*", "*mismatch*Remove preserve_rng_state=False "
                                 "from TrainingArguments.activation_checkpointing_kwargs*"])


def test_a_trainer_gate_with_checkpointing_off_fails_unless_expected(pytester):
    pytester.makepyfile(test_training=DOWNSTREAM_TRAINER_TEST + '''
def test_checkpointing_switched_off(gradckpt, tmp_path):
    gradckpt.check_trainer(trainer(tmp_path))

def test_off_on_purpose(gradckpt, tmp_path):
    gradckpt.check_trainer(trainer(tmp_path), expect={"trainer": "skipped"})
''')
    result = pytester.runpytest_subprocess("--gradckpt", "-p", "no:cacheprovider", "-k", "switched_off or purpose")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAILED*test_checkpointing_switched_off*"])
    result.stdout.fnmatch_lines(["*skipped, so nothing was judged*"])
