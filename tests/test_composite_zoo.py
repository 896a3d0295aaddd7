"""Vision-language and other composite models in the zoo: generic shrinking, inputs built
per model, checkpoint units per stack, and the hazards the full sweep found there, each
against ground truth computed here in plain torch/transformers/peft."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

pytest.importorskip("transformers")
pytest.importorskip("peft")

import transformers  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.pipeline.units import unit_stacks  # noqa: E402
from pytest_gradckpt.zoo import model_inputs, tiny_configs  # noqa: E402
from pytest_gradckpt.zoo.peft_models import vision_language_lora  # noqa: E402
from pytest_gradckpt.zoo.transformers_models import architectures, build  # noqa: E402


def _outcomes(report):
    return {r.key: r.outcome for r in report.results}


def _architecture(model_type):
    return next(a for a in architectures() if a.model_type == model_type)


def test_composite_configs_are_shrunk_in_every_sub_config():
    config = tiny_configs.tiny_config("llava")
    assert config.text_config.hidden_size == 32 and config.text_config.num_hidden_layers == 2
    assert config.vision_config.hidden_size == 32 and config.vision_config.num_hidden_layers == 2
    assert config.vision_config.image_size == tiny_configs.PATCHES_PER_SIDE * config.vision_config.patch_size
    # the image placeholder moved inside the tiny vocabulary, above the ids random text uses
    assert tiny_configs.SPECIAL_BASE <= config.image_token_id < config.text_config.vocab_size


def test_mrope_sections_fit_the_tiny_head():
    text = tiny_configs.tiny_config("qwen2_vl").text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


@pytest.mark.parametrize("model_type, per_image", [
    # CLIP tower, 8 x 8 patches, the CLS token dropped ("default" feature selection): 64 tokens
    ("llava", tiny_configs.PATCHES_PER_SIDE ** 2),
    # Qwen2-VL: a 4 x 4 patch grid merged 2 x 2: 4 tokens
    ("qwen2_vl", 4),
])
def test_image_placeholders_match_the_tower(model_type, per_image):
    model, inputs = build(_architecture(model_type))
    image_token = model.config.image_token_id
    assert ((inputs["input_ids"] == image_token).sum(dim=1) == per_image).all()
    assert (inputs["labels"][inputs["input_ids"] == image_token] == -100).all()
    assert not ((inputs["input_ids"] >= tiny_configs.SPECIAL_BASE) & (inputs["labels"] != -100)).any()


def test_text_only_head_takes_its_sub_config():
    # Llama 4's vision model stays too large at tiny sizes; its text-only head is checked instead
    model, _ = build(_architecture("llama4"))
    assert type(model).__name__ in ("Llama4ForConditionalGeneration", "Llama4ForCausalLM")


def test_inputs_for_speech_to_text():
    model, inputs = build(_architecture("whisper"))
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    assert inputs["input_features"].shape[1] == model.config.num_mel_bins


def test_units_are_reported_per_stack():
    model, inputs = build(_architecture("qwen2_vl"))
    report = gc.check(model, inputs, strategies=["non_reentrant"], scenarios=["train"])
    stacks = report.baseline["unit_stacks"]
    assert stacks == {"model.visual.blocks": 2, "model.language_model.layers": 2}
    assert _outcomes(report) == {"non_reentrant/train": "pass"}


class DeadTail(torch.nn.Module):
    """Two blocks; the loss reads the first block's output, the second block's is computed and
    dropped (LLaVA takes the vision tower's second-to-last hidden state)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        hidden = [x]
        for block in self.blocks[:2]:
            hidden.append(torch.tanh(block(hidden[-1])))
        return self.blocks[2](hidden[-2]).sum()  # blocks.1's output is never used


def test_a_unit_backward_never_reaches_is_not_expected_to_recompute():
    torch.manual_seed(0)
    model, x = DeadTail(), torch.randn(4, 8, requires_grad=True)
    # ground truth, plain torch: with every block checkpointed, blocks.1 runs once
    runs = {i: 0 for i in range(3)}

    def block(i, inp):
        runs[i] += 1
        return model.blocks[i](inp)

    hidden = [x]
    for i in range(2):
        hidden.append(torch.tanh(checkpoint(block, i, hidden[-1], use_reentrant=False)))
    checkpoint(block, 2, hidden[-2], use_reentrant=False).sum().backward()
    assert runs == {0: 2, 1: 1, 2: 2}
    report = gc.check(model, x, loss=lambda out, _: out, strategies=["non_reentrant", "reentrant"],
                      scenarios=["train"], layers="blocks")
    assert _outcomes(report) == {"non_reentrant/train": "pass", "reentrant/train": "pass"}


def test_a_used_unit_that_is_never_recomputed_is_still_caught():
    calls = [0]

    def skips_the_first_block(function, *args):
        calls[0] += 1  # DeadTail calls blocks 0, 1, 2 in turn: leave every blocks.0 call alone
        if calls[0] % 3 == 1:
            return function(*args)
        return checkpoint(function, *args, use_reentrant=False)

    torch.manual_seed(0)
    strategy = gc.Strategy.from_checkpoint_fn("skips_the_first_block", skips_the_first_block)
    report = gc.check(DeadTail(), torch.randn(4, 8, requires_grad=True), loss=lambda out, _: out,
                      strategies=[strategy], scenarios=["train"], layers="blocks")
    assert _outcomes(report) == {"skips_the_first_block/train": "recompute"}
    assert "blocks.0 ran 1 time(s), expected 2" in report.results[0].message


def test_frozen_vision_tower_lora_reentrant_loses_gradients_in_plain_torch():
    """Ground truth for ``qwen2_vl_lora`` ``reentrant``: silent. The first language-model layer
    gets the frozen embeddings (with the frozen tower's features spliced in): under torch's
    reentrant checkpoint no input requires grad, so no layer's output does, torch warns, and
    the step then fails far from the cause, as on a text LoRA."""
    model, inputs = vision_language_lora("qwen2_vl")
    lora = [p for p in model.parameters() if p.requires_grad]
    for layer in model.base_model.model.model.language_model.layers:  # reentrant takes no keywords: bind them
        layer.forward = (lambda f: lambda *a, **k: checkpoint(functools.partial(f, **k), *a, use_reentrant=True)
                         )(layer.forward)
    def step():
        with pytest.raises(RuntimeError, match="does not require grad"):
            model(**inputs).loss.backward()

    seen = _warnings_of(step)
    assert any("None of the inputs have requires_grad" in w for w in seen)
    assert all(p.grad is None for p in lora)

    plain, inputs = vision_language_lora("qwen2_vl")
    plain(**inputs).loss.backward()
    assert all(p.grad is not None for p in plain.parameters() if p.requires_grad)


def _warnings_of(step):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        step()
    return [str(w.message) for w in seen]


def test_pvt_v2_reentrant_switch_loses_the_whole_encoder_in_plain_transformers():
    """Ground truth for ``pvt_v2`` ``hf_reentrant``: silent. Its first encoder stage is a
    checkpoint unit fed raw pixels (the patch embedding is inside the stage): with
    ``use_reentrant=True`` its output does not require grad, so neither does any later stage's,
    and transformers' own switch trains only the classifier, with a warning and no error."""
    torch.manual_seed(0)
    model, inputs = build(_architecture("pvt_v2"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    seen = _warnings_of(lambda: model(**inputs).loss.backward())
    assert any("None of the inputs have requires_grad" in w for w in seen)
    lost = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    encoder = {n for n, _ in model.named_parameters() if n.startswith("pvt_v2.encoder.")}
    assert lost == encoder and len(lost) == 192


def test_model_inputs_module_docstring_example_runs():
    model = transformers.LlavaForConditionalGeneration(tiny_configs.tiny_config("llava"))
    assert sorted(model_inputs.inputs_for(model, "image_text_to_text")) == [
        "attention_mask", "input_ids", "labels", "pixel_values"]
    assert unit_stacks(["a.0", "a.1", "b"]) == {"a": 2, "b": 1}
