"""Shared fixtures: a tiny random model saved as a Hugging Face folder, with a real byte-level BPE
tokenizer, so the whole stack (loading, CLI, bench) runs in seconds without the embedded model.

Two rules for the whole suite:
- converted checkpoints go to a temporary cache for the run, never the user's (~/.cache/coreinfer);
- under CI (CI=true) a skip is a failure, since .ci/run installs everything the tests use; only
  skips whose reason starts with "optional:" (hardware CI does not have, such as a GPU) stay skips.
"""

import os
import shutil
import tempfile

import pytest
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

TEXT = ["The history of the printing press begins in the fifteenth century.",
        "Scholars argue about how much the press changed the way people thought.",
        "The capital of France is Paris. The capital of Italy is Rome."]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}" \
                "{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT * 4, vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def pytest_configure(config):
    config.cache_root = tempfile.mkdtemp(prefix="coreinfer-test-cache-")
    os.environ["COREINFER_CACHE"] = config.cache_root


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "cache_root", ""), ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
        if not reason.removeprefix("Skipped: ").startswith("optional:"):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI, where .ci/run installs everything: {reason}"
