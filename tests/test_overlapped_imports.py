"""Which model libraries a factory names (``overlapped_imports.named_libraries``), so that the
checking process imports them while its ranks build, and the thread that imports them."""

from __future__ import annotations

import functools
import threading

import pytest
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
