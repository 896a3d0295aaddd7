"""Ground truth, in plain peft + transformers + torch (no pytest-gradckpt code), for the verdict
that differs between peft release lines (``fixtures/peft_add_adapter``).

    python -m benchmarks.evidence.peft_lines_ground_truth     # in any environment; prints one JSON line

LoRA on a tiny Llama, the input embeddings made trainable by the user, then ``add_adapter``: does
the embedding still train, and do the hidden states entering the first decoder layer require
grad? Reentrant checkpointing back-propagates into a layer only when one of its inputs requires
grad, so when they do not, a reentrant-checkpointed step loses every LoRA gradient of the
checkpointed layers (counted here with the layers wrapped in torch's reentrant checkpoint).
"""

from __future__ import annotations

import json
import warnings

import peft
import torch
import transformers
from torch.utils.checkpoint import checkpoint


def main() -> int:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    embedding = model.get_input_embeddings().weight
    embedding.requires_grad_(True)
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    layers = model.base_model.model.model.layers
    entering: list[bool] = []
    layers[0].register_forward_pre_hook(lambda m, args, kwargs: entering.append(
        (args[0] if args else kwargs["hidden_states"]).requires_grad), with_kwargs=True)
    for layer in layers:  # reentrant checkpoint of each layer; its keyword arguments ride in a closure
        layer.forward = (lambda forward: lambda hidden_states, **kw: checkpoint(
            lambda h: forward(h, **kw), hidden_states, use_reentrant=True))(layer.forward)
    ids = torch.randint(0, 64, (2, 8))
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        except RuntimeError as failure:  # nothing in the graph requires grad: every gradient is lost
            error = str(failure)[:80]
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    print(json.dumps({"peft": peft.__version__, "case": "add_adapter-trained-embeddings",
                      "embedding_trains_after_add_adapter": embedding.requires_grad,
                      "hidden_states_into_layer_0_require_grad": entering[0],
                      "lora_parameters": len(lora), "lora_gradients_lost_under_reentrant":
                          sum(1 for g in lora.values() if g is None), "error": error}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
