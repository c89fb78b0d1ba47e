"""Text in and out: the tokenizer, the chat template, and incremental detokenization with stop strings."""

from pathlib import Path

from transformers import AutoTokenizer

# Tokens that end an assistant turn in the chat templates of the families we run. GGUF files carry
# no generation config to list them, so generation would otherwise run past the end of a turn.
END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")


class Tokenizer:
    """A transformers tokenizer plus the ids generation needs (every end-of-sequence id, a pad id)."""

    def __init__(self, path: str | Path, config: dict):
        self.hf = AutoTokenizer.from_pretrained(str(path))
        eos = config.get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos]
        vocab = self.hf.get_vocab()
        turn_ends = [vocab[t] for t in END_OF_TURN if t in vocab]
        self.eos_ids = {i for i in [*eos, self.hf.eos_token_id, *turn_ends] if i is not None}
        self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else min(self.eos_ids, default=0)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def encode(self, text: str, chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(text, str) or not text:
            raise ValueError("the prompt is empty")
        if not chat:
            return self.hf(text)["input_ids"]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.encode_chat(messages)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use a plain prompt")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


class TextStream:
    """Turns a token stream into text pieces that are safe to show.

    A piece is held back while it ends in an incomplete UTF-8 character, or while its tail could still
    grow into a stop string; once a stop string appears the text ends just before it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # what has been emitted
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(full[:cut])
        hold = max((n for s in self.stop for n in range(1, len(s)) if full.endswith(s[:n])), default=0)
        return self._emit(full[:len(full) - hold])

    def finish(self) -> str:
        """The held-back tail, once no more tokens come."""
        if self.stopped:
            return ""
        return self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text):]
        self.text = upto if len(upto) > len(self.text) else self.text
        return piece
