"""The native ops of the weight-format contract, looked up by name, or None where they are not built.

The kernels live in `coreinfer/kernels/` and register themselves as `torch.ops.coreinfer.<name>` when
that package loads; every caller here keeps a PyTorch reference for when an op is missing.
"""

import importlib.util
from functools import cache

import torch


@cache
def op(name: str):
    """torch.ops.coreinfer.<name> if the kernels package provides it on this machine, else None."""
    if importlib.util.find_spec("coreinfer.kernels") is not None:
        kernels = importlib.import_module("coreinfer.kernels")
        available = getattr(kernels, "available", None)
        if callable(available) and not available(name):
            return None
    try:
        return getattr(torch.ops.coreinfer, name)
    except (AttributeError, RuntimeError):
        return None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a native op may take these: CPU tensors, a decode-sized x (M <= 16 rows), contiguous."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 16
            and all(w.device.type == "cpu" and w.is_contiguous() for w in weights))
