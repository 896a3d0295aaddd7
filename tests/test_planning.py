"""``gc.plan``: only correct configurations are ranked, the recommendation fits the budget, and the
peaks it ranks by are the ones plain torch counts."""

from __future__ import annotations

import json

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt.errors import GradckptUsageError
from tests import mutations


def wide_stack():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                                    torch.nn.Tanh()) for _ in range(4)])
    return net, torch.randn(32, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)


def plain_peak_without_checkpointing():
    """Ground truth on CPU: weights + gradients + the activations autograd keeps (one count per
    storage, weights left out), in plain torch."""
    net, x = wide_stack()
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x.detach().requires_grad_())
    parameters = sum(p.numel() * p.element_size() for p in net.parameters())
    return 2 * parameters + sum(kept.values())


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    broken = gc.Strategy.from_checkpoint_fn("off_by_a_tenth_percent", mutations.off_by_a_tenth_percent)
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    budget = plain_peak_without_checkpointing() - 1  # no checkpointing does not fit
    return gc.plan(*wide_stack(), strategies=["non_reentrant", "sac", broken], memory_budget=budget,
                   repeats=2, report=path), path, budget


def test_the_peaks_are_plain_torchs(ranked):
    found, _, _ = ranked
    assert found.option("none").peak_bytes == plain_peak_without_checkpointing()


def test_a_configuration_with_a_failed_verdict_is_never_ranked(ranked):
    found, _, _ = ranked
    broken = found.option("off_by_a_tenth_percent")
    assert broken.outcome == "mismatch"
    assert (broken.peak_bytes, broken.seconds, broken.on_front, broken.fits) == (None, None, False, None)
    assert found.recommended != "off_by_a_tenth_percent"
    assert "never ranked, their verdict is not pass: off_by_a_tenth_percent (mismatch)" in found.why


def test_the_recommendation_is_the_fastest_correct_one_that_fits(ranked):
    found, _, budget = ranked
    assert found.option("none").fits is False
    fitting = [o for o in found.options if o.correct and o.fits]
    assert fitting, found.table()
    best = found.option(found.recommended)
    assert best.peak_bytes <= budget
    assert best.seconds == min(o.seconds for o in fitting)
    assert any(o.on_front for o in fitting)


def test_the_json_and_the_png_lie_side_by_side(ranked):
    found, path, _ = ranked
    document = json.loads(path.read_text())
    assert document["recommended"] == found.recommended
    assert {o["strategy"] for o in document["options"]} == {"none", "non_reentrant", "sac", "off_by_a_tenth_percent"}
    assert path.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nothing_fits_a_budget_below_every_peak():
    found = gc.plan(*wide_stack(), strategies=["non_reentrant"], memory_budget=1, repeats=1, warmup=0)
    assert found.recommended is None
    assert found.why.startswith("no correct configuration fits the budget of 0.00 MiB; the smallest peak is ")


def test_a_budget_that_is_not_a_size_is_refused():
    with pytest.raises(GradckptUsageError, match="memory_budget='lots'"):
        gc.plan(*wide_stack(), memory_budget="lots")


PLAN_TEST = '''
import torch
from tests.test_planning import wide_stack


def test_which_checkpointing(gradckpt):
    found = gradckpt.plan(*wide_stack(), strategies=["non_reentrant"], memory_budget="1GiB", repeats=1)
    assert found.recommended in ("none", "non_reentrant")


def test_nothing_fits(gradckpt):
    gradckpt.plan(*wide_stack(), strategies=["non_reentrant"], memory_budget=1, repeats=1, warmup=0)
'''


def test_the_pytest_twin_writes_the_plan_beside_the_report(pytester, request, monkeypatch):
    # the subprocess imports tests.test_planning: the project root must be on its path, not only on ours
    monkeypatch.setenv("PYTHONPATH", str(request.config.rootpath))
    pytester.makepyfile(test_plan=PLAN_TEST)
    result = pytester.runpytest_subprocess("--gradckpt", "--gradckpt-report=out/report.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*pytest-gradckpt plan: no correct configuration fits the budget*"])
    written = json.loads((pytester.path / "out" / "report.plan-test_which_checkpointing.json").read_text())
    assert written["recommended"] in ("none", "non_reentrant")
    assert (pytester.path / "out" / "report.plan-test_which_checkpointing.png").exists()
