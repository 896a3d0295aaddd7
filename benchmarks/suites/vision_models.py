"""timm and torchvision models under every relevant strategy, with plain-torch ground truth.

CI cannot run this: the package index offers only CUDA builds of torchvision for torch 2.13,
which fail at import against the CPU torch (``operator torchvision::nms does not exist``),
and timm imports torchvision. The GPU machine's image has both, so this runs there (on its
CPU, where kernels are deterministic), and the result is committed.

    python -m benchmarks vision-models      # one row per model
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks.case import Case, Emit

ABOUT = "timm and torchvision models under every relevant strategy, with plain-torch ground truth (CPU)"
CASES = {"all": Case("a timm ViT (4 blocks), timm's ResNet-18, torchvision's ResNet-18; 4 x 3 x 32 x 32 images",
                     {}, needs="torchvision")}
STRATEGIES = ["non_reentrant", "reentrant", "offload", "sac", "torch_wrapper", "native"]


def models() -> list[tuple[str, Any, Any]]:
    import timm
    import torchvision

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                            depth=4)
    torch.manual_seed(0)
    convnet = timm.create_model("resnet18", pretrained=False, num_classes=10)
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=10)
    return [("timm-vit", vit, images), ("timm-resnet18", convnet, images), ("torchvision-resnet18", resnet, images)]


def ground_truth(model: Any, images: Any) -> dict[str, Any]:
    """Plain torch: the library's own switch against no checkpointing, gradients and BN buffers."""
    def step(enable: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        copied = copy.deepcopy(model).train()
        if enable:
            copied.set_grad_checkpointing(True)
        torch.manual_seed(0)
        copied(images).float().square().mean().backward()
        return ({n: p.grad for n, p in copied.named_parameters()}, {n: b for n, b in copied.named_buffers()})

    if not hasattr(model, "set_grad_checkpointing"):
        return {"native_switch": False}
    (plain_grads, plain_buffers), (ckpt_grads, ckpt_buffers) = step(False), step(True)
    grads_equal = all(torch.equal(plain_grads[n], ckpt_grads[n]) for n in plain_grads)
    buffers_equal = all(torch.equal(plain_buffers[n], ckpt_buffers[n]) for n in plain_buffers)
    return {"native_switch": True, "native_gradients_equal": grads_equal, "native_buffers_equal": buffers_equal}


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    for name, model, images in models():
        truth = ground_truth(model, images)
        report = gc.check(model, images, strategies=STRATEGIES, name=name)
        print(name, report.baseline["layers_found_by"], truth, report.table(), sep="\n", flush=True)
        emit({"model": name, "units": report.baseline["layers"], "units_found_by": report.baseline["layers_found_by"],
              "ground_truth": truth,
              "results": {r.strategy: {"outcome": r.outcome, "message": r.message[:200],
                                       "recomputed_units": r.metrics.get("recomputed_units")}
                          for r in report.results}})
