"""The distributed scenarios on CUDA with NCCL, one process per GPU started by torchrun.

(``check(..., device="cuda", scenarios=["ddp"])`` now starts one rank per GPU itself, and
``torchrun -m pytest --gradckpt`` runs checks on torchrun's ranks; this script is the engine's
step used directly.) Here torchrun starts the ranks and each one runs the engine's own step with the engine's own DDP/FSDP2 wrapping
(:class:`pytest_gradckpt.ranks.distributed.Parallel`), then the engine's judge compares every
strategy with the same distributed run without checkpointing, and ranks are checked to hold
identical gradients.

    torchrun --nproc-per-node 2 -m benchmarks.evidence.ddp_cuda      # writes $OUT or benchmarks/results/ddp-cuda-*.json
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from pytest_gradckpt.pipeline.subject import Subject  # noqa: E402
from pytest_gradckpt.ranks.distributed import Parallel, options  # noqa: E402
from pytest_gradckpt.pipeline.runs import Stepper  # noqa: E402
from pytest_gradckpt.pipeline import verdicts  # noqa: E402
from pytest_gradckpt.pipeline.baselines import Baseline  # noqa: E402
from pytest_gradckpt.pipeline.comparison import default_tolerances  # noqa: E402
from pytest_gradckpt.pipeline.scenarios import SCENARIOS  # noqa: E402
from pytest_gradckpt.strategies import BUILTIN, get_strategy  # noqa: E402
from pytest_gradckpt.zoo import plain  # noqa: E402


def tiny_llama():
    from pytest_gradckpt.zoo.peft_models import llama_inputs, tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()), llama_inputs(batch=4)


CASES = [
    ("reused_block", plain.reused_block_net, {}),
    ("reused_block static_graph", plain.reused_block_net, {"static_graph": True}),
    ("dropout_mask", plain.dropout_mask_net, {"micro_batches": 2}),
    ("llama", tiny_llama, {}),
]


def main() -> int:
    cuda = torch.cuda.is_available()  # without a GPU: the same run on gloo, as a smoke test
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    rtol, atol = default_tolerances(torch.float32)
    limits = verdicts.Limits(rtol, atol)
    rows = []
    for name, factory, ddp_options in CASES:
        model, inputs = factory()
        session = Stepper(Subject(model, inputs, None, device), None, 0, 120.0, options(ddp_options))
        for scenario_name in ("ddp", "fsdp2"):
            if ddp_options and scenario_name == "fsdp2":
                continue  # DDP options only
            scenario = SCENARIOS[scenario_name]
            parallel = Parallel(scenario.distributed, rank, session.distributed)
            base = session.step(scenario, None, parallel=parallel)
            for strategy_name in BUILTIN:
                row = {"case": name, "scenario": scenario_name, "strategy": strategy_name}
                if base.error is not None:
                    row.update(outcome="skipped", message=f"baseline failed: {base.error}")
                else:
                    run = session.step(scenario, get_strategy(strategy_name), parallel=parallel)
                    gathered = [None] * dist.get_world_size()
                    dist.all_gather_object(gathered, {k: v for k, v in run.grads.items()})
                    if run.error is None and any(
                            any((g[k] is None) != (gathered[0][k] is None) or
                                (g[k] is not None and not torch.equal(g[k], gathered[0][k])) for k in g)
                            for g in gathered[1:]):
                        run.rank_disagreement = "ranks hold different gradients"
                    evidence = verdicts.gather(get_strategy(strategy_name), Baseline(base), run, limits)
                    outcome, message = verdicts.judge(evidence, limits)
                    metrics = evidence.metrics()
                    row.update(outcome=outcome, message=message[:200],
                               max_grad_diff=metrics.get("max_grad_diff"),
                               recomputed_layers=metrics.get("recomputed_layers"),
                               cuda_reduction=metrics.get("cuda_reduction"))
                if rank == 0:
                    print(json.dumps(row), flush=True)
                rows.append(row)
                dist.barrier()
    if rank == 0:
        document = {"device": f"{dist.get_world_size()} x {torch.cuda.get_device_name() if cuda else 'cpu'}",
                    "torch": torch.__version__, "backend": dist.get_backend(), "rows": rows}
        out = Path(os.environ.get("OUT", Path(__file__).resolve().parents[1] / "results"))
        path = out / f"ddp-cuda-{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(document, indent=1) + "\n")
        print(f"wrote {path}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
