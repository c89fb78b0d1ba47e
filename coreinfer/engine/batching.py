"""Continuous batching: sequences join and leave a running decode batch between steps.

    batch = DecodeBatch(model, capacity=16)
    row, token = batch.add(session, logits, gen, eos_ids, selection)  # a prefilled B=1 session moves in
    for row, token in batch.step(): ...                                # one token for every row, one forward
    batch.remove(row)                                                  # finished, cancelled or timed out

Each sequence is prefilled alone (a B=1 Session, dense, its policy selecting as usual); its KV cache
and core ids then move into a row of the batch. Rows are packed: rows 0..n-1 are the live ones and a
removed row's place is taken by the last one, so a step runs over exactly n sequences. Sequences of
one batch sit at different cache slots; a B=1 session has no padding, so a row's positions are its slots.

How each layer's FFN runs is chosen whenever the rows change, by the weight bytes a step reads:
- "compact": each sequence through its own k gathered core rows (reads n * k rows); only when every
  row keeps the same k neurons there;
- "masked": the dense FFN, each row's activations times its 0/1 core mask (reads F rows once for the
  whole batch; the same math as compaction, summed in another order); a row with no core set at
  that layer (a dense request, a dense layer) gets all ones;
- "plan": some row decodes the layer by a per-token plan (adaptive.Plan: refinement, input
  sparsity; a calibrated profile's): each row alone, a planned row through its own AdaptiveFFN (one
  shared by every row whose superset is the whole FFN, which does not depend on the prompt), the
  others dense or masked, so each reads what it would read alone;
- dense (no entry): no row has a core set at that layer.
With n rows of k core neurons, compact reads less while n * k < F: at the default keep 0.85 only a
batch of one.
"""

import copy
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..models.common import KVCache
from .adaptive import AdaptiveFFN, DriftPolicy
from .compact import CompactFFN
from .generate import GenerationConfig, sample
from .observe import Observer
from .policy import Selection, SelectionPolicy
from .session import CACHE_BLOCK, CoreStats, Session, cache_length

FFN_PATHS = ("auto", "compact", "masked")


def core_bytes(ffns: list, dense_bytes: int, sizes: dict[int, int]) -> int:
    """Weight bytes one sequence's decode step reads when layer l keeps sizes[l] of its F neurons
    (`dense_bytes`: the dense model's step)."""
    return dense_bytes - sum(ffns[l].neuron_bytes() * (1 - k / ffns[l].width) for l, k in sizes.items())


@torch.inference_mode()
def prefill_one(model, prompt: list[int], policy: SelectionPolicy | None, pad_id: int = 0, caches=None):
    """Prefill one sequence alone, densely, and let `policy` (None: dense) choose its core set without
    compacting it (the batch gathers or masks for itself). `caches`: a previous prefill's, reused when
    their shape fits. Returns the session (its KV cache), the last logits [1, V], the Selection or
    None, and its CoreStats or None."""
    if isinstance(policy, DriftPolicy):
        raise ValueError("drift checks re-choose a sequence's core set mid-decode, which a continuous batch "
                         "does not do: use drift_period 0")
    session = Session(model, [prompt], 0, pad_id, caches=caches)
    observer = None if policy is None else Observer(policy.wanted())
    logits = session.prefill(observer)
    if policy is None:
        return session, logits, None, None
    t0 = time.perf_counter()
    selection = policy.select(observer.layers)
    sizes = {l: ix.shape[1] for l, ix in selection.index.items()}
    ffns, step_bytes = model.ffns(), core_bytes(model.ffns(), session.dense_bytes, sizes)
    for l, plan in selection.plans.items():  # planned layers: the bytes a session alone counts
        step_bytes += AdaptiveFFN.planned_bytes(ffns[l], sizes[l], plan) - ffns[l].neuron_bytes() * sizes[l] / ffns[l].width
    stats = CoreStats(core_sizes=sizes, ffn_width=model.ffns()[0].width, select_ms=(time.perf_counter() - t0) * 1e3,
                      bytes_dense=session.dense_bytes, bytes_core=round(step_bytes),
                      cluster=selection.cluster, cluster_score=selection.cluster_score)
    return session, logits, selection, stats


def cache_rows(cache: KVCache, n: int) -> KVCache:
    """The first n rows of `cache` as a KVCache of views: a forward's writes land in the batch's cache."""
    view = copy.copy(cache)
    view.k, view.v = cache.k[:n], cache.v[:n]
    return view


@dataclass
class RowStats:
    """What a sequence's decode steps cost while it shared the batch."""

    steps: int = 0
    rows: int = 0  # summed over its steps: the batch sizes it ran in
    bytes: float = 0.0  # summed over its steps: weight bytes per sequence
    layers: Counter = field(default_factory=Counter)  # layer-steps per FFN path ("compact", "masked", "dense")

    @property
    def mean_rows(self) -> float:
        return self.rows / self.steps if self.steps else 1.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.steps if self.steps else 0.0

    def report(self, bytes_dense: int) -> dict:
        """For a response: the mean batch size, the FFN path of each layer-step, and the weight bytes
        read per decoded token of this sequence (absolute and against one dense step)."""
        return {"batch_rows_mean": round(self.mean_rows, 2), "ffn_layer_steps": dict(self.layers),
                "bytes_per_token": round(self.bytes_per_token),
                "bytes_per_token_fraction": round(self.bytes_per_token / bytes_dense, 4)}


class Row:
    """One sequence of the batch: its sampling state, its core ids {layer: [k]}, its per-token plans
    {layer: Plan} and their loaded layers {layer: AdaptiveFFN}, and its costs."""

    def __init__(self, gen: GenerationConfig, prompt: torch.Tensor, core: dict[int, torch.Tensor],
                 eos_ids: set[int], plans: dict | None = None):
        T0 = prompt.shape[0]
        self.gen, self.core, self.eos_ids, self.prompt_len = gen, core, eos_ids, T0
        self.plans = plans or {}
        self.refined: dict[int, AdaptiveFFN] = {}
        self.history = prompt.new_empty(1, T0 + gen.max_new_tokens)  # [1, T0 + max_new]: what the penalty sees
        self.history[0, :T0] = prompt
        self.length = T0
        device = prompt.device
        self.generator = None if gen.seed is None else torch.Generator(device=device).manual_seed(gen.seed)
        self.greedy = gen.temperature == 0 and gen.repetition_penalty == 1.0  # a plain argmax suffices
        self.done = False
        self.stats = RowStats()

    @property
    def generated(self) -> int:
        return self.length - self.prompt_len

    def append(self, token: int) -> None:
        self.history[0, self.length] = token
        self.length += 1
        self.done = (token in self.eos_ids and not self.gen.ignore_eos) or self.generated >= self.gen.max_new_tokens


class DecodeBatch:
    """Up to `capacity` sequences decoding together; see the module docstring. `ffn_path` "auto"
    chooses per layer by bytes; "compact" or "masked" force a path where it is possible (benchmarks)."""

    def __init__(self, model, capacity: int, ffn_path: str = "auto"):
        if capacity < 1:
            raise ValueError(f"the batch capacity must be >= 1, got {capacity}")
        if ffn_path not in FFN_PATHS:
            raise ValueError(f"ffn_path must be one of {FFN_PATHS}, got {ffn_path!r}")
        ref = model.embed_tokens.weight
        self.model, self.capacity, self.ffn_path = model, capacity, ffn_path
        self.rows: list[Row] = []
        self.caches: list[KVCache] = []  # [capacity, Hkv, S, hd] per layer, allocated by the first row
        self.views: list[KVCache] = []  # the same, rows 0..n-1
        self.key_valid = torch.zeros(capacity, 0, dtype=torch.bool, device=ref.device)  # [C, S]
        self.slot = torch.zeros(capacity, 1, dtype=torch.long, device=ref.device)  # [C, 1] slot of the fed token
        self.token = torch.zeros(capacity, 1, dtype=torch.long, device=ref.device)  # [C, 1] the token to feed
        self.paths: dict[int, str] = {}  # layer -> "compact" | "masked"; dense layers are absent
        self.compact: dict[int, CompactFFN] = {}  # n * k < F rows each: kept across plans, reused
        self.masks: dict[int, torch.Tensor] = {}  # layer -> [C, F] 0/1 in the compute dtype
        self.step_bytes = 0  # weight bytes one step of the current rows reads
        self.dense_bytes = model.weight_bytes()  # of one dense decode step: the start of every plan's count
        self.layer_paths: Counter = Counter()  # FFN layers per path in the current plan
        self.shared: dict[tuple, AdaptiveFFN] = {}  # (layer, Plan) -> the whole-FFN superset's, for every row
        self.logits: torch.Tensor | None = None  # the last step's logits [n, V], rows in batch order

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cache_len(self) -> int:
        return self.key_valid.shape[1]

    def _ensure(self, length: int) -> None:
        """Make every row's cache at least `length` slots, keeping what the rows hold."""
        if length <= self.cache_len and self.caches:
            return
        S = cache_length(length, self.model.max_context)
        old, old_valid = self.caches, self.key_valid
        self.caches = self.model.new_caches(self.capacity, S)
        self.key_valid = torch.zeros(self.capacity, S, dtype=torch.bool, device=old_valid.device)
        n, s = len(self.rows), old_valid.shape[1]
        for new, prev in zip(self.caches, old):
            new.k[:n, :, :s], new.v[:n, :, :s] = prev.k[:n], prev.v[:n]
        self.key_valid[:n, :s] = old_valid[:n]

    @torch.inference_mode()
    def add(self, session: Session, logits: torch.Tensor, gen: GenerationConfig, eos_ids: set[int],
            selection: Selection | None = None) -> tuple[Row, int]:
        """Move a prefilled one-sequence session (logits [1, V] of its last prompt token, `selection`
        its policy's choice or None for dense) into a free row; returns the row and its first token."""
        b = session.batch
        if b.size != 1 or len(self.rows) >= self.capacity:
            raise ValueError("add takes one prefilled sequence, and a batch with a free row")
        if gen.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 in a batch, got {gen.max_new_tokens}")
        T0 = b.prompt_len
        self._ensure(T0 + gen.max_new_tokens)
        i = len(self.rows)
        for dst, src in zip(self.caches, session.caches):
            dst.k[i, :, :T0], dst.v[i, :, :T0] = src.k[0, :, :T0], src.v[0, :, :T0]
        self.key_valid[i] = False
        self.key_valid[i, :T0] = True
        self.slot[i] = T0 - 1  # advanced before each step
        core = {} if selection is None else {l: ix[0] for l, ix in selection.index.items()}
        row = Row(gen, b.ids[0], core, eos_ids, None if selection is None else selection.plans)
        for layer, plan in row.plans.items():
            row.refined[layer] = self._refined(self.model.ffns()[layer], plan, core[layer])
        token = int(sample(logits, gen, row.history[:, :T0], row.generator))
        row.append(token)
        self.token[i] = token
        self.rows.append(row)
        self._plan()
        return row, token

    @torch.inference_mode()
    def remove(self, row: Row) -> None:
        """Free a row: the last row moves into its place (its cache, slot, token and core ids)."""
        i, j = self.rows.index(row), len(self.rows) - 1
        if i != j:
            for c in self.caches:
                c.k[i], c.v[i] = c.k[j], c.v[j]
            self.key_valid[i], self.slot[i], self.token[i] = self.key_valid[j], self.slot[j], self.token[j]
            self.rows[i] = self.rows[j]
        self.rows.pop()
        if not self.rows and self.cache_len > CACHE_BLOCK:  # idle: give back caches grown for long requests
            self.caches, self.views = [], []
            self.key_valid = self.key_valid[:, :0]
        self._plan()

    def _plan(self) -> None:
        """Choose each FFN layer's path for the current rows (module docstring) and load what it needs.
        The plan is built aside and swapped in whole: other threads may read it (a server's health)."""
        n = len(self.rows)
        self.views = [cache_rows(c, n) for c in self.caches]
        paths, layer_paths, step_bytes = {}, Counter(), self.dense_bytes
        for ffn in self.model.ffns():
            layer, F = ffn.layer_id, ffn.width
            ks = {row.core[layer].numel() if layer in row.core else F for row in self.rows}
            planned = any(layer in row.refined for row in self.rows)
            path = "plan" if planned else "dense" if ks <= {F} else "masked"
            if path == "masked" and len(ks) == 1 and self.ffn_path != "masked":
                k = ks.pop()
                if self.ffn_path == "compact" or n * k < F:
                    path = "compact"
            layer_paths[path] += 1
            if path == "compact":  # its buffers stay allocated when the path changes: smaller than the FFN
                core = self.compact.setdefault(layer, CompactFFN())
                core.load(ffn, torch.stack([row.core[layer] for row in self.rows]))  # [n, k]
                step_bytes += core.nbytes() - ffn.neuron_bytes()
            elif path == "masked":
                self._load_mask(ffn)
            elif path == "plan":  # each row alone: its plan's bytes, or the whole layer's
                self._load_mask(ffn)
                step_bytes += sum(row.refined[layer].nbytes() if layer in row.refined else ffn.neuron_bytes()
                                  for row in self.rows) - ffn.neuron_bytes()
            if path != "dense":
                paths[layer] = path
        self.paths, self.layer_paths, self.step_bytes = paths, layer_paths, step_bytes

    def _refined(self, ffn, plan, ids: torch.Tensor) -> AdaptiveFFN:
        """The AdaptiveFFN a row decodes layer `ffn` with: the batch's shared one where its superset `ids`
        [k] is the whole FFN, else its own."""
        whole = ids.shape[0] == ffn.width
        key = (ffn.layer_id, plan)
        if whole and key in self.shared:
            return self.shared[key]
        core = plan.build()
        core.load(ffn, ids[None])  # [1, k]
        if whole:
            self.shared[key] = core
        return core

    def _load_mask(self, ffn) -> None:
        ref = self.model.embed_tokens.weight
        mask = self.masks.get(ffn.layer_id)
        if mask is None:
            mask = self.masks[ffn.layer_id] = torch.empty(self.capacity, ffn.width, dtype=ref.dtype, device=ref.device)
        for i, row in enumerate(self.rows):
            ids = row.core.get(ffn.layer_id)
            if ids is None:
                mask[i] = 1
            else:
                mask[i] = 0
                mask[i, ids] = 1

    def run_ffn(self, ffn, x: torch.Tensor) -> torch.Tensor:
        """Decode-time FFN of x [n, 1, d] along the layer's planned path."""
        path = self.paths.get(ffn.layer_id)
        if path is None:
            return ffn(x)
        if path == "compact":
            return self.compact[ffn.layer_id](x)
        if path == "plan":
            return self._run_rows(ffn, x)
        a = ffn.activations(x) * self.masks[ffn.layer_id][:x.shape[0], None]  # [n, 1, F] * [n, 1, F]
        return ffn.project(a)

    def _run_rows(self, ffn, x: torch.Tensor) -> torch.Tensor:
        """A "plan" layer, x [n, 1, d]: row by row, each as it decodes alone (module docstring)."""
        out, mask = torch.empty_like(x), self.masks[ffn.layer_id]
        for i, row in enumerate(self.rows):
            core = row.refined.get(ffn.layer_id)
            if core is not None:
                out[i] = core(x[i:i + 1])[0]  # copied at once: a shared core reuses its output buffer
            elif ffn.layer_id in row.core:
                out[i] = ffn.project(ffn.activations(x[i:i + 1]) * mask[i])[0]
            else:
                out[i] = ffn(x[i:i + 1])[0]
        return out

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """Feed every row its last token in one forward; returns each row's next token. Rows that
        are done (EOS, max_new_tokens) must be removed first."""
        n = len(self.rows)
        if n == 0 or any(row.done for row in self.rows):
            raise ValueError("step needs live rows only: remove finished ones first")
        self.slot[:n] += 1
        self.key_valid[:n].scatter_(1, self.slot[:n], True)
        last = max(row.length for row in self.rows) - 1  # the furthest slot fed this step
        span = min(self.cache_len, (last // CACHE_BLOCK + 1) * CACHE_BLOCK)
        logits = self.model(self.token[:n], self.slot[:n], self.slot[:n], self.key_valid[:n, :span], self.views,
                            ffn=self.run_ffn)[:, -1]  # [n, V]
        self.logits = logits
        tokens = logits.float().argmax(-1)  # [n]: the greedy rows' tokens; the others sample below
        for i, row in enumerate(self.rows):
            if not row.greedy:
                tokens[i] = sample(logits[i:i + 1], row.gen, row.history[:, :row.length], row.generator)[0]
        self.token[:n, 0] = tokens
        out = []
        for row, token in zip(self.rows, tokens.tolist()):
            row.append(token)
            row.stats.steps += 1
            row.stats.rows += n
            row.stats.bytes += self.step_bytes / n
            row.stats.layers.update(self.layer_paths)
            out.append((row, token))
        return out
