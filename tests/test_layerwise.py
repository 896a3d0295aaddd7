"""The layer-local baseline: for models whose step only fits with checkpointing.

Ground truth is plain torch (a step without checkpointing, a few lines here); agreement is
with the whole-model baseline's verdicts over the mutation suite and the packaged suite.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt import zoo
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.zoo import plain
from tests import mutations

SCENARIOS = ("train", "frozen_inputs", "autograd_grad", "autocast", "accumulate", "eval_mode")
BROKEN = [f for name, f in inspect.getmembers(mutations, inspect.isfunction)
          if f.__module__ == mutations.__name__ and name != "hangs"]


def plain_gradients(model, inputs, *, seed=0, freeze_embeddings=False):
    """A training step without checkpointing, in plain torch: the engine's default loss."""
    model = copy.deepcopy(model).train()
    if freeze_embeddings:
        model.embed.requires_grad_(False)
    torch.manual_seed(seed)
    output = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    output.float().square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model


def baseline_run(model, inputs, scenario="train", layers=None):
    from pytest_gradckpt.pipeline import baselines
    from pytest_gradckpt.pipeline.subject import Subject
    from pytest_gradckpt.pipeline.runs import Stepper
    from pytest_gradckpt.pipeline.scenarios import SCENARIOS as ALL

    stepper = Stepper(Subject(model, inputs, None, None), layers, seed=0, timeout=None)
    return baselines.layerwise(stepper.step, ALL[scenario], "model", torch.float32).run


@pytest.mark.parametrize("freeze", [False, True], ids=["train", "frozen_embeddings"])
def test_gradients_equal_a_plain_step_with_dropout_and_keyword_masks(freeze):
    model, inputs = plain.dropout_mask_net()
    expected, _ = plain_gradients(model, inputs, freeze_embeddings=freeze)
    run = baseline_run(model, inputs, "frozen_inputs" if freeze else "train")
    assert set(run.grads) == set(expected)
    torch.testing.assert_close(run.grads, expected, rtol=0, atol=0)
    from pytest_gradckpt.probes.recompute_counts import RecomputeProbe

    # replays are not counted as the model's calls
    assert run.of(RecomputeProbe).calls == {f"blocks.{i}": 1 for i in range(4)}


def test_batchnorm_statistics_are_those_of_one_forward():
    model, features = plain.batchnorm_net()
    _, stepped = plain_gradients(model, features)
    run = baseline_run(model, features)
    torch.testing.assert_close(run.buffers, dict(stepped.named_buffers()), rtol=0, atol=0)


def test_lora_with_frozen_embeddings_on_a_transformers_model():
    pytest.importorskip("peft")
    from pytest_gradckpt.zoo.peft_models import llama_lora

    model, inputs = llama_lora()
    plain_model = copy.deepcopy(model).train()
    torch.manual_seed(0)
    plain_model(**inputs).loss.backward()
    expected = {n: p.grad for n, p in plain_model.named_parameters() if p.requires_grad}
    run = baseline_run(model, inputs)
    assert expected and set(run.grads) == set(expected)
    torch.testing.assert_close(run.grads, expected)


@pytest.mark.parametrize("factory", [plain.dropout_mask_net, plain.tanh_net, plain.batchnorm_net,
                                     plain.reused_block_net], ids=lambda f: f.__name__)
def test_verdicts_agree_with_the_whole_model_baseline_over_the_mutation_suite(factory):
    seen, disagreements = set(), []
    for fn in BROKEN:
        for scenario in SCENARIOS:
            outcomes = {}
            for kind in ("whole-model", "layerwise"):
                model, inputs = factory()
                strategy = gc.Strategy.from_checkpoint_fn(fn.__name__, fn)
                (result,) = gc.check(model, inputs, strategies=[strategy], scenarios=[scenario], baseline=kind,
                                     timeout=30).results
                outcomes[kind] = result.outcome
            seen.add(outcomes["layerwise"])
            if outcomes["whole-model"] != outcomes["layerwise"]:
                disagreements.append((fn.__name__, scenario, outcomes))
    assert disagreements == []
    assert len(seen - {"pass", "skipped"}) >= 3, seen  # the agreement covers real faults, not only passes


@pytest.mark.parametrize("name", zoo.REPRESENTATIVE)
def test_packaged_suite_verdicts_hold_under_the_layerwise_baseline(name):
    """The packaged suite's reviewed (whole-model) expectations, met by the layer-local baseline."""
    from pytest_gradckpt.strategies import BUILTIN
    from pytest_gradckpt.suite import expectations
    from pytest_gradckpt.suite.conftest import EXTRA_SCENARIOS

    if name in ("lora", "lora_modules_to_save", "qlora"):
        pytest.importorskip("peft")
    try:
        (entry,) = zoo.select([name])
    except GradckptUsageError as missing:
        pytest.skip(str(missing))
    scenarios = entry.scenarios + (EXTRA_SCENARIOS if entry.family == "transformers" else ())
    model, inputs = entry.build()
    strategies = list(BUILTIN)  # not available_strategies(): a test may have registered its own
    for scenario in scenarios:
        report = gc.check(model, inputs, strategies=strategies, scenarios=[scenario], baseline="layerwise", name=name)
        summary = report.baseline[scenario]
        assert summary["judged"], summary
        assert summary["kind"] == "layerwise"
        assert report.failures(expectations.for_entry(name, strategies, scenario), strict=True) == []


class BudgetNet(torch.nn.Module):
    """A CPU stand-in for a model that only fits with checkpointing: its forward raises
    ``torch.OutOfMemoryError`` once the tensors autograd keeps for backward outside checkpointed
    units exceed a budget (checkpointed units keep theirs in the checkpoint's own context, or none).
    Only live tensors count: a graph that is dropped gives its bytes back."""

    def __init__(self, budget_bytes: int, width: int = 32, depth: int = 6):
        super().__init__()
        self.budget_bytes = budget_bytes
        self.embed = torch.nn.Embedding(16, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(4 * width, width)) for _ in range(depth))
        self.head = torch.nn.Linear(width, 16)

    def forward(self, ids):
        live = [0]
        budget = self.budget_bytes

        class Kept:
            def __init__(self, tensor):
                self.tensor, self.nbytes = tensor, tensor.nbytes
                live[0] += self.nbytes
                if live[0] > budget:
                    raise torch.OutOfMemoryError(f"simulated: tried to keep {live[0]} bytes for backward")

            def __del__(self):
                live[0] -= self.nbytes

        with torch.autograd.graph.saved_tensors_hooks(Kept, lambda kept: kept.tensor):
            hidden = self.embed(ids)
            for block in self.blocks:
                hidden = hidden + block(hidden)
            return self.head(hidden)


def budget_net():
    torch.manual_seed(0)
    return BudgetNet(budget_bytes=160_000), torch.randint(0, 16, (4, 32), generator=torch.Generator().manual_seed(1))


def test_a_model_that_only_fits_with_checkpointing_falls_back_and_is_judged():
    model, ids = budget_net()
    with pytest.raises(torch.OutOfMemoryError):  # it really does not fit without checkpointing
        model(ids).sum().backward()
    strategies = ["non_reentrant", "reentrant", gc.Strategy.from_checkpoint_fn("rng", mutations.rng_not_preserved),
                  gc.Strategy.from_checkpoint_fn("detached", mutations.output_detached)]
    report = gc.check(model, ids, strategies=strategies)
    summary = report.baseline["train"]
    assert summary["kind"] == "layerwise"
    assert "automatic" in summary["why"] and "ran out of memory" in summary["why"]
    assert [(r.strategy, r.outcome) for r in report.results] == [
        ("non_reentrant", "pass"), ("reentrant", "pass"), ("rng", "mismatch"), ("detached", "silent")]
    assert all(r.metrics["baseline"] == "layerwise" for r in report.results)


def test_whole_model_baseline_that_runs_out_of_memory_names_the_fix():
    model, ids = budget_net()
    with pytest.raises(GradckptUsageError, match="baseline='layerwise'"):
        gc.check(model, ids, strategies=["non_reentrant"], baseline="whole-model")


def test_memory_and_time_are_not_judged_against_a_layerwise_baseline():
    model, features = plain.tanh_net()
    (result,) = gc.check(model, features, strategies=["non_reentrant"], baseline="layerwise",
                         min_memory_reduction=0.99).results
    assert result.outcome == "pass", result.message
    assert "time_ratio" not in result.metrics and "activation_reduction" not in result.metrics
    report = gc.check(model, features, strategies=["non_reentrant"], baseline="layerwise")
    assert report.baseline["train"]["memory"].startswith("not judged")


class CountingBlock(torch.nn.Module):
    """A unit with state outside its buffers: every call scales its output differently."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, hidden):
        self.calls += 1
        return torch.tanh(self.linear(hidden)) * self.calls


@pytest.mark.parametrize(("strategy", "whole_model"), [("non_reentrant", "pass"), ("reentrant", "mismatch")])
def test_limit_a_unit_that_cannot_be_replayed_is_not_judged(strategy, whole_model):
    """Documented limit: a unit whose forward depends on state outside its parameters and
    buffers cannot be replayed, so the layer-local baseline says "not judged" instead of a verdict.
    (The whole-model baseline can tell: non-reentrant recompute only re-derives saved tensors and
    keeps the first call's scale, reentrant recompute differentiates the second call.)"""
    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(CountingBlock(), CountingBlock()), torch.randn(2, 8, requires_grad=True)

    outcomes = {}
    for kind in ("whole-model", "layerwise"):
        model, features = build()
        report = gc.check(model, features, strategies=[strategy], layers=CountingBlock, baseline=kind)
        outcomes[kind] = report.results[0].outcome
    assert outcomes == {"whole-model": whole_model, "layerwise": "error"}
    assert "cannot replay" in report.results[0].message and "baseline='whole-model'" in report.results[0].message


def test_bad_baseline_kind_is_refused():
    model, features = plain.tanh_net()
    with pytest.raises(GradckptUsageError, match="layerwise"):
        gc.check(model, features, baseline="per-layer")


def test_the_forward_keeps_only_unit_inputs_and_nothing_leaks():
    """In forward each unit's own graph is dropped at once (only its inputs are kept, as a
    checkpoint keeps them), and after the check no copy of the model is left alive."""
    import gc as collector
    import weakref

    from pytest_gradckpt.pipeline.replay import replay_call

    inner = []

    class Unit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = torch.nn.Linear(8, 64), torch.nn.Linear(64, 8)

        def forward(self, hidden):
            wide = torch.tanh(self.up(hidden))
            inner.append(weakref.ref(wide))
            return self.down(wide)

    units = [Unit() for _ in range(3)]
    hidden = torch.randn(4, 8, requires_grad=True)
    for unit in units:
        hidden = replay_call(unit.forward, (hidden,), {})
    assert [ref() for ref in inner] == [None, None, None]
    hidden.sum().backward()
    assert all(u.up.weight.grad is not None for u in units)

    model, features = plain.tanh_net()
    gc.check(model, features, strategies=["non_reentrant"], baseline="layerwise")
    collector.collect()
    assert [m for m in collector.get_objects() if type(m) is type(model) and m is not model] == []


def test_a_run_that_fails_mid_step_gives_its_memory_back():
    """A step that fails after forward saved tensors (the whole-model step running out of memory,
    or a strategy raising in its second layer) must free them: the fallback needs the room."""
    import gc as collector
    import weakref

    from pytest_gradckpt.pipeline.units import layer_of

    seen = []

    def fails_in_second_layer(function, *args):
        seen.extend(weakref.ref(t) for t in (*layer_of(function).parameters(), *args))
        if len(seen) > 3:
            raise RuntimeError("second layer fails")
        return torch.sigmoid(function(*args))  # saves its output for backward

    model, features = plain.tanh_net()
    report = gc.check(model, features, strategies=[gc.Strategy.from_checkpoint_fn("fails", fails_in_second_layer)])
    assert report.results[0].outcome == "error"
    collector.collect()
    assert [ref() for ref in seen if ref() is not None] == []
