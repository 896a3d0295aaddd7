"""Ground truth, in plain torch (no pytest-gradckpt code), for the verdict that differs between
torch release lines: selective activation checkpointing (SAC) and a custom op registered with an
ordered effect (``fixtures/effectful_op``).

    python -m benchmarks.evidence.torch_lines_ground_truth     # in any environment; prints one JSON line

The op scales by a factor drawn from a stream restarted at every forward; SAC's policy
recomputes everything (``PREFER_RECOMPUTE``). Counted: how often the op ran in one training step
(2 = forward + recompute in backward, 1 = its output was saved) and how many parameter gradients
differ from the same step without checkpointing.
"""

from __future__ import annotations

import functools
import json

import torch
from torch._higher_order_ops.effects import _EffectType, _register_effectful_op
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

CALLS = [0]
_library = torch.library.Library("gradckpt_truth", "DEF")
_library.define("drifting_scale(Tensor x) -> Tensor")
_library.impl("drifting_scale", lambda x: (CALLS.__setitem__(0, CALLS[0] + 1), x * (1.0 + 0.25 * CALLS[0]))[1],
              "CompositeExplicitAutograd")
torch.library.register_autograd("gradckpt_truth::drifting_scale", lambda ctx, grad: grad * ctx.scale,
                                setup_context=lambda ctx, inputs, output: setattr(ctx, "scale", output / inputs[0]))
_register_effectful_op(torch.ops.gradckpt_truth.drifting_scale.default, _EffectType.ORDERED)


def main() -> int:
    torch.manual_seed(0)
    inner, outer, x = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.randn(4, 8)
    parameters = [*inner.parameters(), *outer.parameters()]

    def block(x: torch.Tensor) -> torch.Tensor:
        return x + outer(torch.ops.gradckpt_truth.drifting_scale(inner(x)))

    def step(run: object) -> tuple[list[torch.Tensor], int]:
        for p in parameters:
            p.grad = None
        CALLS[0] = 0
        run(x).sum().backward()
        return [p.grad.clone() for p in parameters], CALLS[0]

    plain, plain_calls = step(block)
    recompute_all = lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE  # noqa: E731
    policy = functools.partial(create_selective_checkpoint_contexts, recompute_all)
    sac, sac_calls = step(lambda x: checkpoint(block, x, use_reentrant=False, context_fn=policy))
    print(json.dumps({"torch": torch.__version__, "case": "sac-effectful-op", "op_calls_plain": plain_calls,
                      "op_calls_sac": sac_calls, "parameters": len(plain),
                      "gradients_differ": sum(not torch.allclose(a, b) for a, b in zip(plain, sac, strict=True))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
