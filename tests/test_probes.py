"""The probe protocol: a probe added in this file only (one class, registered for one ``with``
block) reaches the evidence, the metrics, the JSON report and the table, also from rank
processes; mistyped metric keys are errors; nothing outlives the block."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import torch
from torch import nn

import pytest_gradckpt as gc
from pytest_gradckpt import outcomes as gc_outcomes
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline import verdicts
from pytest_gradckpt.pipeline.baselines import Baseline
from pytest_gradckpt.probes import registry
from pytest_gradckpt.probes.protocol import Column, Probe, ProbeStep
from pytest_gradckpt.report import Metrics, Result, UnknownMetric, format_table
from pytest_gradckpt.pipeline.runs import Run
from pytest_gradckpt.strategies import get_strategy


@dataclasses.dataclass
class Forwards:
    forward_calls: int = 0
    per_rank: list[int] = dataclasses.field(default_factory=list)


class ForwardCalls(Probe[Forwards]):
    """Counts the forward calls of the copy's modules during the step, summed over ranks."""

    name = "forward_calls"
    measurement = Forwards
    metric_keys = ("forward_calls", "baseline_forward_calls", "forward_calls_per_rank")
    columns = (Column("fwd", ("forward_calls",), lambda n: "" if n is None else str(n)),)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.seen = 0

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        def count(module: nn.Module, args: Any, output: Any) -> None:
            self.seen += id(module) in self.step.module_names

        handle = nn.modules.module.register_module_forward_hook(count)
        try:
            yield
        finally:
            handle.remove()

    def read(self) -> Forwards:
        return Forwards(self.seen)

    @classmethod
    def merge(cls, mine: Forwards, ranks: Sequence[Forwards]) -> Forwards:
        return Forwards(sum(r.forward_calls for r in ranks), [r.forward_calls for r in ranks])

    @classmethod
    def metrics(cls, evidence: verdicts.Evidence) -> Mapping[str, Any]:
        run, base = evidence.run.of(cls), evidence.baseline.run.of(cls)
        found: dict[str, Any] = {"forward_calls": run.forward_calls, "baseline_forward_calls": base.forward_calls}
        if run.per_rank:
            found["forward_calls_per_rank"] = run.per_rank
        return found


class Mistyped(ForwardCalls):
    """Writes a metric it does not declare."""

    name = "mistyped"

    @classmethod
    def metrics(cls, evidence: verdicts.Evidence) -> Mapping[str, Any]:
        return {"forward_cals": evidence.run.of(cls).forward_calls}


class BadEvidence(ForwardCalls):
    """Adds evidence Evidence has no field for."""

    name = "bad_evidence"

    @classmethod
    def evidence(cls, evidence: verdicts.Evidence) -> Mapping[str, Any]:
        return {"forward_call_cut": 0.5}


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])


def plain_forward_calls(checkpointed: bool) -> int:
    """Ground truth in plain torch: forward calls of a step of ``net()``, with every block
    checkpointed (non-reentrant) or not."""
    model = net()
    calls = [0]
    handle = nn.modules.module.register_module_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        hidden = torch.randn(4, 8, requires_grad=True)
        calls[0] += 1  # the root Sequential: called once, it calls the blocks
        for block in model:
            hidden = (torch.utils.checkpoint.checkpoint(block, hidden, use_reentrant=False) if checkpointed
                      else block(hidden))
        hidden.square().mean().backward()
    finally:
        handle.remove()
    return calls[0]


def test_ground_truth_counts() -> None:
    assert plain_forward_calls(False) == 10  # root, 3 blocks, 6 leaves
    # In backward only each block's Linear completes again: torch stops a non-reentrant recompute
    # as soon as it holds every tensor backward needs.
    assert plain_forward_calls(True) == 13


def test_a_registered_probe_reaches_evidence_metrics_json_and_table() -> None:
    with registry.using(ForwardCalls):
        report = gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"],
                          layers=None)
        result = report.results[0]
        table = report.table()
    assert result.outcome == "pass", result.message
    assert result.metrics["baseline_forward_calls"] == plain_forward_calls(False)
    assert result.metrics["forward_calls"] == plain_forward_calls(True)
    row = json.loads(report.to_json())["results"][0]["metrics"]
    assert (row["forward_calls"], row["baseline_forward_calls"]) == (13, 10)
    header, _, line = table.splitlines()[:3]
    assert line.split()[header.split().index("fwd")] == "13"


def test_the_measurement_ships_from_rank_processes_and_merges() -> None:
    """An isolated step (one child process) and DDP on two gloo ranks: the probe runs in each
    rank, its host form comes back, and its merge (a sum here) sees every rank."""
    with registry.using(ForwardCalls):
        report = gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"],
                          layers=None, scenarios=["train", "ddp"], isolate=True)
    by = {r.scenario: r for r in report.results}
    assert [r.outcome for r in report.results] == ["pass", "pass"], report.table()
    assert by["train"].metrics["forward_calls"] == plain_forward_calls(True)
    assert by["train"].metrics["forward_calls_per_rank"] == [13]  # one child process
    assert by["ddp"].metrics["forward_calls_per_rank"] == [13, 13]  # the DDP wrapper is not the model's
    assert by["ddp"].metrics["forward_calls"] == 26


def test_nothing_outlives_the_block() -> None:
    with registry.using(ForwardCalls):
        assert registry.registered()[-1] is ForwardCalls
        Metrics(forward_calls=1)
    assert ForwardCalls not in registry.registered()
    assert registry.registered() == registry.PROBES
    with pytest.raises(UnknownMetric, match="unknown metric 'forward_calls'"):
        Metrics(forward_calls=1)
    run = gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"]).results[0]
    assert "forward_calls" not in run.metrics


def test_a_probe_registered_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="forward_calls registered twice"):
        with registry.using(ForwardCalls, ForwardCalls):
            pass


def test_a_probe_without_a_measurement_is_refused() -> None:
    class Undeclared(ForwardCalls):
        name = "undeclared"
        measurement = int  # not a dataclass

    with pytest.raises(ValueError, match=r"Undeclared declare no measurement: set measurement = <a dataclass>"):
        with registry.using(Undeclared):
            pass


def test_mistyped_metric_keys_are_errors_not_blank_columns() -> None:
    result = Result("non_reentrant", "train", "pass", metrics={"activation_reduction": 0.5})
    with pytest.raises(UnknownMetric, match="unknown metric 'activation_reducton'"):
        result.metrics.get("activation_reducton")
    with pytest.raises(UnknownMetric):
        Result("non_reentrant", "train", "pass", metrics={"max_grad_dif": 0.0})
    with pytest.raises(UnknownMetric):
        result.metrics["time_ration"] = 1.0
    # a column that reads a key nobody declares fails the table, it does not leave a blank column
    typo = type("TypoColumn", (ForwardCalls,), {"name": "typo", "columns": (Column("x", ("forward_cals",), str),)})
    with registry.using(typo), pytest.raises(UnknownMetric, match="forward_cals"):
        format_table([result])
    # a probe writing a key it does not declare fails the check's metrics
    with registry.using(Mistyped), pytest.raises(UnknownMetric, match="'mistyped' wrote metric.*forward_cals"):
        gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"])


def over_budget(e: verdicts.Evidence, limits: verdicts.Limits) -> str | None:
    """A probe's rule: more forward calls than the step without checkpointing plus 20%."""
    ran, base = e.run.of(ForwardCalls).forward_calls, e.baseline.run.of(ForwardCalls).forward_calls
    return f"{ran} forward calls against {base}" if ran > 1.2 * base else None


class Budgeted(ForwardCalls):
    judges = (("recompute", over_budget),)


def test_a_probe_that_judges_decides_where_no_table_rule_fires() -> None:
    """Plain torch says 13 forward calls against 10 (test_ground_truth_counts): 30% over, so the
    probe's rule fires on a correct strategy, and only while the probe is registered."""
    with registry.using(Budgeted):
        result = gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"],
                          layers=None).results[0]
    assert (result.outcome, result.message) == ("recompute", f"{plain_forward_calls(True)} forward calls "
                                                             f"against {plain_forward_calls(False)}")
    assert verdicts.rules_in_force() == verdicts.RULES
    again = gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"], layers=None)
    assert again.results[0].outcome == "pass", again.results[0].message


def test_a_probes_rules_follow_the_tables_rules_of_the_same_outcome_and_worse_ones() -> None:
    with registry.using(Budgeted):
        rules = verdicts.rules_in_force()
    outcomes_in_order = [outcome for outcome, _ in rules]
    assert outcomes_in_order == sorted(outcomes_in_order, key=gc_outcomes.SEVERITY.index)
    recompute_rules = [rule for outcome, rule in rules if outcome == "recompute"]
    assert recompute_rules[-1] is over_budget
    assert recompute_rules[:-1] == [rule for outcome, rule in verdicts.RULES if outcome == "recompute"]
    # a failing table rule of a worse outcome still decides: a raising step is an error, not over budget
    base = Run(loss=torch.ones(()), grads={"w": torch.ones(2)})
    crashed = Run(error=RuntimeError("boom"))
    with registry.using(Budgeted):
        found = verdicts.judge(verdicts.Evidence(get_strategy("non_reentrant"), crashed, Baseline(base)),
                               verdicts.Limits(1e-6, 1e-5))
    assert found == ("error", "RuntimeError: boom")


def test_a_probe_rule_with_a_passing_or_unknown_outcome_is_a_usage_error() -> None:
    for outcome in ("pass", "slow"):
        bad = type("Bad", (ForwardCalls,), {"name": "bad", "judges": ((outcome, over_budget),)})
        with registry.using(bad), pytest.raises(GradckptUsageError, match=f"probe 'bad' brings a rule whose "
                                                                       f"outcome is '{outcome}'"):
            verdicts.rules_in_force()


def test_evidence_a_probe_adds_must_be_a_field_of_evidence() -> None:
    base = Run(loss=torch.ones(()), grads={"w": torch.ones(2)})
    with registry.using(BadEvidence), pytest.raises(AttributeError, match="forward_call_cut"):
        verdicts.gather(get_strategy("non_reentrant"), Baseline(base), base, verdicts.Limits(1e-6, 1e-5))


def test_every_registered_probe_ships_and_comes_back_alike() -> None:
    """What a rank sends is every registered probe's measurement, read back equal."""
    measured = {kind.name: kind.empty() for kind in registry.PROBES}
    payload = Run(loss=torch.ones(()), measured=measured).to_payload()
    assert sorted(payload["measured"]) == sorted(kind.name for kind in registry.PROBES)
    assert Run.from_payload(payload).measured == measured
    assert not set(registry.metric_keys()) & {field.name for field in dataclasses.fields(Run)}


def test_an_isolated_step_keeps_every_measurement() -> None:
    """What ships from a child process is every registered probe's measurement. (A hand-kept list
    of shipped fields once left ``saved_elsewhere_units`` out: isolated offload runs reported none.)"""
    inputs = torch.randn(4, 8, requires_grad=True)
    here = gc.check(net(), inputs, strategies=["torch_offload_wrapper"]).results[0]
    child = gc.check(net(), inputs, strategies=["torch_offload_wrapper"], isolate=True).results[0]
    assert here.metrics["saved_elsewhere_units"] == ["0", "1", "2"]  # the wrapper offloads every block
    for key in ("saved_elsewhere_units", "recomputed_units", "layer_calls", "activation_bytes", "warnings"):
        assert child.metrics[key] == here.metrics[key], key


UNDER_TORCHRUN = """
import json, sys
import torch
import pytest_gradckpt as gc
from pytest_gradckpt import outcomes as gc_outcomes
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.ranks.distributed import join_launch, leave_launch
from pytest_gradckpt.probes import registry
from tests.test_probes import ForwardCalls, net

rank = join_launch("cpu")
with registry.using(ForwardCalls):
    torch.manual_seed(1)
    report = gc.check(net(), torch.randn(4, 8, requires_grad=True), strategies=["non_reentrant"], scenarios=["ddp"])
metrics = report.results[0].metrics
with open(sys.argv[1] + str(rank), "w") as out:
    json.dump([report.results[0].outcome, metrics["ranks"], metrics["forward_calls_per_rank"], metrics["forward_calls"]], out)
leave_launch()
"""


def test_under_torchrun_every_rank_merges_the_ranks_measurements(tmp_path) -> None:
    """Ranks of a launch someone else started (as torchrun sets them up): each gathers every rank's
    host form and merges them, so every rank reports the same sum."""
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    root = pathlib.Path(__file__).parent.parent
    processes = [subprocess.Popen([sys.executable, "-c", UNDER_TORCHRUN, str(tmp_path / "rank")], cwd=root,
                                  env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                                           PYTHONPATH=str(root)),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [(p.wait(timeout=300), p.stdout.read() if p.stdout else "") for p in processes]
    assert [status for status, _ in outputs] == [0, 0], outputs
    for rank in (0, 1):
        outcome, ranks, per_rank, total = json.loads((tmp_path / f"rank{rank}").read_text())
        assert (outcome, ranks) == ("pass", "2 ranks of the running process group (torchrun), gloo")
        assert (per_rank, total) == ([13, 13], 26)  # each rank's copy: the count of plain_forward_calls(True)


def test_a_finished_step_frees_its_copy_without_the_cyclic_collector() -> None:
    """A step's copy (weights and gradients) must be gone when the next step runs: on a GPU a copy
    left for Python's cyclic collector is another model's worth of device memory (1.1B bf16:
    +6.4 GiB at the H200's peak when two baseline copies lingered). Measured here as objects: the
    parameters of the single shape this model has, counted from inside each strategy's step,
    with the cyclic collector switched off."""
    import gc as collector

    shape = (37, 41)

    def alive() -> int:
        # the copies' parameters (the caller's are left out: during a check the collector does not
        # list them, gc.freeze having put them aside)
        return sum(1 for o in collector.get_objects() if isinstance(o, torch.nn.Parameter) and tuple(o.shape) == shape
                   and not any(o is p for p in model.parameters()))

    class Counting(gc.Strategy):
        description = "non_reentrant, counting the model-shaped parameters alive while it applies"

        def __init__(self, name: str) -> None:
            self.name, self.inner, self.seen = name, get_strategy("non_reentrant"), []

        def apply(self, info: Any) -> None:
            self.seen.append(alive())
            self.inner.apply(info)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(41, 37, bias=False), torch.nn.ReLU(), torch.nn.Linear(37, 41),
                                torch.nn.ReLU(), torch.nn.Linear(41, 37, bias=False))
    strategies = [Counting("count_a"), Counting("count_b")]
    collector.collect()
    collector.disable()
    try:
        report = gc.check(model, torch.randn(3, 41), strategies=strategies, scenarios=["train"], layers=[model[0], model[2], model[4]],
                          isolate=False)
    finally:
        collector.enable()
    assert [r.outcome for r in report.results] == ["pass", "pass"]
    # this step's copy's 2; a lingering baseline or earlier copy would add 2 each
    assert [s.seen for s in strategies] == [[2], [2]]
