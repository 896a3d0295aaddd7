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
from pathlib import Path
from typing import Any


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
