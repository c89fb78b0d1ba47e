"""Helpers that run our models and the transformers oracle on the same random weights."""

import torch

from coreinfer.generate import Batch, decode_one_token
from coreinfer.models import build_model


def hf_pair(hf_config, seed: int = 0):
    """A random transformers model and ours with the same weights (fp32, CPU)."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    for p in hf.parameters():  # non-trivial norms and biases, so every weight matters
        if p.dim() == 1:
            p.data.normal_(0.0 if p.data.abs().sum() == 0 else 1.0, 0.1)
    ours = build_model(hf_config.to_dict(), hf.state_dict())
    return hf, ours


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    """The oracle: one uncached forward over the whole sequence -> logits [T, V]."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def our_logits(model, prompts: list[list[int]], continuations: list[list[int]], sparse=False, core_hook=None):
    """Prefill the left-padded batch, then feed each continuation token by token through the cache.

    Returns, per sequence, logits [len(prompt) + len(cont), V] aligned with hf_logits (prompt rows
    come from the prefill, the rest from cached decode steps).
    """
    steps = max(len(c) for c in continuations)
    batch = Batch(prompts, steps, pad_id=0, device="cpu")
    with torch.inference_mode():
        model.setup_caches(len(prompts), batch.total_len)
        acts = [] if core_hook else None
        T0 = batch.prompt_len
        pre = model(batch.ids, batch.prompt_positions, batch.slots[:T0], batch.key_valid[:, :T0], acts=acts)
        if core_hook:
            core_hook(acts, batch.valid)
        rows = [[pre[b, T0 - len(p):]] for b, p in enumerate(prompts)]
        for step in range(steps):
            batch.token[:, 0] = torch.tensor([c[step] if step < len(c) else 0 for c in continuations])
            logits = decode_one_token(model, batch, step, sparse=sparse)
            for b, c in enumerate(continuations):
                if step < len(c):
                    rows[b].append(logits[b:b + 1])
    return [torch.cat(r) for r in rows]


def assert_parity(name, hf_config, prompts, continuations, tol: float) -> None:
    """Ours alone and in a left-padded batch (prefill + cached decode) vs an uncached transformers
    forward, max abs logit difference below `tol`; prints the differences."""
    hf, ours = hf_pair(hf_config)
    batched = our_logits(ours, prompts, continuations)
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        ref = hf_logits(hf, p + c)
        alone = our_logits(ours, [p], [c])[0]
        err_alone, err_batch = (alone - ref).abs().max().item(), (batched[b] - ref).abs().max().item()
        print(f"{name} seq{b}: max|ours-hf| alone {err_alone:.2e}, in batch {err_batch:.2e}")
        assert err_alone < tol and err_batch < tol
