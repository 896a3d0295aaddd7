"""Distributed scenarios (``ddp``, ``fsdp2``) on torch.distributed itself, never an imitation.

What one rank does: :class:`Parallel` wraps the model in ``DistributedDataParallel`` or
``fully_shard`` (after the strategy is applied, as in training), gives the rank its shard of the
global batch and gathers full gradients. The ranks are started once per check by
:mod:`pytest_gradckpt.ranks.launcher` (which runs every step in them, see :mod:`pytest_gradckpt.ranks.rank_group`),
or are those of a launch someone else started (torchrun): :func:`step_in_existing_group`.

The judge compares against the same distributed setup without checkpointing (same ranks,
same seeds, so dropout masks match) and requires every rank to hold the same gradients.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Mapping
from typing import Any

import torch

from pytest_gradckpt.pipeline.subject import model_device
from pytest_gradckpt.pipeline.process_state import cuda_present
from pytest_gradckpt.pipeline.tensors import map_tensors, tensors_in
from pytest_gradckpt.errors import GradckptUsageError, HarnessFailure, StrategyNotApplicable
from pytest_gradckpt.pipeline.units import ModelInfo
from pytest_gradckpt.probes import registry
from pytest_gradckpt.pipeline.runs import Run, Stepper
from pytest_gradckpt.pipeline.scenarios import Scenario
from pytest_gradckpt.settings import DISTRIBUTED_DEFAULTS, check_distributed
from pytest_gradckpt.strategies import Strategy

#: Settable through ``check(..., distributed={...})``; validated by :func:`pytest_gradckpt.settings.check_distributed`.
DEFAULTS: dict[str, Any] = DISTRIBUTED_DEFAULTS


def options(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate ``distributed=`` settings (kept for callers outside the package; the check's own
    validation is :class:`~pytest_gradckpt.spec.CheckSpec`'s).

    Example:
        >>> options({"static_graph": True})["world_size"]
        2
    """
    return check_distributed(given)


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

    def unwrap(self, runner: Any) -> bool:
        """After a run: undo what :meth:`wrap` left outside the model's modules, so the model's working
        copy can serve the next run (:mod:`pytest_gradckpt.pipeline.reused_copy` restores the modules,
        and FSDP2's record of them). DDP's reducer keeps hooks on every parameter's gradient
        accumulator until it is freed (a reference cycle may keep it past the run): they are removed
        here, as torch does to recover a failed DDP. False when that could not be done: the copy is
        then not reused.

        Example:
            >>> Parallel("fsdp2", 0, DEFAULTS).unwrap(torch.nn.Linear(1, 1))  # nothing outside the modules
            True
        """
        if self.kind != "ddp":
            return True
        remove = getattr(runner, "_remove_autograd_hooks", None)
        if remove is None:
            return False
        try:
            remove()
        except Exception:  # noqa: BLE001 - hooks that may still be there: a new copy is the answer
            return False
        return True

    def micro_batches(self, scenario: Scenario) -> int:
        """Micro-batches per step: gradients are synchronised only on the last (DDP ``no_sync``)."""
        return max(scenario.micro_batches, self.settings["micro_batches"])

    def shard(self, inputs: Any) -> Any:
        """This rank's slice of the global batch: dimension 0 of every tensor, at any depth of
        nested mappings and sequences, whose first dimension is the batch (the first tensor's).

        Example:
            >>> ranks = [Parallel("ddp", rank, DEFAULTS) for rank in (0, 1)]
            >>> [r.shard({"x": {"ids": torch.arange(4)}, "n": [torch.zeros(4, 2)]})["x"]["ids"].tolist()
            ...  for r in ranks]
            [[0, 1], [2, 3]]
        """
        batch = _batch_size(inputs)
        if batch is None:
            return inputs
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
        """The whole of a (sharded) gradient on every rank. FSDP2's dimension-0 shards are
        gathered with a plain ``all_gather``, not ``DTensor.full_tensor()``: that goes through
        functional collectives (``AsyncCollectiveTensor``), which need nothing here and are
        what the issue-21 crash (SIGSEGV in ``AsyncCollectiveTensor.__new__``) came through."""
        placements = getattr(grad, "placements", None)
        if placements is None:
            return grad
        local = getattr(grad, "_local_tensor", None)
        if local is None or len(placements) != 1 or not placements[0].is_shard(0) or grad.dim() == 0:
            return grad.full_tensor()  # other layouts: torch's general path
        return _gather_dim0(local, tuple(grad.shape), grad.device_mesh.get_group())


@contextlib.contextmanager
def _restore_sync(runner: Any) -> Any:
    try:
        yield
    finally:
        runner.set_requires_gradient_sync(True)


def _batch_size(inputs: Any) -> int | None:
    """The first dimension of the first tensor found (depth first, as :func:`map_tensors` walks).

    Example:
        >>> _batch_size({"kwargs": {"x": torch.zeros(6, 2)}}), _batch_size({"n": 3})
        (6, None)
    """
    found = tensors_in(inputs)
    if not found:
        return None
    return found[0].shape[0] if found[0].dim() else 1


def _gather_dim0(local: torch.Tensor, shape: tuple[int, ...], group: Any) -> torch.Tensor:
    """The full tensor of ``shape`` from every rank's ``torch.chunk`` piece along dimension 0
    (FSDP2's sharding): pieces are padded to the largest chunk, gathered, and trimmed."""
    import torch.distributed as dist

    world_size = dist.get_world_size(group)
    if world_size == 1:  # one rank's shard is the whole tensor
        return local.reshape(shape)
    chunk = math.ceil(shape[0] / world_size)
    sizes = [max(0, min(chunk, shape[0] - rank * chunk)) for rank in range(world_size)]
    padded = local.new_zeros((chunk, *shape[1:]))
    padded[:local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(pieces, padded, group=group)
    return torch.cat([piece[:size] for piece, size in zip(pieces, sizes, strict=True)])


def describe_exception(error: BaseException) -> dict[str, Any]:
    """How a rank reports an exception to the process that judges.

    Example:
        >>> describe_exception(ValueError("bad"))
        {'error': 'ValueError: bad', 'not_applicable': False, 'usage': False}
    """
    not_applicable = isinstance(error, StrategyNotApplicable)
    return {"error": str(error) if not_applicable else f"{type(error).__name__}: {error}",
            "not_applicable": not_applicable, "usage": isinstance(error, GradckptUsageError)}


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


class LaunchFailure(RankFailure, HarnessFailure):
    """The harness could not run the step (ranks did not meet, a transport broke, a rank was
    killed from outside): the strategy is not to blame."""


class RankNeverStarted(RankFailure, HarnessFailure):
    """A rank's process ended by itself before it started serving the check: it never ran the model.
    Not retried: what ends a process there (a spawned rank that cannot import the check's code, or
    that runs an unguarded main script again) ends the next one too."""


class RankTimeout(RankFailure, HarnessFailure):
    """A rank outlived its time limit: nothing was judged (``error: not judged: ...``)."""


def launch_environment() -> bool:
    """Whether this process was started by a launcher that set up a world for it: ``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set (torchrun sets them for every
    process it starts, ``--nproc-per-node 1`` included). Reads only the environment.

    Example:
        >>> launch_environment()  # not started by torchrun
        False
    """
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def join_launch(device: str | None) -> int | None:
    """Join the process group of an existing launch (``torchrun`` sets ``RANK`` and ``WORLD_SIZE``
    for every process it starts, a world of one included) unless one is running already; return
    this process's rank, or None outside a launch. Where the machine has CUDA and ``device`` is not
    cpu, each process takes the GPU of its ``LOCAL_RANK``; the backend is :func:`launch_backend`'s.

    Example:
        >>> join_launch("cpu") is None  # not started by torchrun
        True
    """
    import torch.distributed as dist

    if not launch_environment() and not dist.is_initialized():
        return None
    if not dist.is_initialized():
        backend = launch_backend(device, torch.cuda.is_available())
        if "nccl" in backend:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank()


def launch_backend(device: str | None, cuda: bool) -> str:
    """The backend of the group a launch's process joins: gloo without CUDA or for ``device`` cpu,
    NCCL for ``device`` cuda or auto; where the device is left to the model (None), gloo for CPU
    tensors and NCCL for CUDA ones, since a session may check models of both and only the tests
    know which. Left to gloo alone, a GPU model's collectives went through gloo on the GPU of
    ``LOCAL_RANK`` 0 in every process (``torchrun -m pytest --gradckpt`` on an H200, issue 30).

    Example:
        >>> launch_backend(None, cuda=True), launch_backend("cuda", cuda=True), launch_backend(None, cuda=False)
        ('cpu:gloo,cuda:nccl', 'nccl', 'gloo')
    """
    if not cuda or (device is not None and not (str(device) == "auto" or str(device).startswith("cuda"))):
        return "gloo"
    return "cpu:gloo,cuda:nccl" if device is None else "nccl"


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


def describe_ranks(settings: Mapping[str, Any], device: torch.device, spawned: str | None = None) -> str:
    """Where a distributed scenario's ranks run, for the report; ``spawned``: why the check's ranks
    were spawned, not forked (None: forked).

    Example:
        >>> describe_ranks(DEFAULTS, torch.device("cpu"))
        '2 ranks started by the check, gloo'
        >>> describe_ranks(DEFAULTS, torch.device("cpu"), "spawned, as asked")
        '2 ranks started by the check, gloo; spawned, as asked'
    """
    import torch.distributed as dist

    if launched_from_outside():
        return f"{_ranks(dist.get_world_size())} of the running process group (torchrun), {dist.get_backend()}"
    backend = "nccl, one GPU each" if device.type == "cuda" else "gloo"
    return f"{_ranks(settings['world_size'])} started by the check, {backend}" + (f"; {spawned}" if spawned else "")


def _ranks(count: int) -> str:
    return f"{count} rank" if count == 1 else f"{count} ranks"


def launched_from_outside() -> bool:
    """Whether this process is a rank of a process group someone else started (torchrun, or a
    training script that called ``init_process_group``), whatever its size: a launch of one
    rank is that rank's world too, and the check runs in it rather than starting ranks of its own.

    Example:
        >>> launched_from_outside()
        False
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def device_before_build(model: Any, device: Any) -> torch.device | None:
    """The check's device where it is known without building the model: the one named, or the
    given module's; None for a factory left to choose (or a device the subject will refuse).

    Example:
        >>> device_before_build(lambda: None, "cpu"), device_before_build(torch.nn.Linear(1, 1), None)
        (device(type='cpu'), device(type='cpu'))
    """
    if device is None:
        return model_device(model) if isinstance(model, torch.nn.Module) else None
    if device == "auto":
        return torch.device("cuda") if cuda_present() else torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        return None


def refuse_unrunnable_world(settings: Mapping[str, Any], device: torch.device | None) -> None:
    """Before anything is built: self-started ranks on GPUs need one GPU each. ``device`` is the
    check's device where it is known without building the model (None: learnt later, and
    checked again when the ranks start).

    Example:
        >>> refuse_unrunnable_world(DEFAULTS, torch.device("cpu"))  # gloo ranks share the CPU
    """
    if device is None or device.type != "cuda" or launched_from_outside():
        return
    visible = torch.cuda.device_count()
    if settings["world_size"] > visible:
        raise GradckptUsageError(
            f"world_size={settings['world_size']} ranks need as many GPUs, one each, and {visible} are visible; "
            f"pass distributed={{'world_size': {visible}}}, run on more GPUs, or launch with "
            f"torchrun --nproc-per-node N (the check then runs in torchrun's world)")


def step_in_existing_group(stepper: Stepper, scenario: Scenario, strategy: Strategy | None,
                           grad_targets: set[str] | None) -> Run:
    """The step on this rank of the running group; every rank calls it for the same check, in the
    same order (as every rank of ``torchrun -m pytest`` runs the same tests), and every rank ends
    with the same Run: full gradients, each rank's CUDA peak, and whether the ranks agree."""
    import torch.distributed as dist

    assert scenario.distributed is not None, "only distributed scenarios step in a process group"
    settings = dict(stepper.distributed or DEFAULTS, world_size=dist.get_world_size())
    parallel = Parallel(scenario.distributed, dist.get_rank(), settings)
    stepper.subject.keep_template_on_device()  # once per check: later runs copy it, none builds again
    run = stepper.step(scenario, strategy, grad_targets, parallel=parallel)
    # Every rank must reach the same verdict: share failures, measurements and gradient fingerprints.
    mine = {"error": None if run.error is None else describe_exception(run.error),
            "measured": registry.to_host(run.measured), "fingerprint": fingerprint(run.grads)}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [(rank, e["error"]) for rank, e in enumerate(everyone) if e["error"] is not None]
    if failed and run.error is None:
        rank, error = failed[0]
        run.error = StrategyNotApplicable(error["error"]) if error["not_applicable"] else RankFailure(
            f"rank {rank}: {error['error']}")
    if run.error is None:
        run.measured = registry.merge(run.measured, [registry.from_host(e["measured"]) for e in everyone])
        run.rank_disagreement = disagreement([e["fingerprint"] for e in everyone])
    return run


def fingerprint(grads: dict[str, Any]) -> dict[str, Any]:
    """Per gradient, numbers equal exactly when the tensors are (for practical purposes): the
    ranks compare these instead of shipping whole gradients.

    Example:
        >>> fingerprint({"w": torch.tensor([1.0, -2.0]), "frozen": None})
        {'w': (-1.0, 5.0, 2.0), 'frozen': None}
    """
    found = [(n, g.double()) for n, g in grads.items() if g is not None]
    numbers = torch.stack([torch.stack([g.sum(), g.square().sum(), g.abs().max()]) for _, g in found]).cpu().tolist() \
        if found else []  # one transfer for all of them
    summary = {n: tuple(row) for (n, _), row in zip(found, numbers, strict=True)}
    return {n: summary.get(n) for n in grads}


def _is_transport_failure(message: str) -> bool:
    return any(marker in message for marker in TRANSPORT_FAILURES)


#: Signals a process sends itself when native code fails: the step's own doing. Others (SIGKILL,
#: SIGTERM) come from outside (the OOM killer, a CI runner) and say nothing about the step.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}


def death(rank: int, code: int | None, ranks: int, started: bool = True) -> RankFailure:
    """What a rank's death means: a crash of the step (a verdict) or the launch failing (retried).
    A rank that ended before it ``started`` serving never ran a step of the model: killed, its
    launch failed (retried); ended by itself, it could not start (:class:`RankNeverStarted`).

    Example:
        >>> str(death(0, -11, 1))
        'the step crashed its process: SIGSEGV (a fault in native code)'
        >>> type(death(1, -9, 2)).__name__
        'LaunchFailure'
        >>> str(death(0, 0, 1))  # a step that raises is answered, even SystemExit: this is the harness's
        'rank 0 ended without answering (exit code 0)'
        >>> type(death(0, 1, 1, started=False)).__name__, type(death(0, -9, 1, started=False)).__name__
        ('RankNeverStarted', 'LaunchFailure')
    """
    if not started and code is not None and code < 0:  # killed from outside: the launch's failure, retried
        return LaunchFailure(f"rank {rank} was killed by {signal.Signals(-code).name} before it started")
    if not started:
        return RankNeverStarted(
            f"not judged: rank {rank} ended before it could start serving the check (exit code {code}). A spawned "
            "rank imports the check's model factory, inputs and loss by module name, and runs the main script "
            "again unless its code is under `if __name__ == '__main__':`; the rank's traceback on stderr says what "
            "failed. Guard the script and define those at module level, or let the ranks fork: do not use CUDA in "
            "this process before the check (torch.cuda.device_count() leaves it unused)")
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        if sig in CRASH_SIGNALS:
            where = "the step crashed its process" if ranks == 1 else f"rank {rank} crashed"
            return StepCrashed(f"{where}: {sig.name} (a fault in native code)")
        return LaunchFailure(f"rank {rank} was killed by {sig.name}")
    if code == 0:
        return LaunchFailure(f"rank {rank} ended without answering (exit code 0)")
    return RankFailure(f"rank {rank} died with exit code {code}")


def disagreement(fingerprints: list[dict[str, Any]]) -> str | None:
    """Which parameter's gradient differs between ranks, if any (they must all hold the same).

    Example:
        >>> disagreement([{"w": (1.0, 1.0, 1.0)}, {"w": (1.0, 1.0, 1.0)}]) is None
        True
        >>> disagreement([{"w": (1.0, 1.0, 1.0)}, {"w": None}])
        'rank 1 holds a different gradient for w than rank 0'
    """
    for rank, theirs in enumerate(fingerprints[1:], start=1):
        for name, value in fingerprints[0].items():
            if theirs.get(name) != value:
                return f"rank {rank} holds a different gradient for {name} than rank 0"
    return None
