"""Checkpoint functions: :func:`torch.utils.checkpoint.checkpoint`'s signature, ``fn(function, *args,
**kwargs)``, one per built-in per-unit strategy (reentrant, non-reentrant, selective, offload, SAC).
Torch is imported inside each, so importing the registry stays torch-free.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def reentrant_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)``."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=True, **kwargs)


def non_reentrant_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, **kwargs)


def _requires_grad(value: Any) -> bool:
    return getattr(value, "requires_grad", False) is True


def selective_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Checkpoint only layers with trainable parameters, reentrant where that is safe.

    Frozen layers run plainly: recomputing them buys no memory worth the time in
    adapter training, because their inputs are saved for the trainable layers
    anyway. Reentrant checkpointing is faster but loses parameter gradients when
    no positional input requires grad (frozen embeddings, as in LoRA), and loses
    gradients of tensors passed by keyword. So: a grad-free hidden state gets a
    grad-requiring alias, and a call carrying grad-requiring keyword tensors
    falls back to non-reentrant checkpointing.
    """
    from torch import Tensor
    from torch.utils.checkpoint import checkpoint

    from pytest_gradckpt.pipeline.units import layer_of

    layer = layer_of(function)
    if layer is not None and not any(p.requires_grad for p in layer.parameters()):
        return function(*args)
    keywords = getattr(function, "keywords", None) or {}
    if any(_requires_grad(v) for v in keywords.values()):
        return checkpoint(function, *args, use_reentrant=False)
    given = list(args)
    if not any(_requires_grad(a) for a in given):
        for i, arg in enumerate(given):
            if isinstance(arg, Tensor) and arg.is_floating_point():
                given[i] = arg.detach().requires_grad_()
                break
    return checkpoint(function, *given, use_reentrant=True)


def offload_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Keep each layer's hidden-state input in host memory; recompute the layer in backward.

    The input is copied to the CPU with a differentiable ``.to("cpu")`` and the
    layer is checkpointed (non-reentrant) on that copy, so the device holds no
    per-layer activations between forward and backward. Unlike hand-written
    offloading, this keeps the RNG state (an empty tensor on the device makes
    checkpoint stash that device's generator too), keyword arguments and the
    input's gradient. The host copy is declared to this run's memory probe
    (:func:`pytest_gradckpt.pipeline.units.memory_probe_of`), as a user's offloading function would.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    from pytest_gradckpt.pipeline.units import memory_probe_of

    index = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    if index is None:
        return checkpoint(function, *args, use_reentrant=False)
    hidden = args[index]
    device = hidden.device
    # On CUDA the copies are asynchronous (pinned host memory, stream-ordered): the copy back in
    # backward is queued on the same stream after this one, so it never reads an unfinished copy.
    asynchronous = device.type == "cuda"
    host = hidden.to("cpu", non_blocking=True) if asynchronous else hidden.to("cpu", copy=True)
    probe = memory_probe_of(function)
    if probe is not None:
        probe.mark_offloaded(host)
    anchor = torch.empty(0, device=device)

    def run_from_host(host_hidden: Any, _anchor: Any, *rest: Any) -> Any:
        inputs = list(rest)
        inputs.insert(index, host_hidden.to(device, non_blocking=asynchronous))
        return function(*inputs)

    rest = args[:index] + args[index + 1:]
    return checkpoint(run_from_host, host, anchor, *rest, use_reentrant=False)


#: Ops whose outputs ``sac`` keeps: matrix products, the expensive part to redo.
@functools.lru_cache(maxsize=1)
def _sac_saved_ops() -> frozenset[Any]:
    import torch

    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu"]
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


def sac_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """``sac``'s policy: keep matmul outputs, recompute the rest. A module-level function (as
    ``context_fn`` is), so dynamo can trace a checkpoint that uses it.

    Example:
        >>> import torch
        >>> sac_policy(None, torch.ops.aten.mm.default).name, sac_policy(None, torch.ops.aten.relu.default).name
        ('MUST_SAVE', 'PREFER_RECOMPUTE')
    """
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _sac_saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def sac_contexts() -> tuple[Any, Any]:
    """``sac``'s ``context_fn``: a module-level function, so torch.compile's partitioner can read
    the policy from the plain contexts."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(sac_policy)


def _sac_contexts_noted(probe: Any) -> tuple[Any, Any]:
    """``sac``'s contexts in eager code inside a check: the forward context also shows this run's
    memory probe the outputs SAC keeps."""
    import torch

    from pytest_gradckpt.probes.memory import note_sac_saved_outputs

    forward_ctx, recompute_ctx = sac_contexts()
    if torch.compiler.is_compiling():
        return forward_ctx, recompute_ctx
    return note_sac_saved_outputs(probe, forward_ctx, _sac_saved_ops()), recompute_ctx


def sac_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Selective activation checkpointing: save matmul outputs, recompute the rest."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from pytest_gradckpt.pipeline.units import memory_probe_of

    probe = None if torch.compiler.is_compiling() else memory_probe_of(function)
    context_fn = sac_contexts if probe is None else functools.partial(_sac_contexts_noted, probe)
    return checkpoint(function, *args, use_reentrant=False, context_fn=context_fn)


def sac_offload_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    """``sac_offload``'s policy: offload matmul outputs to host memory (``MUST_CPU_OFFLOAD``),
    recompute the rest. It promises no matmul is recomputed; torch 2.13 recomputes them in eager
    code, and the check says so.

    Example:
        >>> import torch
        >>> sac_offload_policy(None, torch.ops.aten.mm.default).name
        'MUST_CPU_OFFLOAD'
    """
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_CPU_OFFLOAD if op in _sac_saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_offload_contexts() -> tuple[Any, Any]:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(sac_offload_policy)


def sac_offload_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """Selective activation checkpointing whose policy offloads matmul outputs to the host."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, context_fn=_sac_offload_contexts)


@functools.cache
def warm_up() -> None:
    """Run each checkpoint mechanism once on a toy layer, once per process (the cache).

    torch's first non-reentrant checkpoint in a process takes about a second (lazy imports);
    without this the first strategy checked would be billed for it. A checkpoint of CPU tensors
    asks which accelerator there is: through NVML here, so that GPU ranks forked after it can
    still use CUDA. Its backward starts autograd's device threads, after which a forked
    process cannot run autograd: a check that forks GPU ranks warms them up instead of itself.

    Example:
        >>> warm_up()
    """
    import torch

    from pytest_gradckpt.pipeline.process_state import cuda_asked_through_nvml

    layer = torch.nn.Linear(2, 2)
    with cuda_asked_through_nvml():
        for checkpoint_fn in (non_reentrant_checkpoint, reentrant_checkpoint, sac_checkpoint):
            checkpoint_fn(layer, torch.ones(1, 2, requires_grad=True)).sum().backward()
