"""The verdict rules on hand-built evidence: every rule fires on its own finding, and when
several fire the worst outcome of :data:`outcomes.SEVERITY` wins."""

from __future__ import annotations

import dataclasses

import pytest

from pytest_gradckpt import outcomes
from pytest_gradckpt.pipeline import verdicts
from pytest_gradckpt.pipeline.baselines import Baseline
from pytest_gradckpt.compilation.compiled import CompiledRun
from pytest_gradckpt.errors import StrategyNotApplicable
from pytest_gradckpt.probes.compiled_regions import CompiledRegions
from pytest_gradckpt.pipeline.comparison import Comparison
from pytest_gradckpt.probes.recompute_counts import LayerCalls
from pytest_gradckpt.probes.op_counts import OpCounts
from pytest_gradckpt.pipeline.promises import Promise
from pytest_gradckpt.pipeline.runs import Run
from pytest_gradckpt.strategies import get_strategy
from pytest_gradckpt.pipeline.verdicts import Evidence, Limits, judge

WARNING = "None of the inputs have requires_grad=True. Gradients will be None"
LIMITS = Limits(rtol=1e-6, atol=1e-5)
MEMORY_LIMITS = Limits(rtol=1e-6, atol=1e-5, min_memory_reduction=0.5, min_cuda_memory_reduction=0.5)


def evidence(run: Run | None = None, **fields: object) -> Evidence:
    """Evidence of a run that checkpointed one layer correctly, changed by ``fields``."""
    base = Evidence(get_strategy("non_reentrant"), run or Run(), Baseline(Run()), grads=Comparison(),
                    loss=Comparison(), outputs=Comparison(), buffers=Comparison(), recomputed=1, checkpointable=1)
    return dataclasses.replace(base, **fields)


def promised(promise: Promise, calls: dict[str, int], matmuls: int = 12, **fields: object) -> Evidence:
    """Evidence of a run whose strategy made ``promise``; every unit ran once without checkpointing,
    ``calls`` times here; backward ran 12 matmuls without checkpointing and ``matmuls`` here."""
    run = Run(promise=promise, measured={"recompute": LayerCalls(calls=calls), "ops": OpCounts(True, 6, matmuls)})
    base = Run(measured={"recompute": LayerCalls(calls=dict.fromkeys(calls, 1)), "ops": OpCounts(True, 6, 12)})
    return evidence(run, baseline=Baseline(base), **fields)


EVERY_2 = Promise("every_n_layers=2", units=("l.0", "l.1", "l.2", "l.3"), recomputed_units=("l.0", "l.2"))
ALL_FOUR = {"l.0": 2, "l.1": 2, "l.2": 2, "l.3": 2}


def lost(*names: str) -> Comparison:
    return Comparison(vanished=list(names))


def wrong(*names: str) -> Comparison:
    return Comparison(mismatched=list(names), worst=names[0], worst_abs=0.5, worst_rel=0.1, max_abs=0.5)


#: (case, evidence, limits, the rules that fire, outcome, a fragment of the message)
CASES = [
    ("not applicable", evidence(Run(error=StrategyNotApplicable("has no layers"))), LIMITS,
     {"not_applicable"}, outcomes.SKIPPED, "has no layers"),
    ("raised", evidence(Run(error=RuntimeError("boom"))), LIMITS, {"raised"}, outcomes.ERROR, "RuntimeError: boom"),
    ("warned, then raised", evidence(Run(error=RuntimeError("boom")), lost_warning=WARNING), LIMITS,
     {"warned_then_raised", "raised"}, outcomes.SILENT, "the step then raised RuntimeError: boom"),
    ("ranks disagree", evidence(Run(rank_disagreement="rank 1 holds a different gradient for w")), LIMITS,
     {"ranks_disagree"}, outcomes.MISMATCH, "rank 1 holds"),
    ("warned and lost", evidence(grads=wrong("w"), lost_warning=WARNING), LIMITS,
     {"warned_and_lost", "values_differ"}, outcomes.SILENT, "1 parameter gradient(s) lost or wrong"),
    ("gradients vanished", evidence(grads=lost("w")), LIMITS,
     {"gradients_vanished", "values_differ"}, outcomes.SILENT, "got None or all zeros, with no error: w"),
    ("values differ", evidence(loss=wrong("loss")), LIMITS, {"values_differ"}, outcomes.MISMATCH, "1 loss differ"),
    ("loss differs, gradients too", evidence(loss=wrong("loss"), grads=wrong("w", "b")), LIMITS,
     {"values_differ"}, outcomes.MISMATCH,
     "1 loss differ; worst loss: max abs diff 0.5, relative error norm 0.1; also 2 gradients differ; worst w"),
    ("outputs differ, gradients equal", evidence(outputs=wrong("logits")), LIMITS, {"values_differ"},
     outcomes.MISMATCH, "1 outputs differ; worst logits: max abs diff 0.5, relative error norm 0.1; every gradient"),
    ("buffers differ", evidence(buffers=wrong("bn.running_mean")), LIMITS,
     {"buffers_differ"}, outcomes.BUFFERS, "buffers differ"),
    ("promised units not kept", promised(EVERY_2, ALL_FOUR), LIMITS, {"promise_broken"}, outcomes.RECOMPUTE,
     "every_n_layers=2 promised layers 0, 2; recomputed 0, 1, 2, 3"),
    ("promised ops not kept", promised(Promise("MUST_CPU_OFFLOAD", kept_ops="matmuls"), {"l.0": 2}, matmuls=15),
     LIMITS, {"promise_broken"}, outcomes.RECOMPUTE, "MUST_CPU_OFFLOAD recomputed matmuls in eager torch"),
    ("broken promise and a mismatch", promised(EVERY_2, ALL_FOUR, grads=wrong("w")), LIMITS,
     {"promise_broken", "values_differ"}, outcomes.MISMATCH, "1 gradients differ"),
    ("broken promise and a wrong count", promised(EVERY_2, ALL_FOUR, recompute_problems=["l.1 ran 3 time(s)"]),
     LIMITS, {"promise_broken", "wrong_recompute_count"}, outcomes.RECOMPUTE, "promised layers 0, 2"),
    ("wrong recompute count", evidence(recompute_problems=["a ran 3 time(s), expected 2"]), LIMITS,
     {"wrong_recompute_count"}, outcomes.RECOMPUTE, "a ran 3 time(s)"),
    ("never recomputed", evidence(recomputed=0, recompute_problems=["a ran 1 time(s), expected 2"]), LIMITS,
     {"never_recomputed"}, outcomes.NOT_APPLIED, "no layer was recomputed"),
    ("too little saved memory", evidence(activation_reduction=0.1), MEMORY_LIMITS,
     {"too_little_saved_memory"}, outcomes.NOT_APPLIED, "fell by 10%, below min_memory_reduction=50%"),
    ("compiled, no memory saved", evidence(Run(compiled=CompiledRun(frames=2)), recomputed=0, checkpointable=0,
                                           activation_reduction=0.0), LIMITS,
     {"recompute_unobserved"}, outcomes.NOT_APPLIED, "fell by 0% under compile"),
    ("compiled, no region recomputed", evidence(Run(compiled={"frames": 1}, expected_recompute={"l.0": True},
                                                    measured={"compiled_regions": CompiledRegions(graphs=1, regions=2)}),
                                                recomputed=0, checkpointable=0, activation_reduction=0.5), LIMITS,
     {"compiled_regions_not_recomputed"}, outcomes.NOT_APPLIED, "no checkpoint region is recomputed"),
    ("too little CUDA memory", evidence(activation_reduction=0.9, cuda_reduction=0.2), MEMORY_LIMITS,
     {"too_little_cuda_memory"}, outcomes.NOT_APPLIED, "min_cuda_memory_reduction=50%"),
    # precedence: two findings, the worse outcome wins
    ("lost on one rank only", evidence(Run(rank_disagreement="rank 1 holds a different gradient for w"),
                                       grads=lost("w")), LIMITS,
     {"ranks_disagree", "gradients_vanished", "values_differ"}, outcomes.SILENT, "got None or all zeros"),
    ("mismatch and buffers", evidence(grads=wrong("w"), buffers=wrong("bn.running_mean")), LIMITS,
     {"values_differ", "buffers_differ"}, outcomes.MISMATCH, "1 gradients differ"),
    ("buffers and recompute", evidence(buffers=wrong("bn.running_var"), recompute_problems=["a ran 3 time(s)"]),
     LIMITS, {"buffers_differ", "wrong_recompute_count"}, outcomes.BUFFERS, "buffers differ"),
    ("recompute and memory", evidence(recompute_problems=["a ran 3 time(s)"], activation_reduction=0.0),
     MEMORY_LIMITS, {"wrong_recompute_count", "too_little_saved_memory"}, outcomes.RECOMPUTE, "a ran 3 time(s)"),
    ("mismatch and never recomputed", evidence(grads=wrong("w"), recomputed=0), LIMITS,
     {"values_differ", "never_recomputed"}, outcomes.MISMATCH, "gradients differ"),
    ("never recomputed and no memory saved", evidence(recomputed=0, activation_reduction=0.0), MEMORY_LIMITS,
     {"never_recomputed", "too_little_saved_memory"}, outcomes.NOT_APPLIED, "no layer was recomputed"),
]


@pytest.mark.parametrize(("case", "found", "limits", "fired", "outcome", "message"), CASES,
                         ids=[case[0] for case in CASES])
def test_each_rule_on_hand_built_evidence(case, found, limits, fired, outcome, message):
    assert {rule.__name__ for _, rule in verdicts.RULES if rule(found, limits) is not None} == fired
    verdict, text = judge(found, limits)
    assert verdict == outcome
    assert message in text


def test_every_rule_has_a_case_where_it_fires_alone():
    alone = {next(iter(case[3])) for case in CASES if len(case[3]) == 1}
    everyone = {rule.__name__ for _, rule in verdicts.RULES}
    # warned_then_raised, warned_and_lost and gradients_vanished never fire alone: raising, or a lost
    # or wrong gradient, is part of their finding; the cases above show each with its companions
    assert everyone - alone == {"warned_then_raised", "warned_and_lost", "gradients_vanished"}
    assert everyone <= set().union(*(case[3] for case in CASES))


def test_clean_evidence_passes():
    assert judge(evidence(), LIMITS) == (outcomes.PASS, "")


def test_a_kept_promise_passes():
    kept = promised(EVERY_2, {"l.0": 2, "l.1": 1, "l.2": 2, "l.3": 1})
    assert judge(kept, LIMITS) == (outcomes.PASS, "")
    assert judge(promised(Promise("MUST_SAVE", kept_ops="matmuls"), {"l.0": 2}), LIMITS) == (outcomes.PASS, "")


def test_rules_are_in_severity_order():
    ranks = [outcomes.SEVERITY.index(outcome) for outcome, _ in verdicts.RULES]
    assert ranks == sorted(ranks)
    assert {outcome for outcome, _ in verdicts.RULES} == outcomes.ALL - {outcomes.PASS}
