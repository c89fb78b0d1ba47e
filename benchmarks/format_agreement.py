"""Top-1 agreement of --weights auto against the file's dequantized fp32 weights, teacher-forced on ~384
tokens of README.md (prefill, so the PyTorch matmuls: no activation quantization).

    python benchmarks/format_agreement.py [model.gguf]   # default: the embedded SmolLM2
"""
import sys
import time
from pathlib import Path

import torch

from coreinfer.io.loading import load_checkpoint
from coreinfer.io.text import Tokenizer
from coreinfer.models import build_model
from coreinfer.engine.session import Session

path = sys.argv[1] if len(sys.argv) > 1 else None
text = open(Path(__file__).resolve().parents[1] / "README.md").read()[2000:6000]
ck = load_checkpoint(path, progress=False)
tok = Tokenizer(ck.tokenizer_dir, ck.config)
ids = tok.encode(text)[:384]
logits = {}
for fmt in ("auto", "dense"):
    t = time.time()
    model = build_model(ck.config, ck.weights, formats=fmt)
    with torch.inference_mode():
        logits[fmt] = Session(model, [ids], 1).prefill(all_logits=True)[0]
    print(f"{fmt}: built and prefilled {len(ids)} tokens in {time.time() - t:.1f} s, weight bytes {model.weight_bytes() / 1e6:.0f} MB")
    del model
a, d = logits["auto"].argmax(-1), logits["dense"].argmax(-1)
print(f"{path or 'embedded SmolLM2'}: top-1 agreement auto vs fp32 file weights {(a == d).float().mean():.3f} over {len(ids)} positions")
