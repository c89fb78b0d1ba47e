"""Model families, one module each, and the one function that builds a model from a checkpoint."""

import torch

from . import gemma3, llama, opt, validate
from .common import CausalLM, fuse_qkv
from .validate import UnsupportedModel

# config.json `model_type` -> (config class, model class, sanitize)
FAMILIES = {
    "llama": (llama.LlamaConfig, llama.Model, llama.sanitize),
    "mistral": (llama.LlamaConfig, llama.Model, llama.sanitize),
    "qwen2": (llama.LlamaConfig, llama.Model, llama.sanitize),
    "qwen3": (llama.LlamaConfig, llama.Model, llama.sanitize),
    "gemma3_text": (gemma3.Gemma3Config, gemma3.Model, llama.sanitize),  # same HF parameter names
    "opt": (opt.OPTConfig, opt.Model, opt.sanitize),
}


def build_model(config: dict, weights: dict, device="cpu", dtype=torch.float32, contiguous=True) -> CausalLM:
    """Instantiate on the meta device, then adopt the checkpoint tensors (cast to `dtype` on `device`).
    contiguous False adopts views as they are (the transposed FFN down too), so tensors of a
    memory-mapped checkpoint stay in its file: the CPU memory-limited mode (engine/residency.py)."""
    model_type = validate.check(config, FAMILIES)  # one line naming the field or the architecture
    config_cls, model_cls, sanitize = FAMILIES[model_type]
    cfg = config_cls.from_dict(config)
    with torch.device("meta"):
        model = model_cls(cfg)
    state = fuse_qkv(sanitize(weights, cfg))
    expected = set(model.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {model_type}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    for name, param in model.state_dict().items():
        if state[name].shape != param.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model {tuple(param.shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype).contiguous() if contiguous else v.to(device=device, dtype=dtype)
                           for k, v in state.items()},
                          assign=True, strict=True)
    if cfg.tie_word_embeddings:  # the copy above untied them; share one tensor again
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()
