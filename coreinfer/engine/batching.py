"""Continuous batching: sequences join and leave a running decode batch between steps.

    batch = DecodeBatch(model, capacity=16)
    session, logits, selection, _ = prefill_group(model, prompts, policy)  # arrivals prefill together
    row, token = batch.add(session, logits, gen, eos_ids, selection, seq=b)  # each sequence moves in
    for row, token in batch.step(): ...                                  # one token for every row, one forward
    batch.remove(row)                                                    # finished, cancelled or timed out

Sequences that arrive together are prefilled together (one left-padded Session, dense, their policy
selecting each one's core set as usual); each one's KV cache and core ids then move into a row of the
batch. Rows are packed: rows 0..n-1 are the live ones and a removed row's place is taken by the last
one, so a step runs over exactly n sequences. Sequences of one batch sit at different cache slots; a
row holds its tokens from slot 0 on, so its positions are its slots.

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
from typing import TYPE_CHECKING

import torch

from ..models.common import KVCache
from .adaptive import AdaptiveFFN, DriftPolicy
from .compact import CompactFFN
from .generate import GenerationConfig, sample
from .observe import Observer
from .policy import Selection, SelectionPolicy
from .session import CACHE_BLOCK, CoreStats, Session, cache_length

if TYPE_CHECKING:  # llguidance is imported only where a grammar is built
    from .structured import Constraint

FFN_PATHS = ("auto", "compact", "masked")


def core_bytes(ffns: list, dense_bytes: int, sizes: dict[int, int]) -> int:
    """Weight bytes one sequence's decode step reads when layer l keeps sizes[l] of its F neurons
    (`dense_bytes`: the dense model's step)."""
    return dense_bytes - sum(ffns[l].neuron_bytes() * (1 - k / ffns[l].width) for l, k in sizes.items())


@torch.inference_mode()
def prefill_group(model, prompts: list[list[int]], policy: SelectionPolicy | None, pad_id: int = 0, caches=None):
    """Prefill sequences together, densely, in one left-padded forward, and let `policy` (None: dense)
    choose each one's core set without compacting it (the batch gathers or masks for itself).
    `caches`: a previous prefill's, reused when their shape fits. Returns the session (its KV caches),
    the last logits [B, V], the Selection (index [B, k] per layer) or None, and per sequence its
    CoreStats or None. Each sequence's tokens, activations and core set are its own: padding is masked."""
    if isinstance(policy, DriftPolicy):
        raise ValueError("drift checks re-choose a sequence's core set mid-decode, which a continuous batch "
                         "does not do: use drift_period 0")
    session = Session(model, prompts, 0, pad_id, caches=caches)
    observer = None if policy is None else Observer(policy.wanted())
    logits = session.prefill(observer)
    if policy is None:
        return session, logits, None, [None] * len(prompts)
    t0 = time.perf_counter()
    selection = policy.select(observer.layers)
    sizes = {l: ix.shape[1] for l, ix in selection.index.items()}
    ffns = model.ffns()
    step_bytes = core_bytes(ffns, session.dense_bytes, sizes)
    for l, plan in selection.plans.items():  # planned layers: the bytes a session alone counts
        step_bytes += AdaptiveFFN.planned_bytes(ffns[l], sizes[l], plan) - ffns[l].neuron_bytes() * sizes[l] / ffns[l].width
    select_ms = (time.perf_counter() - t0) * 1e3 / len(prompts)
    stats = [CoreStats(core_sizes=sizes, ffn_width=ffns[0].width, select_ms=select_ms,
                       bytes_dense=session.dense_bytes, bytes_core=round(step_bytes),
                       cluster=None if selection.cluster is None else selection.cluster[b:b + 1],
                       cluster_score=None if selection.cluster_score is None else selection.cluster_score[b:b + 1])
             for b in range(len(prompts))]
    return session, logits, selection, stats


def prefill_one(model, prompt: list[int], policy: SelectionPolicy | None, pad_id: int = 0, caches=None):
    """prefill_group of one sequence: (session, logits [1, V], Selection or None, CoreStats or None)."""
    session, logits, selection, stats = prefill_group(model, [prompt], policy, pad_id, caches)
    return session, logits, selection, stats[0]


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
                 eos_ids: set[int], constraint: "Constraint | None" = None, plans: dict | None = None):
        T0 = prompt.shape[0]
        self.gen, self.core, self.eos_ids, self.prompt_len = gen, core, eos_ids, T0
        self.plans = plans or {}
        self.refined: dict[int, AdaptiveFFN] = {}
        self.history = prompt.new_empty(1, T0 + gen.max_new_tokens)  # [1, T0 + max_new]: what the penalty sees
        self.history[0, :T0] = prompt
        self.length = T0
        device = prompt.device
        self.generator = None if gen.seed is None else torch.Generator(device=device).manual_seed(gen.seed)
        self.constraint = constraint  # structured output: a grammar masks every token
        self.greedy = gen.greedy and constraint is None  # the batch's plain argmax suffices
        self.records = gen.logprobs is not None or constraint is not None  # `record` has work to do
        # (token, its log-probability, [(id, log-probability)] of the gen.logprobs likeliest) per token,
        # taken by the server as it streams
        self.logprobs: list[tuple[int, float, list[tuple[int, float]]]] = []
        self.done = False
        self.stats = RowStats()

    @property
    def generated(self) -> int:
        return self.length - self.prompt_len

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits [1, V]: grammar mask, penalties and bias, sampling."""
        scores = logits if self.constraint is None else self.constraint.mask(logits)
        return int(sample(scores, self.gen, self.history[:, :self.length], self.prompt_len, self.generator)[0])

    def record(self, logits: torch.Tensor, token: int) -> None:
        """Keep the chosen token's log-probability (and the likeliest ones') under the model's own
        distribution, logits [1, V] before any penalty, bias, mask or temperature; advance the grammar."""
        if self.gen.logprobs is not None:
            lp = logits[0].float().log_softmax(-1)  # [V]
            top = lp.topk(self.gen.logprobs) if self.gen.logprobs else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            self.logprobs.append((token, float(lp[token]), alts))
        if self.constraint is not None:
            self.constraint.accept(token)

    def append(self, token: int) -> None:
        self.history[0, self.length] = token
        self.length += 1
        # a grammar's document ends at EOS even under ignore_eos: the grammar allows nothing after it
        ends = token in self.eos_ids and (not self.gen.ignore_eos or self.constraint is not None)
        self.done = ends or self.generated >= self.gen.max_new_tokens


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
            selection: Selection | None = None, constraint: "Constraint | None" = None,
            seq: int = 0) -> tuple[Row, int]:
        """Move sequence `seq` of a prefilled session (logits [B, V] of its last prompt tokens,
        `selection` its policy's choice or None for dense, `constraint` a grammar for the output) into
        a free row; returns the row and its first token."""
        b = session.batch
        if not 0 <= seq < b.size or len(self.rows) >= self.capacity:
            raise ValueError("add takes a sequence of a prefilled session, and a batch with a free row")
        if gen.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 in a batch, got {gen.max_new_tokens}")
        # the session pads on the left: the sequence's T tokens sit at slots T0 - T .. T0 - 1 with
        # positions 0 .. T - 1; here they move to slots 0 .. T - 1, so that slot equals position again
        T0, T = b.prompt_len, int(b.valid[seq].sum())
        self._ensure(T + gen.max_new_tokens)
        i = len(self.rows)
        for dst, src in zip(self.caches, session.caches):
            dst.k[i, :, :T], dst.v[i, :, :T] = src.k[seq, :, T0 - T:T0], src.v[seq, :, T0 - T:T0]
        self.key_valid[i] = False
        self.key_valid[i, :T] = True
        self.slot[i] = T - 1  # advanced before each step
        core = {} if selection is None else {l: ix[seq] for l, ix in selection.index.items()}
        row = Row(gen, b.ids[seq, T0 - T:], core, eos_ids, constraint, None if selection is None else selection.plans)
        for layer, plan in row.plans.items():
            row.refined[layer] = self._refined(self.model.ffns()[layer], plan, core[layer])
        logits = logits[seq:seq + 1]
        token = row.choose(logits)
        row.record(logits, token)
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
                tokens[i] = row.choose(logits[i:i + 1])
            if row.records:
                row.record(logits[i:i + 1], int(tokens[i]))
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
