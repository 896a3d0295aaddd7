"""Distributed scenarios (``ddp``, ``fsdp2``) on torch.distributed itself, never an imitation.

The launcher forks ``world_size`` ranks (default 2), or spawns them when this process
has already used CUDA (autograd's device threads do not survive a fork). They meet through a file store in a
fresh temporary directory, so no port has to be found or can be raced for. Each rank
runs the engine's ordinary step on its shard of the global batch, with the model wrapped
in ``DistributedDataParallel`` or ``fully_shard`` (after the strategy is applied, as in
training), and sends back what it measured. The parent waits with a deadline; a rank that
fails or hangs ends the run as ``error`` and every rank is killed, so none is left behind.

The judge compares against the same distributed setup without checkpointing (same ranks,
same seeds, so dropout masks match) and requires every rank to hold the same gradients.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import pickle
import queue as queue_module
import signal
import tempfile
import time
from collections.abc import Mapping
from datetime import timedelta
from multiprocessing.queues import Queue
from typing import Any

import torch

from pytest_gradckpt.arguments import map_tensors, model_device
from pytest_gradckpt.errors import GradckptUsageError, StrategyNotApplicable
from pytest_gradckpt.layers import ModelInfo
from pytest_gradckpt.runs import Run, Stepper
from pytest_gradckpt.scenarios import Scenario
from pytest_gradckpt.strategies import Strategy

#: Settable through ``check(..., distributed={...})``.
DEFAULTS: dict[str, Any] = {"world_size": 2, "find_unused_parameters": False, "static_graph": False,
                            "micro_batches": 1, "timeout": 60.0, "start_method": "auto"}
START_METHODS = ("auto", "fork", "spawn")


def options(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``distributed=`` settings.

    Example:
        >>> options({"static_graph": True})["world_size"]
        2
    """
    chosen = dict(DEFAULTS)
    unknown = sorted(set(given or {}) - set(DEFAULTS))
    if unknown:
        raise GradckptUsageError(f"distributed: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(DEFAULTS)}")
    chosen.update(given or {})
    if chosen["start_method"] not in START_METHODS:
        raise GradckptUsageError(f"distributed: start_method={chosen['start_method']!r}; pass one of "
                                 f"{', '.join(START_METHODS)}")
    for name in ("world_size", "micro_batches"):
        if isinstance(chosen[name], bool) or not isinstance(chosen[name], int) or chosen[name] < 1:
            raise GradckptUsageError(f"distributed: {name}={chosen[name]!r}; pass an int >= 1")
    return chosen


class RankFailure(Exception):
    """A rank raised, died or hung; the message says which and how."""


class Parallel:
    """How one rank wraps the model, shards the inputs and reads full gradients."""

    def __init__(self, kind: str, rank: int, settings: dict[str, Any]):
        self.kind, self.rank, self.settings = kind, rank, settings
        self.world_size = settings["world_size"]

    def wrap(self, model: torch.nn.Module, info: ModelInfo) -> torch.nn.Module:
        if self.kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids,
                                           find_unused_parameters=self.settings["find_unused_parameters"],
                                           static_graph=self.settings["static_graph"])
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # An explicit mesh of the model's device type: left to itself FSDP2 picks CUDA whenever
        # the machine has it, also for a CPU model on gloo.
        mesh = init_device_mesh(model_device(model).type, (self.world_size,))
        for layer in info.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def micro_batches(self, scenario: Scenario) -> int:
        """Micro-batches per step: gradients are synchronised only on the last (DDP ``no_sync``)."""
        return max(scenario.micro_batches, self.settings["micro_batches"])

    def shard(self, inputs: Any) -> Any:
        """This rank's slice of the global batch (dimension 0 of every batch-sized tensor)."""
        tensors = _tensors(inputs)
        if not tensors:
            return inputs
        batch = tensors[0].shape[0] if tensors[0].dim() else 1
        if batch % self.world_size:
            raise GradckptUsageError(f"{self.kind}: the global batch of {batch} does not split evenly over "
                                     f"{self.world_size} ranks; pass a batch divisible by world_size")
        size = batch // self.world_size

        def cut(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.dim() and tensor.shape[0] == batch:
                return tensor[self.rank * size:(self.rank + 1) * size]
            return tensor

        return map_tensors(inputs, cut)

    def sync(self, runner: Any, last: bool) -> Any:
        """Gradient sync only on the last micro-batch (DDP ``no_sync``; FSDP2's switch)."""
        if last:
            return contextlib.nullcontext()
        if self.kind == "ddp":
            return runner.no_sync()
        runner.set_requires_gradient_sync(False)
        return _restore_sync(runner)

    @staticmethod
    def full_tensor(grad: Any) -> torch.Tensor:
        return grad.full_tensor() if hasattr(grad, "full_tensor") else grad


@contextlib.contextmanager
def _restore_sync(runner: Any) -> Any:
    try:
        yield
    finally:
        runner.set_requires_gradient_sync(True)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [v for v in value.values() if isinstance(v, torch.Tensor)]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


def _describe(error: BaseException) -> dict[str, Any]:
    not_applicable = isinstance(error, StrategyNotApplicable)
    return {"error": str(error) if not_applicable else f"{type(error).__name__}: {error}",
            "not_applicable": not_applicable, "usage": isinstance(error, GradckptUsageError)}


#: The fields of a :class:`Run` a rank sends back (its error travels separately, described).
MEASURED = ("loss", "grads", "buffers", "calls", "graph_calls", "reached_calls", "expected_recompute", "recomputed_units",
            "warnings", "seconds", "activation_bytes", "outputs", "cuda_peak_bytes")


def _rank_main(rank: int, store: str, stepper: Stepper, scenario: Scenario, strategy: Strategy | None,
               grad_targets: set[str] | None, results: Queue[bytes]) -> None:
    import torch.distributed as dist

    settings = stepper.distributed or DEFAULTS
    payload: dict[str, Any] = {"rank": rank}
    try:
        torch.set_num_threads(1)  # ranks share the machine's cores
        cuda = stepper.subject.device.type == "cuda"
        # One GPU per rank, as torchrun would give it; an isolated local step keeps the check's device.
        if cuda and scenario.distributed:
            stepper.subject.on_device(torch.device("cuda", rank))
            torch.cuda.set_device(rank)
        parallel = None  # an isolated local step: one process, no group
        if scenario.distributed:
            payload["launch"] = True  # until the ranks have met, a failure is the harness's
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                                    world_size=settings["world_size"], timeout=timedelta(seconds=settings["timeout"]))
            payload["launch"] = False
            parallel = Parallel(scenario.distributed, rank, settings)
        run = stepper.step(scenario, strategy, grad_targets, parallel=parallel)
        payload["fingerprint"] = _fingerprint(run.grads)
        if rank:  # rank 0 ships the gradients; the others only what proves theirs are the same
            run.grads, run.outputs, run.buffers = {}, {}, {}
        run = run.to_host()
        payload.update({key: getattr(run, key) for key in MEASURED})
        if run.error is not None:
            payload.update(_describe(run.error))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, whatever it is
        payload.update(_describe(error))
    finally:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        results.put(buffer.getvalue())
        results.close()
        results.join_thread()  # put() hands off to a feeder thread: let it finish before _exit
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
        if multiprocessing.get_start_method(allow_none=True) != "spawn":
            os._exit(0)  # a forked rank must not run the parent's atexit handlers or pytest teardown


#: Attempts at one distributed step when the launch itself fails (rendezvous, transport, a rank
#: killed from outside): such failures say nothing about the strategy.
LAUNCH_ATTEMPTS = 3
#: Messages of transport and rendezvous failures (gloo, NCCL, the store), not of the step.
TRANSPORT_FAILURES = ("connectFullMesh", "Connection closed by peer", "Connection reset by peer",
                      "Connection refused", "DistNetworkError", "Socket Timeout", "rendezvous")


class RaisedInChild(Exception):
    """An isolated step raised in its own process; ``str`` is the original ``Type: message``."""

    already_described = True


class StepCrashed(RankFailure):
    """The process running the step died of a crash signal (a fault in native code)."""


class LaunchFailure(RankFailure):
    """The harness could not run the step (ranks did not meet, a transport broke, a rank was
    killed from outside): the strategy is not to blame."""


class Launcher:
    """Runs :meth:`Stepper.step` on ``world_size`` ranks and folds their measurements into one Run.

    ``step`` has the local step's signature, so the engine treats both alike.
    """

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    def step(self, scenario: Scenario, strategy: Strategy | None, grad_targets: set[str] | None = None) -> Run:
        """One distributed step; a strategy that does not apply is skipped before any rank starts.
        Under an existing launch (torchrun), the step runs on this process's rank of that group."""
        if strategy is not None:
            stepper = self.stepper
            reason = strategy.applies_to(ModelInfo(stepper.subject.peek(), stepper.layer_names, stepper.found_by))
            if reason:
                return Run(error=StrategyNotApplicable(reason))
        if scenario.distributed and launched_from_outside():
            return step_in_existing_group(self.stepper, scenario, strategy, grad_targets)
        for _ in range(LAUNCH_ATTEMPTS):
            run = launch(self.stepper, scenario, strategy, grad_targets)
            if not isinstance(run.error, LaunchFailure):
                return run
        run.error = LaunchFailure(
            f"not judged: the distributed launch itself failed {LAUNCH_ATTEMPTS} times (a harness failure, not a "
            f"verdict on the strategy): {run.error}")
        return run


def join_launch(device: str | None) -> int | None:
    """Join the process group of an existing launch (``torchrun`` sets ``RANK`` and ``WORLD_SIZE``
    for every process it starts) unless one is running already; return this process's rank, or
    None outside a launch. On GPUs (``device`` cuda or auto with CUDA) each process takes the GPU
    of its ``LOCAL_RANK`` and the group uses NCCL; on CPU, gloo.

    Example:
        >>> join_launch("cpu") is None  # not started by torchrun
        True
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return None
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device == "auto" or str(device).startswith("cuda"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def agreed_exit_status(status: int) -> int:
    """The worst exit status of all ranks, so every rank of a launch exits alike (a CI job that
    looks at any rank sees the same verdict)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, int(status))
    failing = [s for s in everyone if s != 0]
    return max(failing) if failing else 0


def leave_launch() -> None:
    """Leave the group :func:`join_launch` joined."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def describe_ranks(settings: Mapping[str, Any], device: torch.device) -> str:
    """Where a distributed scenario's ranks run, for the report.

    Example:
        >>> describe_ranks(DEFAULTS, torch.device("cpu"))
        '2 ranks started by the check, gloo'
    """
    import torch.distributed as dist

    if launched_from_outside():
        return f"{dist.get_world_size()} ranks of the running process group (torchrun), {dist.get_backend()}"
    backend = "nccl, one GPU each" if device.type == "cuda" else "gloo"
    return f"{settings['world_size']} ranks started by the check, {backend}"


def launched_from_outside() -> bool:
    """Whether this process is a rank of a process group someone else started (torchrun, or a
    training script that called ``init_process_group``).

    Example:
        >>> launched_from_outside()
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def step_in_existing_group(stepper: Stepper, scenario: Scenario, strategy: Strategy | None,
                           grad_targets: set[str] | None) -> Run:
    """The step on this rank of the running group; every rank calls it for the same check, in the
    same order (as every rank of ``torchrun -m pytest`` runs the same tests), and every rank ends
    with the same Run: full gradients, each rank's CUDA peak, and whether the ranks agree."""
    import torch.distributed as dist

    assert scenario.distributed is not None, "only distributed scenarios step in a process group"
    settings = dict(stepper.distributed or DEFAULTS, world_size=dist.get_world_size())
    parallel = Parallel(scenario.distributed, dist.get_rank(), settings)
    run = stepper.step(scenario, strategy, grad_targets, parallel=parallel)
    # Every rank must reach the same verdict: share failures, peaks and gradient fingerprints.
    mine = {"error": None if run.error is None else _describe(run.error), "peak": run.cuda_peak_bytes,
            "fingerprint": _fingerprint(run.grads)}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [(rank, e["error"]) for rank, e in enumerate(everyone) if e["error"] is not None]
    if failed and run.error is None:
        rank, error = failed[0]
        run.error = StrategyNotApplicable(error["error"]) if error["not_applicable"] else RankFailure(
            f"rank {rank}: {error['error']}")
    if run.error is None:
        _fold_peaks(run, [e["peak"] for e in everyone])
        run.rank_disagreement = _disagreement([e["fingerprint"] for e in everyone])
    return run


def _fingerprint(grads: dict[str, Any]) -> dict[str, Any]:
    """Per gradient, numbers equal exactly when the tensors are (for practical purposes): the
    ranks compare these instead of shipping whole gradients."""
    found = [(n, g.double()) for n, g in grads.items() if g is not None]
    numbers = torch.stack([torch.stack([g.sum(), g.square().sum(), g.abs().max()]) for _, g in found]).cpu().tolist() \
        if found else []  # one transfer for all of them
    summary = {n: tuple(row) for (n, _), row in zip(found, numbers, strict=True)}
    return {n: summary.get(n) for n in grads}


def _is_transport_failure(message: str) -> bool:
    return any(marker in message for marker in TRANSPORT_FAILURES)


def launch(stepper: Stepper, scenario: Scenario, strategy: Strategy | None, grad_targets: set[str] | None) -> Run:
    """Run one step on ``world_size`` ranks started here (forked, or spawned where CUDA is
    involved), once, and fold their measurements into one Run. A scenario that is not
    distributed runs in one child process: a step isolated from this one."""
    settings = dict(stepper.distributed or DEFAULTS)
    if not scenario.distributed:  # an isolated step: the check's own per-run limit applies inside it
        settings["world_size"] = 1
        settings["timeout"] = 30 + 1.5 * (stepper.timeout or 3600)
    cuda = stepper.subject.device.type == "cuda"
    if cuda and settings["world_size"] > torch.cuda.device_count():
        raise GradckptUsageError(
            f"{scenario.name}: world_size={settings['world_size']} ranks need as many GPUs, one each, and "
            f"{torch.cuda.device_count()} are visible; pass distributed={{'world_size': "
            f"{torch.cuda.device_count()}}} or run on more GPUs")
    method = settings["start_method"]
    if method == "auto":
        # Fork is cheap and needs nothing picklable, but CUDA cannot be used in a forked child, and
        # a process whose CUDA (and so autograd's device threads) already ran cannot fork safely:
        # then spawn, which pickles the stepper.
        method = "spawn" if cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()) else "fork"
    if method == "spawn":
        try:
            pickle.dumps((stepper, scenario, strategy))
        except Exception as error:  # noqa: BLE001
            raise GradckptUsageError(
                f"{scenario.name}: ranks must be spawned here (this process already used CUDA), which needs a "
                f"picklable model, inputs, loss and strategy: {type(error).__name__}: {error}. Define them at module "
                "level (no lambdas or local classes), or run distributed checks in a process that has not used "
                "CUDA") from None
    context = multiprocessing.get_context(method)
    results = context.Queue()
    run = Run()
    with tempfile.TemporaryDirectory(prefix="gradckpt-dist-") as folder:
        store = os.path.join(folder, "store")
        ranks = [context.Process(target=_rank_main, daemon=True,
                                 args=(rank, store, stepper, scenario, strategy, grad_targets, results))
                 for rank in range(settings["world_size"])]
        for process in ranks:
            process.start()
        payloads: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + settings["timeout"]
        try:
            while len(payloads) < len(ranks):
                if time.monotonic() > deadline:
                    missing = sorted(set(range(len(ranks))) - set(payloads))
                    raise RankFailure(f"rank(s) {missing} did not finish within {settings['timeout']:g} s (hung)")
                try:
                    payload = torch.load(io.BytesIO(results.get(timeout=0.2)), weights_only=False)
                    payloads[payload["rank"]] = payload
                except queue_module.Empty:
                    dead = [r for r, p in enumerate(ranks) if r not in payloads and p.exitcode not in (None, 0)]
                    if dead:
                        raise _death(dead[0], ranks[dead[0]].exitcode, len(ranks)) from None
        except RankFailure as failure:
            run.error = failure
            return run
        finally:
            for process in ranks:
                process.join(timeout=2)
                if process.is_alive():
                    process.terminate()
                    process.join(timeout=2)
                if process.is_alive():
                    process.kill()
                    process.join()
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
        elif len(ranks) == 1:
            run.error = RaisedInChild(first["error"])
        else:
            run.error = RankFailure(f"rank {first['rank']}: {first['error']}")
        run.warnings = first.get("warnings", [])
        return run
    first = payloads[0]
    for key in MEASURED:
        setattr(run, key, first[key])
    _fold_peaks(run, [payloads[r]["cuda_peak_bytes"] for r in sorted(payloads)])
    run.rank_disagreement = _disagreement([payloads[r]["fingerprint"] for r in sorted(payloads)])
    return run


#: Signals a process sends itself when native code fails: the step's own doing. Others (SIGKILL,
#: SIGTERM) come from outside (the OOM killer, a CI runner) and say nothing about the step.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


def _death(rank: int, code: int | None, ranks: int) -> RankFailure:
    """What a rank's death means: a crash of the step (a verdict) or the launch failing (retried).

    Example:
        >>> str(_death(0, -11, 1))
        'the step crashed its process: SIGSEGV (a fault in native code)'
        >>> type(_death(1, -9, 2)).__name__
        'LaunchFailure'
    """
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        if sig in CRASH_SIGNALS:
            where = "the step crashed its process" if ranks == 1 else f"rank {rank} crashed"
            return StepCrashed(f"{where}: {sig.name} (a fault in native code)")
        return LaunchFailure(f"rank {rank} was killed by {sig.name}")
    return RankFailure(f"rank {rank} died with exit code {code}")


def _fold_peaks(run: Run, peaks: list[int | None]) -> None:
    """Every rank's CUDA peak is kept; the run's is the largest, so thresholds hold on every rank."""
    known = [p for p in peaks if p is not None]
    if len(known) == len(peaks):
        run.rank_cuda_peak_bytes = known
        run.cuda_peak_bytes = max(known)


def _disagreement(fingerprints: list[dict[str, Any]]) -> str | None:
    """Which parameter's gradient differs between ranks, if any (they must all hold the same).

    Example:
        >>> _disagreement([{"w": (1.0, 1.0, 1.0)}, {"w": (1.0, 1.0, 1.0)}]) is None
        True
        >>> _disagreement([{"w": (1.0, 1.0, 1.0)}, {"w": None}])
        'rank 1 holds a different gradient for w than rank 0'
    """
    for rank, theirs in enumerate(fingerprints[1:], start=1):
        for name, value in fingerprints[0].items():
            if theirs.get(name) != value:
                return f"rank {rank} holds a different gradient for {name} than rank 0"
    return None
