"""Model families, one module each, and the one function that builds a model from a checkpoint."""

import torch

from . import adopt, gemma3, llama, opt, validate
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


def build_model(config: dict, weights: dict, device="cpu", dtype=torch.float32, formats: str = "dense",
                progress: bool = False, contiguous: bool = True, in_file: dict | None = None) -> CausalLM:
    """Instantiate on the meta device, then adopt the checkpoint tensors on `device`: `formats` "dense"
    casts them to `dtype`; "auto" or "q8_0" converts each into a weight format (models/adopt.py), the
    compute dtype `dtype`. Weights may be tensors or a GGUF's FileTensors (io/gguf.py). contiguous
    False adopts dense views as they are (the transposed FFN down too), so tensors of a memory-mapped
    checkpoint stay in its file: the CPU memory-limited mode (engine/residency.py). `in_file` (block
    formats): the FFN weights are left unconverted in it, by layer (models/adopt.py), for that mode."""
    model_type = validate.check(config, FAMILIES)  # one line naming the field or the architecture
    config_cls, model_cls, sanitize = FAMILIES[model_type]
    cfg = config_cls.from_dict(config)
    with torch.device("meta"):
        model = model_cls(cfg)
    if formats != "dense":
        if model_type == "opt":
            raise UnsupportedModel(f"--weights {formats} takes llama, mistral, qwen2 and gemma3 models; "
                                   "OPT runs dense, int8 or int4")
        adopt.adopt(model, sanitize(weights, cfg), formats, device, dtype, progress, in_file)
        return model.eval()
    # one tensor at a time: a GGUF's FileTensors are dequantized as they are adopted
    weights = {name: w.dequantize(dtype) if adopt._is_file_tensor(w) else w for name, w in weights.items()}
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
