"""Steps that run in processes of their own: on the ranks of a distributed scenario, or
isolated from the caller's process (``check(..., isolate=True)``).

One :class:`Launcher` serves a whole check: its ranks start at the first step that needs
them and run the baselines, every strategy and every distributed scenario of the check
(:class:`~pytest_gradckpt.ranks.rank_group.RankGroup`), until the check closes it. A step that
broke its group (a rank died, hung, or failed while its peers may wait in a collective) ends
that group; the next step starts a fresh one. Under an existing launch (torchrun) the ranks
are the launch's own processes, and each runs the same steps in turn.

A check whose every step runs on ranks it starts, given a factory, starts them before anything
is built (:func:`build_on_ranks`): each rank builds the model once, where it will train it, and
this process reads the layers and names from a skeleton of it (meta tensors), so the model is
built once per rank and never here, and this process never uses the GPU (its ranks can then be
forked, without re-importing anything).
"""

from __future__ import annotations

import dataclasses
import functools
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.ranks import held, overlapped_imports

from pytest_gradckpt.ranks.distributed import (
    DEFAULTS, LAUNCH_ATTEMPTS, LaunchFailure, RaisedInChild, RankFailure, device_before_build, disagreement,
    launched_from_outside, refuse_unrunnable_world, step_in_existing_group, _is_transport_failure)
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable
from pytest_gradckpt.pipeline.units import ModelInfo
from pytest_gradckpt.probes import registry
from pytest_gradckpt.ranks.rank_group import BUILD_FLOOR, RankGroup, StepperRecipe, TimeLimit
from pytest_gradckpt.pipeline.replay import LAYER_REPLAY
from pytest_gradckpt.pipeline.runs import Run, Stepper

#: The process group's own collective timeout when no fixed limit was given: ranks stuck in a
#: collective are killed by the launcher's limit long before this.
GROUP_TIMEOUT = 1800.0
#: Devices whose ranks build the model themselves (:func:`build_on_ranks`). On the CPU the model
#: built here is shared with forked ranks instead (one build for any number of ranks); tests add "cpu".
BUILD_ON_RANKS = ("cuda",)


def _group_settings(distributed: Any) -> dict[str, Any]:
    settings = dict(distributed or DEFAULTS)
    # Longer than the launcher's own limit, so a rank waiting on a hung peer is not the one blamed.
    fixed = settings["timeout"]
    settings["group_timeout"] = GROUP_TIMEOUT if fixed is None else 2 * fixed + 60
    return settings


@dataclasses.dataclass
class BuiltOnRanks:
    """Ranks started before anything was built here, each holding the model it built: the group,
    its time limit, the layer names the ranks found, and the model's skeleton (None: it could not
    travel, and this process builds a model of its own to read)."""

    group: RankGroup
    limit: TimeLimit
    layer_names: list[str]
    skeleton: bytes | None

    def model(self, given: Any) -> Any:
        """What this process's subject reads the model from: a factory of the skeleton, else ``given``."""
        if self.skeleton is None:
            return given
        return functools.partial(pickle.loads, self.skeleton)


def build_on_ranks(model: Any, make_stepper: Callable[[], Any], device: Any, distributed: Any,
                   every_step_distributed: bool, catalog: Sequence[Any]) -> BuiltOnRanks | None:
    """Start the ranks of a distributed check and let each build the model, before this process
    builds anything: when ``model`` is a factory, every step runs on ranks the check starts
    (``every_step_distributed``, no outside launch) and ``device`` (the check's) is one of
    :data:`BUILD_ON_RANKS`. ``make_stepper()`` makes the check's stepper (in each rank).
    None where that does not apply, or the ranks could not build (this process then builds as
    always, and meets the same error, if any, itself).

    Example:
        >>> build_on_ranks(torch.nn.Linear(2, 2), lambda: None, "cuda", None, True, []) is None  # a module, no factory
        True
    """
    where = device_before_build(model, device)
    if isinstance(model, nn.Module) or not callable(model) or not every_step_distributed or where is None or \
            where.type not in BUILD_ON_RANKS or launched_from_outside():
        return None
    settings = _group_settings(distributed)
    for _ in range(LAUNCH_ATTEMPTS):  # a fork refused (CUDA initialised here before it) is retried, spawning
        try:
            group, limit, built = _start_building(StepperRecipe(make_stepper), [*catalog, LAYER_REPLAY], settings,
                                                  where, overlapped_imports.named_libraries(model))
        except LaunchFailure:
            continue
        except (RankFailure, GradckptUsageError):  # e.g. spawning needs what cannot be pickled
            return None
        return BuiltOnRanks(group, limit, built["layer_names"], built.get("skeleton"))
    return None


def _start_building(recipe: StepperRecipe, catalog: list[Any], settings: dict[str, Any], device: torch.device,
                    libraries: list[str]) -> tuple[RankGroup, TimeLimit, dict[str, Any]]:
    """A group of ranks that each made the stepper from ``recipe`` (built the model), its time
    limit, and rank 0's account of the build; raises :class:`RankFailure` (the group closed).
    ``libraries``: see :func:`_answers_to_build`."""
    group = RankGroup(recipe, catalog, settings["world_size"], True, settings, device)
    limit = TimeLimit(settings["timeout"], 0.0, first_floor=BUILD_FLOOR)
    group.start()
    try:
        payloads = _answers_to_build(group, limit, libraries)
        failed = sorted((p["rank"], p) for p in payloads.values() if "error" in p)
        if failed:
            rank, first = failed[0]
            kind = LaunchFailure if first.get("launch") else RankFailure
            raise kind(f"rank {rank}: {first['error']}")
    except RankFailure:
        group.close(wait=False)
        raise
    limit.measured(max(p["wall"] for p in payloads.values()))
    limit.build_seconds = max(p["built"]["build_seconds"] for p in payloads.values())
    return group, limit, payloads[0]["built"]


def _answers_to_build(group: RankGroup, limit: TimeLimit, libraries: list[str]) -> dict[int, dict[str, Any]]:
    """Every rank's answer to the ``build`` command. Meanwhile this process imports ``libraries``
    (those the factory names) from the ranks' fork on, then each module rank 0 reports it imports,
    so reading the skeleton afterwards imports nothing; the imports end before this returns."""
    with overlapped_imports.Importer() as importer:  # a thread, so only once the ranks are forked
        importer.want(libraries)
        return group.run(("build", None, None), limit, "building the model on the ranks", importer.want)


class Launcher:
    """``step(scenario, strategy, grad_targets=None) -> Run`` in rank processes started once per
    check; a context manager that stops them. ``step`` has the local step's signature, so the
    engine and the baselines treat both alike.

    ``catalog``: the scenarios and strategies the check will use (handed to the ranks when they
    start; others are pickled into the command).

    Example:
        >>> from pytest_gradckpt.pipeline.subject import Subject
        >>> from pytest_gradckpt.pipeline.scenarios import SCENARIOS
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> stepper = Stepper(Subject(net, torch.ones(2, 4), None, None), None, seed=0, timeout=None)
        >>> from pytest_gradckpt.pipeline.comparison import compare
        >>> with Launcher(stepper, [SCENARIOS["ddp"]]) as launcher:
        ...     runs = [launcher.step(SCENARIOS["ddp"], None) for _ in range(2)]
        ...     same = compare(runs[0].grads, runs[1].grads, rtol=0.0, atol=0.0).equal  # where the tensors are
        >>> [r.error for r in runs], launcher.launches, same, tuple(runs[0].grads["0.weight"].shape)
        ([None, None], 1, True, (4, 4))
    """

    def __init__(self, stepper: Stepper, catalog: Sequence[Any] = (), built: BuiltOnRanks | None = None):
        self.stepper = stepper
        self.catalog = [*catalog, LAYER_REPLAY]
        self.settings = _group_settings(stepper.distributed)
        #: ranks that built the model before this process made its stepper (:func:`build_on_ranks`),
        #: serving the distributed steps once they agree with it on the layers
        self.built = built
        #: how a fresh group builds the model again after a step broke the group that built it
        self.recipe: StepperRecipe | None = None
        if built is not None and (built.layer_names != stepper.layer_names or len(built.group.catalog) != len(
                self.catalog) or any(a is not b for a, b in zip(built.group.catalog, self.catalog, strict=True))):
            built.group.close(wait=False)  # not the model or catalog this check reads: start ranks as always
            self.built = None
        if self.built is not None:
            self.recipe = self.built.group.stepper  # type: ignore[assignment]
        self.groups: dict[bool, RankGroup] = {}
        self.limits: dict[bool, TimeLimit] = {}
        #: rank groups started so far: one per check, unless a step broke its group
        self.launches = 0
        # Runs whose tensors rank 0 holds (pytest_gradckpt.ranks.held): by run id, the group holding them
        # and the command that made them (repeated on a fresh group when their group ended).
        self.run_count = 0
        self.kept_in: dict[int, RankGroup] = {}
        self.recipes: dict[int, tuple[bool, tuple[Any, ...]]] = {}
        self.closed = False

    def spawned(self, distributed: bool) -> str | None:
        """Why the ranks serving ``distributed`` steps (or isolated ones) were spawned, not forked
        (:func:`~pytest_gradckpt.ranks.rank_group.why_spawned`); None when forked or none started."""
        group = self.groups.get(distributed)
        return None if group is None else group.spawned

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop every rank this launcher started (and with them every tensor they held)."""
        if self.built is not None:
            self.built.group.close()
            self.built = None
        for group in self.groups.values():
            group.close()
        self.groups.clear()
        self.closed = True

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
        try:
            group = self._group(distributed)
        except RankFailure as failure:  # ranks that build the model failed to (retried when a launch failure)
            return Run(error=failure)
        limit = self.limits[distributed]
        from torch.utils import deterministic

        # The caller's kernel settings as they are now (a check on CUDA switches them; a retry relaxes them).
        determinism = (torch.are_deterministic_algorithms_enabled(),
                       torch.is_deterministic_algorithms_warn_only_enabled(),
                       deterministic.fill_uninitialized_memory, torch.backends.cudnn.benchmark)
        body = (self._ref(scenario), self._ref(strategy), grad_targets, determinism, registry.registered())
        what = (f"the step of {strategy.name!r}" if strategy is not None else "the step without checkpointing") + \
            f" under {scenario.name}"
        self.run_count += 1
        run_id = self.run_count
        try:
            payloads = group.run(("step", run_id, body), limit, what)
        except RankFailure as failure:
            self._end(distributed)
            return Run(error=failure)
        limit.measured(max(p["wall"] for p in payloads.values()))
        run = self._fold(payloads, group.world_size)
        if run.error is not None and not isinstance(run.error, StrategyNotApplicable):
            self._end(distributed)  # its ranks may be stuck in, or out of step with, a collective
        elif run.error is not None:
            group.released.append(run_id)  # rank 0 may have finished it while another rank refused
        else:
            self.kept_in[run_id], self.recipes[run_id] = group, (distributed, body)
            held.attach(held.Token(run_id, self), {field: getattr(run, field) for field in held.FIELDS}, self._release)
        return run

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in rank 0, where the held tensors among ``args`` live; only the
        result travels back. A run held by a group that has ended since (a step broke it) is
        first run again, with the same seeds, on the group now serving."""
        if self.closed:
            raise RuntimeError("the check that held these tensors has ended; its ranks are gone")
        run_ids = held.run_ids(args)
        gone = sorted(run_ids - set(self.recipes))
        if gone:
            raise RuntimeError(f"held run(s) {gone} were released; nothing can be computed from them")
        (distributed,) = {self.recipes[run_id][0] for run_id in run_ids} or {True}
        group = self._group(distributed)
        for run_id in sorted(run_ids):
            if self.kept_in[run_id] is not group:
                self._repeat(run_id, group)
        payloads = self._run_or_end(group, distributed, ("call", None, (function, args)),
                                    f"{function.__name__} on rank 0's held tensors")
        answer = payloads[0]
        if "error" in answer:
            raise RankFailure(f"rank 0: {answer['error']}")
        return answer["value"]

    def _repeat(self, run_id: int, group: RankGroup) -> None:
        distributed, body = self.recipes[run_id]
        payloads = self._run_or_end(group, distributed, ("step", run_id, body),
                                    "a held step again, on ranks started after a failure")
        failed = [p["error"] for p in payloads.values() if "error" in p]
        if failed:
            raise RankFailure(f"a held step could not be repeated on fresh ranks: {failed[0]}")
        self.kept_in[run_id] = group

    def _run_or_end(self, group: RankGroup, distributed: bool, command: tuple[Any, ...],
                    what: str) -> dict[int, dict[str, Any]]:
        try:
            return group.run(command, self.limits[distributed], what)
        except RankFailure:
            self._end(distributed)
            raise

    def _release(self, run_id: int) -> None:
        """No stand-in of the run is left here: its group frees the tensors with its next command."""
        group = self.kept_in.pop(run_id, None)
        self.recipes.pop(run_id, None)
        if group is not None:
            group.released.append(run_id)

    def _group(self, distributed: bool) -> RankGroup:
        group = self.groups.get(distributed)
        if group is not None:
            return group
        subject = self.stepper.subject
        if distributed and self.recipe is not None:  # the ranks that built the model serve its steps
            if self.built is not None:
                group, self.limits[distributed], self.built = self.built.group, self.built.limit, None
            else:  # a step broke that group: a fresh one builds it again (the skeleton here is no model to copy)
                group, self.limits[distributed], _ = _start_building(self.recipe, self.catalog, self.settings,
                                                                     subject.device, [])  # imported already
            self.groups[distributed] = group
            self.launches += 1
            return group
        world_size = self.settings["world_size"] if distributed else 1
        if distributed:
            refuse_unrunnable_world(self.settings, subject.device)
        subject.share_build()  # a CPU (or meta) build made here is what the ranks copy: one build per check
        subject.drop_spare()  # one built on a GPU must not sit there beside the ranks' own
        group = RankGroup(self.stepper, self.catalog, world_size, distributed, self.settings, subject.device)
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
