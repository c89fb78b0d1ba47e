"""coreinfer: decode with each prompt's core neurons (CoreInfer, Wang et al. 2024)."""

from .api import LLM, Completion, RuntimeConfig
from .engine.generate import GenerationConfig
from .engine.policy import CoreConfig

__all__ = ["LLM", "Completion", "CoreConfig", "GenerationConfig", "RuntimeConfig"]
