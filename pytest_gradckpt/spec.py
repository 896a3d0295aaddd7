"""One check's whole configuration: :class:`CheckSpec`, validated once, typed and frozen.

Every front builds one: :func:`pytest_gradckpt.check` and
:func:`pytest_gradckpt.check_trainer` from their keyword arguments, the ``@pytest.mark.gradckpt``
marker from its keywords, the plugin from ``--gradckpt-*`` options and their ini twins. The
engine, the baseline cache, the time limits and the launcher read it. Torch-free, so the plugin
can reject a bad marker or option at collection without importing torch.

Each option is declared once, in :data:`OPTIONS`: its name, its default, its validator (one per
option, in :mod:`pytest_gradckpt.settings`, one message naming the problem and the fix), its
one-line help, whether the marker and ``check_trainer`` take it, and its command-line flag with
the flag's ini twin. The plugin registers its flags and the marker its keywords from this table.

Adding an option: declare it in :data:`OPTIONS` (and, if the marker or the command line should
carry it, say so there), add the field of the same name to :class:`CheckSpec`, read it where it
acts, and list it in the docs (docs/api.md, and docs/pytest.md for a flag).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pytest_gradckpt import settings
from pytest_gradckpt.errors import GradckptUsageError

#: Default per-run time limit in seconds: far above any tiny model's step.
DEFAULT_TIMEOUT = 300.0


def _number(text: str, where: str) -> float:
    """Option text to a number (the option's validator then judges the number).

    Example:
        >>> _number("0.3", "--gradckpt-min-memory-reduction")
        0.3
    """
    try:
        return float(text)
    except ValueError:
        raise GradckptUsageError(f"{where}={text!r} is not a number") from None


def _text(text: str, where: str) -> str:
    return text


@dataclasses.dataclass(frozen=True)
class Flag:
    """A ``--gradckpt-*`` command-line option and its ini twin (the flag's name with underscores).

    Example:
        >>> Flag("--gradckpt-timeout", "end a run that takes longer as 'error'", metavar="SECONDS").ini
        'gradckpt_timeout'
    """

    flag: str
    help: str
    metavar: str | None = None
    ini_type: Literal["bool", "string", "linelist"] = "string"
    #: from the text given on the command line or in the ini file to the value the validator judges
    parse: Callable[[str, str], Any] = _text

    @property
    def ini(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def addoption_keywords(self) -> dict[str, Any]:
        """What ``parser.addoption`` takes besides the flag and its help."""
        if self.ini_type == "bool":
            return {"action": "store_true", "default": None}
        if self.ini_type == "linelist":
            return {"action": "append", "metavar": self.metavar}
        return {"metavar": self.metavar}


#: One flag sets both memory cuts: on CUDA the allocator peak is the one that counts.
MEMORY_FLAG = Flag("--gradckpt-min-memory-reduction", "require every checkpointing strategy to cut activation "
                   "memory by FRACTION (CUDA: the allocator peak)", "FRACTION", parse=_number)
#: A session-wide ``compile_order``: applied only to models with compiled blocks (the marker's wins).
COMPILE_ORDER_FLAG = Flag("--gradckpt-compile-order", "for models with compiled blocks, where checkpoints sit "
                          "(default compile_outside); eager and whole-model compiled models are unaffected; the "
                          "marker's compile_order= wins", "compile_outside|checkpoint_outside")


#: ``Option.marker_default`` when the marker's default is ``check()``'s
_SAME: Any = type("_Same", (), {"__repr__": lambda self: "<check()'s default>"})()


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a check: declared once, read by every front.

    Example:
        >>> OPTION["seed"].validate(1), OPTION["seed"].marker, OPTION["seed"].trainer
        (1, True, True)
    """

    name: str
    #: ``check()``'s default
    default: Any
    #: ``check(value, where) -> normalised value``; raises one :class:`GradckptUsageError` naming ``where``
    check: Callable[[Any, str], Any]
    #: one line: the marker's help and the docs
    doc: str
    #: the marker's keyword takes it (the marker's default when it differs from check()'s)
    marker: bool = True
    marker_default: Any = _SAME
    #: ``check_trainer`` takes it (the trainer decides strategies, scenarios and units itself)
    trainer: bool = False
    #: the command-line flag (and ini twin) that sets it for a whole session
    flag: Flag | None = None
    #: a field of :class:`CheckSpec` (``expect`` is the marker's, read by the plugin)
    in_spec: bool = True

    def validate(self, value: Any, where: str | None = None) -> Any:
        """``value`` normalised, or one usage error naming ``where`` (default: the option's name)."""
        return self.check(value, where or self.name)

    @property
    def shown_default(self) -> Any:
        return self.default if self.marker_default is _SAME else self.marker_default


def _fraction(value: Any, where: str) -> float | None:
    return settings.check_fraction(where, value)


def _tolerance(value: Any, where: str) -> float | None:
    return settings.check_tolerance(where, value)


def _any(value: Any, where: str) -> Any:
    return value  # the subject validates layers against the model it finds them in


#: Every option, in the marker's keyword order. The one place an option is declared.
OPTIONS: tuple[Option, ...] = (
    Option("strategies", None, settings.check_strategies, "strategy names to run (default: all registered, or "
           "--gradckpt-strategies).", flag=Flag("--gradckpt-strategies", "comma-separated strategies to run "
                                               "(default: all registered); 'help' lists them", "NAMES")),
    Option("scenarios", None, settings.check_scenarios, "scenario names (default: train, or --gradckpt-scenarios).",
           flag=Flag("--gradckpt-scenarios", "comma-separated scenarios (default: train)", "NAMES")),
    Option("layers", None, _any, "checkpoint units: dotted path, module class, or list of modules."),
    Option("rtol", None, _tolerance, "relative tolerance (default per dtype).", trainer=True),
    Option("atol", None, _tolerance, "absolute tolerance (default per dtype).", trainer=True),
    Option("min_memory_reduction", None, _fraction, "required cut of the saved-activation peak, a fraction in "
           "[0, 1).", trainer=True, flag=MEMORY_FLAG),
    Option("min_cuda_memory_reduction", None, _fraction, "required cut of the CUDA allocator peak, a fraction in "
           "[0, 1).", flag=MEMORY_FLAG),
    Option("expect", None, settings.check_expect, "{'strategy' or 'strategy/scenario': outcome} for known hazards.",
           in_spec=False),
    Option("seed", 0, settings.check_seed, "seed for every run (default 0).", trainer=True),
    Option("timeout", DEFAULT_TIMEOUT, settings.check_timeout, "seconds one run may take before it ends as error.",
           marker_default=None, trainer=True,
           flag=Flag("--gradckpt-timeout", "end a run that takes longer as 'error' (default 300)", "SECONDS",
                     parse=_number)),
    Option("baseline", "auto", settings.check_baseline, "auto (whole-model, layerwise if that runs out of memory), "
           "whole-model or layerwise.",
           flag=Flag("--gradckpt-baseline", "what strategies are compared with (default auto: the step without "
                     "checkpointing, or the layer-local replay when that runs out of device memory)",
                     "auto|whole-model|layerwise")),
    Option("isolate", False, lambda value, where: settings.check_isolate(value),
           "True: every step in a child process; 'auto' (default): in a forked child where that is cheap (CPU), "
           "so a crash in native code is an error verdict, not the end of the session.", marker_default="auto"),
    Option("compile_order", None, settings.check_compile_order, "for a model with compiled blocks: compile_outside "
           "(default) or checkpoint_outside.", flag=COMPILE_ORDER_FLAG),
    Option("device", None, settings.check_device, "None (where the model is), auto, cpu or cuda.", marker=False,
           flag=Flag("--gradckpt-device", "device to run checks on (default: where the model is)", "auto|cpu|cuda")),
    Option("distributed", None, lambda value, where: DistributedSpec.of(value, where),
           "settings of the ddp/fsdp2 scenarios (docs/multi-gpu.md).", marker=False),
    Option("fingerprint", False, settings.check_flag, "add metrics['fingerprint'] for golden records.",
           marker=False),
)

#: The options by name.
OPTION: dict[str, Option] = {option.name: option for option in OPTIONS}
#: The keywords ``@pytest.mark.gradckpt`` accepts, in order.
MARKER_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if o.marker)
#: The options ``check_trainer`` takes.
TRAINER_OPTIONS: frozenset[str] = frozenset(o.name for o in OPTIONS if o.trainer)
#: The command-line flags the check options have, each once.
FLAGS: tuple[Flag, ...] = tuple(dict.fromkeys(o.flag for o in OPTIONS if o.flag is not None))


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """``distributed=``: the settings of the ``ddp``/``fsdp2`` scenarios, validated.

    Example:
        >>> DistributedSpec.of({"world_size": 4}).world_size
        4
    """

    world_size: int = 2
    find_unused_parameters: bool = False
    static_graph: bool = False
    micro_batches: int = 1
    #: seconds per step on the ranks; None scales with the measured model build and step times
    timeout: float | None = None
    start_method: str = "auto"

    @classmethod
    def of(cls, given: Mapping[str, Any] | DistributedSpec | None, where: str = "distributed") -> DistributedSpec:
        if isinstance(given, DistributedSpec):
            return given
        return cls(**settings.check_distributed(given, where))

    def as_dict(self) -> dict[str, Any]:
        """The settings as the rank code reads them (:mod:`pytest_gradckpt.ranks.distributed`)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CheckSpec:
    """One check's configuration: every option validated (build it with :meth:`of`), then read-only.

    Example:
        >>> spec = CheckSpec.of(strategies=["non_reentrant"], seed=3)
        >>> spec.strategies, spec.seed, spec.timeout, spec.baseline
        (('non_reentrant',), 3, 300.0, 'auto')
        >>> spec.replace(seed=4).seed
        4
        >>> CheckSpec.of(seed="3")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: seed='3' is not an int; pass an int such as 0
    """

    strategies: tuple[Any, ...] | None = None  # names and Strategy objects; None: every registered one
    scenarios: tuple[Any, ...] | None = None  # names and Scenario objects; None: train
    layers: Any = None
    rtol: float | None = None  # None: per compute dtype
    atol: float | None = None
    min_memory_reduction: float | None = None
    min_cuda_memory_reduction: float | None = None
    seed: int = 0
    timeout: float | None = DEFAULT_TIMEOUT
    baseline: str = "auto"
    isolate: bool | str = False
    compile_order: str | None = None
    device: Any = None
    distributed: DistributedSpec = dataclasses.field(default_factory=DistributedSpec)
    fingerprint: bool = False

    @classmethod
    def of(cls, where: str = "", **given: Any) -> CheckSpec:
        """Validate ``given`` (option names as keywords); the others take their defaults.
        ``where`` opens every message (e.g. the test's node id)."""
        return cls().replace(where=where, **given)

    def replace(self, where: str = "", **given: Any) -> CheckSpec:
        """This spec with ``given`` options validated and set.

        Example:
            >>> CheckSpec.of().replace(colour="red")
            Traceback (most recent call last):
            ...
            pytest_gradckpt.errors.GradckptUsageError: unknown option(s) colour; accepted: strategies, scenarios, layers, rtol, atol, min_memory_reduction, min_cuda_memory_reduction, seed, timeout, baseline, isolate, compile_order, device, distributed, fingerprint
        """
        unknown = [name for name in given if name not in OPTION or not OPTION[name].in_spec]
        if unknown:
            raise GradckptUsageError(f"{where + ': ' if where else ''}unknown option(s) {', '.join(unknown)}; accepted: "
                                     f"{', '.join(o.name for o in OPTIONS if o.in_spec)}")
        return dataclasses.replace(self, **{name: validated(name, value, where) for name, value in given.items()})

    def memory_cuts(self) -> dict[str, float | None]:
        """The required memory reductions, by option name (as :class:`~pytest_gradckpt.pipeline.verdicts.Limits` takes them)."""
        return {"min_memory_reduction": self.min_memory_reduction,
                "min_cuda_memory_reduction": self.min_cuda_memory_reduction}

    def baseline_key(self, distributed: bool) -> tuple[Any, ...]:
        """What of this spec makes a scenario's baseline differ: checks that agree here (and on the
        model, scenario, device and units) share one cached baseline."""
        return (self.seed, tuple(sorted(self.distributed.as_dict().items())) if distributed else (), self.baseline)


def validated(name: str, value: Any, where: str = "") -> Any:
    """``value`` of option ``name``, validated by the option's one validator.

    Example:
        >>> validated("timeout", 30)
        30.0
        >>> validated("rtol", -1, "test_x.py::test_x")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: test_x.py::test_x: rtol=-1 is not a usable tolerance; pass a finite number >= 0 or None for the per-dtype default
    """
    try:
        return OPTION[name].validate(value)
    except GradckptUsageError as error:
        if where:
            raise GradckptUsageError(f"{where}: {error}") from None
        raise
