"""The Python API: load a model once, then generate, stream or score with or without core neurons.

    from coreinfer import LLM, GenerationConfig, CoreConfig
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    out = llm.generate("The capital of France is", GenerationConfig(max_new_tokens=16), core=CoreConfig(beta=0.7))
    llm.generate("...", core=CoreConfig(profile="auto"))  # the default: the model's calibrated profile, or dense
"""

import os
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from .engine.clusters import ClusterSet
from .engine.compact import CoreWeights
from .engine.background import BackgroundStep
from .engine.compiled import CompiledStep, batch_bucket, decode_forward, use_cache_dir
from .engine.cuda_graphs import GraphedStep
from .engine.generate import GenerationConfig, decode
from .engine import residency
from .engine.offload import OffloadSession, Streamer, parse_bytes, plan, place
from .engine.residency import ResidentSession
from .engine.policy import CoreConfig, SelectionPolicy
from .engine.profile import AUTO, find_profile
from .engine.quant import LOAD_FORMATS, WEIGHT_FORMATS, quantize_model
from .engine.session import CoreStats, Session, make_policy
from .io.loading import cache_dir, load_checkpoint
from .io.text import TextStream, Tokenizer
from .models import build_model

PROFILES = Path(__file__).parent / "profiles"  # calibrated profiles shipped for the embedded models


def profile_folders() -> list[Path]:
    """Where the default core setting looks for a profile calibrated on the model: the user's own
    (`coreinfer calibrate` writes there by default) before the shipped ones."""
    return [cache_dir() / "profiles", PROFILES]


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class RuntimeConfig:
    """Where and how the model runs. dtype None: fp32 on CPU, bf16 on CUDA. threads None:
    `default_threads()`, the physical cores this process may use less those the load average shows busy.
    compile: a compiled decode step (engine/compiled.py); None: on where it pays: int8 and int4 weights on
    the CPU (~1.7x decode) and float weights on CUDA (inside the CUDA graphs, ~1.4x), off elsewhere.
    background_compile: on the CPU, decode eager while a new shape's compiled step builds in a worker
    thread, and switch to it once built (engine/background.py); False: the first step of a shape waits.
    weights None: `default_weights`, the fastest format that keeps quality where this model runs."""

    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    threads: int | None = None
    weights: str | None = None
    max_gpu_memory: str | int | None = None  # e.g. "2GiB": the memory-limited mode (engine/offload.py)
    max_memory: str | int | None = None  # e.g. "3GiB": the CPU memory-limited mode (engine/residency.py)
    compile: bool | None = None
    background_compile: bool = True

    def compiles(self) -> bool:
        """Whether decode steps run compiled (engine/compiled.py). The memory-limited mode streams FFN
        weights between steps and stays eager."""
        if self.max_gpu_memory is not None or self.max_memory is not None:
            return False
        if self.compile is not None:
            return self.compile
        # int8, int4 and the block formats on the CPU: the compiled step decodes ~1.7x faster (int8; the
        # block formats' native ops run inside it the same way, docs/speed.md); the first compile of a shape
        # takes about two minutes, once: later processes load it from the on-disk cache (docs/speed.md).
        # fp32 and bf16 on the CPU gain little from it. On CUDA the graphed step is a chain of ~30 tiny
        # kernels a layer (norms, RoPE, casts) that inductor fuses: 1.4x on an H200 (docs/speed.md), for
        # ~20 s of compiling per shape; int8 there runs our Triton kernel, which is not verified compiled.
        cuda = torch.device(self.device).type == "cuda"
        return self.weights in ("int8", "int4", *LOAD_FORMATS) if not cuda else self.weights == "dense"

    def __post_init__(self):
        if self.weights is None:
            self.weights = default_weights(self.model, self.device)
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}")
        if self.weights == "int4" and torch.device(self.device).type != "cpu":
            raise ValueError("--weights int4 runs on the CPU only (PyTorch's CUDA int4 kernel packs its weights "
                             "differently): use int8 on CUDA")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_device(self.device)  # before the model loads, which takes a while
        if self.weights in LOAD_FORMATS and torch.device(self.device).type != "cpu":
            raise ValueError(f"--weights {self.weights} runs on the CPU only for now (its block formats have no "
                             "GPU kernels): use dense or int8 on CUDA")
        if self.max_gpu_memory is not None:
            parse_bytes(self.max_gpu_memory)
            if torch.device(self.device).type != "cuda" or self.weights != "dense":
                raise ValueError("--max-gpu-memory needs --device cuda and --weights dense: it keeps FFN weights "
                                 "in CPU memory and only their core rows on the GPU")
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
            if torch.device(self.device).type != "cpu" or self.weights in ("int8", "int4") or self.max_gpu_memory is not None:
                raise ValueError("--max-memory needs --device cpu and --weights dense, auto or q8_0: it keeps the "
                                 "checkpoint's FFN weights in the file and only their core rows in RAM")

    def torch_dtype(self) -> torch.dtype:
        name = self.dtype or ("fp32" if torch.device(self.device).type == "cpu" else "bf16")
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]


def default_weights(model: str | None, device: str) -> str:
    """The format `--weights` defaults to. On the CPU, a GGUF (the embedded model is one) decodes in its own
    block formats (auto): compiled, with its calibrated threshold profile, the embedded model decodes at
    1.16x llama.cpp on the same file in a clean bench run on an Intel Xeon, 0.78-0.82x on a loaded AMD EPYC
    (docs/speed.md, issue 20), and computes the file's own weights, where
    int8 requantizes them. An HF folder holds float weights, which dense computes as they are; CUDA runs
    dense (the block formats have no GPU kernels)."""
    gguf = model is None or str(model).lower().endswith(".gguf")
    return "auto" if gguf and torch.device(device).type == "cpu" else "dense"


def physical_cores() -> int:
    """CPU cores this process may run on (its affinity set), SMT siblings counted once."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        try:
            cores.add(tuple(Path(topology, name).read_text().strip() for name in ("physical_package_id", "core_id")))
        except OSError:  # no sysfs topology: count the CPU itself
            cores.add(cpu)
    return max(1, len(cores))


def default_threads() -> int:
    """The physical cores less those other processes keep busy (the 1-minute load average, rounded
    down), at least one. More threads than free cores collapse on a busy machine: each parallel region
    waits for a descheduled thread (int8 decode at load 12 on 2 cores: 0.2 tok/s on 2 threads, 1.8 on 1)."""
    return max(1, physical_cores() - int(os.getloadavg()[0]))


def check_device(device: str) -> None:
    """cpu, cuda or cuda:N, where that CUDA device exists; else one line saying what is wrong."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device {device!r}: no CUDA device is available (torch {torch.__version__}, {build})")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        raise ValueError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), "
                         f"cuda:0 to cuda:{count - 1}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    prefill_s: float = 0.0
    decode_s: float = 0.0  # decoding alone: compile_s is not in it
    stats: CoreStats | None = None  # what the core selection did (None when dense)
    compile_s: float = 0.0  # compiling the decode step, or loading its graph from the cache, during this run
    eager_steps: int = 0  # decode steps run eager while the compiled step built in the background
    eager_s: float = 0.0  # the time they took (in decode_s)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first over the time they took (the first comes from the prefill); 0 when
        there are none."""
        if self.completion_tokens < 2 or self.decode_s <= 0:
            return 0.0
        return (self.completion_tokens - 1) / self.decode_s

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


@dataclass
class StreamEvent:
    index: int  # which prompt of the batch
    text: str  # the new piece of its text ("" on the final event if nothing was held back)
    completion: Completion | None = field(default=None)  # set on that prompt's final event


@dataclass
class Comparison:
    """One prompt decoded dense and with core neurons. `agreement`: the share of the dense tokens that
    the core model, fed the dense text so far (teacher-forced), ranks first; None without dense tokens.
    At temperature 0 it is the per-token fidelity of core decoding, free of the compounding that makes
    two free-running outputs drift apart. `diverges_at`: the first token where the outputs differ."""

    dense: Completion
    core: Completion
    agreement: float | None
    diverges_at: int | None  # None: identical outputs


def check_prompt(prompt: str) -> None:
    """A prompt must hold text: whitespace alone gives the model nothing to answer."""
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("the prompt is empty or only whitespace")


def compile_seconds(step) -> float:
    """Seconds a compiled or graphed decode step has spent compiling and capturing (0 for eager)."""
    return getattr(step, "compile_s", 0.0)


def eager_steps(step) -> tuple[int, float]:
    """Steps a background-compiling decode step has run eager so far, and their seconds ((0, 0) for others)."""
    return (step.eager_steps, step.eager_s) if isinstance(step, BackgroundStep) else (0, 0.0)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists differ (a list ending early differs there); None if equal."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return None if n == len(a) == len(b) else n


class LLM:
    def __init__(self, model: str | None = None, device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None, weights: str | None = None, progress: bool = True,
                 max_gpu_memory: str | int | None = None, compile: bool | None = None,
                 max_memory: str | int | None = None, background_compile: bool = True):
        self.runtime = RuntimeConfig(model, device, dtype, threads, weights, max_gpu_memory=max_gpu_memory,
                                     max_memory=max_memory, compile=compile, background_compile=background_compile)
        torch.set_num_threads(threads or default_threads())
        ckpt = load_checkpoint(model, progress=progress)
        self.name = ckpt.source
        self.config = ckpt.config
        limited = max_gpu_memory is not None
        weights = self.runtime.weights  # resolved: None is the default format
        formats = weights if weights in LOAD_FORMATS else "dense"  # block formats are adopted while loading
        in_file = {} if max_memory is not None and formats != "dense" else None  # FFNs left in the GGUF, by layer
        self.model = build_model(ckpt.config, ckpt.weights, "cpu" if limited else device, self.runtime.torch_dtype(),
                                 formats, progress, contiguous=max_memory is None, in_file=in_file)
        # memory-limited: FFN weights stay in pinned CPU memory, the rest moves to the GPU
        self.budget = parse_bytes(max_gpu_memory) if limited else None
        if limited:
            plan(self.model, 1, 1, None, 0).check(self.budget)  # the resident weights and staging must fit
            place(self.model, device)
        self.streamer = Streamer(self.model, device) if limited else None
        if max_memory is not None:  # the CPU memory-limited mode: FFN weights stay in the mapped file
            self.budget = parse_bytes(max_memory)
            self.streamer = residency.open_streamer(self.model, self.budget, in_file, formats)
        if weights in ("int8", "int4"):
            quantize_model(self.model, weights)
        self.tokenizer = Tokenizer(ckpt.tokenizer_dir, ckpt.config)
        self.cores = CoreWeights()  # compacted weights, reused by every session
        self.caches = None  # the last session's KV caches, reused by the next one of the same shape
        self.compiled = None  # the compiled decode step every session uses (see RuntimeConfig.compiles)
        if self.runtime.compiles():
            use_cache_dir(cache_dir() / "inductor")  # a second process loads the kernels the first compiled
            self.compiled = CompiledStep(self.model)
            if background_compile and torch.device(device).type == "cpu":  # CUDA graphs capture a compiled step
                self.compiled = BackgroundStep(self.compiled)
        if torch.device(device).type == "cuda" and compile is not False:  # one launch per step, not hundreds
            self.compiled = GraphedStep(self.compiled or partial(decode_forward, self.model))
        self._clusters: dict[str, ClusterSet] = {}
        self._default: tuple[str | None, str] | None = None

    def default_core(self) -> tuple[str | None, str]:
        """What `CoreConfig(profile="auto")`, the default core setting, decodes with: (profile path, or
        None for dense; one line saying which and why). The profile is the one calibrated on this model
        (`coreinfer calibrate`, or shipped for the embedded models), which kept top-1 agreement with
        dense >= its target on held-out text. Dense where there is none, where its calibration found no
        sparse setting that met the target, or where this runtime cannot run its per-token plans."""
        if self._default is None:
            self._default = self._find_default()
        return self._default

    def _find_default(self) -> tuple[str | None, str]:
        found = find_profile(self.model, profile_folders())
        if found is None:
            return None, ("core neurons: no calibrated profile for this model, decoding dense (`coreinfer calibrate` "
                          "makes one; --beta picks the paper's prompt-fixed core sets)")
        path, profile = found
        target = profile.info.get("target_top1_agree", 0.95)
        if not profile.layers:
            return None, (f"core neurons: {path.name} found no sparse setting that keeps top-1 agreement >= "
                          f"{target:g} on this model, decoding dense")
        # per-token plans run eager and compiled on float and int8 CPU weights (engine/adaptive.py), and on
        # block formats by per-layer thresholds (engine/threshold.py)
        ffn = self.model.ffns()[0]
        cannot = [why for why, yes in ((f"{self.runtime.weights} weights", ffn.format == "int4"),
                                       (f"{self.runtime.weights} weights without per-layer thresholds", not profile.runs_on(ffn)),
                                       ("a memory-limited GPU", self.budget is not None),
                                       ("a graphed GPU decode step", isinstance(self.compiled, GraphedStep))) if yes]
        if profile.per_token and cannot:
            return None, (f"core neurons: the calibrated profile {path.name} picks rows per token, which "
                          f"{cannot[0]} cannot run yet: decoding dense")
        got = profile.measured or {}
        return str(path), (f"core neurons: calibrated profile {path.name} (held-out top-1 agreement "
                           f"{got.get('top1_agree', float('nan')):.1%} >= {target:g}, {profile.ffn_share(self.model):.0%} "
                           "of the FFN bytes)")

    def runtime_line(self) -> str:
        """What decodes, in words: 'weights auto (FFN q4, down q8_0), compiled step built in the background'."""
        ffn = self.model.ffns()[0]
        formats = f" (FFN {ffn.format}, down {ffn.down_format})" if ffn.blocked else ""
        step = ("CUDA graphs" if isinstance(self.compiled, GraphedStep) else
                "compiled step built in the background" if isinstance(self.compiled, BackgroundStep) else
                "compiled step" if self.compiled is not None else "eager")
        return f"weights {self.runtime.weights}{formats}, {step}"

    def resolve(self, core: CoreConfig | SelectionPolicy | None) -> CoreConfig | SelectionPolicy | None:
        """`core` with profile "auto" replaced by what `default_core` chose (None: dense)."""
        if isinstance(core, CoreConfig) and core.profile == AUTO:
            path = self.default_core()[0]
            return None if path is None else replace(core, profile=path)
        return core

    def load_clusters(self, path: str) -> ClusterSet:
        """A cluster file, read once per LLM."""
        if path not in self._clusters:
            self._clusters[path] = ClusterSet.load(path)
        return self._clusters[path]

    def session(self, ids: list[list[int]], max_new_tokens: int,
                core: CoreConfig | SelectionPolicy | None = None) -> Session:
        """A decode session over token ids; `core` None decodes dense. With a compiled step the batch is
        padded to its bucket (`batch_bucket`) with copies of the last prompt: they decode what it decodes,
        and callers read only the first len(ids) rows. Not in the memory-limited mode, whose budget is
        planned for the rows it is given."""
        policy = make_policy(self.resolve(core), self.model, self.load_clusters)
        if self.compiled is not None and self.budget is None:
            ids = ids + [ids[-1]] * (batch_bucket(len(ids)) - len(ids))
        if self.budget is not None:
            kind = ResidentSession if self.runtime.max_memory is not None else OffloadSession
            session = kind(self.model, ids, max_new_tokens, self.tokenizer.pad_id, policy, self.cores,
                           self.caches, budget=self.budget, streamer=self.streamer, compiled=self.compiled)
        else:
            session = Session(self.model, ids, max_new_tokens, self.tokenizer.pad_id, policy, self.cores, self.caches,
                              compiled=self.compiled)
        self.caches = session.caches
        return session

    def encode(self, prompt: str | list[dict], chat: bool = False) -> list[int]:
        """A string (as is, or wrapped as one user turn when chat) or a list of chat messages."""
        if isinstance(prompt, list):
            return self.tokenizer.encode_chat(prompt)
        check_prompt(prompt)
        return self.tokenizer.encode(prompt, chat=chat)

    def stream(self, prompts, gen: GenerationConfig | None = None, core: CoreConfig | SelectionPolicy | None = None,
               chat: bool = False) -> Iterator[StreamEvent]:
        """Yield text pieces as they are decoded; each prompt ends with an event carrying its Completion."""
        gen = gen or GenerationConfig()
        prompts = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], dict)) else prompts
        ids = [self.encode(p, chat) for p in prompts]
        streams = [TextStream(self.tokenizer, gen.stop) for _ in ids]
        finished = [False] * len(ids)
        session = self.session(ids, gen.max_new_tokens, core)
        compiled_before = compile_seconds(self.compiled)
        eager_before = eager_steps(self.compiled)
        t0 = time.perf_counter()
        t_first = None
        for token in decode(session, gen, self.tokenizer.eos_ids):
            t_first = t_first or time.perf_counter()
            for b, tok in enumerate(token.tolist()[:len(ids)]):  # rows past len(ids): the bucket's padding
                if finished[b]:
                    continue
                if tok in self.tokenizer.eos_ids and not gen.ignore_eos:
                    finished[b] = "stop"
                else:
                    piece = streams[b].push(tok)
                    if piece:
                        yield StreamEvent(b, piece)
                    if streams[b].stopped:
                        finished[b] = "stop"
            if all(finished):
                break
        t_end = time.perf_counter()
        t_first = t_first or t_end
        # the first step of a new shape compiles (minutes) or loads its graph (seconds): timed apart
        compile_s = compile_seconds(self.compiled) - compiled_before
        eager = [now - before for now, before in zip(eager_steps(self.compiled), eager_before)]
        for b, s in enumerate(streams):
            tail = s.finish()
            done = Completion(s.text, s.ids, finished[b] or "length", len(ids[b]), prefill_s=t_first - t0,
                              decode_s=max(t_end - t_first - compile_s, 0.0), stats=session.stats,
                              compile_s=compile_s, eager_steps=eager[0], eager_s=eager[1])
            yield StreamEvent(b, tail, done)

    def generate(self, prompts, gen: GenerationConfig | None = None, core: CoreConfig | SelectionPolicy | None = None,
                 chat: bool = False) -> list[Completion]:
        return [e.completion for e in self.stream(prompts, gen, core, chat) if e.completion is not None]

    def compare(self, prompt: str | list[dict], gen: GenerationConfig | None = None,
                core: CoreConfig | SelectionPolicy | None = None, chat: bool = False) -> Comparison:
        """Decode one prompt dense, then with core neurons (`core` None: the default, CoreConfig(profile="auto")),
        and teacher-force the dense tokens through the core model to measure how often it agrees."""
        gen, core = gen or GenerationConfig(), core or CoreConfig(profile=AUTO)
        for warm_up in (None, core):  # first calls allocate and pick kernels: keep that out of both rates
            self.generate(prompt, GenerationConfig(max_new_tokens=2, ignore_eos=True), warm_up, chat)
        [dense] = self.generate(prompt, gen, None, chat)
        [sparse] = self.generate(prompt, gen, core, chat)
        agreement = None
        if dense.token_ids:
            session = self.session([self.encode(prompt, chat)], dense.completion_tokens, core)
            top = session.score([dense.token_ids])[0].argmax(-1).cpu()  # [L]: the core model's choices
            agreement = (top == torch.tensor(dense.token_ids)).float().mean().item()
        return Comparison(dense, sparse, agreement, first_divergence(dense.token_ids, sparse.token_ids))

