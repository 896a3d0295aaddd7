"""Checkpoint regions inside compiled code, and which of them the compiled backward recomputes.

Inside compiled code no Python of the check runs in backward, so the layer counters
(:mod:`pytest_gradckpt.probes.recompute_counts`) cannot see a recompute there. What the compiler is
told to recompute is in AOT autograd's joint graph (forward and backward in one graph, before the
partitioner splits it): dynamo traces each checkpoint as the ``tag_activation_checkpoint``
higher-order op, and AOT autograd marks every forward node of such a region with the region's
``ac_graph_id`` and its checkpoint policy (``recompute``: ``MUST_SAVE``, ``PREFER_RECOMPUTE``...,
from selective checkpointing's policy where there is one). The partitioner never saves a node
marked for recompute (``torch._functorch.partitioners.must_recompute``): one that backward uses is
recomputed in the compiled backward, with the marked values it is made from. So a region *is
recomputed* when backward (the nodes that descend from the tangents) uses a value of it marked for
recompute, or one made from such values, that is not a mere view (a weight's transpose, a detach).

The partitioner settles the tags in place before it splits the graph: a node marked for recompute
whose value enters a later checkpoint region is saved instead (``cleanup_recompute_tags``: the
boundary between two consecutive regions is stashed, not recomputed). So the graph is read after
the step, as the partitioner left it. In plain torch on three ``Linear`` + ``tanh`` blocks, each
checkpointed, compiled as one program, the backward graph holds one matmul more than without
checkpointing: only the last region recomputes (its output enters no later region), and the probe
counts 1 of 3 regions recomputed (test ``test_tiny_blocks_under_compile_are_no_false_alarm``).

The probe reaches the joint graph through ``torch._functorch.config.joint_custom_pass``, which AOT
autograd calls before partitioning; it returns the graph unchanged (any pass the caller set runs
first), so what runs compiled is what would run without the probe, and no
dispatch mode is involved (a dispatch mode would make dynamo run the code eager). AOT autograd's
own cache is off while the step runs: a cache hit skips the joint graph, and the count would
silently be zero (inductor's FX graph cache stays on; the generated code is the same).

The region counts are per compiled graph, not per execution: a graph dynamo compiles once and runs
for eight layers (per-block compile of identical layers) counts its region once. So the rules read
them as "some region recomputes" or "none does" (``verdicts.compiled_regions_not_recomputed``).

Executions are counted apart (:func:`hook_compiled_backwards`): once a micro-batch's forward ran,
the probe walks the autograd graph from its loss (``grad_fn.next_functions``), finds the backward
nodes of AOT autograd's compiled functions (``CompiledFunctionBackward``, whose forward class
carries the ``aot_id`` of its compilation) and puts a pre-hook on each, which counts one execution
when backward runs it. The joint graph is mapped to the same ``aot_id`` (AOT autograd names the
graph it is compiling ``<aot_id>_joint`` while it calls the joint pass), so each execution is known
to run a graph with recomputed regions or not: ``recomputing_backward_executions``. A per-block
compiled stack of eight identical checkpointed layers is one graph and eight executions; a
whole-model compile, one graph and one execution. A node pre-hook is Python the autograd engine
calls between nodes: the compiled backward itself runs as before, and no dispatch mode is entered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from typing import Any

import torch

from pytest_gradckpt.pipeline.tensors import tensors_in
from pytest_gradckpt.probes.protocol import Probe, ProbeEvidence

#: Checkpoint policies under which the partitioner recomputes a node (``must_recompute``).
_RECOMPUTE_POLICIES = ("MUST_RECOMPUTE", "PREFER_RECOMPUTE")


@dataclasses.dataclass
class CompiledRegions:
    """What AOT autograd's joint graphs of one step held (``graphs`` 0: none was seen, not measured).

    ``regions``: checkpoint regions (``ac_graph_id``) over all joint graphs; ``recomputed_regions``:
    those whose backward recomputes at least one forward node; ``recomputed_bytes``: the bytes of the
    values recomputed, summed over graphs (shapes from the graph's metadata, before any fusion)."""

    graphs: int = 0
    regions: int = 0
    recomputed_regions: int = 0
    recomputed_bytes: int = 0
    #: executions of compiled backward graphs whose joint graph was read, and of those that
    #: recompute a checkpoint region (None: not counted, no loss was shown to the probe)
    backward_executions: int | None = None
    recomputing_backward_executions: int | None = None


def _backward_nodes(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """The joint graph's backward: every node that depends on a tangent, plus nodes tagged backward."""
    found: set[torch.fx.Node] = set()
    pending = [node for node in graph.nodes if node.op == "placeholder" and "tangents" in node.name]
    while pending:
        node = pending.pop()
        if node not in found:
            found.add(node)
            pending.extend(node.users)
    found.update(node for node in graph.nodes if node.meta.get("partitioner_tag") == "is_backward")
    return found


def _value_bytes(node: torch.fx.Node) -> int:
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else (value,)
    total = 0
    for item in values:
        if isinstance(item, torch.Tensor):
            try:
                total += int(item.numel()) * item.element_size()
            except (TypeError, RuntimeError):  # a symbolic size: left out
                continue
    return total


def read_joint_graph(graph: torch.fx.Graph) -> CompiledRegions:
    """The checkpoint regions of one joint graph and those its backward recomputes.

    Example (plain torch: two checkpoint regions with an op between them, compiled with
    ``aot_eager``; each recomputes its ``exp``, whose backward needs it):
        >>> import torch._functorch.config as functorch_config
        >>> from torch.utils.checkpoint import checkpoint
        >>> joint = []
        >>> def look(gm, inputs):
        ...     joint.append(gm)
        ...     return gm
        >>> def two(x):
        ...     x = checkpoint(lambda t: torch.sin(t).exp(), x, use_reentrant=False)
        ...     return checkpoint(lambda t: torch.sin(t).exp(), x + 1, use_reentrant=False)
        >>> torch._dynamo.reset()
        >>> with functorch_config.patch(joint_custom_pass=look, enable_autograd_cache=False):
        ...     torch.compile(two, backend="aot_eager")(torch.ones(3, requires_grad=True)).sum().backward()
        >>> found = read_joint_graph(joint[0].graph)
        >>> found.graphs, found.regions, found.recomputed_regions
        (1, 2, 2)
    """
    backward = _backward_nodes(graph)
    regions = {node.meta["ac_graph_id"] for node in graph.nodes
               if node.meta.get("ac_graph_id") is not None and node not in backward}
    # What backward needs of the forward and may not save: every value marked for recompute that a
    # backward node uses (the graph's output node gathers forward outputs too: not a use), and,
    # to compute it again, the values marked for recompute that it is made from.
    pending = [node for node in graph.nodes if node not in backward and _marked(node)
               and any(user in backward and user.op != "output" for user in node.users)]
    recomputed: set[torch.fx.Node] = set()
    while pending:
        node = pending.pop()
        if node not in recomputed:
            recomputed.add(node)
            pending.extend(source for source in node.all_input_nodes if _marked(source))
    # A view (a weight's transpose, a detach) costs nothing to take again: not a recompute.
    computed = [node for node in recomputed if not getattr(node.target, "is_view", False)]
    return CompiledRegions(1, len(regions), len({node.meta.get("ac_graph_id") for node in computed}),
                           sum(_value_bytes(node) for node in computed))


def aot_id_being_compiled() -> int | None:
    """The ``aot_id`` of the graph AOT autograd is compiling now (it calls the joint pass inside
    ``track_graph_compiling(aot_config, "joint")``), or None (not compiling, or a torch that
    names graphs otherwise)."""
    try:
        from torch._functorch._aot_autograd.logging_utils import get_aot_compilation_context
    except ImportError:
        return None
    names = get_aot_compilation_context()[0]
    head = names[0].split("_", 1)[0] if names else ""
    return int(head) if head.isdigit() else None


def hook_compiled_backwards(roots: Any, counts: Counter[int], aot_ids: Collection[int]) -> int:
    """Put a counting pre-hook on every backward node of an AOT-compiled function (whose
    ``aot_id`` is in ``aot_ids``) in the autograd graph of ``roots`` (tensors, nested): each time
    backward runs such a node, ``counts[aot_id]`` grows by one. Returns the nodes hooked.

    Example (plain torch: two identical blocks compiled once, ``aot_eager``; backward runs the
    one compiled graph twice):
        >>> import collections
        >>> block = torch.nn.Linear(3, 3)
        >>> step = torch.compile(lambda x: torch.tanh(block(x)), backend="aot_eager")
        >>> torch._dynamo.reset()
        >>> loss = step(step(torch.ones(2, 3, requires_grad=True))).sum()
        >>> counts = collections.Counter()
        >>> hook_compiled_backwards(loss, counts, aot_ids=range(10**6))
        2
        >>> loss.backward()
        >>> sorted(counts.values())
        [2]
    """
    pending = [tensor.grad_fn for tensor in tensors_in(roots) if tensor.grad_fn is not None]
    seen: set[Any] = set()
    hooked = 0
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        aot_id = getattr(getattr(node, "_forward_cls", None), "_aot_id", None)
        if isinstance(aot_id, int) and aot_id in aot_ids:
            node.register_prehook(functools.partial(_count, counts, aot_id))
            hooked += 1
        pending.extend(following for following, _ in node.next_functions)
    return hooked


def _count(counts: Counter[int], aot_id: int, grad_outputs: Any) -> None:
    counts[aot_id] += 1


def _marked(node: torch.fx.Node) -> bool:
    """Whether the partitioner must recompute ``node`` (``torch._functorch.partitioners.must_recompute``)."""
    return getattr(node.meta.get("recompute"), "name", None) in _RECOMPUTE_POLICIES


class CompiledRegionsProbe(Probe[CompiledRegions]):
    """Reads every joint graph AOT autograd builds during the step (:func:`read_joint_graph`)."""

    name = "compiled_regions"
    measurement = CompiledRegions
    metric_keys = ("compiled_graphs", "checkpoint_regions", "recomputed_regions", "recomputed_region_bytes",
                   "compiled_backward_executions", "recomputing_backward_executions")

    def __init__(self, step: Any) -> None:
        super().__init__(step)
        #: the joint graphs AOT autograd built during the step, as the partitioner left them, with
        #: their ``aot_id`` (None: unknown)
        self.joint_graphs: list[tuple[int | None, torch.fx.GraphModule]] = []
        #: backward executions of each compiled graph (by ``aot_id``); None until a loss is shown
        self.executions: Counter[int] | None = None

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        import torch._functorch.config as functorch_config

        if not hasattr(functorch_config, "joint_custom_pass"):  # an older torch: not measured
            yield
            return
        callers = functorch_config.joint_custom_pass
        graphs = self.joint_graphs  # not self: the pass outlives the patch (seen: a copy held past its step)

        def look(module: torch.fx.GraphModule, inputs: Any) -> torch.fx.GraphModule:
            if callable(callers):
                module = callers(module, inputs)
            graphs.append((aot_id_being_compiled(), module))  # read after the step: the partitioner's final tags
            return module

        with functorch_config.patch(joint_custom_pass=look, enable_autograd_cache=False):
            yield

    def after_forward(self, loss: Any) -> None:
        # Only where this step compiled graphs (an eager step walks nothing).
        if self.executions is None:
            self.executions = Counter()
        ids = {aot_id for aot_id, _ in self.joint_graphs if aot_id is not None}
        if ids:
            hook_compiled_backwards(loss, self.executions, ids)

    def read(self) -> CompiledRegions:
        found = [(aot_id, read_joint_graph(module.graph)) for aot_id, module in self.joint_graphs]
        self.joint_graphs.clear()  # their fake tensors and nodes are not needed past the step
        graphs = [f for _, f in found]
        measured = CompiledRegions(len(graphs), sum(f.regions for f in graphs),
                                   sum(f.recomputed_regions for f in graphs), sum(f.recomputed_bytes for f in graphs))
        if self.executions is not None and all(aot_id is not None for aot_id, _ in found):
            recomputing = {aot_id for aot_id, f in found if f.recomputed_regions}
            measured.backward_executions = sum(self.executions.values())
            measured.recomputing_backward_executions = sum(n for aot_id, n in self.executions.items()
                                                           if aot_id in recomputing)
        return measured

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        seen = evidence.run.of(cls)
        if not evidence.compared or not seen.graphs:
            return {}
        found: dict[str, Any] = {"compiled_graphs": seen.graphs, "checkpoint_regions": seen.regions,
                                 "recomputed_regions": seen.recomputed_regions,
                                 "recomputed_region_bytes": seen.recomputed_bytes}
        if seen.backward_executions is not None:
            found.update(compiled_backward_executions=seen.backward_executions,
                         recomputing_backward_executions=seen.recomputing_backward_executions)
        return found
