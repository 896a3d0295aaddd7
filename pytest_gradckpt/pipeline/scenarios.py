"""Scenarios: the training situations each strategy is checked under. One table, one rule each."""

from __future__ import annotations

import dataclasses

from pytest_gradckpt.errors import GradckptUsageError


@dataclasses.dataclass(frozen=True)
class Scenario:
    """How one step is run.

    Example:
        >>> SCENARIOS["accumulate"].micro_batches
        2
    """

    name: str
    description: str
    train_mode: bool = True
    micro_batches: int = 1
    autograd_grad: bool = False
    autocast: bool = False
    freeze_input_embeddings: bool = False
    distributed: str | None = None  # "ddp" | "fsdp2": run on ranks of torch.distributed


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("train", "train mode, loss.backward()"),
    Scenario("accumulate", "two micro-batches accumulated into .grad (the second draws fresh dropout masks)",
             micro_batches=2),
    Scenario("autograd_grad", "torch.autograd.grad with respect to the trainable parameters", autograd_grad=True),
    Scenario("autocast", "bf16 autocast (CPU); bf16 on CUDA", autocast=True),
    Scenario("eval_mode", "model.eval() with gradients on: checkpointing must still apply", train_mode=False),
    Scenario("frozen_inputs", "input embeddings frozen, as in LoRA: the reentrant pitfall",
             freeze_input_embeddings=True),
    Scenario("ddp", "DistributedDataParallel on 2 ranks (gloo on CPU, NCCL on CUDA), global batch split by rank",
             distributed="ddp"),
    Scenario("fsdp2", "fully_shard (FSDP2) per layer and at the root, 2 ranks, full gradients gathered",
             distributed="fsdp2"),
)}

DEFAULT_SCENARIOS: tuple[str, ...] = ("train",)


def resolve_scenarios(spec: object) -> list[Scenario]:
    """Names (or None for ``("train",)``) to :class:`Scenario` objects; unknown names list the choices.

    Example:
        >>> [s.name for s in resolve_scenarios(None)]
        ['train']
    """
    if spec is None:
        spec = DEFAULT_SCENARIOS
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise GradckptUsageError(
            f"scenarios={spec!r}: pass a non-empty list of names from {', '.join(SCENARIOS)}")
    resolved = []
    for name in spec:
        if isinstance(name, Scenario):
            resolved.append(name)
        elif name in SCENARIOS:
            resolved.append(SCENARIOS[name])
        else:
            raise GradckptUsageError(f"unknown scenario {name!r}; available: {', '.join(SCENARIOS)}")
    return resolved
