"""Ground truth for the verdicts that differ between transformers release lines, in plain
transformers + peft + torch (no pytest-gradckpt code): each difference the suite reports between
4.57.x and 5.x is reproduced here without the engine, so it is the framework's behaviour, not ours.

    python -m benchmarks.evidence.release_lines_ground_truth        # in any environment; prints one line per case

Cases (tiny configs, random weights, CPU, float32):
- ``lora-reentrant``: PEFT LoRA on Llama (frozen embeddings), the model's own
  ``gradient_checkpointing_enable(use_reentrant=True)``: LoRA parameters that lost their gradient.
- ``t5-sac``: T5 with torch's selective activation checkpointing (matmul outputs saved) through
  the model's own ``gradient_checkpointing_enable``: parameters whose gradient differs.
- ``gpt_bigcode-switch`` / ``layoutlm-switch``: bytes autograd saves in forward with the model's
  own switch against none (a switch that checkpoints saves far less), and gradients lost under
  reentrant checkpointing.
- ``<model>-layer-calls`` (transformers 5.24's new ``inkling2_loop_text`` and ``lara_mini``, with
  ``llama`` as the control): forward pre-hooks on the decoder layers record, call by call, whether
  a layer got the previous call's output as its hidden states and the same other arguments (what
  fusing consecutive layers into one checkpointed segment assumes). The tiny config comes from the
  zoo's config shrinker (sizes only); the observation is plain torch hooks.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from typing import Any

import torch
import transformers


def _grads(model: Any, **inputs: Any) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad()
    model(**inputs).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _lost(plain: dict[str, Any], got: dict[str, Any]) -> int:
    return sum(1 for n, g in plain.items() if g is not None and got.get(n) is None)


def lora_reentrant() -> dict[str, Any]:
    import peft

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 8))
    plain = _grads(copy.deepcopy(model), input_ids=ids, labels=ids)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    try:
        got, error = _grads(checkpointed, input_ids=ids, labels=ids), None
    except RuntimeError as failure:
        got, error = {}, str(failure)[:80]
    return {"case": "lora-reentrant", "lora_parameters": len(plain), "lost": _lost(plain, got), "error": error}


def t5_sac() -> dict[str, Any]:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(config)
    ids, labels = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 6))
    saved = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    plain = _grads(copy.deepcopy(model), input_ids=ids, labels=labels)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, policy)})
    got = _grads(checkpointed, input_ids=ids, labels=labels)
    differ = [n for n in plain if not torch.allclose(plain[n], got[n], rtol=1.3e-6, atol=1e-5)]
    return {"case": "t5-sac", "parameters": len(plain), "differ": len(differ), "worst": differ[:1]}


def own_switch(name: str, head: Any) -> dict[str, Any]:
    """Whether the model's own switch really checkpoints (bytes autograd saves in forward, counted
    with a saved-tensor hook: checkpointed layers save only their inputs), and which gradients
    reentrant checkpointing loses."""
    config = transformers.AutoConfig.for_model(
        name, vocab_size=64, hidden_size=32, n_embd=32, intermediate_size=64, n_inner=64, num_hidden_layers=2,
        n_layer=2, num_attention_heads=4, n_head=4)
    torch.manual_seed(0)
    model = head.from_config(config)
    ids = torch.randint(0, 64, (2, 16))

    def step(m: Any) -> tuple[dict[str, Any], int]:
        saved = [0]

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[0] += tensor.nbytes
            return tensor.detach()

        m.train()
        with warnings.catch_warnings(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            warnings.simplefilter("ignore")
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}, saved[0]

    plain, plain_bytes = step(copy.deepcopy(model))
    row: dict[str, Any] = {"case": f"{name}-switch", "saved_bytes_plain": plain_bytes}
    for reentrant in (False, True):
        checkpointed = copy.deepcopy(model)
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        got, saved = step(checkpointed)
        mode = "reentrant" if reentrant else "non_reentrant"
        row[f"saved_bytes_{mode}"], row[f"lost_{mode}"] = saved, _lost(plain, got)
    return row


def layer_calls(model_type: str) -> dict[str, Any]:
    """Call by call, does each decoder layer get the previous layer call's output and the same
    other arguments? Counts the calls where it does not."""
    from pytest_gradckpt.zoo.tiny_configs import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type))
    layers = next(m for name, m in model.named_modules() if name.endswith("layers")
                  and isinstance(m, torch.nn.ModuleList))
    calls: list[tuple[int, Any, tuple[Any, ...], dict[str, Any]]] = []
    outputs: list[Any] = []

    def before(index: int, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        others = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls.append((index, hidden, args[1:], others))

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(functools.partial(before, index), with_kwargs=True)
        layer.register_forward_hook(after, with_kwargs=True)
    ids = torch.randint(3, 60, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)
    order = [index for index, *_ in calls]
    not_chained = [f"{i}<-{calls[n - 1][0]}" for n, (i, hidden, _, _) in enumerate(calls[1:], start=1)
                   if hidden is not outputs[n - 1]]
    other_arguments = {}
    for n, (i, _, args, kwargs) in enumerate(calls[1:], start=1):
        _, _, previous_args, previous_kwargs = calls[n - 1]
        differ = [f"arg{k + 1}" for k in range(max(len(args), len(previous_args)))
                  if k >= len(args) or k >= len(previous_args) or args[k] is not previous_args[k]]
        differ += sorted(k for k in set(kwargs) | set(previous_kwargs)
                         if kwargs.get(k, "absent") is not previous_kwargs.get(k, "absent"))
        if differ:
            other_arguments[f"{i}<-{calls[n - 1][0]}"] = differ
    return {"case": f"{model_type}-layer-calls", "layers": len(layers), "calls": order,
            "input_not_previous_output": not_chained, "other_arguments_differ": other_arguments}


def main() -> int:
    rows = [lora_reentrant(), t5_sac(),
            own_switch("gpt_bigcode", transformers.AutoModelForCausalLM),
            own_switch("layoutlm", transformers.AutoModelForMaskedLM)]
    rows += [layer_calls(name) for name in ("llama", "inkling2_loop_text", "lara_mini")
             if name in transformers.CONFIG_MAPPING]
    for row in rows:
        print(json.dumps({"transformers": transformers.__version__, **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
