"""Rank processes that live for a whole check.

The ranks start once, meet once (a file store in a fresh temporary directory, so no port has
to be found or can be raced for), and then run every step the check asks for (the two
baseline runs and every strategy, under every distributed scenario) as commands, each
answered with what the rank measured. Ranks are forked (no re-import, nothing pickled), GPU
ranks included while this process has not initialised CUDA; spawned once it has (a process forked
after CUDA was initialised cannot use it, nor can autograd's device threads survive the fork).
A fork refused for that reason (:data:`FORK_REFUSED`) is a launch failure: the launcher retries,
spawning.

A group may also build the model itself (:class:`StepperRecipe`): the ranks of a check whose
every step runs on them build it once each, and send back its :func:`skeleton` (the modules,
their tensors on the meta device) for the checking process to read layers and names from.

Each command has a time limit (:class:`TimeLimit`): the caller's fixed one, or one that
scales with what was measured. A rank that outlives it, dies, or fails in a way that may
leave its peers inside a collective ends the group: every rank is killed, none is left
behind, and the next command starts a fresh group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import multiprocessing
import os
import pickle
import queue as queue_module
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from pytest_gradckpt.ranks import held, overlapped_imports
from pytest_gradckpt.ranks.distributed import Parallel, RankTimeout, death, describe_exception, fingerprint
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.probes import registry
from pytest_gradckpt.pipeline.runs import Stepper
from pytest_gradckpt.pipeline.process_state import (
    cuda_fork_refused,
    leave_to_refcounting_for_good,
    note_cuda_fork_refused,
)
from pytest_gradckpt.strategies.checkpoint_functions import warm_up

#: What a forked GPU rank answers when it cannot use CUDA (this process had initialised the CUDA
#: driver, e.g. through ``torch.cuda.is_available()``, before the fork); later groups of this process
#: spawn (:func:`~pytest_gradckpt.pipeline.process_state.note_cuda_fork_refused`).
FORK_REFUSED = "a forked rank cannot use CUDA (this process initialised it before the fork)"

#: The first command's limit covers starting the ranks, importing, meeting and building the
#: model: this many seconds, plus BUILD_FACTOR times the model's build measured here.
FIRST_FLOOR = 300.0
BUILD_FACTOR = 10.0
#: Ranks that build the model themselves (``build`` command): nothing was measured yet, and a
#: factory building a large model on the CPU may take minutes (the 1.1B Llama in bf16: 31 s).
BUILD_FLOOR = 1800.0
#: Later commands: STEP_FACTOR times the slowest command so far (build and step), at least FLOOR.
FLOOR = 120.0
STEP_FACTOR = 5.0
#: After one rank reported a failure, the others get this long (at least) to report theirs
#: before they are taken to be stuck in a collective the failed rank never joined.
GRACE = 10.0


@dataclasses.dataclass
class TimeLimit:
    """How long a command may take: ``fixed`` (the caller's ``distributed={"timeout": s}``), or
    a limit that scales with what was measured.

    Example:
        >>> limit = TimeLimit(fixed=None, build_seconds=2.0)
        >>> limit.seconds()
        320.0
        >>> limit.measured(100.0); limit.seconds()
        500.0
        >>> TimeLimit(fixed=8.0, build_seconds=2.0).explain()
        "distributed={'timeout': 8}"
    """

    fixed: float | None
    build_seconds: float
    slowest: float = 0.0  # the slowest command so far, on its slowest rank
    #: the first command's own allowance (BUILD_FLOOR where the ranks build the model in it; else FIRST_FLOOR)
    first_floor: float | None = None

    def measured(self, seconds: float) -> None:
        self.slowest = max(self.slowest, seconds)

    def seconds(self) -> float:
        if self.fixed is not None:
            return self.fixed
        if not self.slowest:
            return (FIRST_FLOOR if self.first_floor is None else self.first_floor) + BUILD_FACTOR * self.build_seconds
        return max(FLOOR, STEP_FACTOR * self.slowest)

    def explain(self) -> str:
        if self.fixed is not None:
            return f"distributed={{'timeout': {self.fixed:g}}}"
        if not self.slowest:
            if self.first_floor is not None:
                return f"the limit for starting the ranks and building the model there: {self.first_floor:g} s"
            return (f"the first step's limit: {FIRST_FLOOR:g} s for starting the ranks plus {BUILD_FACTOR:g} x the "
                    f"model's build here ({self.build_seconds:.1f} s)")
        return f"{STEP_FACTOR:g} x the slowest step so far ({self.slowest:.1f} s, model build included), at least " \
               f"{FLOOR:g} s"


class _Picklability(pickle.Pickler):
    """Pickles everything but tensors' data: whether spawning can hand the ranks what they
    need, without serialising a billion weights to find out (they travel as shared memory)."""

    def persistent_id(self, obj: Any) -> Any:
        return id(obj) if isinstance(obj, torch.Tensor) else None


def why_spawned(chosen: str, cuda: bool) -> str | None:
    """Why a group's ranks are spawned, for the report; None when they are forked where that is
    safe (the usual, cheap way: no re-import, nothing pickled). They are spawned as asked, once CUDA
    was initialised in this process, or once a forked GPU rank found it could not use CUDA
    (``cuda``: the group's ranks use it). Spawning re-imports torch and the model's library in
    every rank: seconds a user can often save, hence the reason and the remedy.

    Example:
        >>> why_spawned("auto", cuda=False), why_spawned("auto", cuda=True), why_spawned("fork", cuda=True)
        (None, None, None)
        >>> why_spawned("spawn", cuda=False)
        "spawned, as distributed={'start_method': 'spawn'} asks"
    """
    if chosen != "auto":
        return "spawned, as distributed={'start_method': 'spawn'} asks" if chosen == "spawn" else None
    # Autograd's device threads do not survive a fork once CUDA ran in this process.
    if torch.cuda.is_initialized():
        return "spawned: this process had used CUDA before the ranks started, and a forked rank cannot"
    if cuda and cuda_fork_refused():
        return ("spawned: a forked rank could not use CUDA, which this process had started before the check "
                "(torch.cuda.is_available() starts it, unless PYTORCH_NVML_BASED_CUDA_CHECK=1; "
                "torch.cuda.device_count() does not where NVML answers)")
    return None


class StepperRecipe:
    """How a rank makes the check's stepper itself, building the model there: ``make()`` returns
    the :class:`~pytest_gradckpt.pipeline.runs.Stepper` (its subject's first model built by the factory).
    A group handed a recipe answers its first command, ``("build", ...)``, with rank 0's
    :func:`skeleton` of the model and the layer names found on it."""

    def __init__(self, make: Any):
        self.make = make


class _Skeleton(pickle.Pickler):
    """Pickles a module with every tensor in it replaced by a meta tensor of its shape and dtype."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return _meta_tensor, (tuple(obj.shape), obj.dtype, obj.requires_grad, isinstance(obj, torch.nn.Parameter))
        return NotImplemented


def _meta_tensor(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool, parameter: bool) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype, device="meta")
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad)


def skeleton(model: torch.nn.Module) -> bytes:
    """``model`` pickled with its tensors on the meta device: its modules, names, shapes, dtypes
    and which parameters train, at the size of its structure (no weights travel).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
        >>> _ = net[1].weight.requires_grad_(False)
        >>> copy = pickle.loads(skeleton(net))
        >>> copy[0].weight.device.type, tuple(copy[0].weight.shape), copy[1].weight.requires_grad
        ('meta', (3, 2), False)
    """
    buffer = io.BytesIO()
    _Skeleton(buffer).dump(model)
    return buffer.getvalue()


class RankGroup:
    """``world_size`` processes that each hold the stepper and run commands until closed.

    ``catalog``: the scenarios and strategies the check will use, handed over when the ranks
    start (so with fork nothing needs to be picklable); a command names them by position.
    ``forms_group``: whether the ranks join one process group (distributed scenarios), or run
    alone (a step isolated from the caller's process).
    """

    def __init__(self, stepper: Stepper | StepperRecipe, catalog: Sequence[Any], world_size: int, forms_group: bool,
                 settings: dict[str, Any], device: torch.device):
        self.stepper, self.catalog, self.world_size = stepper, list(catalog), world_size
        self.device = device
        self.forms_group, self.settings = forms_group, settings
        self.processes: list[Any] = []
        self.sequence = 0
        self.folder = ""
        #: held runs the judging process let go of, freed with the next command
        self.released: list[int] = []
        #: the size of every payload received, in bytes (what crossed from the ranks)
        self.payload_bytes: list[int] = []
        #: why the ranks were spawned (:func:`why_spawned`), None when forked or not started
        self.spawned: str | None = None
        #: the ranks that said they started serving: one that ends before saying so never ran the model
        self.started: set[int] = set()

    @property
    def running(self) -> bool:
        return bool(self.processes)

    def start(self) -> None:
        cuda = self.device.type == "cuda"
        self.spawned = why_spawned(self.settings["start_method"], cuda)
        method = "spawn" if self.spawned else "fork"
        if method == "spawn":
            try:
                _Picklability(io.BytesIO()).dump((self.stepper, self.catalog))
            except Exception as error:  # noqa: BLE001
                raise GradckptUsageError(
                    f"ranks must be spawned here (this process already used CUDA), which needs a picklable model, "
                    f"inputs, loss and strategies: {type(error).__name__}: {error}. Define them at module level (no "
                    "lambdas or local classes), or run distributed checks in a process that has not used CUDA"
                ) from None
        context: Any = multiprocessing.get_context(method)  # typeshed's BaseContext lacks Process
        self.results = context.Queue()
        self.commands = [context.Queue() for _ in range(self.world_size)]
        self.folder = tempfile.mkdtemp(prefix="gradckpt-dist-")
        store = os.path.join(self.folder, "store") if self.forms_group else ""
        self.processes = [context.Process(target=serve, daemon=True,
                                          args=(rank, self.world_size, store, self.stepper, self.catalog,
                                                self.commands[rank], self.results, self.settings, method == "fork",
                                                self.device))
                          for rank in range(self.world_size)]
        for process in self.processes:
            process.start()

    def run(self, command: tuple[Any, ...], limit: TimeLimit, what: str,
            on_imports: Callable[[list[str]], object] | None = None) -> dict[int, dict[str, Any]]:
        """Every rank's payload for ``command`` (``("step", run_id, body)`` or ``("call", None,
        (function, args))``); raises :class:`RankFailure` (the group is then unusable: close it)
        when a rank dies or outlives ``limit``. Held runs let go of since the last command are
        freed first. A building rank's word that it begins to import modules goes to
        ``on_imports`` (default :func:`~pytest_gradckpt.ranks.overlapped_imports.follow`)."""
        self.sequence += 1
        released = []
        while self.released:  # popped one by one: a release the garbage collector adds meanwhile is not lost
            released.append(self.released.pop())
        for commands in self.commands:
            commands.put((self.sequence, (*command, released)))
        seconds = limit.seconds()
        deadline = time.monotonic() + seconds
        payloads: dict[int, dict[str, Any]] = {}
        while len(payloads) < self.world_size:
            if time.monotonic() > deadline:
                if any("error" in p for p in payloads.values()):
                    break  # a failed rank left the others waiting in a collective: its error is the news
                missing = sorted(set(range(self.world_size)) - set(payloads))
                raise RankTimeout(f"not judged: rank(s) {missing} did not finish {what} within {seconds:g} s (hung; "
                                  f"the limit is {limit.explain()}). A harness failure, not a verdict: raise the "
                                  "limit with distributed={'timeout': seconds} if the model needs longer")
            try:
                received = self.results.get(timeout=0.2)
                payload = torch.load(io.BytesIO(received), weights_only=False)
            except queue_module.Empty:
                dead = [r for r, p in enumerate(self.processes) if r not in payloads and p.exitcode is not None]
                if dead:
                    raise death(dead[0], self.processes[dead[0]].exitcode, self.world_size,
                                started=dead[0] in self.started) from None
                continue
            if "started" in payload:  # a word, not what a command sent back
                self.started.add(payload["rank"])
                continue
            self.payload_bytes.append(len(received))
            if "imports" in payload:  # news from a rank that builds: import meanwhile, then wait on
                (on_imports or overlapped_imports.follow)(payload["imports"])
                continue
            if payload.get("fork_refused"):
                note_cuda_fork_refused()  # the launcher's retry spawns
            if payload["sequence"] != self.sequence:
                continue  # an answer to an earlier command (cannot happen while groups are closed on failure)
            payloads[payload["rank"]] = payload
            if "error" in payload and not payload.get("not_applicable"):
                deadline = min(deadline, time.monotonic() + max(GRACE, 2 * limit.slowest))
        return payloads

    def close(self, wait: bool = True) -> None:
        """Stop every rank (asked to finish, then by force; at once without ``wait``, for a
        group that failed) and remove the store; no process is left."""
        for commands in getattr(self, "commands", []):
            with contextlib.suppress(Exception):
                commands.put(None)
        for process in self.processes:
            process.join(timeout=5 if wait else 0.1)
            if process.is_alive():
                process.terminate()
                process.join(timeout=2)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = ""


def _fork_unusable(device: torch.device) -> str | None:
    """Why this forked rank cannot train on ``device`` (None: it can). torch refuses CUDA in a child
    forked after the parent initialised it, and autograd in one forked after the parent's first
    backward (which asks the CUDA runtime for its devices); neither is visible from the parent,
    so the rank tries both once, on a toy tensor."""
    if device.type != "cuda":
        return None
    if torch.cuda._is_in_bad_fork():
        return FORK_REFUSED
    try:
        if device.index is not None:
            torch.cuda.set_device(device)
        (torch.ones(1, device=device, requires_grad=True) * 2).sum().backward()
    except Exception as error:  # noqa: BLE001 - any failure here is the fork's: a spawned rank starts clean
        return f"{FORK_REFUSED}: {type(error).__name__}: {error}"[:500]
    return None


def _set_up(rank: int, store_path: str, stepper: Stepper | StepperRecipe, forked: bool, device: torch.device,
            state: dict[str, Any]) -> None:
    """The rank's device: one GPU per rank, as torchrun gives it (an isolated step keeps the check's
    device); a forked rank that cannot use it says so (``state["refused"]``)."""
    cuda = device.type == "cuda"
    own = torch.device("cuda", rank) if cuda and store_path else device
    refused = _fork_unusable(own) if forked else None
    if refused:
        state["refused"] = refused  # answered to the first command: a launch failure, retried spawning
        return
    if cuda and store_path:
        torch.cuda.set_device(rank)
        if isinstance(stepper, Stepper):
            stepper.subject.on_device(own)
    if isinstance(stepper, Stepper):  # the model is here already (a recipe builds it in its first command)
        leave_to_refcounting_for_good()
    warm_up()  # a no-op where forked from a warmed process; the check warms up only when it steps itself


def serve(rank: int, world_size: int, store_path: str, stepper: Stepper | StepperRecipe, catalog: list[Any],
          commands: Any, results: Any, settings: dict[str, Any], forked: bool, device: torch.device) -> None:
    """A rank's life: set up once, then run steps until told to stop (None)."""
    import torch.distributed as dist

    state: dict[str, Any] = {"stepper": stepper}
    try:
        _send(results, rank, 0, {"started": True})  # from here on, a death is this rank's work, not its launch
        cuda = device.type == "cuda"
        # CPU ranks share the machine's cores; GPU ranks get a share each, for building the model.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size) if cuda else 1)
        try:
            _set_up(rank, store_path, stepper, forked, device, state)
        except Exception as error:  # noqa: BLE001 - answered to the first command, not lost with the process
            state["set_up_failed"] = describe_exception(error)
        parent = os.getppid()
        store: dict[int, dict[str, Any]] = {}  # rank 0's held runs: run id -> field -> name -> tensor
        while True:
            try:
                item = commands.get(timeout=5)
            except queue_module.Empty:
                if os.getppid() != parent:  # the checking process is gone: do not outlive it
                    break
                continue
            if item is None:
                break
            sequence, command = item
            payload = _answer(rank, world_size, store_path, state, catalog, command, settings, store,
                              functools.partial(_send, results, rank, sequence))
            _send(results, rank, sequence, payload)
    finally:
        results.close()
        results.join_thread()  # put() hands off to a feeder thread: let it finish before _exit
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
        if forked:
            os._exit(0)  # a forked rank must not run the parent's atexit handlers or pytest teardown


def _send(results: Any, rank: int, sequence: int, payload: dict[str, Any]) -> None:
    """Put ``payload`` on the results queue, as the answer of this rank to command ``sequence``."""
    buffer = io.BytesIO()
    torch.save({**payload, "rank": rank, "sequence": sequence}, buffer)
    results.put(buffer.getvalue())


def _answer(rank: int, world_size: int, store_path: str, state: dict[str, Any], catalog: list[Any],
            command: tuple[Any, ...], settings: dict[str, Any], store: dict[int, dict[str, Any]],
            tell: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One command on this rank, as a payload: what was measured, or what went wrong. ``state``:
    the rank's stepper (or the recipe it builds it from, until the ``build`` command); ``tell``
    sends the checking process news before the payload (``{"imports": [...]}``)."""

    payload: dict[str, Any] = {"rank": rank, "pid": os.getpid()}
    started = time.perf_counter()
    try:
        kind, run_id, body, released = command
        for gone in released:
            store.pop(gone, None)
        stepper = state["stepper"]
        if "refused" in state:
            payload.update(error=state["refused"], launch=True, fork_refused=True)
        elif "set_up_failed" in state:
            payload.update(state["set_up_failed"], launch=True)
        elif kind == "build":
            _build(payload, rank, store_path, state, tell)
        elif isinstance(stepper, StepperRecipe):
            raise RuntimeError("the ranks were asked to step before they built the model")
        elif kind == "call":  # a function of held tensors (a comparison): computed here, its result sent
            function, args = body
            payload["value"] = function(*(held.resolve(a, store) for a in args)) if rank == 0 else None
        else:
            _step(payload, rank, world_size, store_path, stepper, catalog, body, settings, store, run_id)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, whatever it is
        payload.update(describe_exception(error))
    payload["wall"] = time.perf_counter() - started
    return payload


def _build(payload: dict[str, Any], rank: int, store_path: str, state: dict[str, Any],
           tell: Callable[[dict[str, Any]], None]) -> None:
    """The ``build`` command: this rank makes its stepper from the recipe (the factory runs here,
    once), keeps the model on its device for the runs to copy, and rank 0 sends the skeleton.
    Rank 0 tells the checking process which model libraries it begins to import, so that it
    imports them meanwhile (:mod:`~pytest_gradckpt.ranks.overlapped_imports`)."""
    reporting = overlapped_imports.ReportingImports(lambda name: tell({"imports": [name]}))
    with reporting if rank == 0 else contextlib.nullcontext():
        stepper = state["stepper"].make()
    if store_path and stepper.subject.device.type == "cuda":  # the GPU serve chose for this rank
        stepper.subject.on_device(torch.device("cuda", rank))
    built = stepper.subject.peek()
    payload["built"] = {"build_seconds": stepper.subject.build_seconds, "layer_names": stepper.layer_names}
    if rank == 0:
        try:
            payload["built"]["skeleton"] = skeleton(built)
        except Exception as error:  # noqa: BLE001 - the checking process then builds one of its own
            payload["built"]["skeleton_error"] = f"{type(error).__name__}: {error}"
    stepper.subject.keep_template_on_device()
    leave_to_refcounting_for_good()  # the runs' collections then pass over what they made, not the model
    state["stepper"] = stepper


def _step(payload: dict[str, Any], rank: int, world_size: int, store_path: str, stepper: Stepper,
          catalog: list[Any], body: tuple[Any, ...], settings: dict[str, Any], store: dict[int, dict[str, Any]],
          run_id: int) -> None:
    """The step; rank 0 keeps its tensors in ``store`` and sends stand-ins (:mod:`pytest_gradckpt.ranks.held`)."""
    scenario_ref, strategy_ref, grad_targets, determinism, probes = body
    scenario, strategy = _resolve(catalog, scenario_ref), _resolve(catalog, strategy_ref)
    _follow(determinism)
    parallel = None
    if store_path:
        _meet(payload, rank, world_size, store_path, stepper, settings)
        parallel = Parallel(scenario.distributed, rank, dict(settings, world_size=world_size))
    stepper.subject.keep_template_on_device()  # once: later runs copy it where they run
    with registry.using(*probes, only=True):  # the probes in force where the check runs
        run = stepper.step(scenario, strategy, grad_targets, parallel=parallel)
        # The ranks prove they hold the same gradients by fingerprints; one rank has no peer to agree with.
        payload["fingerprint"] = fingerprint(run.grads) if world_size > 1 else {}
        if rank == 0 and run.error is None and held.worth_holding(run):
            store[run_id] = {field: getattr(run, field) for field in held.FIELDS}
            for field, stand_ins in held.keep(run_id, store[run_id]).items():
                setattr(run, field, stand_ins)
        elif rank != 0 or run.error is not None:
            run.grads, run.outputs, run.buffers = {}, {}, {}
        payload.update(run.to_payload())
    if run.error is not None:
        payload.update(describe_exception(run.error))


def _meet(payload: dict[str, Any], rank: int, world_size: int, store: str, stepper: Stepper,
          settings: dict[str, Any]) -> None:
    """Join the ranks' process group once (the first command); until then a failure is the harness's."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    payload["launch"] = True
    backend = "nccl" if stepper.subject.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=settings["group_timeout"]))
    payload["launch"] = False


def _follow(determinism: tuple[bool, bool, bool, bool]) -> None:
    """Use the kernel settings the checking process uses now (spawned ranks start without them)."""
    from torch.utils import deterministic

    torch.use_deterministic_algorithms(determinism[0], warn_only=determinism[1])
    deterministic.fill_uninitialized_memory = determinism[2]
    torch.backends.cudnn.benchmark = determinism[3]


def _resolve(catalog: list[Any], ref: Any) -> Any:
    kind, value = ref
    if kind == "catalog":
        return catalog[value]
    return pickle.loads(value) if kind == "pickled" else None
