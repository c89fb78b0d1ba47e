"""Helpers that run our models and the transformers oracle on the same random weights."""

import torch

from coreinfer.engine.session import Session
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


def our_logits(model, prompts: list[list[int]], continuations: list[list[int]], policy=None,
               prefill_chunk: int = 512) -> list[torch.Tensor]:
    """Prefill the left-padded batch (choosing core sets if `policy`), then feed each continuation token
    by token through the cache.

    Returns, per sequence, logits [len(prompt) + len(cont), V] aligned with hf_logits (prompt rows
    come from the prefill, the rest from cached decode steps), and the session.
    """
    steps = max(len(c) for c in continuations)
    session = Session(model, prompts, steps, policy=policy, prefill_chunk=prefill_chunk)
    pre = session.prefill(all_logits=True)
    T0 = session.batch.prompt_len
    rows = [[pre[b, T0 - len(p):]] for b, p in enumerate(prompts)]
    for step in range(steps):
        logits = session.step(torch.tensor([c[step] if step < len(c) else 0 for c in continuations]))
        for b, c in enumerate(continuations):
            if step < len(c):
                rows[b].append(logits[b:b + 1])
    return [torch.cat(r) for r in rows], session


def assert_parity(name, hf_config, prompts, continuations, tol: float) -> None:
    """Ours alone and in a left-padded batch (prefill + cached decode) vs an uncached transformers
    forward, max abs logit difference below `tol`; prints the differences. The batch is prefilled in
    chunks of 3 tokens, so chunked prefill is held to the same oracle."""
    hf, ours = hf_pair(hf_config)
    batched, _ = our_logits(ours, prompts, continuations, prefill_chunk=3)
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        ref = hf_logits(hf, p + c)
        alone, _ = our_logits(ours, [p], [c])
        alone = alone[0]
        err_alone, err_batch = (alone - ref).abs().max().item(), (batched[b] - ref).abs().max().item()
        print(f"{name} seq{b}: max|ours-hf| alone {err_alone:.2e}, in batch (chunked prefill) {err_batch:.2e}")
        assert err_alone < tol and err_batch < tol


def masked_dense_logits(model, prompt: list[int], cont: list[int], index: dict[int, torch.Tensor]) -> torch.Tensor:
    """The reference for compacted decoding: a dense prefill, then dense decode steps with every
    non-core neuron of each layer in `index` (ids [k]) switched off by zeroing its slice of `down`
    (a row in float and in the block formats' neuron-major tensors, q4's mins too; a column in int8).
    Logits [len(prompt) + len(cont), V]; weights restored after."""
    session = Session(model, [prompt], len(cont))
    rows = [session.prefill(all_logits=True)[0]]
    saved = {}
    with torch.inference_mode():
        for layer, ids in index.items():
            downs = {name: t for name, t in model.ffns()[layer].neuron_tensors().items() if name.startswith("down")}
            saved[layer] = {name: t.clone() for name, (t, _) in downs.items()}
            for down, axis in downs.values():
                keep = torch.zeros(down.shape[axis], dtype=torch.bool)
                keep[ids] = True
                down.index_fill_(axis, (~keep).nonzero()[:, 0], 0)
    try:
        for token in cont:
            rows.append(session.step(torch.tensor([token])))
    finally:
        with torch.inference_mode():
            for layer, held in saved.items():
                tensors = model.ffns()[layer].neuron_tensors()
                for name, w in held.items():
                    tensors[name][0].copy_(w)
    return torch.cat(rows)


def compacted_vs_masked(model, prompts, continuations, policy) -> tuple[list[float], list[float], Session]:
    """Per sequence, over its continuation's logits: max |compacted - masked dense|, and max |compacted -
    dense|, which says whether the core set mattered at all (without it the first proves nothing); and
    the compacted session (its selection)."""
    sparse, session = our_logits(model, prompts, continuations, policy=policy)
    dense, _ = our_logits(model, prompts, continuations)
    errs, changes = [], []
    for b, (p, c) in enumerate(zip(prompts, continuations)):
        got = sparse[b][-len(c):]  # decode rows: the prompt rows are dense in both
        ref = masked_dense_logits(model, p, c, {l: ix[b] for l, ix in session.selection.index.items()})
        errs.append((got - ref[-len(c):]).abs().max().item())
        changes.append((got - dense[b][-len(c):]).abs().max().item())
    return errs, changes, session


def hf_from_checkpoint(checkpoint, **kwargs):
    """transformers' model of a loaded checkpoint, on the fp32 values our loader reads from it (a GGUF's
    cache folder holds only its config and tokenizer: no weights transformers could load itself)."""
    import transformers

    from coreinfer.io.loading import float_weights

    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**checkpoint.config),
                                                       dtype=torch.float32, **kwargs).eval()
    missing, unexpected = hf.load_state_dict(float_weights(checkpoint), strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf
