"""Steps that run in processes of their own: on the ranks of a distributed scenario, or
isolated from the caller's process (``check(..., isolate=True)``).

One :class:`Launcher` serves a whole check: its ranks start at the first step that needs
them and run the baselines, every strategy and every distributed scenario of the check
(:class:`~pytest_gradckpt.rank_group.RankGroup`), until the check closes it. A step that
broke its group (a rank died, hung, or failed while its peers may wait in a collective) ends
that group; the next step starts a fresh one. Under an existing launch (torchrun) the ranks
are the launch's own processes, and each runs the same steps in turn.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import torch

from pytest_gradckpt.distributed import (
    DEFAULTS, LAUNCH_ATTEMPTS, LaunchFailure, RaisedInChild, RankFailure, disagreement, launched_from_outside,
    refuse_unrunnable_world, step_in_existing_group, _is_transport_failure)
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable
from pytest_gradckpt.layers import ModelInfo
from pytest_gradckpt.probes import registry
from pytest_gradckpt.rank_group import RankGroup, TimeLimit
from pytest_gradckpt.replay import LAYER_REPLAY
from pytest_gradckpt.runs import Run, Stepper

#: The process group's own collective timeout when no fixed limit was given: ranks stuck in a
#: collective are killed by the launcher's limit long before this.
GROUP_TIMEOUT = 1800.0


class Launcher:
    """``step(scenario, strategy, grad_targets=None) -> Run`` in rank processes started once per
    check; a context manager that stops them. ``step`` has the local step's signature, so the
    engine and the baselines treat both alike.

    ``catalog``: the scenarios and strategies the check will use (handed to the ranks when they
    start; others are pickled into the command).

    Example:
        >>> from pytest_gradckpt.arguments import Subject
        >>> from pytest_gradckpt.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> stepper = Stepper(Subject(net, torch.ones(2, 4), None, None), None, seed=0, timeout=None)
        >>> with Launcher(stepper, [SCENARIOS["ddp"]]) as launcher:
        ...     runs = [launcher.step(SCENARIOS["ddp"], None) for _ in range(2)]
        >>> same = torch.equal(runs[0].grads["0.weight"], runs[1].grads["0.weight"])
        >>> [r.error for r in runs], launcher.launches, same
        ([None, None], 1, True)
    """

    def __init__(self, stepper: Stepper, catalog: Sequence[Any] = ()):
        self.stepper = stepper
        self.catalog = [*catalog, LAYER_REPLAY]
        self.settings = dict(stepper.distributed or DEFAULTS)
        # Longer than the launcher's own limit, so a rank waiting on a hung peer is not the one blamed.
        fixed = self.settings["timeout"]
        self.settings["group_timeout"] = GROUP_TIMEOUT if fixed is None else 2 * fixed + 60
        self.groups: dict[bool, RankGroup] = {}
        self.limits: dict[bool, TimeLimit] = {}
        #: rank groups started so far: one per check, unless a step broke its group
        self.launches = 0

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every rank this launcher started."""
        for group in self.groups.values():
            group.close()
        self.groups.clear()

    def step(self, scenario: Any, strategy: Any, grad_targets: Any = None) -> Run:
        """One step on the ranks; a strategy that does not apply is skipped before any rank is
        asked. A failure of the launch itself is retried, then reported as ``not judged``."""
        if strategy is not None:
            stepper = self.stepper
            reason = strategy.applies_to(ModelInfo(stepper.subject.peek(), stepper.layer_names, stepper.found_by))
            if reason:
                return Run(error=StrategyNotApplicable(reason))
        if scenario.distributed and launched_from_outside():
            return step_in_existing_group(self.stepper, scenario, strategy, grad_targets)
        for _ in range(LAUNCH_ATTEMPTS):
            run = self._on_ranks(scenario, strategy, grad_targets)
            if not isinstance(run.error, LaunchFailure):
                return run
        run.error = LaunchFailure(
            f"not judged: the distributed launch itself failed {LAUNCH_ATTEMPTS} times (a harness failure, not a "
            f"verdict on the strategy): {run.error}")
        return run

    def _on_ranks(self, scenario: Any, strategy: Any, grad_targets: Any) -> Run:
        distributed = bool(scenario.distributed)
        group = self._group(distributed)
        limit = self.limits[distributed]
        from torch.utils import deterministic

        # The caller's kernel settings as they are now (a check on CUDA switches them; a retry relaxes them).
        determinism = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled(),
                       deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
        command = (self._ref(scenario), self._ref(strategy), grad_targets, determinism, registry.registered())
        what = (f"the step of {strategy.name!r}" if strategy is not None else "the step without checkpointing") + \
            f" under {scenario.name}"
        try:
            payloads = group.run(command, limit, what)
        except RankFailure as failure:
            self._end(distributed)
            return Run(error=failure)
        limit.measured(max(p["wall"] for p in payloads.values()))
        run = self._fold(payloads, group.world_size)
        if run.error is not None and not isinstance(run.error, StrategyNotApplicable):
            self._end(distributed)  # its ranks may be stuck in, or out of step with, a collective
        return run

    def _group(self, distributed: bool) -> RankGroup:
        group = self.groups.get(distributed)
        if group is not None:
            return group
        subject = self.stepper.subject
        world_size = self.settings["world_size"] if distributed else 1
        if distributed:
            refuse_unrunnable_world(self.settings, subject.device)
        subject.share_build()  # a CPU (or meta) build made here is what the ranks copy: one build per check
        subject.drop_spare()  # one built on a GPU must not sit there beside the ranks' own
        group = RankGroup(self.stepper, self.catalog, world_size, distributed, self.settings)
        group.start()
        self.groups[distributed] = group
        self.limits[distributed] = TimeLimit(self.settings["timeout"], subject.build_seconds)
        self.launches += 1
        return group

    def _end(self, distributed: bool) -> None:
        group = self.groups.pop(distributed, None)
        if group is not None:
            group.close(wait=False)

    def _ref(self, item: Any) -> tuple[str, Any]:
        """How a command names a scenario or strategy: its place in the catalog, or pickled."""
        if item is None:
            return ("none", None)
        for index, known in enumerate(self.catalog):
            if known is item:
                return ("catalog", index)
        try:
            return ("pickled", pickle.dumps(item))
        except Exception as error:  # noqa: BLE001
            raise GradckptUsageError(
                f"{getattr(item, 'name', item)!r} must travel to the ranks, which needs it picklable: "
                f"{type(error).__name__}: {error}. Define it at module level (no lambdas or local classes)") from None

    @staticmethod
    def _fold(payloads: dict[int, dict[str, Any]], world_size: int) -> Run:
        """The ranks' payloads as one Run: rank 0's tensors, every probe's measurement merged over
        the ranks (:func:`pytest_gradckpt.probes.registry.merge`), whether they agree, or the first
        rank's failure."""
        run = Run()
        failed = [p for p in payloads.values() if "error" in p]
        usage = [p for p in failed if p.get("usage")]
        if usage:  # bad input is the caller's to fix, in any process
            raise GradckptUsageError(usage[0]["error"].partition(": ")[2])
        if failed:
            first = min(failed, key=lambda p: p["rank"])
            if first.get("not_applicable"):
                run.error = StrategyNotApplicable(first["error"])
            elif first.get("launch") or _is_transport_failure(first["error"]):
                run.error = LaunchFailure(f"rank {first['rank']}: {first['error']}")
            elif world_size == 1:
                run.error = RaisedInChild(first["error"])
            else:
                run.error = RankFailure(f"rank {first['rank']}: {first['error']}")
            run.measured = registry.from_host(first.get("measured", {}))  # its warnings may say why
            return run
        run = Run.from_payload(payloads[0])
        run.measured = registry.merge(run.measured, [registry.from_host(payloads[r]["measured"])
                                                     for r in sorted(payloads)])
        run.rank_disagreement = disagreement([payloads[r]["fingerprint"] for r in sorted(payloads)])
        return run
