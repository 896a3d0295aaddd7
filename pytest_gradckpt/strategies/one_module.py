"""Import one module of a library whose package ``__init__`` cannot run here.

LLaMA-Factory's ``llamafactory.model`` imports its whole model loader, and ``unsloth_zoo``'s
``__init__`` needs ``import unsloth`` and a GPU; the checkpointing code the built-ins run needs
neither. A bare package object stands in for the heavy package while that one module is
imported, and is taken out of ``sys.modules`` again afterwards.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_gradckpt.pipeline.units import ModelInfo


def import_one_module(module: str, package: str, distribution: str, missing: str) -> Any:
    """``module``, imported with ``package`` (inside ``distribution``) standing in bare; raise
    ImportError with ``missing`` when the distribution is absent, or saying why the import failed.

    Example:
        >>> import_one_module("json.decoder", "json", "json", "no json").JSONDecoder.__name__
        'JSONDecoder'
        >>> try:
        ...     import_one_module("no_such_lib.x", "no_such_lib", "no_such_lib", "not installed (pip install it)")
        ... except ImportError as error:
        ...     str(error)
        'not installed (pip install it)'
    """
    if module in sys.modules:
        return sys.modules[module]
    spec = importlib.util.find_spec(distribution)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(missing)
    stub = package not in sys.modules
    if stub:
        shell = types.ModuleType(package)
        inner = package.split(".")[1:]
        shell.__path__ = [str(Path(next(iter(spec.submodule_search_locations))).joinpath(*inner))]
        sys.modules[package] = shell
    try:
        return importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - reported as the reason the strategy does not apply
        raise ImportError(f"cannot import {module}: {type(error).__name__}: {error}") from error
    finally:
        if stub:
            sys.modules.pop(package, None)
            for name in [n for n in sys.modules if n.startswith(package + ".") and sys.modules[n] is None]:
                sys.modules.pop(name)


def library_refusal(load: Callable[[], Any], info: ModelInfo, library: str, cuda_only: str | None = None) -> str | None:
    """Why a library's own checkpointing does not apply to ``info``'s model (None: it does): its
    module cannot be imported (``load()`` raises ImportError), the model is not a transformers
    model, or, where ``cuda_only`` gives the reason, the model is not on CUDA.

    Example:
        >>> import torch
        >>> from pytest_gradckpt.pipeline.units import ModelInfo
        >>> info = ModelInfo(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0"])
        >>> library_refusal(lambda: None, info, "Lib")
        'not a transformers model: Lib checkpoints transformers models'
        >>> def absent() -> None:
        ...     raise ImportError("lib is not installed (pip install lib)")
        >>> library_refusal(absent, info, "Lib")
        'lib is not installed (pip install lib)'
    """
    try:
        load()
    except ImportError as error:
        return str(error)
    if info.hf_model is None:
        return f"not a transformers model: {library} checkpoints transformers models"
    device = next((p.device for p in info.model.parameters()), None)
    if cuda_only is not None and (device is None or device.type != "cuda"):
        return cuda_only
    return None
