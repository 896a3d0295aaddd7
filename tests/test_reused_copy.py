"""One working copy serves a check's runs (pytest_gradckpt/pipeline/reused_copy.py): it must be as good as a new
deep copy for every run. Judged against a check that deep-copies per run, and against plain torch."""

from __future__ import annotations

import copy
import functools
import gc as collector
import json
from typing import Any

import pytest
import torch
import torch.utils.checkpoint as cp

import pytest_gradckpt as gc
from pytest_gradckpt.pipeline import reused_copy, runs
from pytest_gradckpt.pipeline.subject import Subject
from pytest_gradckpt.pipeline.reused_copy import Reuse, ReusedCopy
from tests import mutations
from tests.models import DropoutNet

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pytest_gradckpt.zoo.peft_models import llama_inputs, llama_lora, tiny_llama_config  # noqa: E402


def _state(model: torch.nn.Module) -> dict[str, Any]:
    """Everything a run could leave on a module tree that a fresh deep copy would not have."""
    return {
        "tensors": {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n for n, p in model.named_parameters() if p.grad is not None},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "attributes": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "hooks": {n: [len(getattr(m, h)) for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                                                   "_state_dict_hooks", "_load_state_dict_pre_hooks")]
                  for n, m in model.named_modules()},
        "flags": {n: (m.training, getattr(m, "gradient_checkpointing", None)) for n, m in model.named_modules()},
    }


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["tensors"].keys() == b["tensors"].keys()
            and all(torch.equal(a["tensors"][n], b["tensors"][n]) for n in a["tensors"])
            and all(a[k] == b[k] for k in a if k != "tensors"))


def _outcomes(report: gc.Report) -> list[tuple[str, str, str, str, str]]:
    """Each result with every metric that does not depend on the clock."""
    found = []
    for result in report.results:
        metrics = {k: v for k, v in result.metrics.items() if "seconds" not in k and "time" not in k}
        found.append((result.strategy, result.scenario, result.outcome, result.message,
                      json.dumps(metrics, sort_keys=True, default=str)))
    return found


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How many new copies (``Subject.fresh_model``) a check made."""
    calls = {"new": 0}
    fresh = Subject.fresh_model

    def counting(self: Subject) -> torch.nn.Module:
        calls["new"] += 1
        return fresh(self)

    monkeypatch.setattr(Subject, "fresh_model", counting)
    return calls


SCENARIOS = ["train", "frozen_inputs", "autograd_grad", "accumulate"]


def _full_llama() -> tuple[Any, dict[str, Any]]:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()), llama_inputs()


@pytest.mark.parametrize("build", [_full_llama, llama_lora, functools.partial(llama_lora, modules_to_save=True)],
                         ids=["full", "lora", "lora+modules_to_save"])
def test_reports_match_a_deep_copy_per_run(build: Any, monkeypatch: pytest.MonkeyPatch,
                                           counted: dict[str, int]) -> None:
    """Every built-in strategy in four scenarios on a tiny Llama, full and PEFT LoRA with adapter
    dropout: the same outcomes, messages and measurements (losses, gradient distances, saved bytes,
    recompute counts) as with a new deep copy per run, from one copy made per check. (Scenario
    ``frozen_inputs`` freezes the copy's embeddings; the scenarios after it train them again.)"""
    model, inputs = build()
    reused = gc.check(model, inputs, scenarios=SCENARIOS, timeout=None, fingerprint=True)
    assert counted["new"] == 1  # one copy served every run
    monkeypatch.setattr(runs.Stepper, "_copies", lambda self: Reuse(None, self.subject.fresh_model, eligible=False))
    copied = gc.check(model, inputs, scenarios=SCENARIOS, timeout=None, fingerprint=True)
    assert counted["new"] > 20
    assert _outcomes(reused) == _outcomes(copied)
    assert {r.outcome for r in reused.results} >= {"pass", "silent"}  # real verdicts, not all alike


def test_the_callers_model_is_untouched() -> None:
    """After a check that switched on hooks, wrappers, flags, frozen embeddings and gradients on its copy."""
    model, inputs = llama_lora()
    before = _state(model)
    report = gc.check(model, inputs, scenarios=["train", "frozen_inputs"], timeout=None)
    assert len(report.results) > 10
    assert _same_state(before, _state(model))


def test_a_restored_copy_is_a_fresh_copy() -> None:
    """The engine's own mutations (instrumented classes), hf's switch (flags, a hook on the embeddings),
    torch's wrapper (children replaced), a frozen embedding, trained gradients and a weight written in
    place: all gone after ``restore``, which leaves the copy as a new deep copy is."""
    from pytest_gradckpt.pipeline.units import ModelInfo, find_layers, instrument
    from pytest_gradckpt.probes.unit_counter import LayerCounter
    from pytest_gradckpt.strategies import get_strategy

    model, inputs = llama_lora()
    working = copy.deepcopy(model)
    kept = ReusedCopy(model, working)
    fresh = _state(copy.deepcopy(model))
    for name in ("hf_reentrant", "torch_wrapper", "non_reentrant"):
        names, found_by = find_layers(working)
        info = ModelInfo(working, names, found_by)
        for unit, layer in zip(names, info.layers, strict=True):
            instrument(layer, unit, LayerCounter())
        get_strategy(name).apply(info)
        working.get_input_embeddings().requires_grad_(False)
        working(**inputs).loss.backward()
        with torch.no_grad():
            next(p for p in working.parameters() if p.requires_grad).add_(1.0)
        assert not _same_state(fresh, _state(working))
        assert kept.restore()
        assert _same_state(fresh, _state(working)), name
    # and it still trains as a fresh copy does (the same dropout masks: the same seed)
    again = copy.deepcopy(model)
    for each in (working, again):
        torch.manual_seed(0)
        each(**inputs).loss.backward()
    for (name, a), (_, b) in zip(working.named_parameters(), again.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.equal(a.grad, b.grad), name


def test_copies_are_independent_of_the_callers_model() -> None:
    """Writing the working copy never writes the caller's tensors, and the caller's values are what
    a restore brings back."""
    net = DropoutNet()
    working = copy.deepcopy(net)
    kept = ReusedCopy(net, working)
    original = {n: p.detach().clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        for p in working.parameters():
            p.mul_(-3.0)
    assert all(torch.equal(original[n], p) for n, p in net.named_parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(net.parameters(), working.parameters(), strict=True))
    assert kept.restore()
    assert all(torch.equal(original[n], p) for n, p in working.named_parameters())


@pytest.mark.parametrize("change", ["hook on a parameter", "storage swapped", "dtype changed"])
def test_what_a_restore_cannot_put_back_makes_the_copy_unfit(change: str) -> None:
    net = DropoutNet()
    working = copy.deepcopy(net)
    kept = ReusedCopy(net, working)
    weight = working.blocks[0].up.weight
    if change == "hook on a parameter":
        weight.register_hook(lambda g: g)
    elif change == "storage swapped":
        weight.data = weight.data.clone()
    else:
        working.blocks[0].up.weight.data = weight.data.double()
    assert not kept.restore()


def test_a_copy_is_not_reused_after_a_strategy_that_is_not_built_in(counted: dict[str, int]) -> None:
    """A user's checkpoint function may change anything it reaches: the next run gets a new copy."""
    net = DropoutNet()
    mine = gc.Strategy.from_checkpoint_fn("mine", functools.partial(cp.checkpoint, use_reentrant=False))
    report = gc.check(net, torch.randn(4, 32, requires_grad=True), strategies=["non_reentrant", mine, "reentrant"],
                      timeout=None)
    assert [r.outcome for r in report.results] == ["pass", "pass", "pass"]
    assert counted["new"] == 2  # the baseline's, reused by non_reentrant and mine; a new one after mine


def test_a_fault_planted_after_reused_runs_is_still_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built-in strategies first (their runs reuse the copy), then the mutation suite's faults: each
    caught, with the verdict a check that deep-copies per run gives."""
    model, inputs = llama_lora()
    faults = [gc.Strategy.from_checkpoint_fn(name, getattr(mutations, name))
              for name in ("rng_not_preserved", "off_by_one_percent", "output_detached")]
    strategies = ["non_reentrant", "hf_reentrant", "sequential", *faults]
    reused = {r.strategy: r.outcome for r in gc.check(model, inputs, strategies=strategies, timeout=None).results}
    monkeypatch.setattr(runs.Stepper, "_copies", lambda self: Reuse(None, self.subject.fresh_model, eligible=False))
    copied = {r.strategy: r.outcome for r in gc.check(model, inputs, strategies=strategies, timeout=None).results}
    assert reused == copied
    assert reused["non_reentrant"] == reused["hf_reentrant"] == reused["sequential"] == "pass"
    assert reused["rng_not_preserved"] == reused["off_by_one_percent"] == "mismatch"
    assert reused["output_detached"] in ("silent", "error")  # frozen embeddings: nothing left to differentiate


def test_plain_torch_agrees_with_the_reused_copy() -> None:
    """The gradients of the last of several reused runs equal plain torch's on a fresh deep copy."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(3)])
    hidden = torch.randn(4, 8, requires_grad=True)
    stepper = runs.Stepper(Subject(net, hidden, None, None), None, seed=0, timeout=None)
    from pytest_gradckpt.pipeline.scenarios import SCENARIOS
    from pytest_gradckpt.strategies import get_strategy

    for name in ("non_reentrant", "reentrant", "sequential", "offload"):
        run = stepper.step(SCENARIOS["train"], get_strategy(name))
        assert run.error is None
    plain = copy.deepcopy(net)
    plain(hidden.detach().clone().requires_grad_()).float().square().mean().backward()
    for name, parameter in plain.named_parameters():
        assert torch.allclose(run.grads[name], parameter.grad, rtol=1e-6, atol=1e-7), name


def test_the_collector_skips_older_objects_only_during_the_check() -> None:
    seen = []
    original = reused_copy.Reuse.take

    def take(self: Reuse) -> torch.nn.Module:
        seen.append(collector.get_freeze_count())
        return original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reused_copy.Reuse, "take", take)
        gc.check(DropoutNet(), torch.randn(4, 32, requires_grad=True), strategies=["non_reentrant"], timeout=None)
    assert seen and all(count > 0 for count in seen)
    assert collector.get_freeze_count() == 0


def test_objects_the_caller_froze_stay_frozen() -> None:
    collector.freeze()
    try:
        frozen = collector.get_freeze_count()
        gc.check(DropoutNet(), torch.randn(4, 32, requires_grad=True), strategies=["non_reentrant"], timeout=None)
        assert collector.get_freeze_count() > 0.9 * frozen  # still frozen (less what the check let go of)
    finally:
        collector.unfreeze()


class _Frozen(dict[str, Any]):
    """A dict that refuses to change, as diffusers' ``FrozenDict`` config does."""

    def clear(self) -> None:
        raise TypeError("frozen")

    def update(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("frozen")


def test_a_dict_subclass_that_refuses_to_change_is_left_as_it_is(counted: dict[str, int]) -> None:
    """Only plain dicts, lists and sets are refilled in place; a frozen config keeps its object and
    the copy is still reused (diffusers' UNet found this: its FrozenDict config raised in the restore)."""
    net = DropoutNet()
    net.config = _Frozen(width=32)
    net.blocks[0].config = _Frozen()
    report = gc.check(net, torch.randn(4, 32, requires_grad=True), strategies=["non_reentrant", "reentrant"],
                      timeout=None)
    assert [r.outcome for r in report.results] == ["pass", "pass"]
    assert counted["new"] == 1


def test_a_restore_that_fails_gives_a_new_copy_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    net = DropoutNet()
    kept = ReusedCopy(net, copy.deepcopy(net))

    def broken(self: Any) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(reused_copy._Kept, "restore", broken)
    assert kept.restore() is False
