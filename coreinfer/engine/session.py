"""One request's decode state: the batch, its KV caches, its core weights and the step function.

    session = Session(model, prompts, max_new_tokens, policy=StabilityPolicy(...))
    logits = session.prefill()          # dense, chunked; the policy observes, selects; FFNs compacted
    logits = session.step(tokens)       # one token per sequence through the compacted FFNs
    session.refresh(selection)          # recompact to another selection mid-decode (no re-prefill)
    logits = session.score(conts)       # or: teacher-force whole continuations, scored sparse

Batches are left-padded (see models/common.py). Nothing here knows about text or sampling.
"""

import copy
import time
from dataclasses import dataclass, field

import torch

from ..models.common import KVCache
from .adaptive import adapt
from .clusters import ClusterSet, SimilarityPolicy
from .compact import CoreWeights
from .observe import Observer
from .policy import CoreConfig, Selection, SelectionPolicy, StabilityPolicy
from .profile import AUTO, Profile, prior_policy

PREFILL_CHUNK = 512  # prompt tokens per prefill forward: bounds attention scores and activations
CACHE_BLOCK = 256  # cache lengths and decode key spans are multiples of this: few distinct shapes


@dataclass
class CoreStats:
    """What a core selection did: sizes per layer, its cost, and the bytes each decode step reads.

    bytes_dense: weight bytes of one dense decode step. bytes_core: of one sparse decode step of the
    whole batch, where each sequence reads its own core rows; `per_sequence` divides by the batch."""

    core_sizes: dict[int, int] = field(default_factory=dict)
    ffn_width: int = 0
    batch: int = 1
    select_ms: float = 0.0
    compact_ms: float = 0.0
    bytes_dense: int = 0
    bytes_core: int = 0
    cluster: list[int] | None = None  # similarity mode: each sequence's cluster
    cluster_score: list[float] | None = None  # and its mean core-set overlap with that cluster's members
    peak_gpu_bytes: int = 0  # memory-limited mode on CUDA: the most GPU memory allocated, prefill to last step

    @property
    def per_sequence(self) -> float:
        """Weight bytes read per decoded token of one sequence."""
        return self.bytes_core / self.batch

    @property
    def share(self) -> float:
        """Bytes per decoded token against the dense model's (at batch 1: the share of weights read)."""
        return self.per_sequence / self.bytes_dense


class Batch:
    """A left-padded batch and the decode-time buffers it reuses every step.

    ids [B, T0] prompt tokens (pad on the left), valid [B, T0] real-token mask, prompt_slots [B, T0]
    their cache slots; key_valid [B, S] marks cache slots that hold real tokens; positions [B, 1] and
    slot [B, 1] are the next token's RoPE position and cache slot, updated in place by each step.
    """

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int, device, cache_len: int):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, T0 = len(prompts), max(len(p) for p in prompts)
        self.size, self.prompt_len, self.total_len, self.pad_id = B, T0, T0 + max_new_tokens, pad_id
        self.ids = torch.full((B, T0), pad_id, dtype=torch.long)
        self.valid = torch.zeros(B, T0, dtype=torch.bool)
        for b, p in enumerate(prompts):
            self.ids[b, T0 - len(p):] = torch.tensor(p)
            self.valid[b, T0 - len(p):] = True
        self.ids, self.valid = self.ids.to(device), self.valid.to(device)
        self.key_valid = torch.zeros(B, max(cache_len, self.total_len), dtype=torch.bool, device=device)
        self.key_valid[:, :T0] = self.valid
        self.prompt_slots = torch.arange(T0, device=device).expand(B, T0)
        self.prompt_positions = (self.valid.cumsum(1) - 1).clamp_min(0)  # [B, T0], padding at 0
        self.positions = self.prompt_positions[:, -1:].clone()  # [B, 1], advanced before each step
        self.slot = torch.full((B, 1), T0 - 1, dtype=torch.long, device=device)  # advanced before each step
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)

    def rows(self, index: torch.Tensor) -> "Batch":
        """A batch whose sequence i is a copy of sequence index[i] of this one (index [B'])."""
        out = copy.copy(self)
        out.size = index.shape[0]
        for name in ("ids", "valid", "key_valid", "prompt_slots", "prompt_positions", "positions", "slot", "token"):
            setattr(out, name, getattr(self, name).index_select(0, index))
        return out


def cache_length(tokens: int, limit: int) -> int:
    """Cache slots for `tokens`: rounded up to CACHE_BLOCK (at most `limit`), so requests of similar
    length share cache shapes, and with them compiled graphs and reusable buffers."""
    return max(tokens, min(limit, -(-tokens // CACHE_BLOCK) * CACHE_BLOCK))


class Session:
    """Owns a batch's decode state; see the module docstring. `policy` None decodes dense.

    `cores` and `caches` are the compacted weights and KV caches to (re)use: pass the previous
    session's to the next so buffers are allocated once (caches are taken when their shape fits).
    `compiled` runs the decode steps instead of the eager model (compiled.py, cuda_graphs.py).
    """

    def __init__(self, model, prompts: list[list[int]], max_new_tokens: int, pad_id: int = 0,
                 policy: SelectionPolicy | None = None, cores: CoreWeights | None = None,
                 caches: list[KVCache] | None = None, prefill_chunk: int = PREFILL_CHUNK, compiled=None):
        device = model.embed_tokens.weight.device
        self.model, self.policy, self.chunk = model, policy, prefill_chunk
        self.compiled = compiled  # a CompiledStep (compiled.py) that runs decode steps, or None: eager
        total = max(len(p) for p in prompts) + max_new_tokens if prompts else 0
        if total > model.max_context:
            raise ValueError(f"prompt ({total - max_new_tokens} tokens) + {max_new_tokens} new tokens exceeds "
                             f"the model's context of {model.max_context} tokens")
        self.batch = Batch(prompts, max_new_tokens, pad_id, device, cache_length(total, model.max_context))
        B, S = self.batch.size, self.batch.key_valid.shape[1]
        fits = caches is not None and caches[0].k.shape[0] == B and caches[0].k.shape[2] == S
        self.caches = caches if fits else model.new_caches(B, S)
        self.cores = cores if cores is not None else CoreWeights()
        self.compacted = False  # steps read self.cores only once this session has loaded them
        self.selection: Selection | None = None
        self.stats: CoreStats | None = None
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.steps = 0  # decode steps taken
        self.last_logits: torch.Tensor | None = None  # [B, V] of the last prompt position, once prefilled
        self.checks = self.refreshes = 0  # dense drift-check steps taken, and the recompactions they caused
        self.decode_bytes = 0  # weight bytes all decode steps read (dense check steps at the dense cost)
        self.dense_bytes = model.weight_bytes()  # of one dense decode step

    @torch.inference_mode()
    def prefill(self, observer=None, all_logits: bool = False) -> torch.Tensor:
        """Dense forward over the prompt in chunks -> last-position logits [B, V] ([B, T0, V] with
        `all_logits`); then the policy selects and the FFNs are compacted.

        `observer` (dense sessions only: analyses that read activations) takes the place of the
        policy's: it is called as observer(layer, a [B, T, F]) for the layers it contains, with
        `observer.valid` [B, T] set to the chunk's real-token mask."""
        b = self.batch
        if observer is not None and self.policy is not None:
            raise ValueError("a session with a selection policy observes for its policy only")
        if self.policy is not None:
            observer = Observer(self.policy.wanted())
        run = self.prefill_runner(observer)
        rows = []
        for start in range(0, b.prompt_len, self.chunk):
            end = min(start + self.chunk, b.prompt_len)
            if observer is not None:
                observer.valid = b.valid[:, start:end]
            logits = self.model(b.ids[:, start:end], b.prompt_positions[:, start:end], b.prompt_slots[:, start:end],
                                b.key_valid[:, :end], self.caches, ffn=run, last_only=not all_logits)
            rows.append(logits)
        self.last_logits = logits[:, -1]
        if self.policy is not None:
            self.prefilled(observer)
        return torch.cat(rows, 1) if all_logits else self.last_logits

    def prefill_runner(self, observer):
        """How FFNs run during prefill: dense, handing observed layers' activations to `observer`."""
        return None if observer is None else (lambda ffn, x: observe(ffn, x, observer))

    def prefilled(self, observer: Observer) -> None:
        """After the prefill: the policy selects from the running statistics; the FFNs are compacted."""
        self.refresh(lambda: self.policy.select(observer.layers))

    @torch.inference_mode()
    def fork(self, rows: list[int]) -> "Session":
        """A prefilled session whose sequence i continues a copy of this one's sequence rows[i]: its
        cache, its last logits and its core set. Prefill a shared context once, fork it once per
        continuation (multiple choice); the copies step and score exactly as separate prefills would."""
        if self.last_logits is None or self.steps:
            raise ValueError("fork a session after its prefill and before any decode step")
        index = torch.tensor(rows, dtype=torch.long, device=self.last_logits.device)
        out = copy.copy(self)
        out.batch = self.batch.rows(index)
        out.caches = self.model.new_caches(len(rows), self.batch.key_valid.shape[1])
        for mine, theirs in zip(self.caches, out.caches):
            torch.index_select(mine.k, 0, index, out=theirs.k)
            torch.index_select(mine.v, 0, index, out=theirs.v)
        out.last_logits = self.last_logits.index_select(0, index)
        out.cores = CoreWeights()
        if self.compacted:
            s = self.selection
            picked = Selection({layer: ids.index_select(0, index) for layer, ids in s.index.items()},
                               s.cluster and [s.cluster[i] for i in rows],
                               s.cluster_score and [s.cluster_score[i] for i in rows], dict(s.plans))
            out.refresh(picked)
        return out

    @torch.inference_mode()
    def refresh(self, selection) -> CoreStats:
        """Compact every sparse layer to `selection` (a Selection, or a function that makes one, so its
        time counts as selection time) and return the stats; later steps read only those rows."""
        self.sync()
        t0 = time.perf_counter()
        chosen: Selection = selection() if callable(selection) else selection
        self.sync()
        t1 = time.perf_counter()
        self.cores.load(self.model.ffns(), chosen.index, chosen.plans)
        self.compacted, self.selection = True, chosen
        self.sync()
        t2 = time.perf_counter()
        self.stats = CoreStats(core_sizes={l: ix.shape[1] for l, ix in chosen.index.items()},
                               ffn_width=self.model.ffns()[0].width, batch=self.batch.size,
                               select_ms=(t1 - t0) * 1e3, compact_ms=(t2 - t1) * 1e3,
                               bytes_dense=self.dense_bytes,
                               bytes_core=self.cores.step_bytes(self.model.ffns(), self.dense_bytes),
                               cluster=chosen.cluster, cluster_score=chosen.cluster_score)
        return self.stats

    def run_ffn(self, ffn, x: torch.Tensor) -> torch.Tensor:
        """Decode-time FFN: a compacted layer reads its core rows, the others run dense."""
        core = self.cores.get(ffn.layer_id)
        return ffn(x) if core is None else core(x)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] at the next slot; returns logits [B, V]. The keys span a whole number of
        CACHE_BLOCKs, so the step's shapes change only every CACHE_BLOCK tokens."""
        b = self.batch
        slot = b.prompt_len + self.steps
        if slot >= b.total_len:
            raise ValueError(f"the session was sized for {b.total_len - b.prompt_len} new tokens")
        b.token[:, 0] = tokens
        b.key_valid[:, slot] = True
        b.positions += 1
        b.slot += 1
        span = min(b.key_valid.shape[1], (slot // CACHE_BLOCK + 1) * CACHE_BLOCK)
        check = self.compacted and self.policy is not None and self.policy.check(self.steps)
        if check:  # a dense step whose activations tell the policy whether the core sets still fit
            observer = Observer(self.policy.wanted())
            observer.valid = b.token.new_ones(b.size, 1, dtype=torch.bool)
            run = lambda ffn, x: observe(ffn, x, observer)  # noqa: E731
        else:
            run = self.run_ffn if self.compacted else None
        if self.compiled is not None and not check:  # the whole key mask: one graph for every step
            logits = self.compiled(b.token, b.positions, b.slot, b.key_valid, self.caches,
                                   self.cores if self.compacted else None)
        else:
            logits = self.model(b.token, b.positions, b.slot, b.key_valid[:, :span], self.caches, ffn=run)
        self.steps += 1
        self.decode_bytes += self.stats.bytes_core if self.compacted and not check else self.dense_bytes
        if check:
            self.checks += 1
            revised = self.policy.revise(observer.layers, self.selection)
            if revised is not None:
                self.refresh(revised)
                self.refreshes += 1
        return logits[:, -1]

    @torch.inference_mode()
    def score(self, continuations: list[list[int]]) -> torch.Tensor:
        """Teacher-forced logits [B, L, V] predicting each continuation token (L = longest), as
        decoding would produce them: row 0 from the dense prefill, the rest in one forward through the
        compacted FFNs. Continuations are right-padded, harmless since padding follows every scored token."""
        b = self.batch
        L = max(len(c) for c in continuations)
        if len(continuations) != b.size or any(len(c) == 0 for c in continuations):
            raise ValueError("give one non-empty continuation per prompt")
        if b.prompt_len + L > b.total_len or self.steps:
            raise ValueError("score needs a fresh (or freshly prefilled) session sized for the longest continuation")
        logits = [(self.last_logits if self.last_logits is not None else self.prefill())[:, None]]
        if L > 1:
            T0, pad = b.prompt_len, b.ids.new_tensor(b.pad_id)
            feed = torch.stack([torch.cat([b.ids.new_tensor(c[:-1]), pad.expand(L - len(c))]) for c in continuations])
            b.key_valid[:, T0:T0 + L - 1] = True
            steps = torch.arange(1, L, device=feed.device)
            positions, slots = b.positions + steps, b.slot + steps  # [B, L-1]
            logits.append(self.model(feed, positions, slots, b.key_valid[:, :T0 + L - 1], self.caches,
                                     ffn=self.run_ffn if self.compacted else None))
        return torch.cat(logits, 1)


def observe(ffn, x: torch.Tensor, observer) -> torch.Tensor:
    """Prefill-time FFN: dense, handing the activations [B, T, F] of observed layers to `observer`."""
    if ffn.layer_id not in observer:
        return ffn(x)
    a = ffn.activations(x)
    observer(ffn.layer_id, a)
    return ffn.project(a)


def stability_policy(core: CoreConfig, model) -> StabilityPolicy:
    ffn = model.ffns()[0]
    return StabilityPolicy(core.keep(len(model.ffns())), ffn.width, core.statistic_for(ffn.gated))


def make_policy(core: CoreConfig | SelectionPolicy | None, model,
                load_clusters=ClusterSet.load) -> SelectionPolicy | None:
    """The policy a CoreConfig asks for (a policy passes through; None is dense). `load_clusters(path)`
    reads a cluster file: callers that serve many requests pass a cached loader."""
    if core is None or isinstance(core, SelectionPolicy):
        return core
    if core.profile == AUTO:
        raise ValueError('profile "auto" (the model\'s calibrated profile) is chosen by LLM.default_core: '
                         "give a profile file here")
    if core.profile:
        profile = Profile.load(core.profile)
        profile.check(model, core.profile)
        base = profile.policy(model, core.statistic_for(model.ffns()[0].gated))
        if base is None:
            return None
    elif core.mode == "similarity":
        clusters = load_clusters(core.clusters)
        clusters.check(model)
        base = SimilarityPolicy(clusters, core.keep(len(model.ffns())))
    else:
        base = stability_policy(core, model)
        if core.prior:
            base = prior_policy(base, core.prior, core.prior_weight, model)
    return adapt(core, base, model)
