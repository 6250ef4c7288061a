"""MetaICL's classification tasks: one converter (`TaskSpec`) per task, following MetaICL's preprocess/{task}.py.

Label lists are in the dataset's index order. The strings (field prefixes, label names and their order, the row
filters) are MetaICL's; their typos ("generalied", "span1_text" without a colon, "solution 1" with no colon)
and quirks (tweet_eval-irony's options include "0", "1" and "hate") are kept, so that the files match the
ones MetaICL's scripts write. unifiedqa:boolq, the one classification task from UnifiedQA's files, is in
metaicl_unifiedqa.py.
"""
from __future__ import annotations

import numpy as np

from mamlen.train.metaicl_spec import (SPLIT_SEED, TASK_INFO, Splits, TaskSpec, labelled, majority, no_breaks,
                                       one_line, pair)

HOLDOUT = Splits(test=None)
NLI3 = ["entailment", "neutral", "contradiction"]
BINARY = ["false", "true"]
SENTIMENT = ["negative", "positive"]
text = lambda r: r["text"]  # noqa: E731
sentences = pair("sentence 1", "sentence 2", "sentence1", "sentence2")


def _wellformed(r):
    # ratings in between are ambiguous and dropped
    if r["rating"] < 0.4:
        return r["content"].strip(), "not well-formed"
    if r["rating"] > 0.6:
        return r["content"].strip(), "well-formed"
    return None


def _hatexplain(r):
    label = majority(r["annotators"]["label"])
    return None if label is None else (" ".join(r["post_tokens"]), ["hatespeech", "normal", "offensive"][label])


def _onestop(r):
    t = one_line(r["text"])
    if t.startswith("Intermediate  "):  # a level name left in some texts
        t = t[len("Intermediate  "):]
    return t, ["elementary", "intermediate", "advance"][r["label"]]


def _which_sentence(first: str, second: str, clean=lambda s: s):
    """A split's rows → ('sentence 1: A [SEP] sentence 2: B', which of A, B is row[first]), the order drawn per row
    from a numpy RNG seeded 42 at the start of each split (MetaICL's blimp and crows_pairs)."""
    def convert_split(rows):
        rng, out = np.random.RandomState(SPLIT_SEED), []
        for r in rows:
            a, b = clean(r[first]), clean(r[second])
            if rng.random() > 0.5:
                out.append((f"sentence 1: {a} [SEP] sentence 2: {b}", "sentence 1"))
            else:
                out.append((f"sentence 1: {b} [SEP] sentence 2: {a}", "sentence 2"))
        return out
    return convert_split


def _ethos(dim: str) -> TaskSpec:
    return TaskSpec(f"ethos-{dim}", "ethos", "multilabel",
                    labelled(lambda r: r["text"].strip(),
                             ["generalied", "directed"] if dim == "directed_vs_generalized" else BINARY, label=dim),
                    HOLDOUT)


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


def _tweet_eval(subset: str, labels: list[str]) -> TaskSpec:
    return TaskSpec(f"tweet_eval-{subset}", "tweet_eval", subset,
                    labelled(lambda r: one_line(r["text"]), labels, keep=lambda r: bool(one_line(r["text"]))))


CLASSIFICATION: tuple[TaskSpec, ...] = (
    TaskSpec("ade_corpus_v2-classification", "ade_corpus_v2", "Ade_corpus_v2_classification",
             labelled(text, ["Not Related", "Related"]), HOLDOUT),
    TaskSpec("ag_news", "ag_news", None, labelled(text, ["World", "Sports", "Business", "Sci/Tech"]),
             Splits(test="test")),
    TaskSpec("amazon_polarity", "amazon_polarity", None,
             labelled(pair("title", "content", "title", "content"), SENTIMENT),
             Splits(test=None, train_count=10000, test_count=1000)),
    TaskSpec("anli", "anli", None, labelled(pair("premise", "hypothesis", "premise", "hypothesis", one_line), NLI3),
             Splits(train="train_r1", test="dev_r1")),
    TaskSpec("circa", "circa", None,
             labelled(lambda r: (f"context: {r['context']} [SEP] question X: {r['question-X']} "
                                 f"[SEP] answer Y: {r['answer-Y']}"),
                      ["Yes", "No", "In the middle, neither yes nor no", "Yes, subject to some conditions", "Other"],
                      label="goldstandard2", keep=lambda r: r["goldstandard2"] != -1), HOLDOUT),
    TaskSpec("climate_fever", "climate_fever", None,
             labelled(lambda r: r["claim"], ["Supports", "Refutes", "Not enough info", "Disputed"],
                      label="claim_label"),
             Splits(train="test", test=None)),
    TaskSpec("dbpedia_14", "dbpedia_14", None,
             labelled(lambda r: r["content"].replace("\t", " ").strip(),
                      ["Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                       "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"]),
             Splits(test="test", test_fraction=0.05)),
    TaskSpec("discovery", "discovery", "discovery",
             labelled(sentences, TASK_INFO["discovery"]["options"]),  # the 174 markers, in the dataset's (sorted) order
             Splits(test_fraction=0.1)),
    TaskSpec("emo", "emo", None, labelled(lambda r: r["text"].strip(), ["others", "happy", "sad", "angry"]),
             Splits(test="test")),
    TaskSpec("emotion", "emotion", None,
             labelled(lambda r: r["text"].strip(), ["sadness", "joy", "love", "anger", "fear", "surprise"])),
    TaskSpec("financial_phrasebank", "financial_phrasebank", "sentences_allagree",
             labelled(lambda r: r["sentence"], ["negative", "neutral", "positive"]), HOLDOUT),
    TaskSpec("glue-cola", "glue", "cola", labelled(lambda r: r["sentence"], ["unacceptable", "acceptable"])),
    TaskSpec("glue-mnli", "glue", "mnli", labelled(pair("premise", "hypothesis", "premise", "hypothesis"), NLI3),
             Splits(test="validation_matched")),
    TaskSpec("glue-mrpc", "glue", "mrpc", labelled(sentences, ["not_equivalent", "equivalent"])),
    TaskSpec("glue-qnli", "glue", "qnli",
             labelled(pair("question", "sentence", "question", "sentence"), ["entailment", "not_entailment"])),
    TaskSpec("glue-qqp", "glue", "qqp",
             labelled(pair("question 1", "question 2", "question1", "question2"), ["not_duplicate", "duplicate"])),
    TaskSpec("glue-rte", "glue", "rte", labelled(sentences, ["entailment", "not_entailment"])),
    TaskSpec("glue-sst2", "glue", "sst2", labelled(lambda r: "sentence: " + r["sentence"], SENTIMENT)),
    TaskSpec("glue-wnli", "glue", "wnli", labelled(sentences, ["not_entailment", "entailment"])),
    TaskSpec("google_wellformed_query", "google_wellformed_query", None, _wellformed),
    TaskSpec("hate_speech18", "hate_speech18", None,
             labelled(text, ["noHate", "hate"], keep=lambda r: r["label"] <= 1), HOLDOUT),  # drops relation/idk
    TaskSpec("hate_speech_offensive", "hate_speech_offensive", None,
             labelled(lambda r: one_line(r["tweet"]), ["hate speech", "offensive language", "neither"], label="class"),
             HOLDOUT),
    TaskSpec("hatexplain", "hatexplain", None, _hatexplain),
    TaskSpec("health_fact", "health_fact", None,
             labelled(lambda r: no_breaks(r["claim"].strip()), ["false", "mixture", "true", "unproven"],
                      keep=lambda r: r["label"] >= 0)),
    TaskSpec("imdb", "imdb", None, labelled(lambda r: r["text"].replace("\n", "").replace("\t", ""), SENTIMENT),
             Splits(test="test")),
    TaskSpec("kilt_fever", "kilt_tasks", "fever",
             lambda r: (one_line(r["input"]), "\t".join(o["answer"] for o in r["output"]))),
    TaskSpec("liar", "liar", None,
             labelled(lambda r: no_breaks(f"statement: {r['statement']} [SEP] speaker: {r['speaker']} "
                                           f"[SEP] context: {r['context']}"),
                      ["false", "half-true", "mostly-true", "true", "barely-true", "pants-fire"])),
    TaskSpec("medical_questions_pairs", "medical_questions_pairs", None,
             labelled(pair("question 1", "question 2", "question_1", "question_2"), ["Similar", "Dissimilar"]),
             HOLDOUT),
    TaskSpec("onestop_english", "onestop_english", None, _onestop, HOLDOUT),
    TaskSpec("paws", "paws", "labeled_final", labelled(sentences, ["not_duplicate", "duplicate"])),
    TaskSpec("poem_sentiment", "poem_sentiment", None,
             labelled(lambda r: r["verse_text"], ["negative", "positive", "no_impact"],
                      keep=lambda r: r["label"] != 3)),
    TaskSpec("rotten_tomatoes", "rotten_tomatoes", None, labelled(text, SENTIMENT)),
    TaskSpec("scitail", "scitail", "snli_format", lambda r: (sentences(r), r["gold_label"])),
    TaskSpec("sick", "sick", None, labelled(pair("sentence 1", "sentence 2", "sentence_A", "sentence_B"), NLI3)),
    TaskSpec("sms_spam", "sms_spam", None, labelled(lambda r: r["sms"].strip(), ["ham", "spam"]), HOLDOUT),
    TaskSpec("superglue-cb", "super_glue", "cb",
             labelled(pair("premise", "hypothesis", "premise", "hypothesis"),
                      ["entailment", "contradiction", "neutral"])),
    TaskSpec("superglue-rte", "super_glue", "rte",
             labelled(pair("premise", "hypothesis", "premise", "hypothesis", one_line),
                      ["entailment", "not_entailment"])),
    TaskSpec("superglue-wic", "super_glue", "wic",
             labelled(lambda r: (f"word: {r['word']} [SEP] sentence 1: {r['sentence1']} "
                                 f"[SEP] sentence 2: {r['sentence2']}"),
                      BINARY)),
    TaskSpec("superglue-wsc", "super_glue", "wsc.fixed",
             labelled(lambda r: (f"text: {r['text']} [SEP] span1_text{r['span1_text']} "
                                 f"[SEP] span2_text: {r['span2_text']}"),
                      BINARY)),
    TaskSpec("tab_fact", "tab_fact", "tab_fact",
             labelled(lambda r: (f"statement: {r['statement']} [SEP] table_caption: {r['table_caption']} "
                                 f"[SEP] table_text: " + r["table_text"].replace("\n", " [n] ")),
                      ["refuted", "entailed"])),
    TaskSpec("trec", "trec", None, labelled(text, ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"], label="label-coarse"),
             HOLDOUT),
    TaskSpec("trec-finegrained", "trec", None,
             labelled(lambda r: no_breaks(r["text"], ""),
                      ["manner", "cremat", "animal", "exp", "ind", "gr", "title", "def", "date", "reason", "event",
                       "state", "desc", "count", "other", "letter", "religion", "food", "country", "color", "termeq",
                       "city", "body", "dismed", "mount", "money", "product", "period", "substance", "sport", "plant",
                       "techmeth", "volsize", "instru", "abb", "speed", "word", "lang", "perc", "code", "dist", "temp",
                       "symbol", "ord", "veh", "weight", "currency"], label="label-fine"), HOLDOUT),
    TaskSpec("wiki_qa", "wiki_qa", None, labelled(pair("question", "answer", "question", "answer"), BINARY)),
    TaskSpec("yahoo_answers_topics", "yahoo_answers_topics", None,
             labelled(lambda r: no_breaks(f"question_title: {r['question_title']} [SEP] question_content: "
                                           f"{r['question_content']} [SEP] best_answer: {r['best_answer']}", ""),
                      ["Society & Culture", "Science & Mathematics", "Health", "Education & Reference",
                       "Computers & Internet", "Sports", "Business & Finance", "Entertainment & Music",
                       "Family & Relationships", "Politics & Government"], label="topic"),
             Splits(test="test")),
    TaskSpec("yelp_polarity", "yelp_polarity", None, labelled(lambda r: r["text"].replace("\\n", " "), SENTIMENT),
             Splits(test="test", test_fraction=0.2)),

    # classification tasks outside class_to_class (hr_to_lr, qa_to_qa, non_class_to_class)
    TaskSpec("art", "art", None,
             labelled(lambda r: (f"observation 1: {r['observation_1']} [SEP] observation 2: {r['observation_2']} "
                                 f"[SEP] hypothesis 1: {r['hypothesis_1']} [SEP] hypothesis 2: {r['hypothesis_2']}"
                                 ).replace("\n", " ").replace("\t", " "),
                      {1: "hypothesis 1", 2: "hypothesis 2"})),
    TaskSpec("biomrc", "biomrc", "biomrc_large_B",
             lambda r: (f"question: {one_line(r['title'])} context: {one_line(r['abstract'])}", r["answer"]),
             Splits(test_fraction=0.1)),
    *(TaskSpec(f"blimp-{paradigm}", "blimp", paradigm,
               convert_split=_which_sentence("sentence_good", "sentence_bad"), splits=HOLDOUT)
      for paradigm in ("anaphor_number_agreement", "ellipsis_n_bar_2", "sentential_negation_npi_licensor_present",
                       "sentential_negation_npi_scope")),
    TaskSpec("boolq", "boolq", None,
             labelled(pair("question", "context", "question", "passage"), ["no", "yes"], label="answer")),
    TaskSpec("crows_pairs", "crows_pairs", None,
             convert_split=_which_sentence("sent_more", "sent_less", lambda s: s.replace("\n", "").replace("\t", "")),
             splits=Splits(train="test", test=None)),
    TaskSpec("mc_taco", "mc_taco", None,
             labelled(lambda r: f"{r['sentence']} [SEP] {r['question']} [SEP] {r['answer']}", ["no", "yes"]),
             Splits(train="validation", test=None)),
    TaskSpec("numer_sense", "numer_sense", None,
             lambda r: (r["sentence"].replace("<mask>", "[MASK]"), r["target"]), HOLDOUT),
    TaskSpec("piqa", "piqa", None,  # "solution 1" with no colon; the output is the label index itself
             lambda r: (no_breaks(f"goal: {r['goal']} [SEP] solution 1{r['sol1']} [SEP] solution 2{r['sol2']}", ""),
                        str(r["label"]))),
    TaskSpec("yelp_review_full", "yelp_review_full", None,
             lambda r: (r["text"].replace("\\n", " "), str(r["label"] + 1)), Splits(test="test")),
    *(_ethos(d) for d in ("directed_vs_generalized", "disability", "gender", "national_origin", "race", "religion",
                          "sexual_orientation")),
    *(_tweet_eval(s, labels) for s, labels in _TWEET_EVAL.items()),
)
