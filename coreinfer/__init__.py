"""coreinfer: decode with each prompt's core neurons (CoreInfer, Wang et al. 2024).

The public names load on first use (PEP 562), so that importing a submodule, as `coreinfer --help`
does, does not import torch and transformers (seconds) first.
"""

import importlib

_PUBLIC = {"LLM": ".api", "Completion": ".api", "RuntimeConfig": ".api", "GenerationConfig": ".engine.generate",
           "CoreConfig": ".engine.policy"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'coreinfer' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
