"""``torch.compile``'s module wrapper (``OptimizedModule``): the one place that recognises it.

Modules that must not import ``torch._dynamo`` (it costs seconds on a cold start) ask
:func:`is_optimized_module`; code that builds wrappers takes the class from :func:`optimized_module_type`.
"""

from __future__ import annotations

import sys
from typing import Any


def optimized_module_type() -> type[Any]:
    """The class ``torch.compile(module)`` returns (importing ``torch._dynamo`` if it was not).

    Example:
        >>> optimized_module_type().__name__
        'OptimizedModule'
    """
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def is_optimized_module(module: object) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper, asked without importing ``torch._dynamo``:
    before it is imported nothing can be one.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> is_optimized_module(lin), is_optimized_module(torch.compile(lin, backend="eager"))
        (False, True)
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)
