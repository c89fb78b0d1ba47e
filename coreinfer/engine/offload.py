"""Memory-limited mode: only the core neurons live on the accelerator (the paper's own setting).

    place(model, "cuda")                                  # attention, norms, embeddings, head -> device;
                                                          # FFN neuron weights stay in pinned CPU memory
    session = OffloadSession(model, prompts, 64, policy=..., budget=parse_bytes("2GiB"), streamer=Streamer(model))
    session.prefill()                                     # streams each layer's FFN in, selects that layer's
                                                          # core set in the forward, keeps only its core rows
    session.step(tokens)                                  # decodes from device-resident weights only

Prefill streams each layer's full FFN from pinned memory into one of two device staging FFNs (the
copy of the next layer overlaps the compute of this one on CUDA), computes it there, and, when the
layer has seen the whole prompt, ranks its neurons and gathers the core rows out of the staging
copy: a layer's core set is chosen inside the forward pass, and the full FFN never stays. Layers the
policy keeps dense are "compacted" to all their neurons, so every resident FFN lives in CoreWeights
and a session that streams nothing decodes through the same (compilable, graph-capturable) step as
any other. A dense session (no policy) keeps as many leading layers' FFNs resident as the budget
holds and streams the others on every step, as accelerate's `device_map="auto"` does: the offload a
user would otherwise get, for comparison.

Budget accounting (`budget.plan`, shared with the CPU mode of engine/residency.py) is exact for
weights, KV caches, staging and core rows; activations and the allocator's slack are not counted.
"""

import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models.common import FFN
from .budget import GiB, Plan, parse_bytes, plan, streamed_tensors  # noqa: F401 (GiB, parse_bytes: callers import them here)
from .compact import CompactFFN
from .observe import Observer
from .policy import Selection, StabilityPolicy
from .session import CoreStats, Session, cache_length

STAGING_BUFFERS = 2  # one FFN computing, the next one copying in


@torch.no_grad()
def place(model, device) -> None:
    """Move everything but the FFN neuron weights to `device`; pin those (on CUDA) for fast async copies.
    Tied weights stay tied (each parameter's data moves once)."""
    device = torch.device(device)
    if any(f.quantized for f in model.ffns()):
        raise ValueError("the memory-limited mode streams dense FFN weights: use --weights dense with it")
    streamed = {id(t) for f in model.ffns() for t in streamed_tensors(f).values()}
    moved = {}  # id of a tensor -> its placed successor, shared by every module that holds it

    def placed(t):
        if id(t) not in moved:
            data = t.data.to(device) if id(t) not in streamed else t.data.pin_memory() if device.type == "cuda" else t.data
            moved[id(t)] = nn.Parameter(data, requires_grad=False) if isinstance(t, nn.Parameter) else data
        return moved[id(t)]

    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            setattr(module, name, placed(t))


class Streamer:
    """Device staging copies of the FFNs: `fetch(layer)` returns a device FFN holding that layer's
    weights, copied from pinned memory; `prefetch(layer)` starts the next copy into the other slot (a
    side stream on CUDA, so it overlaps the compute queued before it). `bytes_moved` counts
    host-to-device bytes. Slots keep what they hold across sessions: the model's weights never change."""

    staging_layers = STAGING_BUFFERS  # FFNs staged at a time, as the budget plans them
    runtime = 0  # bytes the budget holds beside tensors: none, the GPU's budget is its tensors' memory

    def __init__(self, model, device):
        self.ffns, self.device = model.ffns(), torch.device(device)
        self.slots = [staging_ffn(self.ffns[0], self.device) for _ in range(STAGING_BUFFERS)]
        self.holds = [None] * STAGING_BUFFERS  # layer id whose weights each slot holds (or is receiving)
        self.ready = [None] * STAGING_BUFFERS  # CUDA events: that copy is done
        self.copier = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.bytes_moved = 0
        self.current = 0  # the slot last fetched: its layer is computing, so copies go elsewhere

    def prefetch(self, layer: int) -> int:
        """Start copying `layer` into the slot not in use (unless a slot holds it); returns the slot."""
        if layer in self.holds:
            return self.holds.index(layer)
        slot = (self.current + 1) % STAGING_BUFFERS
        src, dst = self.ffns[layer], self.slots[slot]
        if src.neuron_bytes() != dst.neuron_bytes():
            raise ValueError("the memory-limited mode needs FFNs of one shape in every layer")
        if self.copier is None:
            copy_ffn(src, dst)
        else:
            # the slot's previous layer may still be computing: queue the copy after everything queued so far
            self.copier.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.copier):
                copy_ffn(src, dst)
                self.ready[slot] = torch.cuda.Event()
                self.ready[slot].record()
        self.holds[slot] = layer
        self.bytes_moved += src.neuron_bytes()
        return slot

    def fetch(self, layer: int, then: int | None = None) -> FFN:
        """The device FFN of `layer`, ready for the current stream; starts copying `then` behind it."""
        self.current = self.prefetch(layer)
        if self.ready[self.current] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[self.current])
        if then is not None:
            self.prefetch(then)
        return self.slots[self.current]


def staging_ffn(like: FFN, device) -> FFN:
    """An empty FFN shaped and typed like `like`, on `device`; its down bias is set per copy."""
    with torch.device("meta"):
        ffn = FFN(like.layer_id, like.up.shape[1], like.width, like.act_name, like.gated, like.up_bias is not None)
    return ffn.to(like.up.dtype).to_empty(device=device)


@torch.no_grad()
def copy_ffn(src: FFN, dst: FFN) -> None:
    for name, t in streamed_tensors(src).items():
        getattr(dst, name).copy_(t, non_blocking=True)
    dst.layer_id, dst.down_bias = src.layer_id, src.down_bias  # down's bias is resident already


@dataclass
class OffloadStats:
    """What the memory-limited mode planned and did: device bytes per the plan, host-to-device bytes
    during prefill and per decode step, and the measured peak device memory (CUDA only, else 0)."""

    plan: Plan
    budget: int
    prefill_bytes_moved: int = 0
    step_bytes_moved: int = 0
    peak_device_bytes: int = 0


class OffloadSession(Session):
    """A Session whose FFN weights live in CPU memory (see the module docstring). `streamer` is reused
    across sessions of one model (its staging buffers are allocated once). A dense session runs as a
    policy with no sparse layers, so its decode steps too go through `run_ffn`."""

    flag = "--max-gpu-memory"  # the budget's name in errors

    def __init__(self, model, prompts, max_new_tokens, pad_id=0, policy=None, cores=None, caches=None,
                 prefill_chunk=None, *, budget: int, streamer: Streamer, compiled=None):
        if not prompts:
            raise ValueError("every prompt needs at least one token")
        if policy is not None and not isinstance(policy, StabilityPolicy):
            raise ValueError("the memory-limited mode selects each layer's core set in the forward pass: "
                             "it takes --mode stability")
        total = max(len(p) for p in prompts) + max_new_tokens
        cache_len = max(cache_length(total, model.max_context), total)
        self.plan = plan(model, len(prompts), cache_len, None if policy is None else policy.keep, budget,
                         staging_layers=streamer.staging_layers, flag=self.flag, runtime=streamer.runtime)
        self.plan.check(budget)
        policy = policy or StabilityPolicy({}, model.ffns()[0].width)
        # prefill in one chunk by default: every chunk streams every FFN again
        super().__init__(model, prompts, max_new_tokens, pad_id, policy, cores, caches,
                         prefill_chunk or max(len(p) for p in prompts), compiled=compiled)
        self.streamer, self.picked = streamer, {}
        if self.plan.streamed:  # a compiled or graphed step reads CoreWeights only
            self.compiled = None
        self.seen = dict.fromkeys(range(len(model.ffns())), 0)  # prompt tokens each layer has prefilled
        self.select_s = self.compact_s = 0.0
        self.offload = OffloadStats(self.plan, budget)
        if streamer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(streamer.device)

    def prefill_runner(self, observer):
        return lambda ffn, x: self.prefill_ffn(ffn, x, observer)

    def prefill_ffn(self, ffn, x, observer) -> torch.Tensor:
        """Prefill-time FFN: streamed in; observed; on the layer's last prompt chunk, its core set is
        selected and gathered (sparse layers) or the whole FFN kept (dense layers under a policy)."""
        layer, n = ffn.layer_id, len(self.streamer.ffns)
        self.seen[layer] += x.shape[1]
        done = self.seen[layer] == self.batch.prompt_len
        last = done and layer == n - 1
        dev = self.streamer.fetch(layer, then=None if last else (layer + 1) % n)
        if layer not in observer:
            out = dev(x)
            if done and layer in self.plan.dense_layers:  # resident: "compacted" to all its neurons
                self.keep_rows(layer, dev, torch.arange(dev.width, device=x.device).expand(x.shape[0], -1))
            return out
        a = dev.activations(x)
        observer(layer, a)
        out = dev.project(a)
        if done:
            self.select_layer(layer, observer, dev)
        return out

    def select_layer(self, layer: int, observer: Observer, dev: FFN) -> None:
        """Rank this layer's neurons from its finished statistics and gather the core rows on the device."""
        self.sync()
        t0 = time.perf_counter()
        one = StabilityPolicy({layer: self.policy.keep[layer]}, self.policy.width, self.policy.spec)
        index = one.select({layer: observer.layers[layer]}).index[layer]  # [B, k]
        self.sync()
        self.select_s += time.perf_counter() - t0
        self.keep_rows(layer, dev, index)

    def keep_rows(self, layer: int, dev: FFN, index: torch.Tensor) -> None:
        """Gather rows `index` [B, k] of the staged FFN into the layer's CompactFFN."""
        t0 = time.perf_counter()
        self.cores.layers.setdefault(layer, CompactFFN()).load(dev, index)
        self.sync()
        self.compact_s += time.perf_counter() - t0
        self.picked[layer] = index

    def prefilled(self, observer) -> None:
        """The core sets were chosen inside the forward; free other layers' stale cores and sum up."""
        for layer in set(self.cores.layers) - set(self.picked):
            self.cores.layers.pop(layer).clear()
        self.compacted, self.selection = True, Selection(self.picked)
        self.stats = CoreStats(core_sizes={l: ix.shape[1] for l, ix in self.picked.items()},
                               ffn_width=self.model.ffns()[0].width, batch=self.batch.size,
                               select_ms=self.select_s * 1e3, compact_ms=self.compact_s * 1e3,
                               bytes_dense=self.dense_bytes,
                               bytes_core=self.cores.step_bytes(self.model.ffns(), self.dense_bytes))

    @torch.inference_mode()
    def prefill(self, observer=None, all_logits=False) -> torch.Tensor:
        moved = self.streamer.bytes_moved
        logits = super().prefill(observer, all_logits)
        if self.plan.streamed:  # the first decode step's first streamed FFN copies in behind the prefill
            self.streamer.prefetch(self.plan.streamed[0])
        self.offload.prefill_bytes_moved = self.streamer.bytes_moved - moved
        self.measure_peak()
        return logits

    def refresh(self, selection) -> CoreStats:
        raise NotImplementedError("the memory-limited mode selects once, during the prefill")

    def run_ffn(self, ffn, x: torch.Tensor) -> torch.Tensor:
        """Decode-time FFN: resident rows (core or all), or streamed in."""
        layer = ffn.layer_id
        if layer in self.picked:
            return self.cores.get(layer)(x)
        streamed = self.plan.streamed
        return self.streamer.fetch(layer, then=streamed[(streamed.index(layer) + 1) % len(streamed)])(x)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        moved = self.streamer.bytes_moved
        logits = super().step(tokens)
        self.offload.step_bytes_moved = self.streamer.bytes_moved - moved
        self.measure_peak()
        return logits

    def measure_peak(self) -> None:
        if self.streamer.device.type == "cuda":
            self.offload.peak_device_bytes = torch.cuda.max_memory_allocated(self.streamer.device)
            if self.stats is not None:
                self.stats.peak_gpu_bytes = self.offload.peak_device_bytes
