"""Quality evaluation on the sparse model.

Scorers on a tiny random model against hand-computed references (sums of continuation log-probs,
lm-eval's acc and acc_norm), the evaluator's dense path against transformers on the embedded model,
the CLI end to end, and the lm-eval adapter against our own evaluator on the same items.
"""

import json
import math
import random

import pytest
import torch
import transformers

from coreinfer.cli import main as cli
from coreinfer.eval import cli as evaluate
from coreinfer.api import LLM
from coreinfer.engine.policy import CoreConfig
from coreinfer.eval import data, report, runner
from coreinfer.eval.data import GenItem, MCItem
from coreinfer.engine.generate import GenerationConfig
from coreinfer.engine.session import Session, make_policy
from coreinfer.eval.report import setting_name
from coreinfer.eval.scoring import continuation_logprobs
from coreinfer.io.loading import load_checkpoint
from oracle import hf_from_checkpoint, our_logits

SPARSE = CoreConfig(beta=0.5, layers="all")
ITEMS = [
    MCItem("The capital of France is", [" Paris.", " Rome.", " the press"], 0, target_delimiter=" "),
    MCItem("Scholars argue about how much the press changed", [" the way people thought.", " Italy"], 0,
           target_delimiter=" "),
    # Winogrande-style partial evaluation: the contexts vary, the continuation is shared.
    MCItem("The history of the", [" thought.", " thought."], 1,
           contexts=["The history of the printing", "The history of the capital"], target_delimiter=" "),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(str(tiny_model_dir), progress=False)


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


def hf_continuation_lls(hf, rows) -> list[float]:
    """The oracle: one uncached transformers forward over prompt + continuation, summed log-probs."""
    out = []
    for ctx, cont in rows:
        with torch.no_grad():
            logp = hf(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
        out.append(sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
    return out


def test_encode_pair_moves_trailing_spaces_to_the_continuation(tiny):
    encode = tiny.tokenizer.encode
    ctx, cont = runner.encode_pair(encode, "The capital of France is  ", "Paris.")
    assert ctx == encode("The capital of France is")
    assert ctx + cont == encode("The capital of France is  Paris.")
    # A toy tokenizer that merges "ab": the continuation is the tail after len(encode(context)).
    toy = lambda s: [ord(c) for c in s.replace("ab", "\x00")]  # noqa: E731
    assert runner.encode_pair(toy, "xa", "bc") == ([ord("x"), ord("a")], [ord("c")])


@pytest.mark.parametrize("core", [None, SPARSE], ids=["dense", "sparse"])
def test_teacher_forced_equals_stepwise_decoding(tiny, tiny_hf, core):
    """Teacher-forced scores (one forward over each continuation) against an independent path: the
    session's own decode steps, token by token through the cache; and dense against transformers."""
    rows = runner.mc_rows(tiny.tokenizer.encode, ITEMS)
    prompts, conts = [r[0] for r in rows], [r[1] for r in rows]
    got = runner.teacher_forced(tiny.model, prompts, conts, core, tiny.tokenizer.pad_id)
    for g, ctx, cont in zip(got, prompts, conts):
        logits, _ = our_logits(tiny.model, [ctx], [cont], policy=make_policy(core, tiny.model))
        logp = logits[0][len(ctx) - 1:-1].log_softmax(-1)  # [len(cont), V]
        err = (g.logprobs - logp.gather(1, torch.tensor(cont)[:, None])[:, 0]).abs().max().item()
        assert err < 1e-5, err
        assert g.greedy.tolist() == logp.argmax(-1).tolist()
        if core is None:
            with torch.no_grad():
                ref = tiny_hf(torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1].log_softmax(-1)
            assert (g.logprobs - ref.gather(1, torch.tensor(cont)[:, None])[:, 0]).abs().max().item() < 1e-4


def test_argmax_under_teacher_forcing_is_sparse_greedy_decoding(tiny):
    prompt = tiny.tokenizer.encode("The capital of Italy is")
    done = tiny.generate("The capital of Italy is", GenerationConfig(max_new_tokens=6, ignore_eos=True), SPARSE)[0]
    scored = runner.teacher_forced(tiny.model, [prompt], [done.token_ids], SPARSE, tiny.tokenizer.pad_id)[0]
    assert scored.is_greedy(done.token_ids)
    assert not scored.is_greedy(done.token_ids[:-1] + [(done.token_ids[-1] + 1) % 300])


@pytest.mark.parametrize("core", [None, SPARSE], ids=["dense", "sparse"])
def test_mc_loglikelihoods_are_summed_continuation_logprobs(tiny, tiny_hf, core):
    encode = tiny.tokenizer.encode
    lls = runner.mc_loglikelihoods(tiny, ITEMS, core, batch_size=3)
    for item, item_lls in zip(ITEMS, lls):
        for (ctx, cont), ll in zip(item.requests(), item_lls):
            # by hand: lm-eval's split, then each continuation alone
            ctx_ids = encode(ctx.rstrip())
            cont_ids = encode(ctx.rstrip() + ctx[len(ctx.rstrip()):] + cont)[len(ctx_ids):]
            alone = continuation_logprobs(tiny.model, [ctx_ids], [cont_ids], core, tiny.tokenizer.pad_id)[0]
            assert ll == pytest.approx(float(alone.double().sum()), abs=1e-5)
    if core is None:
        ref = hf_continuation_lls(tiny_hf, runner.mc_rows(encode, ITEMS))
        assert [ll for item_lls in lls for ll in item_lls] == pytest.approx(ref, abs=1e-4)


@pytest.mark.parametrize("setting", [None, SPARSE, CoreConfig(beta=0.7, statistic="norm")], ids=str)
def test_shared_context_prefill_scores_like_one_prefill_per_row(tiny, setting):
    # one prefill per distinct context, forked per choice, against one prefill per row
    rows = runner.mc_rows(tiny.tokenizer.encode, ITEMS) * 2  # repeats: groups larger than a batch
    shared = runner.score_shared(tiny.model, rows, setting, tiny.tokenizer.pad_id, batch_size=3)
    alone = runner.score_rows(tiny.model, rows, setting, tiny.tokenizer.pad_id, batch_size=1)
    worst = max((a.logprobs - b.logprobs).abs().max().item() for a, b in zip(shared, alone))
    print(f"shared-context vs per-row prefill: max |d logprob| {worst:.2e}")
    assert worst < 1e-5
    assert all(torch.equal(a.greedy, b.greedy) for a, b in zip(shared, alone))


def test_fork_copies_cache_and_core_set(tiny):
    from coreinfer.engine.session import Session

    encode, model = tiny.tokenizer.encode, tiny.model
    prompts, cont = [encode("The capital of France is"), encode("Scholars argue")], encode(" the press")
    policy = make_policy(SPARSE, model)
    session = Session(model, prompts, len(cont), tiny.tokenizer.pad_id, policy)
    session.prefill()
    forked = session.fork([1, 0, 1])
    for layer, ids in session.selection.index.items():
        assert torch.equal(forked.selection.index[layer], ids[[1, 0, 1]])
    logits = forked.score([cont] * 3)
    fresh = Session(model, [prompts[1]], len(cont), tiny.tokenizer.pad_id, policy).score([cont])
    assert (logits[0] - fresh[0]).abs().max().item() < 1e-5 and torch.equal(logits[0], logits[2])
    with pytest.raises(ValueError, match="after its prefill"):
        Session(model, prompts, 1, tiny.tokenizer.pad_id, policy).fork([0])


def test_acc_and_acc_norm_per_item():
    items = [MCItem("q", [" ab", " abcdefgh"], 1, target_delimiter=" "),
             MCItem("q", [" ab", " abcdefgh"], 0, target_delimiter=" ")]
    # acc takes the larger sum (-4 > -5: choice 0); acc_norm divides by the characters without the
    # delimiter: -4/2 = -2 < -5/8 = -0.625, so choice 1.
    per_item = evaluate.mc_per_item([[-4.0, -5.0], [-4.0, -5.0]], items)
    assert per_item == {"acc": [0.0, 1.0], "acc_norm": [1.0, 0.0]}
    # Winogrande normalises by the varying contexts.
    wino = MCItem("a", [" x", " x"], 0, contexts=["a long", "a"], target_delimiter=" ")
    assert evaluate.mc_per_item([[-3.0, -2.0]], [wino]) == {"acc": [0.0], "acc_norm": [1.0]}


def test_scores_do_not_depend_on_the_order_of_the_rows(tiny):
    rows = runner.mc_rows(tiny.tokenizer.encode, ITEMS)
    shuffled = list(range(len(rows)))
    random.Random(1).shuffle(shuffled)
    a = runner.score_rows(tiny.model, rows, SPARSE, tiny.tokenizer.pad_id, 2)
    b = runner.score_rows(tiny.model, [rows[i] for i in shuffled], SPARSE, tiny.tokenizer.pad_id, 2)
    for j, i in enumerate(shuffled):
        assert torch.equal(a[i].logprobs, b[j].logprobs)


def test_batched_generation_equals_one_at_a_time(tiny):
    items = [GenItem("The capital of France is", ["Paris"], (".",)),
             GenItem("Scholars argue about how much the press", ["x"], ("\n",)),
             GenItem("The history", ["x"], (".",))]
    batched = runner.generate_answers(tiny, items, SPARSE, batch_size=3, max_new_tokens=8)
    alone = [runner.generate_answers(tiny, [item], SPARSE, batch_size=1, max_new_tokens=8)[0] for item in items]
    assert batched == alone
    assert all(not any(s in text for s in item.stop) for text, item in zip(batched, items))


def test_split_document_and_prompt_flag():
    ids = list(range(10))
    assert runner.split_document(ids, 0.5) == (ids[:5], ids[5:])
    assert runner.split_document(ids, 3) == (ids[:3], ids[3:])
    assert runner.split_document(ids, 10) is None and runner.split_document([1], 0.5) is None
    assert evaluate.parse_prompt("64") == 64 and evaluate.parse_prompt("0.25") == 0.25
    for bad in ("0", "1.0", "half"):
        with pytest.raises(ValueError):
            evaluate.parse_prompt(bad)


def test_perplexity_and_top1_agreement(tiny):
    docs = [data.Document(t) for t in ("The history of the printing press begins in the fifteenth century.",
                                       "The capital of France is Paris. The capital of Italy is Rome.")]
    rows = runner.document_rows(tiny.tokenizer.encode, docs, 0.5, max_tokens=64)
    grid = [None, SPARSE, CoreConfig(beta=1.0, layers="all"), CoreConfig(beta=0.05, layers="all")]
    dense, sparse, full, tiny_keep = evaluate.ppl_results(tiny, "docs", rows, grid, batch_size=2)
    lps = [continuation_logprobs(tiny.model, [p], [c], None, tiny.tokenizer.pad_id)[0] for p, c in rows]
    by_hand = math.exp(-sum(float(lp.double().sum()) for lp in lps) / sum(len(lp) for lp in lps))
    assert dense.metrics["ppl"][0] == pytest.approx(by_hand, rel=1e-5)
    assert dense.metrics["top1_agree"][0] == 1.0
    assert full.metrics["ppl"][0] == pytest.approx(by_hand, rel=1e-4) and full.metrics["top1_agree"][0] == 1.0
    assert sparse.setting == "frequency keep 0.5 layers all"
    # top-1 agreement by hand: where the sparse argmax equals the dense argmax, over all scored tokens
    prompts, conts = [p for p, _ in rows], [c for _, c in rows]
    d = runner.teacher_forced(tiny.model, prompts, conts, None, tiny.tokenizer.pad_id)
    for result, core in ((sparse, SPARSE), (tiny_keep, grid[3])):
        s = runner.teacher_forced(tiny.model, prompts, conts, core, tiny.tokenizer.pad_id)
        agree = sum(int((x.greedy == y.greedy).sum()) for x, y in zip(d, s)) / sum(len(c) for c in conts)
        assert result.metrics["top1_agree"][0] == pytest.approx(agree)
    assert agree < 1.0  # keep 0.05 of every layer changes some predictions


def test_report_pairs_deltas_and_writes_json_and_markdown(tmp_path):
    dense = report.mean_result("piqa", "dense", {"acc": [1.0, 0.0, 1.0, 1.0]}, 1.0)
    sparse = report.mean_result("piqa", "frequency keep 0.7", {"acc": [1.0, 0.0, 0.0, 1.0]}, 1.0)
    ppl = report.Result("squad", "dense", 2, {"ppl": (20.0, 1.5), "top1_agree": (1.0, 0.0)})
    ppl_sparse = report.Result("squad", "frequency keep 0.7", 2, {"ppl": (25.0, 2.0), "top1_agree": (0.8, 0.05)})
    settings = [report.setting_json(core) for core in (None, CoreConfig(beta=0.7))]
    doc = report.summary([dense, sparse, ppl, ppl_sparse], settings, {"wall_s": 1})
    entry = doc["tasks"]["piqa"]["metrics"]["acc"]["frequency keep 0.7"]
    assert entry["delta"] == pytest.approx(-0.25) and entry["delta_stderr"] == pytest.approx(0.25)
    assert doc["tasks"]["squad"]["metrics"]["ppl"]["frequency keep 0.7"]["delta_stderr"] is None
    # two multiple-choice tasks pool into one row over all their items
    other = report.mean_result("copa", "dense", {"acc": [0.0, 0.0], "acc_norm": [1.0, 1.0]}, 1.0)
    piqa = report.mean_result("piqa", "dense", {"acc": [1.0, 0.0], "acc_norm": [0.0, 0.0]}, 1.0)
    (all_mc,) = report.pooled([piqa, other, ppl])
    assert all_mc.task == report.POOLED and all_mc.n == 4 and all_mc.metrics["acc_norm"][0] == 0.5
    json_path, md_path = report.write(doc, tmp_path / "out" / "r")
    assert json.loads(json_path.read_text())["tasks"]["piqa"]["n"] == 4
    table = md_path.read_text()
    assert "| piqa | acc | 4 | 75.0 ± 25.0 | 50.0 ± 28.9 (−25.0 ± 25.0) |" in table
    assert "| squad | ppl | 2 | 20.00 ± 1.50 | 25.00 ± 2.00 (+5.00) |" in table


def strip_timing(doc: dict) -> dict:
    doc = dict(doc, wall_s=None)
    for task in doc["tasks"].values():
        task["seconds"] = None
    return doc


def test_cli_runs_user_files_and_is_deterministic(tiny_model_dir, tmp_path, capsys):
    mc = tmp_path / "mine.jsonl"
    mc.write_text("\n".join(json.dumps({"context": i.context, "choices": i.choices, "label": i.label})
                            for i in ITEMS[:2]))
    gen = tmp_path / "qa.jsonl"
    gen.write_text(json.dumps({"prompt": "The capital of France is", "answers": ["Paris"], "stop": ["."]}))
    text = tmp_path / "notes.txt"
    text.write_text("The history of the printing press.\n\nThe capital of France is Paris, of Italy Rome.\n")
    common = ["--model", str(tiny_model_dir), "--beta", "0.5,1", "--layers", "all"]
    docs = []
    for run in ("a", "b"):
        assert cli.main(["eval", "tasks", "--mc-jsonl", str(mc), "--gen-jsonl", str(gen), *common,
                         "--output", str(tmp_path / run)]) == 0
        docs.append(json.loads((tmp_path / f"{run}.json").read_text()))
    assert strip_timing(docs[0])["tasks"] == strip_timing(docs[1])["tasks"]
    tasks = docs[0]["tasks"]
    assert set(tasks) == {"mine", "qa"} and tasks["mine"]["n"] == 2
    assert tasks["mine"]["metrics"]["acc"]["frequency keep 1 layers all"]["delta"] == 0.0
    assert set(tasks["qa"]["metrics"]) == {"exact_match", "f1"}
    assert cli.main(["eval", "ppl", "--text", str(text), "--prompt", "4", *common,
                     "--output", str(tmp_path / "ppl")]) == 0
    ppl = json.loads((tmp_path / "ppl.json").read_text())["tasks"]["notes"]
    assert ppl["n"] == 2 and ppl["metrics"]["top1_agree"]["frequency keep 1 layers all"]["value"] == 1.0
    assert "| notes | ppl | 2 |" in capsys.readouterr().out
    assert cli.main(["eval", "report", str(tmp_path / "a.json"), str(tmp_path / "ppl.json"),
                     "--output", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["tasks"]["notes"] == json.loads((tmp_path / "ppl.json").read_text())["tasks"]["notes"]
    assert set(merged["tasks"]) == {"mine", "qa", "notes"}
    assert cli.main(["eval", "report", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2  # same tasks twice
    assert cli.main(["eval", "tasks", "--tasks", "nope", *common]) == 2


def test_dense_eval_reproduces_transformers_on_the_embedded_model():
    llm = LLM(progress=False, weights="dense")
    hf = hf_from_checkpoint(load_checkpoint(None, progress=False), attn_implementation="eager")
    items = [item for task in ("piqa", "winogrande", "arc_easy", "copa") for item in data.load_mc(task, 1, seed=3)]
    lls = runner.mc_loglikelihoods(llm, items, None, batch_size=4)
    ref = hf_continuation_lls(hf, runner.mc_rows(llm.tokenizer.encode, items))
    got = [ll for item_lls in lls for ll in item_lls]
    print(f"max |ours - transformers| = {max(abs(a - b) for a, b in zip(got, ref)):.2e}")
    assert got == pytest.approx(ref, abs=2e-3)


LM_EVAL_TASK = """task: coreinfer_items
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_adapter_agrees_with_coreinfer_eval_tasks(tiny_model_dir, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    from coreinfer.eval.harness import CoreInferLM

    # Packaged items as a user JSONL: the choices keep their leading space and the YAML task adds no
    # delimiter, so lm-eval and `coreinfer eval tasks --mc-jsonl` see the same strings.
    # (short ones: the tiny model's byte-level vocabulary spends a token per character or so)
    fits = lambda i: len(i.context) + max(map(len, i.choices)) < 150  # noqa: E731
    items = [i for i in data.load_mc("piqa", 40, seed=0) if fits(i)][:6] + data.load_mc("copa", 4, seed=0)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("\n".join(json.dumps({"context": i.context, "choices": i.choices, "label": i.label})
                               for i in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "coreinfer_items.yaml").write_text(LM_EVAL_TASK.format(path=jsonl))
    flags = ["--model", str(tiny_model_dir), "--beta", "0.5", "--layers", "all", "--batch-size", "4"]
    assert cli.main(["eval", "tasks", "--mc-jsonl", str(jsonl), *flags, "--output", str(tmp_path / "ours")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())["tasks"]["items"]
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    settings = {"dense": {"dense": True}, "frequency keep 0.5 layers all": {"beta": 0.5, "layers": "all"}}
    for setting, args in settings.items():
        lm = CoreInferLM(pretrained=tiny, batch_size=4, **args)
        out = lm_eval.simple_evaluate(model=lm, tasks=["coreinfer_items"], task_manager=manager, log_samples=True,
                                      bootstrap_iters=0)
        samples = sorted(out["samples"]["coreinfer_items"], key=lambda s: s["doc_id"])
        for metric in ("acc", "acc_norm"):
            assert [s[metric] for s in samples] == ours["per_item"][setting][metric]
            assert out["results"]["coreinfer_items"][f"{metric},none"] == ours["metrics"][metric][setting]["value"]
        # the log-likelihoods themselves: the adapter scores row by row, our evaluator prefills each
        # item's context once (runner.score_shared), so the batches differ and the sums agree to rounding
        lls = runner.mc_loglikelihoods(tiny, items, lm.core, batch_size=4)
        theirs = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
        assert [x for row in theirs for x in row] == pytest.approx([x for row in lls for x in row], abs=1e-5)


def test_lm_eval_adapter_generates_and_rolls_sparse(tiny):
    from lm_eval.api.instance import Instance

    from coreinfer.eval.harness import CoreInferLM

    lm = CoreInferLM(pretrained=tiny, beta=0.5, layers="all", batch_size=2)
    prompts = ["The capital of France is", "Scholars argue about"]
    requests = [Instance("generate_until", {}, (p, {"until": ["."], "max_gen_toks": 6}), i)
                for i, p in enumerate(prompts)]
    assert lm.generate_until(requests, disable_tqdm=True) == runner.generate_texts(
        tiny, prompts, [(".",)] * 2, lm.core, batch_size=2, max_new_tokens=6)
    text = "The history of the printing press."
    rolled = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = tiny.tokenizer.encode(text)
    ref = continuation_logprobs(tiny.model, [[lm.prefix_token_id]], [ids], lm.core, tiny.tokenizer.pad_id)[0]
    assert rolled[0] == pytest.approx(float(ref.double().sum()), abs=1e-5)


def test_frontier_plot_from_ppl_results(tmp_path):
    cell = lambda v: {"value": v, "stderr": None}  # noqa: E731
    doc = {"model": "m.gguf", "tasks": {"squad_paragraphs": {"metrics": {
        "ppl": {"dense": cell(20.0), "norm keep 0.7": cell(30.0)},
        "top1_agree": {"dense": cell(1.0), "norm keep 0.7": cell(0.65)},
        "ffn_read": {"dense": cell(1.0), "norm keep 0.7": cell(0.75)}}}}}
    assert evaluate.frontier_points(doc) == [("dense", 1.0, 1.0, 1.0), ("norm keep 0.7", 0.75, 1.5, 0.65)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert cli.main(["eval", "frontier", str(path), "--output", str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    del doc["tasks"]["squad_paragraphs"]["metrics"]["ffn_read"]
    path.write_text(json.dumps(doc))
    assert cli.main(["eval", "frontier", str(path), "--output", str(tmp_path / "f.png")]) == 2




def decoded_logprobs(model, prompt: list[int], cont: list[int], core) -> torch.Tensor:
    """log p of each continuation token as `generate` computes it: one sequence, prefilled, then one
    decode step per token."""
    session = Session(model, [prompt], len(cont), 0, make_policy(core, model))
    logits = [session.prefill()] + [session.step(torch.tensor([t])) for t in cont[:-1]]  # each [1, V]
    return torch.cat(logits).float().log_softmax(-1).gather(1, torch.tensor(cont)[:, None])[:, 0]


def test_quantized_scoring_runs_the_kernels_decoding_runs(tiny_model_dir):
    """int8 weights: decoding's native GEMV takes decode-sized inputs only (int8 activations), a forward
    over a whole continuation PyTorch's kernel (bf16 activations). Scores must be decoding's. Prompts
    are longer than gemv.MAX_M tokens, so that the prefill takes PyTorch's kernel alone and batched."""
    from coreinfer.engine import gemv
    from coreinfer.eval.scoring import continuation_logits, per_token

    if not gemv.available():
        pytest.skip("optional: the native int8 GEMV is not built for this CPU, so both paths run one kernel")
    llm = LLM(str(tiny_model_dir), weights="int8", compile=False, progress=False)
    encode = llm.tokenizer.encode
    rows = [(encode(f"{item.context} " * 3), encode(f" {choice}")) for item in ITEMS for choice in item.choices]
    assert min(len(p) for p, _ in rows) > gemv.MAX_M
    prompts, conts = [p for p, _ in rows], [c for _, c in rows]
    for core in (None, SPARSE):
        got = runner.score_rows(llm.model, rows, core, llm.tokenizer.pad_id, batch_size=4)
        forward = per_token(continuation_logits(llm.model, prompts, conts, core, llm.tokenizer.pad_id), conts)
        ref = [decoded_logprobs(llm.model, p, c, core) for p, c in rows]
        worst = max((g.logprobs - r).abs().max().item() for g, r in zip(got, ref))
        forward_worst = max((f - r).abs().max().item() for (f, _), r in zip(forward, ref))
        print(f"int8 {setting_name(core)}: max |d logprob| against decoding: stepped {worst:.2e}, "
              f"one forward {forward_worst:.2e}")
        assert worst < 1e-4 < forward_worst  # the forward's kernel is not decoding's (float summation order: ~3e-5 on AVX512-FP16 hosts)


def test_eval_scores_generates_default(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """No core flag, or --profile auto: dense and what generate decodes with, the calibrated profile
    (found in the cache folder here); without a profile, dense alone, saying so."""
    from coreinfer.engine.profile import LayerBudget, Profile

    text = tmp_path / "notes.txt"
    text.write_text("The history of the printing press.\n\nThe capital of France is Paris, of Italy Rome.\n")
    base = ["eval", "ppl", "--text", str(text), "--prompt", "4", "--model", str(tiny_model_dir)]
    monkeypatch.setenv("COREINFER_CACHE", str(tmp_path / "cache"))
    assert cli.main([*base, "--output", str(tmp_path / "none")]) == 0
    assert "no calibrated profile" in capsys.readouterr().err
    assert [s["name"] for s in json.loads((tmp_path / "none.json").read_text())["settings"]] == ["dense"]

    (tmp_path / "cache" / "profiles").mkdir(parents=True)
    met = {"target_top1_agree": 0.95, "meets_target": True, "measured": {"top1_agree": 0.96},
           "tried": [{"budget": 0.5, "ffn_read": 0.5, "ppl_ratio": 1.0, "top1_agree": 0.96}]}
    profile = Profile.for_model(LLM(str(tiny_model_dir), progress=False).model,
                                {l: LayerBudget(keep=0.5) for l in (1, 2)}, met)
    profile.save(tmp_path / "cache" / "profiles" / "tiny.json")
    for flags in ([], ["--profile", "auto"]):
        assert cli.main([*base, *flags, "--output", str(tmp_path / "auto")]) == 0
        assert "calibrated profile tiny.json" in capsys.readouterr().err
        doc = json.loads((tmp_path / "auto.json").read_text())
        assert [s["name"] for s in doc["settings"]] == ["dense", "profile tiny.json"]
        assert doc["tasks"]["notes"]["metrics"]["ffn_read"]["profile tiny.json"]["value"] < 1
