"""lm-evaluation-harness adapter: `--model coreinfer` scores and decodes on the sparse model.

lm-eval has no plugin discovery for models, so the model is registered when this module is
imported; coreinfer itself never imports it, and never requires lm-eval. Either

    python -m coreinfer.eval.harness --model coreinfer --model_args beta=0.7 --tasks piqa

(lm-eval's own command line, with the adapter registered first), or from Python

    import lm_eval, coreinfer.eval.harness
    lm_eval.simple_evaluate(model="coreinfer", model_args="beta=0.7,layers=3-27", tasks=["piqa"])

model_args: pretrained (HF folder or .gguf; default the embedded model; or an `LLM` instance from
Python), device, dtype, threads, weights, dense, alpha, beta, statistic, ranking, layers, batch_size,
max_gen_toks. `loglikelihood` chooses the core set from each request's context and scores the
continuation through the compacted FFN (`is_greedy` included); `generate_until` decodes sparse with
the core set chosen from the prompt; `loglikelihood_rolling` scores each window sparse, the core set
chosen from the window's context (a single token for the first window, so prefer `coreinfer eval
ppl` for perplexity under sparsity). Tokenization is lm-eval's: `_encode_pair` from `TemplateLM`,
special tokens as the tokenizer adds them (as `HFLM` does by default).
"""

import logging

import lm_eval.models  # noqa: F401  (registers the built-in models first, so none goes missing)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from ..api import LLM
from ..engine.policy import CoreConfig
from .runner import generate_texts, score_rows


def pick_device(device: str | None) -> str:
    """lm-eval's command line asks for "cuda" by default; like its HF model, fall back to the CPU
    when CUDA is not there."""
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA is not available: running on the CPU")
        return "cpu"
    return device or "cpu"


@register_model("coreinfer")
class CoreInferLM(TemplateLM):
    def __init__(self, pretrained=None, device: str | None = None, dtype: str | None = None,
                 threads: int | None = None, weights: str = "dense", dense: bool = False,
                 alpha: float = CoreConfig.alpha, beta: float = CoreConfig.beta,
                 statistic: str = CoreConfig.statistic, ranking: str = CoreConfig.ranking,
                 layers: str | None = None, batch_size: int | str = 8, max_batch_size: int | None = None,
                 max_gen_toks: int = 256):
        # max_batch_size: lm-eval passes it to every model; it only bounds HFLM's "auto" probing.
        super().__init__()
        if not isinstance(pretrained, LLM):
            pretrained = LLM(pretrained, device=pick_device(device), dtype=dtype, threads=threads, weights=weights)
        self.llm = pretrained
        self.core = None if dense else CoreConfig(alpha=alpha, beta=beta, statistic=statistic, ranking=ranking,
                                                  layers=None if layers is None else str(layers))
        # "auto" asks HFLM to probe memory; our batches are small either way.
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = self.llm.tokenizer.hf

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else min(self.llm.tokenizer.eos_ids)

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: BOS when the tokenizer has one, else end-of-text, conditions an empty context.
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, **special)["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _score(self, rows: list[tuple[list[int], list[int]]], desc: str, disable_tqdm: bool) -> list:
        return score_rows(self.llm.model, rows, self.core, self.llm.tokenizer.pad_id, self.batch_size,
                          None if disable_tqdm else desc)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context ids, continuation ids) -> (log-likelihood, is_greedy)."""
        scored = self._score([(ctx, cont) for _, ctx, cont in requests], "coreinfer loglikelihood", disable_tqdm)
        out = []
        for (pair, _, cont), s in zip(requests, scored):
            answer = (s.loglikelihood, s.is_greedy(cont))
            self.cache_hook.add_partial("loglikelihood", pair, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        max_len = self.llm.model.max_context - 1  # a window plus the prefix token must fit the cache
        owners, rows = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id, max_seq_len=max_len,
                                                         context_len=1)
            for window in map(lm_utils.make_disjoint_window, windows):
                owners.append(index)
                rows.append(window)
        totals = [0.0] * len(requests)
        for index, s in zip(owners, self._score(rows, "coreinfer loglikelihood_rolling", disable_tqdm)):
            totals[index] += s.loglikelihood
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Sparse greedy decoding; requests are grouped by their token budget, batched by stop strings."""
        groups: dict[int, list[int]] = {}
        stops = []
        for index, (_, kwargs) in enumerate(req.args for req in requests):
            kwargs = dict(kwargs)
            if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                raise NotImplementedError("coreinfer's lm-eval adapter decodes greedily only")
            until = kwargs.get("until") or []
            stops.append(tuple([until] if isinstance(until, str) else until))
            groups.setdefault(int(kwargs.get("max_gen_toks", self.max_gen_toks)), []).append(index)
        out = [""] * len(requests)
        contexts = [req.args[0] for req in requests]
        for budget, indices in tqdm(sorted(groups.items()), desc="coreinfer generate_until", disable=disable_tqdm):
            texts = generate_texts(self.llm, [contexts[i] for i in indices], [stops[i] for i in indices],
                                   self.core, self.batch_size, budget)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main() -> None:
    """lm-eval's command line, with `--model coreinfer` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
