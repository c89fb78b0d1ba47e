"""The decode loop: dense prefill, optional core selection and compaction, then one token at a time.

`prefill`, `decode_one_token` and `sample` are the hot path; `generate_ids` strings them together for
a left-padded batch and yields one token per sequence per step. Nothing here knows about text.
"""

from dataclasses import dataclass
from typing import Iterator

import torch

from .core import CoreConfig, CoreStats, select_and_compact


@dataclass
class GenerationConfig:
    """Sampling and stopping. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.stop = tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)


class Batch:
    """A left-padded batch and the decode-time buffers it reuses every step.

    ids [B, T0] prompt tokens (pad on the left), valid [B, T0] real-token mask;
    key_valid [B, S] marks cache slots that hold real tokens, positions [B, 1] the next RoPE position.
    """

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int, device):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        B, T0 = len(prompts), max(len(p) for p in prompts)
        self.prompt_len, self.total_len = T0, T0 + max_new_tokens
        self.ids = torch.full((B, T0), pad_id, dtype=torch.long)
        self.valid = torch.zeros(B, T0, dtype=torch.bool)
        for b, p in enumerate(prompts):
            self.ids[b, T0 - len(p):] = torch.tensor(p)
            self.valid[b, T0 - len(p):] = True
        self.ids, self.valid = self.ids.to(device), self.valid.to(device)
        self.key_valid = torch.zeros(B, self.total_len, dtype=torch.bool, device=device)
        self.key_valid[:, :T0] = self.valid
        self.prompt_positions = (self.valid.cumsum(1) - 1).clamp_min(0)  # [B, T0], padding at 0
        self.positions = self.prompt_positions[:, -1:].clone()  # [B, 1], advanced before each step
        self.slots = torch.arange(self.total_len, device=device)  # views of this are each step's slots
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)


def prefill(model, batch: Batch, collect: bool) -> tuple[torch.Tensor, list | None]:
    """Dense forward over the prompt; returns last-token logits [B, V] and, if asked, each layer's
    FFN activations [B, T0, F] for core selection."""
    acts = [] if collect else None
    T0 = batch.prompt_len
    logits = model(batch.ids, batch.prompt_positions, batch.slots[:T0], batch.key_valid[:, :T0], acts=acts)
    return logits[:, -1], acts


def decode_one_token(model, batch: Batch, step: int, sparse: bool) -> torch.Tensor:
    """Feed batch.token at slot T0 + step; returns logits [B, V]."""
    slot = batch.prompt_len + step
    batch.key_valid[:, slot] = True
    batch.positions += 1
    logits = model(batch.token, batch.positions, batch.slots[slot:slot + 1], batch.key_valid[:, :slot + 1],
                   sparse=sparse)
    return logits[:, -1]


def sample(logits: torch.Tensor, gen: GenerationConfig, history: torch.Tensor,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. history [B, n] are the tokens the repetition penalty sees."""
    logits = logits.float()
    if gen.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / gen.repetition_penalty, seen * gen.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if gen.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / gen.temperature
    if gen.top_k:
        kth = logits.topk(min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > gen.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.inference_mode()
def generate_ids(model, prompts: list[list[int]], gen: GenerationConfig, core: CoreConfig | None,
                 eos_ids: set[int], pad_id: int, stats: dict | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence [B] per step (finished sequences keep yielding pad).

    `stats`, when given, receives the CoreStats of the selection under "core".
    """
    device = model.embed_tokens.weight.device
    batch = Batch(prompts, gen.max_new_tokens, pad_id, device)
    if batch.total_len > model.max_context:
        raise ValueError(f"prompt ({batch.prompt_len} tokens) + max_new_tokens ({gen.max_new_tokens}) "
                         f"exceeds the model's context of {model.max_context} tokens")
    model.setup_caches(len(prompts), batch.total_len)
    generator = None
    if gen.seed is not None:
        generator = torch.Generator(device=device).manual_seed(gen.seed)
    if gen.max_new_tokens == 0:
        return
    logits, acts = prefill(model, batch, collect=core is not None)
    if core is not None:
        core_stats: CoreStats = select_and_compact(model, acts, batch.valid, core)
        del acts
        if stats is not None:
            stats["core"] = core_stats
    # history [B, T0 + max_new]: the prompt (padding replaced by a real prompt token, so it is never
    # penalised) followed by the generated tokens; the repetition penalty reads a prefix of it.
    T0 = batch.prompt_len
    history = torch.where(batch.valid, batch.ids, batch.ids[:, -1:])
    history = torch.cat([history, history.new_empty(len(prompts), gen.max_new_tokens)], 1)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(gen.max_new_tokens):
        if step:
            logits = decode_one_token(model, batch, step - 1, sparse=core is not None)
        token = sample(logits, gen, history[:, :T0 + step], generator)
        token = torch.where(done, pad_id, token)
        history[:, T0 + step] = token
        batch.token[:, 0] = token
        yield token
        if not gen.ignore_eos:
            done |= torch.isin(token, eos)
            if bool(done.all()):
                return
