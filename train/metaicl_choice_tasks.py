"""MetaICL's multi-choice tasks from hub datasets: one converter (`TaskSpec`) per task, following MetaICL's
preprocess/{task}.py (from CrossFit).

Each converter writes the question with its choices appended as " (A) first (B) second ..." (quail: "(A)first",
no spaces) and the answer text as the output; `metaicl_spec.preprocess` cuts the choices back out into the
example's options. Tasks with a passage put it after " [SEP] " (race-*, sciq, social_i_qa, wiqa, quail,
superglue-multirc), and preprocess moves it in front of the question. The unifiedqa:* multi-choice tasks come
from UnifiedQA's files: metaicl_unifiedqa.py.
"""
from __future__ import annotations

import string

import numpy as np

from mamlen.train.metaicl_spec import SPLIT_SEED, TaskSpec, choices, no_breaks, one_line


def _keyed(question, mark_labels: bool = True):
    """Row with choices {"label": [...], "text": [...]} and an answerKey → (question(row) + choices, answer text).

    `mark_labels=False`: the choices are lettered, and the key read, as A, B, ... whatever the labels (openbookqa)."""
    def convert(r):
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        if not mark_labels:
            labels = list(string.ascii_uppercase[:len(texts)])
        answer = texts[labels.index(r["answerKey"])]  # ValueError when the key is not a label: a reported bad row
        return question(r) + choices(texts, labels), answer
    return convert


def _indexed(question, options, answer_index, after=None):
    """(question(row) + choices(options(row)) [+ " [SEP] " + after(row)], options(row)[answer_index(row)])."""
    def convert(r):
        opts = options(r)
        x = question(r) + choices(opts)
        return (x if after is None else f"{x} [SEP] {after(r)}"), opts[answer_index(r)]
    return convert


def _quarel(r):
    # the choices are inside the question: "... (A) first or (B) second"
    q = r["question"]
    a, b = q.find("(A)"), q.find("(B)")
    answer = q[a + 4:b] if r["answer_index"] == 0 else q[b + 4:]
    if answer.endswith("or "):
        answer = answer[:-3]
    return q, answer.strip()


def _quail(r):
    # choices glued as "(A)first(B)second", the passage after [SEP]
    opts = r["answers"]
    lettered = "".join(f"({chr(65 + i)}){o}" for i, o in enumerate(opts))
    return f"{one_line(r['question'])}{lettered} [SEP] {one_line(r['context'])}", opts[r["correct_answer_id"]]


def _copa(r):
    given, asked = {"cause": ("Effect: ", "Cause: "), "effect": ("Cause: ", "Effect: ")}[r["question"]]
    opts = [asked + r["choice1"], asked + r["choice2"]]
    return given + r["premise"].strip() + choices(opts), opts[r["label"]]


def _sciq(rows):
    # MetaICL shuffles each row's four answers with numpy's global RNG, seeded 42 at the start of the split
    rng, out = np.random.RandomState(SPLIT_SEED), []
    for r in rows:
        support = one_line(r["support"])
        if not support:  # rows without a passage are dropped (before any draw)
            continue
        opts = [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]]
        rng.shuffle(opts)
        out.append((f"{one_line(r['question'])}{choices(opts)} [SEP] {support}", r["correct_answer"]))
    return out


def _multirc(rows):
    # one example per question: its candidate answers are the choices, every correct one an output
    questions: dict = {}
    for r in rows:
        q = questions.setdefault(r["idx"]["question"], {"question": r["question"], "paragraph": r["paragraph"],
                                                        "answers": [], "labels": []})
        q["answers"].append(r["answer"])
        q["labels"].append(r["label"])
    out = []
    for q in questions.values():
        x = (f"question: {no_breaks(q['question'])}{choices([no_breaks(a) for a in q['answers']])} "
             f"[SEP] context: {no_breaks(q['paragraph'])}")
        correct = [a for a, label in zip(q["answers"], q["labels"]) if label == 1]
        out.append((x, "\t".join(correct) if correct else "NO ANSWER!"))  # preprocess drops "NO ANSWER!"
    return out


def _winogrande(r):
    x = f"{r['sentence']} (A) {r['option1']} (B) {r['option2']}"
    return {"1": (x, r["option1"]), "2": (x, r["option2"])}.get(str(r["answer"]))  # unlabelled rows are dropped


def _quartz(name: str, with_passage: bool) -> TaskSpec:
    return TaskSpec(name, "quartz", None, _keyed(lambda r: r["question"] + (r["para"] if with_passage else "")))


def _race(level: str) -> TaskSpec:
    return TaskSpec(f"race-{level}", "race", level,
                    _indexed(lambda r: no_breaks(r["question"]), lambda r: [no_breaks(o) for o in r["options"]],
                             lambda r: ord(r["answer"]) - ord("A"), after=lambda r: no_breaks(r["article"])))


MULTI_CHOICE: tuple[TaskSpec, ...] = (
    TaskSpec("ai2_arc", "ai2_arc", "ARC-Challenge", _keyed(lambda r: r["question"])),
    TaskSpec("codah", "codah", "fold_0",
             _indexed(lambda r: r["question_propmt"], lambda r: r["candidate_answers"],
                      lambda r: r["correct_answer_idx"])),
    TaskSpec("commonsense_qa", "commonsense_qa", None,
             _keyed(lambda r: r["question"].replace("\t", " ").replace("\n", " "))),
    TaskSpec("cosmos_qa", "cosmos_qa", None,
             _indexed(lambda r: f"{r['question']} [SEP] {r['context']} [SEP] ",
                      lambda r: [r[f"answer{i}"] for i in range(4)], lambda r: r["label"])),
    TaskSpec("dream", "dream", None,
             _indexed(lambda r: f"{r['question']} [SEP] {' '.join(r['dialogue'])} [SEP] ", lambda r: r["choice"],
                      lambda r: r["choice"].index(r["answer"]))),
    TaskSpec("hellaswag", "hellaswag", None,
             _indexed(lambda r: r["ctx"], lambda r: r["endings"], lambda r: int(r["label"]))),
    TaskSpec("openbookqa", "openbookqa", "main", _keyed(lambda r: r["question_stem"], mark_labels=False)),
    TaskSpec("qasc", "qasc", None, _keyed(lambda r: r["question"])),
    TaskSpec("quail", "quail", None, _quail),
    TaskSpec("quarel", "quarel", None, _quarel),
    _quartz("quartz-no_knowledge", with_passage=False),
    _quartz("quartz-with_knowledge", with_passage=True),
    _race("high"),
    _race("middle"),
    TaskSpec("sciq", "sciq", None, convert_split=_sciq),
    TaskSpec("social_i_qa", "social_i_qa", None,
             _indexed(lambda r: one_line(r["question"]), lambda r: [r["answerA"], r["answerB"], r["answerC"]],
                      lambda r: int(r["label"]) - 1, after=lambda r: one_line(r["context"]))),
    TaskSpec("superglue-copa", "super_glue", "copa", _copa),
    TaskSpec("superglue-multirc", "super_glue", "multirc", convert_split=_multirc),
    TaskSpec("swag", "swag", "regular",
             _indexed(lambda r: r["startphrase"], lambda r: [r[f"ending{i}"] for i in range(4)],
                      lambda r: r["label"])),
    TaskSpec("wino_grande", "winogrande", "winogrande_xl", _winogrande),
    TaskSpec("wiqa", "wiqa", None,
             _indexed(lambda r: one_line(r["question_stem"]), lambda r: r["choices"]["text"],
                      lambda r: ord(r["answer_label_as_choice"]) - ord("A"),
                      after=lambda r: " ".join(r["question_para_step"]))),
)
