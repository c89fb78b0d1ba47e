"""coreinfer: decode with each prompt's core neurons (CoreInfer, Wang et al. 2024)."""

from .api import LLM, Completion, RuntimeConfig
from .core import CoreConfig
from .generate import GenerationConfig

__all__ = ["LLM", "Completion", "CoreConfig", "GenerationConfig", "RuntimeConfig"]
