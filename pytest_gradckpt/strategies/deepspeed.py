"""DeepSpeed's own activation checkpointing (``deepspeed.checkpointing``) as strategies.

``deepspeed.checkpointing.checkpoint`` is a reentrant autograd function of DeepSpeed's own (its
``CheckpointFunction``): it restores the CPU and accelerator RNG states and DeepSpeed's
model-parallel RNG tracker (``get_cuda_rng_tracker``) before recomputing, and reads its settings
from ``deepspeed.checkpointing.configure`` (``partition_activations``, ``checkpoint_in_cpu``,
``contiguous_checkpointing`` with ``num_checkpoints``). Each strategy here configures DeepSpeed with
its settings when it is applied and installs DeepSpeed's function on every checkpoint unit, so it is
judged like any strategy:

    >>> from pytest_gradckpt.strategies import deepspeed
    >>> [s.name for s in deepspeed.STRATEGIES][:2]
    ['deepspeed_checkpoint', 'deepspeed_non_reentrant']

A setting that cannot do what it says where the model runs is ``skipped`` with the reason, not
passed: ``partition_activations`` (and ``contiguous_checkpointing``, which needs it) splits checkpoints
across model-parallel ranks, and without an ``mpu`` there is one; ``checkpoint_in_cpu`` moves
checkpoints to host memory, where a CPU model's already are. ``configure`` sets process-wide state in
DeepSpeed's module; it stays as the last strategy left it (call ``configure`` again before training).
"""

from __future__ import annotations

import functools
from typing import Any

from pytest_gradckpt.pipeline.units import ModelInfo
from pytest_gradckpt.strategies import CheckpointFunctionStrategy, Strategy


def _checkpointing() -> Any:
    """``deepspeed.checkpointing`` (an attribute of the package, not an importable module)."""
    from deepspeed.runtime.activation_checkpointing import checkpointing

    return checkpointing


def _model_parallel_size() -> int:
    from deepspeed.runtime.activation_checkpointing import checkpointing

    return 1 if checkpointing.mpu is None else int(checkpointing.mpu.get_model_parallel_world_size())


class DeepSpeedCheckpointing(CheckpointFunctionStrategy):
    """One ``deepspeed.checkpointing.configure`` setting, with DeepSpeed's checkpoint function on every unit.

    Example:
        >>> s = DeepSpeedCheckpointing("ds", partition_activations=True)
        >>> s.settings["partition_activations"], s.settings["checkpoint_in_cpu"]
        (True, False)
    """

    def __init__(self, name: str, *, non_reentrant: bool = False, partition_activations: bool = False,
                 checkpoint_in_cpu: bool = False, contiguous_checkpointing: bool = False, description: str = ""):
        self.non_reentrant = non_reentrant
        self.settings = dict(partition_activations=partition_activations, checkpoint_in_cpu=checkpoint_in_cpu,
                             contiguous_checkpointing=contiguous_checkpointing)
        super().__init__(name, self._checkpoint, description=description or self._describe())

    def _describe(self) -> str:
        on = [k for k, v in self.settings.items() if v]
        function = "non_reentrant_checkpoint" if self.non_reentrant else "checkpoint"
        return f"deepspeed.checkpointing.{function} per layer" + (f", configure({'=True, '.join(on)}=True)"
                                                                    if on else "")

    def _checkpoint(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        checkpointing = _checkpointing()
        if self.non_reentrant:  # it takes no keyword arguments
            return checkpointing.non_reentrant_checkpoint(functools.partial(function, **kwargs), *args)
        return checkpointing.checkpoint(function, *args, **kwargs)

    def applies_to(self, info: ModelInfo) -> str | None:
        try:
            _checkpointing()
        except ImportError as error:
            return f"DeepSpeed is not installed (pip install deepspeed): {error}"
        from deepspeed import comm

        if not comm.is_initialized():
            return ("DeepSpeed's checkpoint function needs deepspeed.comm initialized, as in a DeepSpeed training "
                    "process: call deepspeed.init_distributed() (or deepspeed.initialize) before the check")
        partitioned = self.settings["partition_activations"] or self.settings["contiguous_checkpointing"]
        if partitioned and _model_parallel_size() == 1:
            return ("partition_activations splits each checkpoint across model-parallel ranks; without model "
                    "parallelism (configure(mpu_=None)) there is one, so nothing is partitioned: it would run as "
                    "deepspeed_checkpoint")
        if self.settings["checkpoint_in_cpu"] and _device_type(info) == "cpu":
            return "checkpoint_in_cpu moves checkpoints to host memory; this model runs on the CPU, so nothing moves"
        return None

    def apply(self, info: ModelInfo) -> None:
        settings = dict(self.settings)
        num_checkpoints = len(info.layers) if settings["contiguous_checkpointing"] else None
        _checkpointing().configure(None, num_checkpoints=num_checkpoints, **settings)
        super().apply(info)


def _device_type(info: ModelInfo) -> str:
    parameter = next(iter(info.model.parameters()), None)
    return "cpu" if parameter is None else parameter.device.type


#: DeepSpeed's activation checkpointing, one strategy per setting (pass to ``gc.check(..., strategies=...)``).
STRATEGIES: list[Strategy] = [
    DeepSpeedCheckpointing("deepspeed_checkpoint"),
    DeepSpeedCheckpointing("deepspeed_non_reentrant", non_reentrant=True),
    DeepSpeedCheckpointing("deepspeed_checkpoint_in_cpu", checkpoint_in_cpu=True),
    DeepSpeedCheckpointing("deepspeed_partition_activations", partition_activations=True),
    DeepSpeedCheckpointing("deepspeed_contiguous", partition_activations=True, contiguous_checkpointing=True),
]
