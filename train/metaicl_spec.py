"""What a MetaICL task converter is, and MetaICL's common preprocessing step (its preprocess/utils.py).

metaicl_tasks.json holds MetaICL's config/{setting}.json task lists and config/tasks/{task}.json types and label
options, for all 142 tasks of the seven settings. A converter (`TaskSpec`) follows MetaICL's
preprocess/{task}.py, which comes from CrossFit:
- which dataset (hub id and config, or data files) to load;
- how its splits become a training pool and test queries (`Splits`);
- how rows become (input, output) pairs: `convert` one row at a time (None drops the row), or `convert_split`
  for a whole split where MetaICL's conversion carries state across rows (a numpy RNG seeded per split, rows
  grouped by question).
`preprocess` then applies MetaICL's common step to each sampled pair: strip the input and turn literal "\\n"
into spaces, keep the output up to its first tab, and attach options: the task's label set (classification),
the "(A) ... (B) ..." choices cut out of the input (multi-choice), or none (free-form).

The converters themselves are in metaicl_class_tasks.py, metaicl_choice_tasks.py and metaicl_freeform_tasks.py
(hub datasets) and metaicl_unifiedqa.py (UnifiedQA's TSV files); metaicl_tasks.py assembles the registry.
"""
from __future__ import annotations

import json
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

_META = json.loads((Path(__file__).resolve().parent / "metaicl_tasks.json").read_text(encoding="utf-8"))
SETTINGS: dict[str, dict[str, list[str]]] = _META["settings"]
TASK_INFO: dict[str, dict] = _META["tasks"]  # {task: {"type": "classification"|"multi-choice"|"free-form", "options"}}
TRAIN_K, TEST_K = 16384, 16
TRAIN_SEED, TEST_SEEDS = 100, (100, 13, 21, 42, 87)
SPLIT_SEED = 42  # MetaICL's fixed shuffle before cutting a held-out test part from one split

Pair = tuple[str, str]


class ConversionError(ValueError):
    """A row that the converter cannot map; the message names the task, the split, the row and the problem."""


@dataclass(frozen=True)
class Splits:
    """Where a task's training pool and test queries come from (MetaICL's get_train_test_lines).

    Default: the "train" split is the pool and the "validation" split the test queries. With `test=None`
    both are cut from `train` after a seed-42 shuffle: the first `holdout` share (or `train_count` rows) is
    the pool, the rest from `test_from` on (or the next `test_count` rows) the test queries. `test_fraction`
    keeps that share of a large test split, also after a seed-42 shuffle.
    """

    train: str = "train"
    test: str | None = "validation"
    holdout: float = 0.8
    test_from: float | None = None
    """Where the held-out test queries start, as a share of the split (default: `holdout`; lama-trex: 0.99)."""
    train_count: int | None = None
    test_count: int | None = None
    test_fraction: float | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str
    """Hub dataset id, as MetaICL loads it (`datasets.load_dataset(path, config)`); with `data_files`, their origin."""
    config: str | None
    convert: Callable[[dict], Pair | None] | None = None
    """One row → (input, output), or None to drop it."""
    splits: Splits = field(default_factory=Splits)
    convert_split: Callable[[Iterable[dict]], list[Pair]] | None = None
    """All rows of a split → pairs, for conversions with state across rows; instead of `convert`."""
    data_files: dict[str, str] | None = None
    """{split: URL of a JSON-lines file} for a task whose data is not a hub dataset; each line is a row."""

    def __post_init__(self):
        if self.name not in TASK_INFO:
            raise KeyError(f"TaskSpec: {self.name!r} is not a task of MetaICL's settings (metaicl_tasks.json)")
        if (self.convert is None) == (self.convert_split is None):
            raise TypeError(f"TaskSpec {self.name!r}: give exactly one of convert and convert_split")

    @property
    def source(self) -> str:
        """Where the rows come from, for tasks.json and messages."""
        if self.data_files:
            return ", ".join(self.data_files.values())
        return f"hf:{self.path}" + (f"/{self.config}" if self.config else "")


# ---------------------------------------------------------------------------------------------------------
# MetaICL's common step (its utils.preprocess)

# Multi-choice tasks whose converter writes "question (A) ... [SEP] context": the choices are cut from the
# question part and the context is put back in front of it (with no separator, as MetaICL does).
_CONTEXT_AFTER_SEP = {"sciq", "social_i_qa", "wiqa", "quail", "superglue-multirc"}


def cut(text: str, markers: Iterable[str]) -> list[str]:
    """text split at each marker in turn, stopping at the first absent one (MetaICL's get_sentences)."""
    parts = []
    for m in markers:
        if m not in text:
            break
        head, text = text.split(m, 1)
        parts.append(head)
    parts.append(text)
    return parts


def _quarel_fixes(output: str, options: list[str]) -> tuple[str, list[str]]:
    """quarel's choices end in " or" or "." and some answers lost a first letter; MetaICL repairs both."""
    options = list(options)
    for i, o in enumerate(options):
        if o.endswith(" or"):
            options[i] = o[:-3]
        if o.endswith("."):
            options[i] = o[:-1]
        if output.endswith("."):  # inside the loop in MetaICL: one trailing dot dropped per option
            output = output[:-1]
    if output not in options and output + "or" in options:
        output = output + "or"
    if output not in options and output.endswith(" or") and output[:-3] in options:
        output = output[:-3]
    for cut, first in (("ext to construction site", "n"), ("oilet paper", "t"), ("aster", "f")):
        if output not in options and output == cut:
            output = first + output
    return output, options


def preprocess(task: str, pair: Pair) -> dict | None:
    """(input, output) → {"task", "input", "output", "options"}, as MetaICL writes it; None for a dropped example
    (superglue-multirc without an answer or with one choice, which MetaICL drops after sampling)."""
    x, y = pair
    x = x.strip().replace("\\n", " ")  # a literal backslash-n, as MetaICL does
    y = str(y).split("\t")[0].strip()
    info = TASK_INFO[task]
    if info["type"] == "classification":
        options = list(info["options"])
        if y not in options:
            raise ConversionError(f"{task}: output {y!r} is not among the task's options {options}")
        return {"task": task, "input": x, "output": y, "options": options}
    if info["type"] == "free-form":
        return {"task": task, "input": x, "output": y, "options": []}

    if task == "superglue-multirc" and y == "NO ANSWER!":
        return None
    with_context = task.startswith("race-") or task in _CONTEXT_AFTER_SEP
    if with_context:
        if x.count("[SEP]") != 1:
            raise ConversionError(f"{task}: input has {x.count('[SEP]')} '[SEP]' markers, expected one: {x[:200]!r}")
        x, context = x.split("[SEP]")
    letters = string.ascii_uppercase
    markers = [f"({c})" for c in letters] if task in ("quail", "quarel") else [f" ({c}) " for c in letters]
    options: list[str] = []
    parts = cut(x, markers)
    if len(parts) > 1:
        parts = [s.strip() for s in parts]
        x, options = parts[0], parts[1:]
        if task == "quarel":
            y, options = _quarel_fixes(y, options)
        if task == "superglue-multirc" and len(options) == 1:
            return None
        _check_choices(task, x, y, options, "[SEP]")
    if not options and task == "ai2_arc":  # some ARC questions number their choices (1) (2) ...
        parts = cut(x, [f" ({i}) " for i in range(1, 100)])
        if len(parts) > 1:
            parts = [s.strip() for s in parts]
            x, options = parts[0], parts[1:]
            _check_choices(task, x, y, options, "SEP")
    if with_context:
        x = context + x
    return {"task": task, "input": x, "output": y, "options": options}


def _check_choices(task: str, x: str, y: str, options: list[str], sep: str) -> None:
    # MetaICL's asserts, as errors that name the task and the example
    if len(options) < 2:
        raise ConversionError(f"{task}: fewer than two choices {options} in {x[:200]!r}")
    if any(sep in o for o in options):
        raise ConversionError(f"{task}: a choice contains {sep!r}: {options}")
    if y not in options:
        raise ConversionError(f"{task}: output {y!r} is not among the choices {options} of {x[:200]!r}")


# ---------------------------------------------------------------------------------------------------------
# converter helpers


def labelled(text: Callable[[dict], str], labels: Sequence[str], label: str = "label",
             keep: Callable[[dict], bool] = lambda r: True):
    """Row → (text(row), labels[row[label]]); rows failing `keep` are dropped."""
    def convert(r):
        if not keep(r):
            return None
        return text(r), labels[r[label]]
    return convert


def pair(a: str, b: str, fa: str, fb: str, clean=lambda s: s):
    """'{a}: {row[fa]} [SEP] {b}: {row[fb]}', each field through `clean`."""
    return lambda r: f"{a}: {clean(r[fa])} [SEP] {b}: {clean(r[fb])}"


def one_line(s: str) -> str:
    return s.replace("\n", " ")


def no_breaks(s: str, by: str = " ") -> str:
    return s.replace("\n", by).replace("\r", by).replace("\t", by)


def choices(texts: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """' (A) first (B) second ...': the choices as CrossFit appends them to a question."""
    labels = labels if labels is not None else string.ascii_uppercase[:len(texts)]
    return "".join(f" ({label}) {t}" for label, t in zip(labels, texts))


def majority(votes: Sequence[int]):
    """The most common vote, or None on a tie at the top (MetaICL's get_majority)."""
    ranked = Counter(votes).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


def answers(texts: Iterable[str]) -> str:
    """Several reference answers, tab-joined: `preprocess` keeps the first as the output."""
    return "\t".join(texts)
