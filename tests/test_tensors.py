"""One walker for nested tensors: every caller sees a ``dict`` inside a ``list`` inside a ``tuple``
the same way (ground truth: the tensors written out by hand, in order)."""

from __future__ import annotations

import collections

import torch

from pytest_gradckpt.ranks.distributed import DEFAULTS, Parallel
from pytest_gradckpt.probes.unit_counter import LayerCounter
from pytest_gradckpt.pipeline.runs import Run
from pytest_gradckpt.pipeline.tensors import map_tensors, tensors_in

A, B, C = torch.arange(4.0), torch.arange(8.0).reshape(4, 2), torch.ones(4, 3)


def nested() -> tuple:
    return ([{"a": A, "inner": [B, 7]}], "text", (C,))


def test_every_tensor_is_found_in_order_at_any_depth():
    found = tensors_in(nested())
    assert len(found) == 3 and all(f is t for f, t in zip(found, (A, B, C), strict=True))
    doubled = tensors_in(map_tensors(nested(), lambda t: t * 2))
    assert all(torch.equal(f, 2 * t) for f, t in zip(doubled, (A, B, C), strict=True))


def test_map_keeps_the_containers_and_non_tensors():
    mapped = map_tensors(nested(), lambda t: t + 1)
    assert isinstance(mapped, tuple) and isinstance(mapped[0], list) and isinstance(mapped[0][0], dict)
    assert mapped[1] == "text" and mapped[0][0]["inner"][1] == 7
    assert torch.equal(mapped[0][0]["inner"][0], B + 1) and torch.equal(mapped[2][0], C + 1)
    pair = collections.namedtuple("pair", "x y")
    mapped_pair = map_tensors(pair(A, 3), lambda t: t + 1)
    assert type(mapped_pair) is pair and torch.equal(mapped_pair.x, A + 1) and mapped_pair.y == 3


def test_ddp_sharding_splits_every_nested_tensor():
    shards = [Parallel("ddp", rank, DEFAULTS).shard(nested()) for rank in (0, 1)]
    for rank, shard in enumerate(shards):
        rows = slice(2 * rank, 2 * rank + 2)
        expected = (A[rows], B[rows], C[rows])
        assert all(torch.equal(f, t) for f, t in zip(tensors_in(shard), expected, strict=True))
        assert shard[1] == "text" and shard[0][0]["inner"][1] == 7


def test_the_recompute_counter_sees_a_nested_output_that_joins_the_graph():
    counter = LayerCounter()
    grad_deep = ([{"a": A, "inner": [B.clone().requires_grad_(), 7]}], "text", (C,))
    counter.saw_output("layer", nested())  # nothing requires grad: backward never reaches it
    counter.saw_output("layer", grad_deep)
    assert counter.graph_calls["layer"] == 1
    grad_deep[0][0]["inner"][0].sum().backward()
    assert counter.reached_calls["layer"] == 1


def test_a_run_moved_to_the_host_copies_nested_outputs():
    run = Run(outputs={"deep": nested()})  # type: ignore[dict-item]
    host = run.to_host()
    assert all(torch.equal(f, t) and f is not t
               for f, t in zip(tensors_in(host.outputs), (A, B, C), strict=True))
