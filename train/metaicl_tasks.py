"""MetaICL's tasks: the seven settings' task lists and, per task, a converter from its Hugging Face dataset.

metaicl_tasks.json holds MetaICL's config/{setting}.json task lists and config/tasks/{task}.json types and label
options, for all 142 tasks of the settings. A converter (`TaskSpec`) follows MetaICL's preprocess/{task}.py,
which comes from CrossFit:
- which hub dataset (and config) to load;
- how its splits become a training pool and test queries (`Splits`);
- how one row becomes an (input, output) pair (`convert`; None drops the row).
`preprocess` then applies MetaICL's common step: strip the input and turn literal "\\n" into spaces, keep the
output up to its first tab, attach the task's options.

Converters exist for the 63 classification tasks of `class_to_class` (43 train, 20 test), which make
`non_nli_to_nli` and `non_paraphrase_to_paraphrase` complete too, and cover 44 of `hr_to_lr`'s 87 tasks.
Multiple-choice and free-form tasks (QA, the unifiedqa:* files) have none yet. `missing(setting)` lists them,
and `train/build_metaicl_data.py --list` prints them. Adding one is a `register(...)` call
below plus a test row in tests/train/test_metaicl_data.py. The strings (field prefixes, label names and
their order, the row filters) are MetaICL's; their typos ("generalied", "span1_text" without a colon) and
quirks (tweet_eval-irony's options include "0", "1" and "hate") are kept, so that the files match the
ones MetaICL's scripts write.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

_META = json.loads((Path(__file__).resolve().parent / "metaicl_tasks.json").read_text(encoding="utf-8"))
SETTINGS: dict[str, dict[str, list[str]]] = _META["settings"]
TASK_INFO: dict[str, dict] = _META["tasks"]  # {task: {"type": "classification"|"multi-choice"|"free-form", "options"}}
TRAIN_K, TEST_K = 16384, 16
TRAIN_SEED, TEST_SEEDS = 100, (100, 13, 21, 42, 87)
SPLIT_SEED = 42  # MetaICL's fixed shuffle before cutting a held-out test part from one split


class ConversionError(ValueError):
    """A row that the converter cannot map; the message names the task, the split, the row and the problem."""


@dataclass(frozen=True)
class Splits:
    """Where a task's training pool and test queries come from (MetaICL's get_train_test_lines).

    Default: the "train" split is the pool and the "validation" split the test queries. With `test=None`
    both are cut from `train` after a seed-42 shuffle: the first `holdout` share (or `train_count` rows) is
    the pool, the rest (or the next `test_count` rows) the test queries. `test_fraction` keeps that share of
    a large test split, also after a seed-42 shuffle.
    """

    train: str = "train"
    test: str | None = "validation"
    holdout: float = 0.8
    train_count: int | None = None
    test_count: int | None = None
    test_fraction: float | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: str
    """Hub dataset id, as MetaICL loads it (`datasets.load_dataset(path, config)`)."""
    config: str | None
    convert: Callable[[dict], tuple[str, str] | None]
    splits: Splits = field(default_factory=Splits)


REGISTRY: dict[str, TaskSpec] = {}


def register(name: str, path: str, config: str | None, convert, splits: Splits | None = None) -> None:
    if name not in TASK_INFO:
        raise KeyError(f"register: {name!r} is not a task of MetaICL's settings (metaicl_tasks.json)")
    if name in REGISTRY:
        raise KeyError(f"register: {name!r} has a converter already")
    REGISTRY[name] = TaskSpec(name, path, config, convert, splits or Splits())


def missing(setting: str) -> list[str]:
    """The tasks of a setting that have no converter yet."""
    s = SETTINGS[setting]
    return sorted({t for k in ("train", "test", "unseen_domain_test") for t in s[k]} - set(REGISTRY))


# ---------------------------------------------------------------------------------------------------------
# MetaICL's common step (its utils.preprocess) for classification tasks


def preprocess(task: str, pair: tuple[str, str]) -> dict:
    """(input, output) → {"task", "input", "output", "options"}, as MetaICL writes it."""
    x, y = pair
    x = x.strip().replace("\\n", " ")  # a literal backslash-n, as MetaICL does
    y = str(y).split("\t")[0].strip()
    info = TASK_INFO[task]
    if info["type"] != "classification":
        raise NotImplementedError(f"{task}: MetaICL's option parsing for {info['type']!r} tasks is not ported yet")
    options = list(info["options"])
    if y not in options:
        raise ConversionError(f"{task}: output {y!r} is not among the task's options {options}")
    return {"task": task, "input": x, "output": y, "options": options}


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


def _one_line(s: str) -> str:
    return s.replace("\n", " ")


def _no_breaks(s: str, by: str = " ") -> str:
    return s.replace("\n", by).replace("\r", by).replace("\t", by)


def majority(votes: Sequence[int]):
    """The most common vote, or None on a tie at the top (MetaICL's get_majority)."""
    ranked = Counter(votes).most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    return ranked[0][0]


HOLDOUT = Splits(test=None)
NLI3 = ["entailment", "neutral", "contradiction"]
BINARY = ["false", "true"]
SENTIMENT = ["negative", "positive"]
text = lambda r: r["text"]  # noqa: E731
sentences = pair("sentence 1", "sentence 2", "sentence1", "sentence2")

# ---------------------------------------------------------------------------------------------------------
# class_to_class (train and test tasks); label lists in the dataset's index order

register("ade_corpus_v2-classification", "ade_corpus_v2", "Ade_corpus_v2_classification",
         labelled(text, ["Not Related", "Related"]), HOLDOUT)
register("ag_news", "ag_news", None, labelled(text, ["World", "Sports", "Business", "Sci/Tech"]),
         Splits(test="test"))
register("amazon_polarity", "amazon_polarity", None,
         labelled(pair("title", "content", "title", "content"), SENTIMENT),
         Splits(test=None, train_count=10000, test_count=1000))
register("anli", "anli", None, labelled(pair("premise", "hypothesis", "premise", "hypothesis", _one_line), NLI3),
         Splits(train="train_r1", test="dev_r1"))
register("circa", "circa", None,
         labelled(lambda r: (f"context: {r['context']} [SEP] question X: {r['question-X']} "
                             f"[SEP] answer Y: {r['answer-Y']}"),
                  ["Yes", "No", "In the middle, neither yes nor no", "Yes, subject to some conditions", "Other"],
                  label="goldstandard2", keep=lambda r: r["goldstandard2"] != -1), HOLDOUT)
register("climate_fever", "climate_fever", None,
         labelled(lambda r: r["claim"], ["Supports", "Refutes", "Not enough info", "Disputed"], label="claim_label"),
         Splits(train="test", test=None))
register("dbpedia_14", "dbpedia_14", None,
         labelled(lambda r: r["content"].replace("\t", " ").strip(),
                  ["Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                   "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"]),
         Splits(test="test", test_fraction=0.05))
register("discovery", "discovery", "discovery",
         labelled(sentences, TASK_INFO["discovery"]["options"]),  # the 174 markers, in the dataset's (sorted) order
         Splits(test_fraction=0.1))
register("emo", "emo", None, labelled(lambda r: r["text"].strip(), ["others", "happy", "sad", "angry"]),
         Splits(test="test"))
register("emotion", "emotion", None,
         labelled(lambda r: r["text"].strip(), ["sadness", "joy", "love", "anger", "fear", "surprise"]))
for _dim in ("directed_vs_generalized", "disability", "gender", "national_origin", "race", "religion",
             "sexual_orientation"):
    register(f"ethos-{_dim}", "ethos", "multilabel",
             labelled(lambda r: r["text"].strip(),
                      ["generalied", "directed"] if _dim == "directed_vs_generalized" else BINARY, label=_dim),
             HOLDOUT)
register("financial_phrasebank", "financial_phrasebank", "sentences_allagree",
         labelled(lambda r: r["sentence"], ["negative", "neutral", "positive"]), HOLDOUT)
register("glue-cola", "glue", "cola", labelled(lambda r: r["sentence"], ["unacceptable", "acceptable"]))
register("glue-mnli", "glue", "mnli", labelled(pair("premise", "hypothesis", "premise", "hypothesis"), NLI3),
         Splits(test="validation_matched"))
register("glue-mrpc", "glue", "mrpc", labelled(sentences, ["not_equivalent", "equivalent"]))
register("glue-qnli", "glue", "qnli",
         labelled(pair("question", "sentence", "question", "sentence"), ["entailment", "not_entailment"]))
register("glue-qqp", "glue", "qqp",
         labelled(pair("question 1", "question 2", "question1", "question2"), ["not_duplicate", "duplicate"]))
register("glue-rte", "glue", "rte", labelled(sentences, ["entailment", "not_entailment"]))
register("glue-sst2", "glue", "sst2", labelled(lambda r: "sentence: " + r["sentence"], SENTIMENT))
register("glue-wnli", "glue", "wnli", labelled(sentences, ["not_entailment", "entailment"]))


def _wellformed(r):
    # ratings in between are ambiguous and dropped
    if r["rating"] < 0.4:
        return r["content"].strip(), "not well-formed"
    if r["rating"] > 0.6:
        return r["content"].strip(), "well-formed"
    return None


register("google_wellformed_query", "google_wellformed_query", None, _wellformed)
register("hate_speech18", "hate_speech18", None,
         labelled(text, ["noHate", "hate"], keep=lambda r: r["label"] <= 1), HOLDOUT)  # drops relation/idk
register("hate_speech_offensive", "hate_speech_offensive", None,
         labelled(lambda r: _one_line(r["tweet"]), ["hate speech", "offensive language", "neither"], label="class"),
         HOLDOUT)


def _hatexplain(r):
    label = majority(r["annotators"]["label"])
    return None if label is None else (" ".join(r["post_tokens"]), ["hatespeech", "normal", "offensive"][label])


register("hatexplain", "hatexplain", None, _hatexplain)
register("health_fact", "health_fact", None,
         labelled(lambda r: _no_breaks(r["claim"].strip()), ["false", "mixture", "true", "unproven"],
                  keep=lambda r: r["label"] >= 0))
register("imdb", "imdb", None, labelled(lambda r: r["text"].replace("\n", "").replace("\t", ""), SENTIMENT),
         Splits(test="test"))
register("kilt_fever", "kilt_tasks", "fever",
         lambda r: (_one_line(r["input"]), "\t".join(o["answer"] for o in r["output"])))
register("liar", "liar", None,
         labelled(lambda r: _no_breaks(f"statement: {r['statement']} [SEP] speaker: {r['speaker']} "
                                       f"[SEP] context: {r['context']}"),
                  ["false", "half-true", "mostly-true", "true", "barely-true", "pants-fire"]))
register("medical_questions_pairs", "medical_questions_pairs", None,
         labelled(pair("question 1", "question 2", "question_1", "question_2"), ["Similar", "Dissimilar"]), HOLDOUT)


def _onestop(r):
    t = _one_line(r["text"])
    if t.startswith("Intermediate  "):  # a level name left in some texts
        t = t[len("Intermediate  "):]
    return t, ["elementary", "intermediate", "advance"][r["label"]]


register("onestop_english", "onestop_english", None, _onestop, HOLDOUT)
register("paws", "paws", "labeled_final", labelled(sentences, ["not_duplicate", "duplicate"]))
register("poem_sentiment", "poem_sentiment", None,
         labelled(lambda r: r["verse_text"], ["negative", "positive", "no_impact"], keep=lambda r: r["label"] != 3))
register("rotten_tomatoes", "rotten_tomatoes", None, labelled(text, SENTIMENT))
register("scitail", "scitail", "snli_format", lambda r: (sentences(r), r["gold_label"]))
register("sick", "sick", None, labelled(pair("sentence 1", "sentence 2", "sentence_A", "sentence_B"), NLI3))
register("sms_spam", "sms_spam", None, labelled(lambda r: r["sms"].strip(), ["ham", "spam"]), HOLDOUT)
register("superglue-cb", "super_glue", "cb",
         labelled(pair("premise", "hypothesis", "premise", "hypothesis"), ["entailment", "contradiction", "neutral"]))
register("superglue-rte", "super_glue", "rte",
         labelled(pair("premise", "hypothesis", "premise", "hypothesis", _one_line), ["entailment", "not_entailment"]))
register("superglue-wic", "super_glue", "wic",
         labelled(lambda r: f"word: {r['word']} [SEP] sentence 1: {r['sentence1']} [SEP] sentence 2: {r['sentence2']}",
                  BINARY))
register("superglue-wsc", "super_glue", "wsc.fixed",
         labelled(lambda r: f"text: {r['text']} [SEP] span1_text{r['span1_text']} [SEP] span2_text: {r['span2_text']}",
                  BINARY))
register("tab_fact", "tab_fact", "tab_fact",
         labelled(lambda r: (f"statement: {r['statement']} [SEP] table_caption: {r['table_caption']} "
                             f"[SEP] table_text: " + r["table_text"].replace("\n", " [n] ")), ["refuted", "entailed"]))
register("trec", "trec", None, labelled(text, ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"], label="label-coarse"),
         HOLDOUT)
register("trec-finegrained", "trec", None,
         labelled(lambda r: _no_breaks(r["text"], ""),
                  ["manner", "cremat", "animal", "exp", "ind", "gr", "title", "def", "date", "reason", "event",
                   "state", "desc", "count", "other", "letter", "religion", "food", "country", "color", "termeq",
                   "city", "body", "dismed", "mount", "money", "product", "period", "substance", "sport", "plant",
                   "techmeth", "volsize", "instru", "abb", "speed", "word", "lang", "perc", "code", "dist", "temp",
                   "symbol", "ord", "veh", "weight", "currency"], label="label-fine"), HOLDOUT)
_TWEET_EVAL = {
    "emoji": ["❤", "😍", "😂", "💕", "🔥", "😊", "😎", "✨", "💙", "😘", "📷", "🇺🇸", "☀", "💜", "😉", "💯", "😁",
              "🎄", "📸", "😜"],
    "emotion": ["anger", "joy", "optimism", "sadness"],
    "hate": ["non-hate", "hate"],
    "irony": ["non-irony", "hate"],
    "offensive": ["non-offensive", "hate"],
    "sentiment": ["negative", "neutral", "positive"],
    **{f"stance_{s}": ["none", "against", "favor"] for s in ("abortion", "atheism", "climate", "feminist", "hillary")},
}
for _subset, _labels in _TWEET_EVAL.items():
    register(f"tweet_eval-{_subset}", "tweet_eval", _subset,
             labelled(lambda r: _one_line(r["text"]), _labels, keep=lambda r: bool(_one_line(r["text"]))))
register("wiki_qa", "wiki_qa", None, labelled(pair("question", "answer", "question", "answer"), BINARY))
register("yahoo_answers_topics", "yahoo_answers_topics", None,
         labelled(lambda r: _no_breaks(f"question_title: {r['question_title']} [SEP] question_content: "
                                       f"{r['question_content']} [SEP] best_answer: {r['best_answer']}", ""),
                  ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
                   "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
                   "Family & Relationships", "Politics & Government"], label="topic"),
         Splits(test="test"))
register("yelp_polarity", "yelp_polarity", None, labelled(lambda r: r["text"].replace("\\n", " "), SENTIMENT),
         Splits(test="test", test_fraction=0.2))
