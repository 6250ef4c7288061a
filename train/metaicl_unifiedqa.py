"""MetaICL's unifiedqa:* tasks: UnifiedQA's TSV files, parsed and sampled as MetaICL's preprocess/unifiedqa.py does.

These 20 tasks (qa_to_qa's and non_qa_to_qa's) are not hub datasets. MetaICL downloads a zip of UnifiedQA's
files from Google Drive; this module reads them from UnifiedQA's public bucket (`URL`, as TensorFlow Datasets'
unified_qa does), which has one directory per dataset with train.tsv / dev.tsv / test.tsv, one
"input<TAB>output" per line with literal "\\n" separating question, choices and passage. That the bucket's
files equal those in MetaICL's zip is assumed, not checked (no network here).

MetaICL treats them differently from the hub tasks, and so does this module:
- test tasks (`test_example`): a line whose last "\\n"-part starts with "(A)" becomes a multi-choice example
  (the choices cut at "(A)", "(B)", ...; the other parts joined by spaces); a yes/no answer gets no options;
  every train.tsv line is the pool and every test line (dev.tsv for mctest, multirc, qasc, qasc_with_ir) a query.
  Per seed, the 16 demonstrations are `RandomState(seed).permutation(n)[:16]`; there is no dev sample.
- training tasks (`train_examples`): extractive tasks keep a line only if its normalized answer is in its
  normalized input; inputs over 200 words keep a random 200-word window of the passage that holds the answer;
  answers over 100 words are dropped; the pool is a seed-100 permutation's first 16,384, with the window draws
  and the permutation from one RandomState, in that order. These inputs keep their literal "\\n" and have no
  options, as in MetaICL's files.
"""
from __future__ import annotations

import itertools
import re
import string
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from mamlen.train.metaicl_spec import TASK_INFO, ConversionError, cut

PREFIX = "unifiedqa:"
URL = "https://storage.googleapis.com/unifiedqa/data/{dataset}/{file}"
MAX_WORDS = 200  # MetaICL's --max_length: longer training inputs are cut to a window of the passage
MAX_ANSWER_WORDS = 100
EXTRACTIVE = {"natural_questions_with_dpr_para", "race_string", "drop", "newsqa", "narrativeqa", "quoref", "ropes"}
THREE_PARTS = {"race_string", "social_iqa"}  # question \n choices \n passage: the choices are dropped
TEST_FROM_DEV = {"mctest", "multirc", "qasc", "qasc_with_ir"}
_PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class UnifiedQASpec:
    name: str
    """"unifiedqa:{dataset}", the task's name in MetaICL's settings."""

    def __post_init__(self):
        if self.name not in TASK_INFO or not self.name.startswith(PREFIX):
            raise KeyError(f"UnifiedQASpec: {self.name!r} is not a unifiedqa:* task of MetaICL's settings")

    @property
    def dataset(self) -> str:
        return self.name[len(PREFIX):]

    @property
    def files(self) -> dict[str, str]:
        """{"train": the pool's file} and, for a test task (MetaICL's multi-choice ones), {"test": the queries' file}.
        MetaICL reads no other: some datasets have no test.tsv."""
        if TASK_INFO[self.name]["type"] != "multi-choice":
            return {"train": "train.tsv"}
        return {"train": "train.tsv", "test": "dev.tsv" if self.dataset in TEST_FROM_DEV else "test.tsv"}

    def urls(self) -> dict[str, str]:
        return {split: URL.format(dataset=self.dataset, file=f) for split, f in self.files.items()}

    @property
    def source(self) -> str:
        return URL.format(dataset=self.dataset, file="")


UNIFIEDQA: tuple[UnifiedQASpec, ...] = tuple(UnifiedQASpec(t) for t in sorted(TASK_INFO) if t.startswith(PREFIX))


def normalize_answer(s: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalization, as MetaICL uses it)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s, flags=re.UNICODE)
    return " ".join(s.split())


def _split_line(task: str, line: str) -> tuple[str, str] | None:
    parts = line.strip().split("\t")
    return (parts[0], parts[1]) if len(parts) == 2 else None


# ---------------------------------------------------------------------------------------------------------
# test tasks (MetaICL's process_test)


def test_example(task: str, line: str) -> dict:
    """One line of a test task's file → {"task", "input", "output", "options"}."""
    pair = _split_line(task, line)
    if pair is None:
        raise ConversionError(f"{task}: a line without exactly one tab: {line.strip()[:200]!r}")
    x, y = pair
    if line.strip().count("\\n") == 2:  # question \n choices \n passage → question \n passage \n choices
        question, opts, context = x.split("\\n")
        x = question + "\\n  " + context + " \\n " + opts
    parts = x.split("\\n")
    last = parts[-1].strip()
    if last.startswith("(A)"):
        options = [s.strip() for s in cut(last, [f"({c})" for c in string.ascii_uppercase]) if s.strip()]
        if y not in options:
            raise ConversionError(f"{task}: output {y!r} is not among the choices {options}")
        x = " ".join(parts[:-1])
    elif y in ("yes", "no"):
        options = []
    else:
        raise ConversionError(f"{task}: a line with neither (A)-choices nor a yes/no answer: {line.strip()[:200]!r}")
    return {"task": task, "input": x, "output": y, "options": options}


def test_demonstrations(pool: list, k: int, seed: int) -> list:
    """The k demonstrations of one seed: the pool in `RandomState(seed).permutation` order, first k."""
    return [pool[i] for i in np.random.RandomState(seed).permutation(len(pool))[:k]]


# ---------------------------------------------------------------------------------------------------------
# training tasks (MetaICL's process_train)


def train_examples(task: str, lines: Iterable[str], k: int, rng: np.random.RandomState) -> list[dict]:
    """A training task's file → its pool of at most k examples, drawn as MetaICL does with `rng`
    (seeded with the training seed: the passage windows draw from it first, then the permutation)."""
    dataset = task[len(PREFIX):]
    kept = []
    for line in lines:
        pair = _split_line(task, line)
        if pair is None:  # MetaICL skips lines without exactly one tab
            continue
        x, y = pair
        if dataset in EXTRACTIVE and normalize_answer(y) not in normalize_answer(x):
            continue
        if dataset in THREE_PARTS:
            parts = x.split("\\n")
            if len(parts) != 3:
                raise ConversionError(f"{task}: expected question \\n choices \\n passage, got {len(parts)} "
                                      f"parts: {x[:200]!r}")
            x = parts[0] + "\\n" + parts[2]
        elif x.count("\\n") >= 3:
            raise ConversionError(f"{task}: more than two literal \\n in an input: {x[:200]!r}")
        if dataset == "natural_questions_with_dpr_para":  # undo the tokenizer's spaces around punctuation
            x = (x.replace(" , ", ", ").replace("( ", "(").replace(" )", ")").replace(" - - ", " - ")
                 .replace(" . ", ". "))
        if dataset in EXTRACTIVE and len(x.split(" ")) > MAX_WORDS:
            x = _window(task, x, y, rng)
            if x is None:
                continue
        if len(y.split(" ")) > MAX_ANSWER_WORDS:
            continue
        kept.append({"task": task, "input": x, "output": y, "options": []})
    return [kept[i] for i in rng.permutation(len(kept))[:k]]


def _window(task: str, x: str, y: str, rng: np.random.RandomState) -> str | None:
    """question + " \\t " + a random window of the passage's words that holds the answer; None (the line is
    dropped) when the passage does not hold it."""
    parts = x.split("\\n")
    if len(parts) != 2:
        raise ConversionError(f"{task}: a long input should be question \\n passage, got {len(parts)} parts: "
                              f"{x[:200]!r}")
    question, context = parts
    answer = normalize_answer(y)
    if answer not in normalize_answer(context):
        return None
    words = context.split(" ")
    n = MAX_WORDS - len(question.split(" ")) - 1
    if len(words) <= n:
        raise ConversionError(f"{task}: the passage ({len(words)} words) fits in the window ({n}) but the input "
                              f"is over {MAX_WORDS} words: {x[:200]!r}")
    starts = range(len(words) - n + 1)
    for tries in itertools.count(1):
        start = rng.choice(starts)
        window = " ".join(words[start:start + n])
        if answer in normalize_answer(window):
            return question + " \\t " + window
        # MetaICL draws until a window holds the answer; where none does it would loop forever: drop the line
        if tries == 10 * len(starts) and not any(answer in normalize_answer(" ".join(words[s:s + n])) for s in starts):
            return None
