"""What the suites share: the Llama shapes and builders, tokens, the bare step timer, and the part
timers of a distributed check.

This is the one module of ``benchmarks/`` that imports pytest_gradckpt's internals (everything
below ``# --- internals``); every other module uses the public API (``import pytest_gradckpt as gc``).
When the package's modules move, this file is the one to fix.

Example:
    >>> sorted(SHAPES), PER_LAYER[0]
    (['1b', '7b'], 'non_reentrant')
    >>> tokens(1, 4, 100, "cpu")["input_ids"].shape
    torch.Size([1, 4])
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import os
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

GIB = 2 ** 30
#: the six per-layer built-in strategies every GPU suite checks
PER_LAYER = ["non_reentrant", "hf_non_reentrant", "hf_reentrant", "selective", "offload", "sequential"]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
#: a two-layer Llama: the suites' cases tried on any machine
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=32000)
#: dist_profile's mid shape (8 layers of 512)
MID = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
           vocab_size=32000)


def shape(name: str) -> dict[str, Any]:
    """A named shape: ``1b``, ``7b``, ``mid`` or ``tiny``."""
    return {"tiny": TINY, "mid": MID}.get(name) or SHAPES[name]


def llama(shape: dict[str, Any], device: str, dtype: torch.dtype, **extra: Any) -> Any:
    """A Llama of ``shape`` with random weights (seed 0), sdpa, no cache, no attention dropout unless given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    extra.setdefault("max_position_embeddings", 4096)
    extra.setdefault("attention_dropout", 0.0)
    config = LlamaConfig(**shape, **extra)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")


def lora(model: Any, dropout: float = 0.0) -> Any:
    """PEFT LoRA r=16 on every linear layer of the decoder."""
    from peft import LoraConfig, get_peft_model

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=linear,
                                            task_type="CAUSAL_LM"))


def tokens(batch: int, length: int, vocab: int, device: str) -> dict[str, Any]:
    """Random token ids (seed 1) as inputs and labels."""
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def build(shape_name: str, adapters: bool, where: str) -> Any:
    """Module level (spawned ranks call it by name): the Llama shape, bf16, built ``where`` (cpu, gpu, meta)."""
    device = {"cpu": "cpu", "meta": "meta"}.get(where) or f"cuda:{torch.cuda.current_device()}"
    model = llama(shape(shape_name), device, torch.bfloat16)
    return lora(model) if adapters else model


def build_fp32_cpu(shape_name: str, adapters: bool) -> Any:
    """The shape in float32 on the CPU (bf16 matmuls on a CPU are slow and not what is profiled)."""
    model = llama(shape(shape_name), "cpu", torch.float32)
    return lora(model) if adapters else model


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(values: Iterable[float] | None) -> list[float] | None:
    return None if values is None else [round(v / GIB, 2) for v in values]


# --------------------------------------------------------------------------- internals
# Everything below reads pytest_gradckpt's internal modules: the one place a move of them touches.


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    from pytest_gradckpt.pipeline.subject import tensor_bytes as count

    return int(count(tensors))


def instrumented(model: Any) -> tuple[Any, Any, list[str]]:
    """The model's checkpoint units found as the engine finds them, each call routed through one layer
    counter (``counter.counts[name]``): the engine's model info, the counter, the units' names."""
    from pytest_gradckpt.pipeline.units import ModelInfo, find_layers, instrument
    from pytest_gradckpt.probes.unit_counter import LayerCounter

    names, found_by = find_layers(model)
    info = ModelInfo(model, names, found_by)
    counter = LayerCounter()
    for name, layer in zip(names, info.layers, strict=True):
        instrument(layer, name, counter)
    return info, counter, names


def unit_names(model: Any) -> list[str]:
    from pytest_gradckpt.pipeline.units import find_layers

    return list(find_layers(model)[0])


def switch_on(info: Any, strategy: str) -> str | None:
    """Apply a built-in strategy to a model info of :func:`instrumented`; the reason it does not apply, if so."""
    from pytest_gradckpt.strategies import get_strategy

    found = get_strategy(strategy)
    reason = found.applies_to(info)
    if not reason:
        found.apply(info)
    return reason or None


def apply_strategy(model: Any, strategy: str) -> None:
    """Switch a built-in strategy on ``model`` in place, as the engine does (calls routed through a layer counter)."""
    from pytest_gradckpt.strategies import get_strategy

    info, _, _ = instrumented(model)
    get_strategy(strategy).apply(info)


def promise(name: str, **claims: Any) -> Any:
    """A strategy's declared promise (:class:`pytest_gradckpt.pipeline.promises.Promise`), e.g. activations on the host."""
    from pytest_gradckpt.pipeline.promises import Promise

    return Promise(name, **claims)


def checkpoint_function(name: str) -> Any:
    """A built-in strategy's checkpoint function by its name in :mod:`pytest_gradckpt.strategies`
    (``non_reentrant_checkpoint``, ``sac_checkpoint``, ...)."""
    from pytest_gradckpt import strategies

    return getattr(strategies, name)


def zoo_model(name: str) -> tuple[Any, Any]:
    """A model of the packaged zoo and its inputs: ``tanh_net`` and ``DropoutMaskNet`` of the plain zoo by
    those names, any other name through the zoo's entry (``llama``, ``bert``, ...)."""
    from pytest_gradckpt.zoo import entry, plain

    if name == "tanh_net":
        return plain.tanh_net()
    return entry(name).build()


def dropout_mask_net(**sizes: Any) -> Any:
    """The plain zoo's ``DropoutMaskNet`` (an embedding, dropout, a mask input) at the given sizes."""
    from pytest_gradckpt.zoo.plain import DropoutMaskNet

    return DropoutMaskNet(**sizes)


def golden() -> Any:
    """The golden-record module (:mod:`pytest_gradckpt.release.golden`: ``key``, ``differences``), as ``--gradckpt-compare``
    applies it; benchmarks/preserved.py compares two sweeps with it."""
    from pytest_gradckpt.release import golden as module

    return module


def builtin_strategies() -> list[str]:
    from pytest_gradckpt.strategies import BUILTIN

    return list(BUILTIN)


def join_launch(device: str) -> int | None:
    """This process's rank when started by torchrun (``None`` otherwise); see :mod:`pytest_gradckpt.ranks.distributed`."""
    from pytest_gradckpt.ranks.distributed import join_launch as join

    return join(device)


def leave_launch() -> None:
    from pytest_gradckpt.ranks.distributed import leave_launch as leave

    leave()


def raw_step_seconds(model: Any, inputs: dict[str, Any], strategy: str | None, device: str) -> tuple[float, int]:
    """A bare step (copy, strategy applied, forward + backward): median of 3 after a warm-up,
    and the step's allocator peak above the copy (CUDA)."""
    times, peak = [], 0
    for attempt in range(4):
        sync(device)
        started = time.perf_counter()
        copied = copy.deepcopy(model)
        if strategy is not None:
            apply_strategy(copied, strategy)
        if device.startswith("cuda"):
            sync(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        copied(**inputs).loss.backward()
        sync(device)
        if device.startswith("cuda"):
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        if attempt:
            times.append(time.perf_counter() - started)
        del copied
    return statistics.median(times), peak


# --------------------------------------------------------------------------- part timers
# Where a distributed (or isolated) check's time goes, in every process: wrappers put on the engine's
# functions. Spawned ranks import this module again (through ``build``, which they unpickle), and
# put the timers on there too when ``GRADCKPT_PROFILE_DIR`` is set.

#: part -> seconds, in this process; ranks write theirs to ``$GRADCKPT_PROFILE_DIR/<pid>.json``.
SPENT: collections.defaultdict[str, float] = collections.defaultdict(float)


def _timed(part: str, function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "GRADCKPT_PROFILE_T0" in os.environ and "rank: start to first command" not in SPENT and (
                os.getpid() != int(os.environ.get("GRADCKPT_PROFILE_PARENT", "0"))):
            SPENT["rank: start to first command"] = time.time() - float(os.environ["GRADCKPT_PROFILE_T0"])
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[part] += time.perf_counter() - started
            folder = os.environ.get("GRADCKPT_PROFILE_DIR")
            if folder and os.getpid() != int(os.environ.get("GRADCKPT_PROFILE_PARENT", "0")):
                Path(folder, f"{os.getpid()}.json").write_text(json.dumps(SPENT))
    wrapper.__profiled__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap(owner: Any, name: str, part: str) -> None:
    function = getattr(owner, name, None)
    if function is None or getattr(function, "__profiled__", False):
        return
    if isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod):
        setattr(owner, name, staticmethod(_timed(part, function)))
    else:
        setattr(owner, name, _timed(part, function))


def install_timers() -> None:
    """Put the timers on (idempotent; modules are patched where they are looked up)."""
    from pytest_gradckpt.pipeline import subject, baselines, engine, runs, verdicts
    from pytest_gradckpt.ranks import overlapped_imports, rank_group
    from pytest_gradckpt.pipeline import comparison

    _wrap(subject.Subject, "_build", "model build (factory)")
    _wrap(subject.Subject, "fresh_model", "per-run model copy (to device)")
    _wrap(runs.Stepper, "_prepare", "prepare copy (names, probes attached; copy included)")
    _wrap(runs.Stepper, "_switch_on", "strategy switched on")
    _wrap(runs.Stepper, "_wrap", "parallel wrap (DDP/fully_shard)")
    _wrap(runs.Stepper, "_train", "steps (forward+backward, probes)")
    _wrap(runs.Stepper, "_collect", "collect (full-gradient gathering)")
    _wrap(runs.Run, "to_payload", "rank: payload to host")
    _wrap(runs.Reuse, "give_back", "working copy restored (or dropped)")
    _wrap(runs.Reuse, "take", "working copy taken (a deep copy when new)")
    if not getattr(runs.gc, "__profiled__", False):  # the collector the stepper runs between runs
        runs.gc = _TimedCollector(runs.gc)  # type: ignore[assignment]
    _wrap(rank_group, "_answer", "rank: whole command")
    _wrap(rank_group, "_step", "rank: step commands")
    _wrap(rank_group, "_meet", "rank: process group joined")
    _wrap(rank_group, "_build", "rank: build command")
    _wrap(rank_group, "fingerprint", "rank: fingerprints")
    _wrap(rank_group.RankGroup, "start", "parent: ranks started")
    _wrap(rank_group.RankGroup, "run", "parent: waiting for ranks (incl. transfer)")
    # Part of the wait above: the model library's import here, on a building rank's word. Where it
    # outlasts the rank's build, the wait exceeds the rank's own time by the difference.
    _wrap(overlapped_imports, "follow", "parent: imports followed (within the wait)")
    # What of them was left when the ranks had built: the wait's excess over the ranks' own time.
    _wrap(overlapped_imports.Importer, "finish", "parent: imports awaited after the build")
    _wrap(subject.Subject, "keep_template_on_device", "rank: template kept on its device")
    _wrap(verdicts, "gather", "parent: comparison (evidence)")
    _mark_spawn(rank_group)
    _wrap(comparison, "measure_noise", "parent: baseline noise")
    _wrap(baselines, "_validate", "parent: baseline validated")
    _wrap(engine, "_make_room", "parent: make room")
    for module in (baselines, verdicts):
        if hasattr(module, "measure_noise"):
            module.measure_noise = comparison.measure_noise  # type: ignore[attr-defined]


class _TimedCollector:
    """Stands in for the ``gc`` module in :mod:`pytest_gradckpt.pipeline.runs`: its ``collect`` timed."""

    __profiled__ = True

    def __init__(self, module: Any) -> None:
        self.module = module
        self.collect = _timed("cyclic garbage collection between runs", module.collect)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


def build_on_ranks_also(device_type: str) -> None:
    """Let ranks on ``device_type`` build the model as GPU ranks do (``launcher.BUILD_ON_RANKS``; the
    tests add "cpu" the same way): the GPU design measured on the CPU."""
    from pytest_gradckpt.ranks import launcher

    if device_type not in launcher.BUILD_ON_RANKS:
        launcher.BUILD_ON_RANKS = (*launcher.BUILD_ON_RANKS, device_type)  # type: ignore[assignment]


def _mark_spawn(rank_group: Any) -> None:
    """The parent's clock when it starts a group travels to the ranks in the environment; a rank
    reads it at its first timed call: spawn, imports and unpickling what it is handed."""
    start = rank_group.RankGroup.start
    if getattr(start, "__clocked__", False):
        return

    def started(self: Any) -> None:
        os.environ["GRADCKPT_PROFILE_T0"] = repr(time.time())
        start(self)

    started.__clocked__ = True  # type: ignore[attr-defined]
    rank_group.RankGroup.start = started


def gpu_name() -> str:
    """The first visible GPU's name, asked without initialising CUDA in this process (as the check asks)."""
    from pytest_gradckpt.release.environment import device_versions

    return device_versions()["device"]


def fork_refused() -> bool:
    """Whether a GPU rank forked from this process found it could not use CUDA (ranks are spawned since)."""
    from pytest_gradckpt.pipeline.process_state import cuda_fork_refused

    return cuda_fork_refused()


def collect_timers(folder: str) -> dict[str, dict[str, float]]:
    """Every process's parts: ``{"parent": {...}, "rank <pid>": {...}}`` in seconds."""
    found = {"parent": {k: round(v, 3) for k, v in SPENT.items()}}
    for path in sorted(Path(folder).glob("*.json")):
        found[f"rank {path.stem}"] = {k: round(v, 3) for k, v in json.loads(path.read_text()).items()}
        path.unlink()
    return found


if os.environ.get("GRADCKPT_PROFILE_DIR"):  # spawned ranks import this module again: time them too
    install_timers()
