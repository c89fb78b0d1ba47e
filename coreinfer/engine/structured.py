"""Structured output: OpenAI's `response_format` as a mask over the next token, per decode step.

    grammars = Grammars(hf_tokenizer, vocab_size, eos_ids)  # once per tokenizer (~1 s)
    c = grammars.constraint(json_grammar({"type": "json_object"}))
    logits = c.mask(logits)  # [1, V]: tokens the grammar forbids at -inf
    c.accept(token)          # after sampling; c.finished once the document is complete

The grammar engine is llguidance (Rust, no dependencies). It was chosen by measurement against
xgrammar and outlines-core (benchmarks/structured_output.py, docs/server.md): its mask costs ~20 us
per token on the 49k vocabulary, noise beside a decode step; xgrammar is faster still but pulls in
triton and tvm-ffi; outlines-core builds regular expressions, so it cannot express arbitrary JSON.
"""

import json

import llguidance
import llguidance.hf
import llguidance.torch as llt
import torch

# compact separators: a small model left free to choose whitespace may emit it until max_tokens
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_grammar(response_format: dict) -> str | None:
    """OpenAI's response_format (already checked for shape) as an llguidance grammar; None for text."""
    kind = response_format["type"]
    if kind == "text":
        return None
    schema = {"type": "object"} if kind == "json_object" else response_format["json_schema"].get("schema", {})
    return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)


class Constraint:
    """One sequence's grammar state: the mask before each token, the token after it."""

    def __init__(self, matcher: "llguidance.LLMatcher", vocab_size: int):
        self.matcher = matcher
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)  # [1, ceil(V / 32)] int32, reused

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] -> an fp32 copy with the forbidden tokens at -inf."""
        llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        out = logits.float().clone()
        llt.apply_token_bitmask_inplace(out, self.bitmask.to(out.device))
        return out

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise ValueError(f"the grammar rejected token {token}: {self.matcher.get_error()}")


class Grammars:
    """Builds Constraints for one tokenizer; `vocab_size` is the model's logits width."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_ids: set[int]):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))

    def constraint(self, grammar: str) -> Constraint:
        """A fresh Constraint; ValueError naming the problem when the schema cannot be compiled."""
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"response_format: the JSON schema is not supported: {error}")
        return Constraint(llguidance.LLMatcher(self.tokenizer, grammar), self.vocab_size)
