"""The native ops of the weight-format contract, looked up by name, or None where they are not built.

The kernels live in `coreinfer/kernels/` (one module per format, each with a `load()` that builds and
registers its ops as `torch.ops.coreinfer.<name>` and says whether they run on this CPU); every caller
here keeps a PyTorch reference for when an op is missing.
"""

import importlib
from functools import cache

import torch

KERNEL_MODULES = ("q8_0", "q4", "rows")  # coreinfer.kernels.<module>, where present


@cache
def op(name: str):
    """torch.ops.coreinfer.<name> if a kernels module builds and registers it on this machine, else None."""
    for module in KERNEL_MODULES:
        try:
            kernels = importlib.import_module(f"coreinfer.kernels.{module}")
        except ImportError:
            continue
        load = getattr(kernels, "load", None)
        if callable(load):
            load()
    try:
        found = getattr(torch.ops.coreinfer, name)
    except (AttributeError, RuntimeError):
        return None
    supported = getattr(torch.ops.coreinfer, f"{name}_supported", None) if hasattr(torch.ops, "coreinfer") else None
    return found if supported is None or supported() else None


def usable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether a native op may take these: CPU tensors, a decode-sized x (M <= 16 rows), contiguous."""
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 16
            and all(w.device.type == "cpu" and w.is_contiguous() for w in weights))
