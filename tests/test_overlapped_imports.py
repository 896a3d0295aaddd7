"""Which model libraries a factory names (``overlapped_imports.named_libraries``), so that the
checking process imports them while its ranks build, and the thread that imports them."""

from __future__ import annotations

import functools
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from pytest_gradckpt.ranks import overlapped_imports
from pytest_gradckpt.ranks.overlapped_imports import Importer, named_libraries


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1))


def with_adapters(rank: int) -> torch.nn.Module:
    import peft

    return peft.get_peft_model(llama(), peft.LoraConfig(r=rank, target_modules=["q_proj"]))


def one_call_deeper() -> torch.nn.Module:
    return two_calls_deeper()


def two_calls_deeper() -> torch.nn.Module:
    return llama()


def plain() -> torch.nn.Module:
    return torch.nn.Linear(2, 2)


class Builder:
    def make(self) -> torch.nn.Module:
        return llama()

    def __call__(self) -> torch.nn.Module:
        return llama()


def closure() -> functools.partial[torch.nn.Module]:
    helper = llama

    def factory() -> torch.nn.Module:
        return helper()

    return functools.partial(factory)


@pytest.mark.parametrize("factory, named", [
    (llama, ["transformers"]),
    (functools.partial(with_adapters, 8), ["peft", "transformers"]),  # and what the function it calls names
    (Builder().make, ["transformers"]),
    (closure(), ["transformers"]),
    (lambda: llama(), ["transformers"]),
    (plain, []),
    (torch.nn.Linear, []),  # a class: its module is imported already
    (Builder(), []),  # a callable object: no function to read
    (print, []),
])
def test_the_libraries_a_factory_names(factory, named):
    assert named_libraries(factory) == named


def test_calls_are_followed_only_so_deep():
    assert named_libraries(one_call_deeper, depth=2) == ["transformers"]
    assert named_libraries(one_call_deeper, depth=1) == []


def test_a_library_not_listed_is_not_named(monkeypatch):
    monkeypatch.setattr(overlapped_imports, "OVERLAPPED", {"peft": "peft"})
    assert named_libraries(functools.partial(with_adapters, 8)) == ["peft"]


def test_the_importer_imports_in_order_and_its_thread_ends_with_it(monkeypatch):
    order = []
    monkeypatch.setattr(overlapped_imports, "follow", lambda names: order.extend(names) or list(names))
    with Importer() as importer:
        importer.want(["transformers"])
        importer.want(["transformers.models.llama", "peft"])
        thread = importer._thread
    assert order == importer.imported == ["transformers", "transformers.models.llama", "peft"]
    assert not thread.is_alive() and thread not in threading.enumerate()


@settings(max_examples=60, deadline=None)
@given(wrappers=st.integers(0, 4), bound=st.booleans(), other=st.one_of(
    st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.sampled_from([len, print, int])))
def test_any_wrapping_of_a_factory_names_its_library_and_nothing_else_names_one(wrappers, bound, other):
    """However deep the partials (and a bound method), the library is found; a value that is no
    Python function names none, and none of them raises."""
    factory = Builder().make if bound else llama
    for _ in range(wrappers):
        factory = functools.partial(factory)
    assert named_libraries(factory) == ["transformers"]
    assert named_libraries(other) == []
