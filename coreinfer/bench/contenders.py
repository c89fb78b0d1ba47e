"""The contenders `coreinfer bench` times: coreinfer itself (`Ours`), transformers `generate`, llama.cpp."""

import time
from pathlib import Path

import torch

from ..engine.compact import CoreWeights
from ..engine.generate import GenerationConfig, decode
from ..engine.offload import OffloadSession, Streamer
from ..engine.policy import CoreConfig
from ..engine.session import Session, make_policy
from ..io.loading import cache_dir, float_weights


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_bytes(*modules) -> int:
    """Bytes of the distinct parameters and buffers of `modules` that live on a CUDA device."""
    held = {t.data_ptr(): t.nbytes for m in modules for t in [*m.parameters(), *m.buffers()] if t.is_cuda}
    return sum(held.values())


class Ours:
    """coreinfer on one model copy: dense or core, fp32/bf16 or int8 weights; with `budget` (bytes),
    the memory-limited mode on a model `offload.place`d on the GPU."""

    def __init__(self, name, model, core: CoreConfig | None, budget: int | None = None, compiled=None,
                 dense_ref: str | None = None):
        self.name, self.model, self.core, self.note, self.budget = name, model, core, "", budget
        self.dense_ref = dense_ref  # the contender whose decode rate its "vs dense" ratio divides by
        self.compiled = compiled  # a CompiledStep shared by the contenders of one model, or None: eager
        self.cores, self.caches = CoreWeights(), None  # reused across runs, as LLM does (and CUDA graphs need)
        self.device = model.embed_tokens.weight.device
        self.streamer = Streamer(model, self.device) if budget is not None else None

    def held_bytes(self) -> int:
        """GPU bytes kept between runs: weights, staging buffers, core rows and KV caches."""
        kept = [t for c in self.cores.layers.values() for t in getattr(c, "weights", {}).values()]
        kept += [t for c in self.caches or [] for t in (c.k, c.v)]
        return device_bytes(self.model, *(self.streamer.slots if self.streamer else [])) + sum(
            t.nbytes for t in kept if t.is_cuda)

    def run(self, ids: list[int], new_tokens: int, eos: set[int]) -> tuple[float, float, float, int]:
        """One generation -> (prefill s, select+compact ms, decode tok/s, bytes per decode step)."""
        gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        policy = make_policy(self.core, self.model)
        if self.budget is None:
            session = Session(self.model, [ids], new_tokens, policy=policy, cores=self.cores, caches=self.caches,
                              compiled=self.compiled)
        else:
            session = OffloadSession(self.model, [ids], new_tokens, policy=policy, cores=self.cores, caches=self.caches,
                                     budget=self.budget, streamer=self.streamer, compiled=self.compiled)
        self.caches = session.caches
        compiling = getattr(self.compiled, "compile_s", 0.0)
        t0 = time.perf_counter()
        steps = decode(session, gen, eos)
        next(steps)
        synchronize(self.device)
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        synchronize(self.device)
        t2 = time.perf_counter() - (getattr(self.compiled, "compile_s", 0.0) - compiling)  # decoding alone
        core = session.stats
        ms = core.select_ms + core.compact_ms if core else 0.0
        prefill_s = t1 - t0 - ms / 1e3
        if self.streamer is not None:
            self.note = f"{session.offload.step_bytes_moved / 1e6:.0f} MB/token host->GPU"
        return prefill_s, ms, n / (t2 - t1), core.bytes_core if core else self.model.weight_bytes()


class Transformers:
    """transformers `generate`, greedy, same weights, dtype and threads: the baseline users have."""

    def __init__(self, hf_model, name="transformers", note="dense"):
        self.name, self.hf, self.note = name, hf_model, note
        self.device = hf_model.get_input_embeddings().weight.device  # with a device map: where tokens go in

    def held_bytes(self) -> int:
        return device_bytes(self.hf)

    def run(self, ids, new_tokens, eos):
        x = torch.tensor([ids], device=self.device)
        kw = dict(do_sample=False, min_new_tokens=new_tokens, pad_token_id=0)
        synchronize(self.device)
        t0 = time.perf_counter()
        self.hf.generate(x, max_new_tokens=1, **{**kw, "min_new_tokens": 1})
        synchronize(self.device)
        t1 = time.perf_counter()
        self.hf.generate(x, max_new_tokens=new_tokens, **kw)
        synchronize(self.device)
        t2 = time.perf_counter()
        decode_s = (t2 - t1) - (t1 - t0)  # the same prefill, then new_tokens - 1 decode steps
        nbytes = sum(p.nbytes for p in self.hf.parameters()) - self.hf.get_input_embeddings().weight.nbytes * (
            self.hf.get_output_embeddings().weight is not self.hf.get_input_embeddings().weight)
        return t1 - t0, 0.0, (new_tokens - 1) / decode_s, nbytes


class LlamaCpp:
    """llama.cpp through llama_cpp, on the original GGUF: the CPU engine users would otherwise pick."""

    def __init__(self, gguf_path, threads: int):
        from llama_cpp import Llama

        self.name, self.note = f"llama.cpp {gguf_type(gguf_path)}", gguf_path.name
        self.llm = Llama(str(gguf_path), n_ctx=2048, n_threads=threads, verbose=False)

    def run(self, ids, new_tokens, eos):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.llm.sample(temp=0.0)
            self.llm.eval([token])
        t2 = time.perf_counter()
        return t1 - t0, 0.0, (new_tokens - 1) / (t2 - t1), 0


def gguf_type(path: Path) -> str:
    """The weight type a GGUF's name announces (SmolLM2-135M-Instruct-Q4_1.gguf -> Q4_1, and lower case as
    Hugging Face repos often name them: qwen2.5-7b-q4_k_m.gguf -> Q4_K_M), else "gguf"."""
    parts = path.stem.upper().replace("-", ".").split(".")
    return next((p for p in reversed(parts) if p[:1] in "QF" and p[1:2].isdigit()), "gguf")


def q8_0(gguf: Path) -> Path:
    """The GGUF requantized to Q8_0 by llama.cpp (once, into the cache): llama.cpp on int8 weights, the
    byte-comparable row to coreinfer's int8."""
    import llama_cpp

    out = cache_dir() / "gguf" / f"{gguf.stem}.Q8_0.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params) != 0:
            raise OSError(f"llama.cpp could not requantize {gguf} to Q8_0")
        tmp.rename(out)
    return out


def transformers_model(ckpt, dtype):
    import transformers

    config = transformers.AutoConfig.for_model(**ckpt.config)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    missing, _ = hf.load_state_dict(float_weights(ckpt, dtype), strict=False)
    if set(missing) - {"lm_head.weight"}:
        raise ValueError(f"transformers model lacks weights: {missing[:3]}")
    if "lm_head.weight" in missing:
        hf.tie_weights()
    return hf

