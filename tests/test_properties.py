"""Property tests: whatever the model, settings and outcome, the caller's state is untouched."""

from __future__ import annotations

import random
import warnings

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest_gradckpt as gc
from pytest_gradckpt.hypothesis_models import batch_shapes, build, model_configs
from pytest_gradckpt.strategies import BUILTIN
from tests import mutations

BROKEN = [gc.Strategy.from_checkpoint_fn(f.__name__, f) for f in
          (mutations.output_detached, mutations.raises, mutations.rng_not_preserved, mutations.forward_twice)]


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "grad_mode": torch.is_grad_enabled(),
        "autocast": torch.is_autocast_enabled("cpu"),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "filters": list(warnings.filters),
    }


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in ("params", "buffers"):
        for name, tensor in before[key].items():
            torch.testing.assert_close(after[key][name], tensor, rtol=0, atol=0)
    for name, grad in before["grads"].items():
        if grad is None:
            assert after["grads"][name] is None
        else:
            torch.testing.assert_close(after["grads"][name], grad, rtol=0, atol=0)
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    for key in ("requires_grad", "training", "classes", "python_rng", "grad_mode", "autocast", "deterministic",
                "default_dtype", "filters"):
        assert before[key] == after[key], key


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=model_configs(), batch=batch_shapes(), train_mode=st.booleans(), with_grads=st.booleans(),
       strategies=st.lists(st.sampled_from(list(BUILTIN) + BROKEN), min_size=1, max_size=3),
       scenario=st.sampled_from(["train", "accumulate", "autograd_grad", "autocast", "eval_mode"]),
       bad_setting=st.booleans())
def test_check_leaves_no_trace(config, batch, train_mode, with_grads, strategies, scenario, bad_setting):
    model, inputs = build(config, batch)
    model.train(train_mode)
    if with_grads:
        model(inputs).sum().backward()  # the caller's own .grad must survive untouched
    before = snapshot(model)
    try:
        gc.check(model, inputs, strategies=strategies, scenarios=[scenario],
                 min_memory_reduction=1.5 if bad_setting else None)
    except gc.GradckptUsageError:
        assert bad_setting
    else:
        assert not bad_setting, "min_memory_reduction=1.5 was accepted"
    assert_same(before, snapshot(model))


@settings(max_examples=10, deadline=None)
@given(config=model_configs(), batch=batch_shapes())
def test_correct_checkpointing_always_passes(config, batch):
    # Property: on any small stack, torch's non-reentrant checkpoint equals the baseline exactly,
    # except that BatchNorm statistics are updated again in recompute (train mode).
    model, inputs = build(config, batch)
    (result,) = gc.check(model, inputs, strategies=["non_reentrant"]).results
    expected = "buffers" if config.batchnorm else "pass"
    assert result.outcome == expected, result.message


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=3),
       scale=st.sampled_from([0.0, 1e-7, 1e-5, 1e-3, 1e-1]),
       rtol=st.sampled_from([0.0, 1.3e-6, 1.6e-2]), atol=st.sampled_from([0.0, 1e-5]),
       nan=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_device_comparison_agrees_with_torch_testing(shape, scale, rtol, atol, nan, seed):
    from pytest_gradckpt.pipeline.comparison import compare

    generator = torch.Generator().manual_seed(seed)
    want = torch.randn(shape, generator=generator) + 2.0  # non-zero: vanishing is a separate rule
    got = want + scale * torch.randn(shape, generator=generator)
    if nan and got.numel():
        got.view(-1)[0] = float("nan")
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
        expected_equal = True
    except AssertionError:
        expected_equal = False
    # ... and the relative error norm within rtol (atol alone would pass any tiny-valued tensor)
    if got.numel() and not torch.isnan(got).any():
        rms = float(want.double().square().mean().sqrt())
        bound = rtol * (float(torch.linalg.vector_norm(want.double())) + rms * want.numel() ** 0.5)
        expected_equal &= float(torch.linalg.vector_norm((got - want).double())) <= bound
    assert compare({"t": want}, {"t": got}, rtol, atol).equal == expected_equal
