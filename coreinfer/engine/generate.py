"""The decode loop: a session's prefill, then one sampled token per sequence per step.

`sample` and `decode` are the hot path; `decode` yields one token per sequence per step and stops
when every sequence has ended. Nothing here knows about text.
"""

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .session import Session


@dataclass
class GenerationConfig:
    """Sampling and stopping. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence among the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N likeliest
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
            (math.isfinite(self.presence_penalty), f"presence_penalty must be finite, got {self.presence_penalty}"),
            (math.isfinite(self.frequency_penalty), f"frequency_penalty must be finite, got {self.frequency_penalty}"),
            (all(math.isfinite(b) for b in self.logit_bias.values()), "logit_bias values must be finite"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.stop = tuple(s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s)

    @property
    def greedy(self) -> bool:
        """Whether the next token is the plain argmax of the model's logits."""
        return (self.temperature == 0 and self.repetition_penalty == 1.0 and not self.presence_penalty
                and not self.frequency_penalty and not self.logit_bias)


def filter_logits(logits: torch.Tensor, gen: GenerationConfig, history: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """logits [B, V] -> the fp32 scores sampling draws from: repetition penalty over history [B, n],
    OpenAI's presence and frequency penalties over the generated part history[:, prompt_len:], the
    logit bias, then temperature, top-k and top-p (filtered tokens at -inf), in transformers' order."""
    logits = logits.float()
    if gen.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / gen.repetition_penalty, seen * gen.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    generated = history[:, prompt_len:]
    if (gen.presence_penalty or gen.frequency_penalty) and generated.shape[1]:
        counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))
        logits = logits - counts * gen.frequency_penalty - (counts > 0).to(logits.dtype) * gen.presence_penalty
    if gen.logit_bias:
        ids = torch.tensor(list(gen.logit_bias), device=logits.device)
        logits = logits.index_add(1, ids, torch.tensor(list(gen.logit_bias.values()), device=logits.device)
                                  .expand(logits.shape[0], -1))
    if gen.temperature == 0:
        return logits
    logits = logits / gen.temperature
    if gen.top_k:
        kth = logits.topk(min(gen.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if gen.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > gen.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, gen: GenerationConfig, history: torch.Tensor, prompt_len: int,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. history [B, n]: the tokens the penalties see, the generated
    ones from prompt_len on."""
    logits = filter_logits(logits, gen, history, prompt_len)
    if gen.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@torch.inference_mode()
def decode(session: Session, gen: GenerationConfig, eos_ids: set[int]) -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence [B] per step (finished sequences keep yielding pad).

    The session must be fresh and sized for gen.max_new_tokens; its prefill gives the first token.
    """
    batch = session.batch
    B, T0, device = batch.size, batch.prompt_len, batch.ids.device
    if gen.max_new_tokens == 0:
        return
    generator = None if gen.seed is None else torch.Generator(device=device).manual_seed(gen.seed)
    logits = session.prefill()
    # history [B, T0 + max_new]: the prompt (padding replaced by a real prompt token, so it is never
    # penalised) followed by the generated tokens; the repetition penalty reads a prefix of it.
    history = torch.where(batch.valid, batch.ids, batch.ids[:, -1:])
    history = torch.cat([history, history.new_empty(B, gen.max_new_tokens)], 1)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(gen.max_new_tokens):
        if step:
            logits = session.step(history[:, T0 + step - 1])
        token = sample(logits, gen, history[:, :T0 + step], T0, generator)
        token = torch.where(done, batch.pad_id, token)
        history[:, T0 + step] = token
        yield token
        if not gen.ignore_eos:
            done |= torch.isin(token, eos)
            if bool(done.all()):
                return
