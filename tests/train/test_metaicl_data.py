"""train/build_metaicl_data.py and train/metaicl_*.py on small local `datasets.Dataset`s and TSV lines (no network):
- every classification converter maps every label index to one of the task's MetaICL options;
- exact MetaICL lines for the converters with special cases, and for every multi-choice and free-form task a row
  with its hub dataset's real column names and types;
- MetaICL's option parsing (preprocess) and UnifiedQA's line parsing and sampling;
- splits and k-shot samples equal an independent replay of MetaICL's numpy shuffles;
- the written directory loads with train/data.py and feeds the episode sampler;
- an unreachable hub, a missing converter and a bad row are reported by name."""
import importlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from mamlen.train import build_metaicl_data as b
from mamlen.train import data, metaicl_spec as ms, metaicl_tasks as mt, metaicl_unifiedqa as uq
from mamlen.train.metaicl_class_tasks import CLASSIFICATION

LABEL_FIELD = {"boolq": "answer",
               "circa": "goldstandard2", "climate_fever": "claim_label", "hate_speech_offensive": "class",
               "trec": "label-coarse", "trec-finegrained": "label-fine", "yahoo_answers_topics": "topic",
               **{t: t.split("-", 1)[1] for t in mt.REGISTRY if t.startswith("ethos-")}}
SPECIAL = {"google_wellformed_query", "hatexplain", "kilt_fever", "scitail",  # no label index: tested below
           "art", "biomrc", "numer_sense", "piqa", "yelp_review_full"}


def test_settings_and_coverage():
    assert len(ms.SETTINGS) == 7 and len(ms.TASK_INFO) == 142
    s = ms.SETTINGS["class_to_class"]
    assert (len(s["train"]), len(s["test"]), len(s["unseen_domain_test"])) == (43, 20, 4)
    assert set(s["unseen_domain_test"]) <= set(s["test"]) and not set(s["train"]) & set(s["test"])
    for setting in ("class_to_class", "non_nli_to_nli", "non_paraphrase_to_paraphrase"):
        assert mt.missing(setting) == [], setting
    by_type = {kind: {t for t, i in ms.TASK_INFO.items() if i["type"] == kind} for kind in ("multi-choice",)}
    assert by_type["multi-choice"] <= set(mt.REGISTRY) and len(by_type["multi-choice"]) == 27
    assert set(mt.REGISTRY) <= set(ms.TASK_INFO)
    for setting in ms.SETTINGS:  # missing() and --list agree with the registry
        tasks = mt.setting_tasks(setting)
        assert set(mt.missing(setting)) == tasks - set(mt.REGISTRY)
        line = f"{setting}: converters for {len(tasks) - len(mt.missing(setting))} of {len(tasks)} tasks"
        assert line in b.listing()
    assert "class_to_class: converters for 63 of 63 tasks\n" in b.listing()


class Row(dict):
    """A row whose text fields are '<field>' and whose label field is `label`."""

    def __init__(self, label_field, label):
        super().__init__({label_field: label})

    def __missing__(self, key):
        return f"<{key}>"


@pytest.mark.parametrize("task", sorted({s.name for s in CLASSIFICATION if s.convert} - SPECIAL))
def test_every_label_index_maps_to_an_option(task):
    spec, field = mt.REGISTRY[task], LABEL_FIELD.get(task, "label")
    outputs = []
    for i in range(300):  # more than any task's label count (discovery: 174)
        try:
            pair = spec.convert(Row(field, i))
        except IndexError:
            break
        if pair is None:  # a filtered label (e.g. poem_sentiment's 3)
            continue
        ex = ms.preprocess(task, pair)
        assert ex["output"] in ms.TASK_INFO[task]["options"]
        assert "<" in ex["input"] and ex["input"] == ex["input"].strip()
        outputs.append(ex["output"])
    assert len(outputs) >= 2 and len(set(outputs)) == len(outputs), outputs  # distinct label names
    if task != "tweet_eval-irony":  # MetaICL lists "0", "1" among its options, which no row produces
        assert sorted(outputs) == sorted(ms.TASK_INFO[task]["options"])


def convert(task, **row):
    pair = mt.REGISTRY[task].convert(row)
    return None if pair is None else ms.preprocess(task, pair)


def test_exact_metaicl_strings():
    assert convert("glue-mrpc", sentence1="A b.", sentence2="C d.", label=1) == {
        "task": "glue-mrpc", "input": "sentence 1: A b. [SEP] sentence 2: C d.", "output": "equivalent",
        "options": ["equivalent", "not_equivalent"]}
    assert convert("anli", premise="P\nq", hypothesis=" H ", label=2)["input"] == "premise: P q [SEP] hypothesis:  H"
    assert convert("anli", premise="P", hypothesis="H", label=2)["output"] == "contradiction"
    assert convert("superglue-wsc", text="T", span1_text="a", span2_text="b", label=0)["input"] == \
        "text: T [SEP] span1_texta [SEP] span2_text: b"  # MetaICL's missing colon
    assert convert("ethos-directed_vs_generalized", text=" x ", directed_vs_generalized=0)["output"] == "generalied"
    assert convert("yelp_polarity", text="good\\nfood", label=1)["input"] == "good food"  # a literal backslash-n
    assert convert("tab_fact", statement="s", table_caption="c", table_text="a#b\nc#d", label=1)["input"] == \
        "statement: s [SEP] table_caption: c [SEP] table_text: a#b [n] c#d"
    assert convert("trec-finegrained", text="Who\tis\r\n?", **{"label-fine": 4})["input"] == "Whois?"
    assert convert("onestop_english", text="Intermediate  Some\ntext", label=2)["input"] == "Some text"
    assert convert("tweet_eval-irony", text="so\nfun", label=1)["output"] == "hate"
    assert convert("tweet_eval-hate", text="", label=1) is None  # empty tweets are dropped
    assert convert("circa", context="c", **{"question-X": "q?", "answer-Y": "a."}, goldstandard2=3)["output"] == \
        "Yes, subject to some conditions"
    assert convert("circa", context="c", **{"question-X": "q", "answer-Y": "a"}, goldstandard2=-1) is None
    assert convert("poem_sentiment", verse_text="v", label=3) is None
    assert convert("health_fact", claim="c", label=-1) is None
    assert convert("hate_speech18", text="t", label=2) is None
    assert convert("scitail", sentence1="a", sentence2="b", gold_label="neutral")["output"] == "neutral"
    assert convert("kilt_fever", input="claim\ntext", output=[{"answer": "SUPPORTS"}, {"answer": "REFUTES"}]) == {
        "task": "kilt_fever", "input": "claim text", "output": "SUPPORTS", "options": ["REFUTES", "SUPPORTS"]}


def test_special_converters():
    wf = lambda r: convert("google_wellformed_query", content=" q? ", rating=r)  # noqa: E731
    assert wf(0.2)["output"] == "not well-formed" and wf(0.8)["output"] == "well-formed" and wf(0.5) is None
    ann = lambda votes: convert("hatexplain", post_tokens=["a", "b"], annotators={"label": votes})  # noqa: E731
    assert ann([2, 2, 1]) == {"task": "hatexplain", "input": "a b", "output": "offensive",
                              "options": ["hatespeech", "normal", "offensive"]}
    assert ann([0, 1, 2]) is None and ann([1, 1, 0, 0]) is None  # a tie at the top: dropped
    assert ann([1]) ["output"] == "normal"
    with pytest.raises(ms.ConversionError, match="'maybe' is not among the task's options"):
        convert("scitail", sentence1="a", sentence2="b", gold_label="maybe")


# classification tasks outside class_to_class: a row with its hub dataset's real columns each

CLASS_ROWS = {
    "art": ([{"observation_1": "O1.", "observation_2": "O2\n.", "hypothesis_1": "H\t1", "hypothesis_2": "H2",
              "label": 2}],
            [("observation 1: O1. [SEP] observation 2: O2 . [SEP] hypothesis 1: H 1 [SEP] hypothesis 2: H2",
              "hypothesis 2")]),
    "biomrc": ([{"abstract": "@entity1 binds @entity3.", "title": "What does\n@entity1 bind? XXXX",
                 "entities_list": ["@entity1 :: ('x',)", "@entity3 :: ('y',)"], "answer": "@entity3"}],
               [("question: What does @entity1 bind? XXXX context: @entity1 binds @entity3.", "@entity3")]),
    "boolq": ([{"question": "is it wet", "answer": True, "passage": "It rained."}],
              [("question: is it wet [SEP] context: It rained.", "yes")]),
    "mc_taco": ([{"sentence": "He ate.", "question": "How long?", "answer": "a year", "label": 0, "category": 1}],
                [("He ate. [SEP] How long? [SEP] a year", "no")]),
    "numer_sense": ([{"sentence": "a dog has <mask> legs.", "target": "four"}], [("a dog has [MASK] legs.", "four")]),
    "piqa": ([{"goal": "open\na jar", "sol1": "tw\tist", "sol2": "shake\r", "label": 1}],
             [("goal: opena jar [SEP] solution 1twist [SEP] solution 2shake", "1")]),  # MetaICL's missing colons
    "yelp_review_full": ([{"label": 4, "text": "good\\nfood"}], [("good food", "5")]),
}


@pytest.mark.parametrize("task", sorted(CLASS_ROWS))
def test_classification_rows(task):
    rows, want = CLASS_ROWS[task]
    assert lines_of(task, rows) == [ex(task, *w, ms.TASK_INFO[task]["options"]) for w in want]


@pytest.mark.parametrize("task,good,bad,clean", [
    ("blimp-ellipsis_n_bar_2", "sentence_good", "sentence_bad", lambda s: s),
    ("crows_pairs", "sent_more", "sent_less", lambda s: s.replace("\n", "").replace("\t", ""))])
def test_which_sentence_draws_the_order_per_split(task, good, bad, clean):
    others = {"blimp-ellipsis_n_bar_2": {"field": "syntax", "UID": "ellipsis_n_bar_2", "pair_id": 0},
              "crows_pairs": {"id": 0, "bias_type": 1, "stereo_antistereo": 0}}[task]
    rows = [{good: f"Good\t{i}\n.", bad: f"Bad {i}.", **others} for i in range(12)]
    np.random.seed(42)  # MetaICL: seed 42 at the start of the split, one draw per row
    want = []
    for r in rows:
        a, b_ = clean(r[good]), clean(r[bad])
        if np.random.random() > 0.5:
            want.append(ex(task, f"sentence 1: {a} [SEP] sentence 2: {b_}", "sentence 1", ["sentence 1", "sentence 2"]))
        else:
            want.append(ex(task, f"sentence 1: {b_} [SEP] sentence 2: {a}", "sentence 2", ["sentence 1", "sentence 2"]))
    got = lines_of(task, rows, split="test" if task == "crows_pairs" else "train")
    assert got == want and {e["output"] for e in got} == {"sentence 1", "sentence 2"}


# ---------------------------------------------------------------------------------------------------------
# multi-choice tasks: MetaICL's option parsing, and one row per task with its hub dataset's real columns


def lines_of(task, rows, split="train"):
    """MetaICL's lines for `rows`, converted as the build does (a local Dataset with the hub's columns)."""
    ds = DatasetDict({split: Dataset.from_list(rows)})
    return [e for e in (ms.preprocess(task, p) for p in b.convert_split(mt.REGISTRY[task], ds, split)) if e]


def ex(task, input, output, options):
    return {"task": task, "input": input, "output": output, "options": options}


def test_preprocess_multi_choice_rules():
    mc = lambda task, x, y: ms.preprocess(task, (x, y))  # noqa: E731
    assert mc("codah", " Q? \\n now (A) a (B) b ", "b") == ex("codah", "Q?   now", "b", ["a", "b"])
    assert mc("codah", "no choices here", "x") == ex("codah", "no choices here", "x", [])  # kept, as MetaICL does
    with pytest.raises(ms.ConversionError, match=r"codah: fewer than two choices \['a \(C\) c'\]"):
        mc("codah", "Q (A) a (C) c", "a (C) c")  # the cut stops at the first absent letter
    with pytest.raises(ms.ConversionError, match="codah: output 'z' is not among the choices"):
        mc("codah", "Q (A) a (B) b", "z")
    assert mc("ai2_arc", "Q (1) a (2) b", "b") == ex("ai2_arc", "Q", "b", ["a", "b"])  # numbered choices
    # a passage after [SEP] goes in front of the question, with no separator
    assert mc("race-high", "Q? (A) a (B) b [SEP] The text.", "a") == ex("race-high", " The text.Q?", "a", ["a", "b"])
    with pytest.raises(ms.ConversionError, match="race-high: input has 2 '\\[SEP\\]' markers"):
        mc("race-high", "Q (A) a (B) b [SEP] t [SEP] u", "a")
    with pytest.raises(ms.ConversionError, match="a choice contains '\\[SEP\\]'"):
        mc("cosmos_qa", "Q (A) a [SEP] (B) b", "b")
    # quail and quarel: choices marked "(A)" with no spaces around
    assert mc("quail", "Q(A)a(B)b [SEP] P", "b") == ex("quail", " PQ", "b", ["a", "b"])
    # quarel's repairs: " or" and "." endings, and a dot dropped from the answer once per choice
    assert mc("quarel", "Q (A) fast or (B) slow.", "slow..") == ex("quarel", "Q", "slow", ["fast", "slow"])
    assert mc("quarel", "Q (A) aster car or (B) faster car", "aster car")["output"] == "aster car"
    assert mc("quarel", "Q (A) ext to construction site (B) next to construction site",
              "ext to construction site")["output"] == "ext to construction site"
    assert mc("quarel", "Q (A) toilet paper (B) tissue", "oilet paper")["output"] == "toilet paper"
    # superglue-multirc: dropped without an answer or with a single choice
    assert mc("superglue-multirc", "question: Q (A) a (B) b [SEP] context: C", "NO ANSWER!") is None
    assert mc("superglue-multirc", "question: Q (A) a [SEP] context: C", "a") is None
    # free-form: no options, the first of several tab-joined answers
    assert ms.preprocess("squad-no_context", (" question: Q\\nR ", "one\ttwo")) == \
        ex("squad-no_context", "question: Q R", "one", [])


ARC = {"id": "Mercury_1", "question": "Which is a gas?", "answerKey": "B",
       "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]}}
KEYED = lambda q, key, texts, **more: {"question": q, "answerKey": key, **more,  # noqa: E731
                                       "choices": {"text": texts, "label": list("ABCDEFGH"[:len(texts)])}}
CHOICE_ROWS = {
    "ai2_arc": ([ARC, {**ARC, "answerKey": "3", "choices": {"text": ["ice", "steam", "rock"],
                                                              "label": ["1", "2", "3"]}}],
                [("Which is a gas?", "steam", ["ice", "steam", "rock"]),
                 ("Which is a gas?", "rock", ["ice", "steam", "rock"])]),
    "codah": ([{"id": 7, "question_category": 2, "question_propmt": "I was hungry, so I",
                "candidate_answers": ["ate.", "slept.", "ran.", "sang."], "correct_answer_idx": 0}],
              [("I was hungry, so I", "ate.", ["ate.", "slept.", "ran.", "sang."])]),
    "commonsense_qa": ([{"id": "x", "question_concept": "bed", **KEYED("Where\tdo you\nsleep?", "C",
                                                                       ["desk", "car", "bed", "sea", "sky"])}],
                       [("Where do you sleep?", "bed", ["desk", "car", "bed", "sea", "sky"])]),
    "cosmos_qa": ([{"id": "c", "context": "I left.", "question": "Why?", "answer0": "a0", "answer1": "a1",
                    "answer2": "a2", "answer3": "a3", "label": 2}],
                  [("Why? [SEP] I left. [SEP]", "a2", ["a0", "a1", "a2", "a3"])]),
    "dream": ([{"id": 1, "dialogue_id": "5-1", "dialogue": ["M: Hi.", "W: Hello."], "question": "Who spoke first?",
                "choice": ["The man.", "The woman.", "Nobody."], "answer": "The man."}],
              [("Who spoke first? [SEP] M: Hi. W: Hello. [SEP]", "The man.", ["The man.", "The woman.", "Nobody."])]),
    "hellaswag": ([{"ind": 4, "activity_label": "Sitting", "ctx_a": "A man sits.", "ctx_b": "he",
                    "ctx": "A man sits. he",
                    "endings": ["reads.", "runs.", "flies.", "swims."], "source_id": "s", "split": "train",
                    "split_type": "indomain", "label": "1"}],
                  [("A man sits. he", "runs.", ["reads.", "runs.", "flies.", "swims."])]),
    "openbookqa": ([{"id": "o", "question_stem": "The sun is a", "answerKey": "D",
                     "choices": {"text": ["moon", "planet", "comet", "star"], "label": ["A", "B", "C", "D"]}}],
                   [("The sun is a", "star", ["moon", "planet", "comet", "star"])]),
    "qasc": ([{"id": "q", "fact1": "f1", "fact2": "f2", "combinedfact": "cf", "formatted_question": "fq",
               **KEYED("What do plants need?", "A", ["light", "salt", "iron", "oil", "gas", "ice", "sand", "tar"])}],
             [("What do plants need?", "light", ["light", "salt", "iron", "oil", "gas", "ice", "sand", "tar"])]),
    "quail": ([{"id": "q1", "context_id": "c1", "question_id": "1", "domain": "news",
                "metadata": {"author": "a", "title": "t", "url": "u"}, "context": "Line one.\nLine two.",
                "question": "Why?\n", "question_type": "Causality", "answers": ["a", "b", "c", "d"],
                "correct_answer_id": 1}],
              [(" Line one. Line two.Why?", "b", ["a", "b", "c", "d"])]),
    "quarel": ([{"id": "r", "answer_index": 1, "logical_forms": ["lf"], "logical_form_pretty": "lfp",
                 "world_literals": {"world1": ["car"], "world2": ["bike"]},
                 "question": "Which is faster? (A) a car or (B) a bike"},
                {"id": "s", "answer_index": 0, "logical_forms": ["lf"], "logical_form_pretty": "lfp",
                 "world_literals": {"world1": ["car"], "world2": ["bike"]},
                 "question": "Which is faster? (A) a car or (B) a bike"}],
               [("Which is faster?", "a bike", ["a car", "a bike"]),
                ("Which is faster?", "a car", ["a car", "a bike"])]),
    "quartz-no_knowledge": ([{"id": "z", "para": "More heat, more melting.", "para_id": "p", **KEYED(
                                 "Hotter ice melts", "A", ["more", "less"])}],
                            [("Hotter ice melts", "more", ["more", "less"])]),
    "quartz-with_knowledge": ([{"id": "z", "para": "More heat, more melting.", "para_id": "p", **KEYED(
                                   "Hotter ice melts ", "A", ["more", "less"])}],
                              [("Hotter ice melts More heat, more melting.", "more", ["more", "less"])]),
    "race-high": ([{"example_id": "h1", "article": "Art\nicle.", "question": "Q\t?", "answer": "A",
                    "options": ["o\r1", "o2", "o3", "o4"]}],
                  [(" Art icle.Q ?", "o 1", ["o 1", "o2", "o3", "o4"])]),
    "race-middle": ([{"example_id": "m1", "article": "Story.", "question": "Who?", "answer": "D",
                      "options": ["a", "b", "c", "d"]}],
                    [(" Story.Who?", "d", ["a", "b", "c", "d"])]),
    "social_i_qa": ([{"context": "Ann\nwon.", "question": "How does Ann feel?", "answerA": "sad", "answerB": "glad",
                      "answerC": "bored", "label": "2"}],
                    [(" Ann won.How does Ann feel?", "glad", ["sad", "glad", "bored"])]),
    "superglue-copa": ([{"premise": " It rained. ", "choice1": "I got wet.", "choice2": "I stayed dry.",
                         "question": "effect", "idx": 0, "label": 0},
                        {"premise": "I got wet.", "choice1": "It rained.", "choice2": "It was sunny.",
                         "question": "cause", "idx": 1, "label": 0}],
                       [("Cause: It rained.", "Effect: I got wet.", ["Effect: I got wet.", "Effect: I stayed dry."]),
                        ("Effect: I got wet.", "Cause: It rained.", ["Cause: It rained.", "Cause: It was sunny."])]),
    "superglue-multirc": (
        [{"paragraph": "P\none.", "question": "Q?", "answer": a, "idx": {"paragraph": 0, "question": q, "answer": i},
          "label": label}
         for q, i, a, label in [(0, 0, "a1", 1), (0, 1, "a2", 0), (1, 2, "b1", 0), (0, 2, "a3", 1), (1, 3, "b2", 0),
                                (2, 4, "c1", 1)]],
        [(" context: P one.question: Q?", "a1", ["a1", "a2", "a3"])]),  # question 1: no answer; 2: one choice
    "swag": ([{"video-id": "v", "fold-ind": "1", "startphrase": "He opens the door.", "sent1": "He opens the door.",
               "sent2": "", "gold-source": "gold", "ending0": "e0", "ending1": "e1", "ending2": "e2", "ending3": "e3",
               "label": 3}],
             [("He opens the door.", "e3", ["e0", "e1", "e2", "e3"])]),
    "wino_grande": ([{"sentence": "It did not fit: _ was big.", "option1": "the cup", "option2": "the box",
                      "answer": "2"},
                     {"sentence": "Unlabelled _.", "option1": "x", "option2": "y", "answer": ""}],
                    [("It did not fit: _ was big.", "the box", ["the cup", "the box"])]),
    "wiqa": ([{"question_stem": "suppose rain\nhappens, how will it affect floods?",
               "question_para_step": ["Rain falls.", "Rivers rise."], "answer_label": "more",
               "answer_label_as_choice": "A", "metadata_question_id": "w", "metadata_graph_id": "1",
               "metadata_para_id": "2", "metadata_question_type": "EXOGENOUS_EFFECT", "metadata_path_len": 2,
               "choices": {"text": ["more", "less", "no effect"], "label": ["A", "B", "C"]}}],
             [(" Rain falls. Rivers rise.suppose rain happens, how will it affect floods?", "more",
               ["more", "less", "no effect"])]),
}


@pytest.mark.parametrize("task", sorted(CHOICE_ROWS))
def test_multi_choice_rows(task):
    rows, want = CHOICE_ROWS[task]
    assert lines_of(task, rows) == [ex(task, *w) for w in want]


def test_sciq_shuffles_choices_with_one_rng_per_split():
    row = lambda q, support: {"question": q, "distractor3": "d3", "distractor1": "d1", "distractor2": "d2",  # noqa
                              "correct_answer": "right", "support": support}
    rows = [row("Q0", ""), row("Q1", "S\n1."), row("Q2", "S2."), row("Q3", "\n")]  # Q0 (no passage) is dropped
    np.random.seed(42)  # MetaICL: seed 42 at the start of the split, one shuffle per kept row
    orders = []
    for _ in range(3):
        opts = ["d1", "d2", "d3", "right"]
        np.random.shuffle(opts)
        orders.append(opts)
    assert orders[0] != orders[2]
    assert lines_of("sciq", rows) == [ex("sciq", " S 1.Q1", "right", orders[0]),
                                      ex("sciq", " S2.Q2", "right", orders[1]), ex("sciq", "Q3", "right", orders[2])]
    assert lines_of("sciq", rows, split="validation") == lines_of("sciq", rows)  # a fresh RNG per split


# ---------------------------------------------------------------------------------------------------------
# free-form tasks: a row with its hub dataset's real columns each; the output is the first reference answer

SQUAD = {"id": "s1", "title": "T", "context": "C\tx\ny", "question": "Q?",
         "answers": {"text": ["A", "A2"], "answer_start": [0, 4]}}
KILT = {"id": "k1", "input": "who\nis it", "meta": {"left_context": "", "mention": "", "right_context": ""},
        "output": [{"answer": "A1", "meta": {"score": 0}}, {"answer": "A2", "meta": {"score": 1}}]}
FREE_ROWS = {
    "ade_corpus_v2-dosage": ([{"text": "Take 5 mg daily.", "drug": "aspirin", "dosage": "5 mg",
                               "indexes": {"drug": {"start_char": [0], "end_char": [7]},
                                           "dosage": {"start_char": [5], "end_char": [9]}}}],
                             [("Take 5 mg daily. [SEP] aspirin", "5 mg")]),
    "freebase_qa": ([{"Question-ID": "FreebaseQuestions-train-0", "RawQuestion": "Who wrote X?",
                      "ProcessedQuestion": "who wrote x",
                      "Parses": {"Parse-Id": ["p0", "p1"], "PotentialTopicEntityMention": ["x", "x"],
                                 "TopicEntityName": ["x", "x"], "TopicEntityMid": ["m.0", "m.0"],
                                 "InferentialChain": ["book.author", "book.writer"],
                                 "Answers": [{"AnswersMid": ["m.1"], "AnswersName": [["Bob", "Robert"]]},
                                             {"AnswersMid": ["m.2"], "AnswersName": [["Ann", "Bob"]]}]}}],
                    [("Who wrote X?", "Ann")]),  # all names, sorted: "Ann\tBob\tRobert"
    "gigaword": ([{"document": "the text", "summary": "short"}], [("summarize: the text", "short")]),
    "hotpot_qa": ([{"id": "h", "question": "Q?", "answer": "A", "type": "bridge", "level": "hard",
                    "supporting_facts": {"title": ["T1", "T3"], "sent_id": [0, 1]},
                    "context": {"title": ["T1", "T2", "T3"], "sentences": [["a1 ", "a2"], ["b1"], ["c1 ", "c2"]]}}],
                  [("question: Q? context: a1 a2 c1 c2", "A")]),
    **{t: ([KILT], [("who is it", "A1")]) for t in ("kilt_ay2", "kilt_hotpotqa", "kilt_nq", "kilt_trex", "kilt_zsre")},
    "lama-conceptnet": ([{"uuid": "u", "sub": "cat", "obj": "pet", "pred": "IsA", "obj_label": "pet",
                          "masked_sentence": "A cat is a [MASK].", "negated": ""}], [("A cat is a [MASK].", "pet")]),
    "lama-google_re": ([{"pred": "p", "sub": "s", "obj": "o", "sub_w": "", "sub_label": "Ann", "sub_aliases": "",
                         "obj_w": "", "obj_label": "1950", "obj_aliases": "", "uuid": "u", "masked_sentence": "m",
                         "template": "[X] was born in [Y] .", "template_negated": ""}],
                       [("Ann was born in [MASK] .", "1950")]),
    "lama-squad": ([{"id": "q", "sub_label": "Squad", "obj_label": "red", "negated": "",
                     "masked_sentence": "The sky at dusk is [MASK]."}], [("The sky at dusk is [MASK].", "red")]),
    "lama-trex": ([{"uuid": "u", "obj_uri": "Q90", "obj_label": "Paris", "sub_uri": "Q142", "sub_label": "France",
                    "predicate_id": "P36", "sub_surface": "France", "obj_surface": "Paris", "masked_sentence": "m",
                    "template": "The capital of [X] is [Y] .", "template_negated": "", "label": "capital",
                    "description": "d", "type": "N-1"}], [("The capital of France is [MASK] .", "Paris")]),
    "proto_qa": ([{"question": {"normalized": "name something red", "original": "Name something red."},
                   "answers": {"raw": {"apple": 10, "fire truck": 5}}, "num": {"answers": 2},
                   "metadata": {"id": "r1"}}],
                 [("name something red", "apple")]),
    "qa_srl": ([{"sentence": "He ate .", "sent_id": "1", "predicate_idx": 1, "predicate": "ate",
                 "question": ["who", "_", "ate", "_", "_", "_", "?"], "answers": ["He"]}],
               [("question: who _ ate _ _ _ ? context: He ate .", "He")]),
    "quoref": ([{"id": "q", "question": "Who?", "context": "Ann\nmet Bob.", "title": "t", "url": "u",
                 "answers": {"answer_start": [0], "text": ["Ann"]}}],
               [("question: Who? context: Ann met Bob.", "Ann")]),
    "ropes": ([{"id": "r", "background": "B\n.", "situation": "S.", "question": "Q?", "answers": {"text": ["x", "y"]}}],
              [("question: Q? [SEP] situation: S. [SEP] background: B .", "x")]),
    "search_qa": ([{"category": "HISTORY", "air_date": "2004-12-31", "question": "'He was first'", "value": "$200",
                    "answer": "Washington", "round": "Jeopardy!", "show_number": "4680",
                    "search_results": {"urls": ["u"], "snippets": ["s"], "titles": ["t"], "related_links": [None]}}],
                  [("question: 'He was first'category: HISTORY", "Washington")]),
    "spider": ([{"db_id": "db", "query": "SELECT count(*) FROM t", "question": "How many?",
                 "query_toks": ["SELECT"], "query_toks_no_value": ["select"], "question_toks": ["How", "many", "?"]}],
               [("How many?", "SELECT count(*) FROM t")]),
    "squad-no_context": ([SQUAD], [("question: Q?", "A")]),
    "squad-with_context": ([SQUAD], [("question: Q? context: C x y", "A")]),
    "superglue-record": ([{"passage": "P\nq", "query": "@placeholder won", "entities": ["Ann"],
                           "entity_spans": {"text": ["Ann"], "start": [0], "end": [3]}, "answers": ["Ann", "ann"],
                           "idx": {"passage": 0, "query": 0}}], [("question: @placeholder won context: P q", "Ann")]),
    "tweet_qa": ([{"Question": "Q?", "Answer": ["A", "B"], "Tweet": "T", "qid": "1"}],
                 [("question: Q? context: T", "A")]),
    "web_questions": ([{"url": "u", "question": "what is x?", "answers": ["a", "b"]}], [("what is x?", "a")]),
    "wikisql": ([{"phase": 1, "question": "how many?", "table": {"header": ["h"], "page_title": "p"},
                  "sql": {"human_readable": " SELECT x ", "sel": 0, "agg": 0,
                          "conds": {"column_index": [0], "operator_index": [0], "condition": ["c"]}}}],
                [("how many?", "SELECT x")]),
    "xsum": ([{"document": "D\nE", "summary": "S", "id": "1"}], [("summarize: D E", "S")]),
}


@pytest.mark.parametrize("task", sorted(FREE_ROWS))
def test_free_form_rows(task):
    rows, want = FREE_ROWS[task]
    assert lines_of(task, rows) == [ex(task, *w, []) for w in want]


def test_free_form_coverage():
    assert {t for t, i in ms.TASK_INFO.items() if i["type"] == "free-form" and not t.startswith(uq.PREFIX)} \
        == set(FREE_ROWS)


def test_non_hub_files_are_downloaded_and_parsed_as_metaicl_reads_them(tmp_path, monkeypatch):
    proto = tmp_path / "train.jsonl"
    proto.write_text("".join(json.dumps(r) + "\n" for r in FREE_ROWS["proto_qa"][0] * 2), encoding="utf-8")
    tsv = tmp_path / "train.tsv"
    tsv.write_bytes(b"q1 \\n (A) x (B) y\tx\r\nq2 \\n (A) x (B) y\ty\n\n")
    fetched = []

    def download(task, url):
        fetched.append((task, url))
        return str(proto if url.endswith(".jsonl") else tsv)

    monkeypatch.setattr(b, "_download", download)
    assert b.load_source(mt.REGISTRY["proto_qa"]) == {"train": FREE_ROWS["proto_qa"][0] * 2}
    raw = b.load_source(mt.REGISTRY["unifiedqa:mctest"])
    assert raw["train"] == ["q1 \\n (A) x (B) y\tx\n", "q2 \\n (A) x (B) y\ty\n", "\n"]  # universal newlines
    assert fetched[0] == ("proto_qa",
                          "https://raw.githubusercontent.com/iesl/protoqa-data/master/data/train/train.jsonl")
    assert fetched[1:] == [("unifiedqa:mctest", u) for u in mt.REGISTRY["unifiedqa:mctest"].urls().values()]


def test_an_unreachable_file_server_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(uq, "URL", "http://127.0.0.1:9/unifiedqa/{dataset}/{file}")  # the discard port
    uqa = sorted(t for t in ms.TASK_INFO if t.startswith(uq.PREFIX))  # no hub task: only the bucket is checked
    monkeypatch.setitem(ms.SETTINGS, "uqa", {"train": [t for t in uqa if ms.TASK_INFO[t]["type"] != "multi-choice"],
                                             "test": [t for t in uqa if ms.TASK_INFO[t]["type"] == "multi-choice"],
                                             "unseen_domain_test": []})
    with pytest.raises(SystemExit) as e:
        b.main(["--setting", "uqa", "--out", str(tmp_path / "d"), "--no-progress"])
    msg = str(e.value.code)
    assert msg.startswith("error: http://127.0.0.1:9 is unreachable")
    assert "20 task(s) of the setting (unifiedqa:ai2_science_middle, " in msg
    assert "\n" not in msg
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------------------------------------------------
# unifiedqa:* tasks: UnifiedQA's TSV lines, parsed and sampled as MetaICL's preprocess/unifiedqa.py does


def test_unifiedqa_test_lines():
    t = "unifiedqa:openbookqa"
    assert uq.test_example(t, "What is the sun? \\n (A) a star (B) a planet\ta star\n") == \
        ex(t, "What is the sun? ", "a star", ["a star", "a planet"])
    # question \n choices \n passage: the passage is moved before the choices, then the parts joined by spaces
    t = "unifiedqa:qasc_with_ir"
    assert uq.test_example(t, "q? \\n (A) x (B) y \\n fact one.\ty") == ex(t, "q?     fact one. ", "y", ["x", "y"])
    assert uq.test_example(t, "is it? \\n ctx\tyes") == ex(t, "is it? \\n ctx", "yes", [])  # yes/no: no options
    with pytest.raises(ms.ConversionError, match="unifiedqa:qasc_with_ir: output 'z' is not among the choices"):
        uq.test_example(t, "q \\n (A) x (B) y\tz")
    with pytest.raises(ms.ConversionError, match="neither \\(A\\)-choices nor a yes/no answer"):
        uq.test_example(t, "q \\n ctx\tmaybe")
    with pytest.raises(ms.ConversionError, match="a line without exactly one tab"):
        uq.test_example(t, "q \\n (A) x (B) y")
    spec = mt.REGISTRY["unifiedqa:mctest"]
    assert spec.urls() == {"train": "https://storage.googleapis.com/unifiedqa/data/mctest/train.tsv",
                           "test": "https://storage.googleapis.com/unifiedqa/data/mctest/dev.tsv"}
    assert mt.REGISTRY["unifiedqa:openbookqa"].files["test"] == "test.tsv"
    assert mt.REGISTRY["unifiedqa:drop"].files == {"train": "train.tsv"}  # a training task: no test file read
    pool = [f"line {i}" for i in range(40)]
    for seed in ms.TEST_SEEDS:  # MetaICL: np.random.seed(seed); permutation(range(n))[:k]
        np.random.seed(seed)
        assert uq.test_demonstrations(pool, 16, seed) == [pool[i] for i in np.random.permutation(range(40))[:16]]


def metaicl_window(question, context, answer, n_words):
    """MetaICL's passage window loop, as it is there (global numpy RNG)."""
    words = context.split(" ")
    while True:
        start = np.random.choice(range(len(words) - n_words + 1))
        window = " ".join(words[start:start + n_words])
        if uq.normalize_answer(answer) in uq.normalize_answer(window):
            return question + " \\t " + window


def test_unifiedqa_training_lines():
    t = "unifiedqa:quoref"  # extractive: the answer must be in the input
    words = [f"w{i}" for i in range(400)]
    words[300:302] = ["golden", "key"]
    long_context = " ".join(words)
    lines = ["no tab here\n", "a\tb\tc\n",  # skipped: not exactly one tab
             "Who won? \\n Ann won the race.\tAnn\n",
             "Who lost? \\n Ann won.\tBob\n",  # answer not in the input: dropped
             f"Where is the key? \\n {long_context}\tgolden key\n",  # over 200 words: a window holding the answer
             "Who? \\n " + " ".join(["Ann"] * 150) + "\t" + " ".join(["Ann"] * 101) + "\n"]  # answer over 100 words
    got = uq.train_examples(t, lines, 16384, np.random.RandomState(100))
    np.random.seed(100)  # MetaICL: one seed for the windows, then the permutation
    window = metaicl_window("Where is the key? ", " " + long_context, "golden key", 200 - 5 - 1)
    kept = [ex(t, "Who won? \\n Ann won the race.", "Ann", []), ex(t, window, "golden key", [])]
    assert got == [kept[i] for i in np.random.permutation(range(2))[:16384]]
    assert "golden key" in window and len(window.split(" \\t ")[1].split(" ")) == 194
    assert uq.train_examples(t, lines, 1, np.random.RandomState(100)) == got[:1]

    # question \n choices \n passage: the choices are dropped; NQ's tokenized punctuation is undone
    assert uq.train_examples("unifiedqa:race_string", ["Q? \\n (A) x (B) y \\n blue sky here.\tblue sky"], 9,
                             np.random.RandomState(0)) == [ex("unifiedqa:race_string", "Q? \\n blue sky here.",
                                                              "blue sky", [])]
    nq = "unifiedqa:natural_questions_with_dpr_para"
    assert uq.train_examples(nq, ["who ( b ) - - c , d . e \\n b c d\tb c"], 9, np.random.RandomState(0))[0]["input"] \
        == "who (b) - c, d. e \\n b c d"
    with pytest.raises(ms.ConversionError, match="unifiedqa:squad1_1: more than two literal"):
        uq.train_examples("unifiedqa:squad1_1", ["a \\n b \\n c \\n d\tx"], 9, np.random.RandomState(0))


# ---------------------------------------------------------------------------------------------------------
# building a small setting end to end


def _mrpc(n, offset=0):
    return Dataset.from_dict({"sentence1": [f"first {i}" for i in range(offset, offset + n)],
                              "sentence2": [f"second {i}" for i in range(offset, offset + n)],
                              "label": [i % 2 for i in range(offset, offset + n)]})


def _trec(n):
    return Dataset.from_dict({"text": [f"question {i}?" for i in range(n)], "label-coarse": [i % 6 for i in range(n)],
                              "label-fine": [i % 47 for i in range(n)]})


def _cb(n, offset=0):
    return Dataset.from_dict({"premise": [f"p {i}" for i in range(offset, offset + n)],
                              "hypothesis": [f"h {i}" for i in range(offset, offset + n)],
                              "label": [i % 3 for i in range(offset, offset + n)]})


HUB = {("glue", "mrpc"): DatasetDict(train=_mrpc(50), validation=_mrpc(7, offset=1000)),
       ("trec", None): DatasetDict(train=_trec(45), test=_trec(3)),
       ("super_glue", "cb"): DatasetDict(train=_cb(40), validation=_cb(9, offset=500))}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(ms.SETTINGS, "toy", {"train": ["glue-mrpc", "trec"], "test": ["superglue-cb"],
                                             "unseen_domain_test": []})
    loads = []

    def load(spec):
        loads.append(spec.name)
        return HUB[(spec.path, spec.config)]

    return load, loads


def metaicl_replay(lines, seed, k):
    """MetaICL's generate_k_shot_data, written as it is there: global numpy seed, shuffle, slice."""
    lines = list(lines)
    np.random.seed(seed)
    np.random.shuffle(lines)
    return lines[:k], lines[k:2 * k]


def test_build_matches_metaicl_sampling_and_loads(tmp_path, toy, tiny):
    load, loads = toy
    out = tmp_path / "metaicl"
    written = b.build("toy", out, load=load, progress=False)
    assert written == {"train": ["glue-mrpc", "trec"], "test": ["superglue-cb"], "unseen_domain_test": []}
    assert sorted(loads) == ["glue-mrpc", "superglue-cb", "trec"]

    # train tasks: the whole pool (< 16,384) in MetaICL's seed-100 order
    mrpc = [mt.REGISTRY["glue-mrpc"].convert(r) for r in HUB[("glue", "mrpc")]["train"]]
    want, _ = metaicl_replay(mrpc, 100, 16384)
    got = data.load_task(out, "glue-mrpc", "train", k=16384, seed=100)
    assert [(e["input"], e["output"]) for e in got] == want and len(got) == 50
    # trec: train and test cut from one split after a seed-42 shuffle (80 / 20)
    rows = [mt.REGISTRY["trec"].convert(r) for r in HUB[("trec", None)]["train"]]
    np.random.seed(42)
    np.random.shuffle(rows)
    want, _ = metaicl_replay(rows[:36], 100, 16384)
    assert [(e["input"], e["output"]) for e in data.load_task(out, "trec", "train", k=16384, seed=100)] == want
    assert not (out / "trec" / "trec_16_13_train.jsonl").exists()  # a training task has no k-shot files

    # the test task: per seed, 16 demonstrations, 16 dev examples, every validation query
    cb = [mt.REGISTRY["superglue-cb"].convert(r) for r in HUB[("super_glue", "cb")]["train"]]
    for seed in ms.TEST_SEEDS:
        demos, dev = metaicl_replay(cb, seed, 16)
        assert [(e["input"], e["output"]) for e in data.load_task(out, "superglue-cb", "train", seed=seed)] == demos
        assert [(e["input"], e["output"]) for e in data.load_task(out, "superglue-cb", "dev", seed=seed)] == dev
        test = data.load_task(out, "superglue-cb", "test", seed=seed)
        assert [e["input"] for e in test] == [f"premise: p {i} [SEP] hypothesis: h {i}" for i in range(500, 509)]
    assert {e["output"] for e in test} == {"entailment", "contradiction", "neutral"}
    assert test[0]["options"] == ["contradiction", "entailment", "neutral"]
    assert data.load_task(out, "superglue-cb", "train", seed=13) != data.load_task(out, "superglue-cb", "train", seed=21)

    # what the trainer reads: the setting, task types and an episode
    setting = data.load_setting(out, "toy")
    assert setting["test"] == ["superglue-cb"]
    assert data.task_info(out, "trec")["type"] == "classification"
    model, tok = tiny
    sampler = data.EpisodeSampler(data.load_train_tasks(out, "toy"), tok, tasks_per_step=2, k=2, inner_steps=1,
                                  batch_size=1, max_len=96)
    assert len(sampler.meta_batch(1)) == 2

    # a rebuild is byte-identical, and other settings' tasks in the directory are kept
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jsonl")}
    (out / "other_task").mkdir()
    b.build("toy", out, load=load, progress=False)
    assert before == {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jsonl")}
    assert (out / "other_task").is_dir() and not list(out.glob(".*"))  # no temporary leftovers


# ---------------------------------------------------------------------------------------------------------
# against MetaICL's own scripts (opt-in: METAICL_REPO=/path/to/a/facebookresearch/MetaICL checkout)

METAICL_REPO = os.environ.get("METAICL_REPO")
SCRIPT = {"superglue-copa": "superglue_copa", "superglue-multirc": "superglue_multirc", "wino_grande": "winogrande",
          "ade_corpus_v2-dosage": "ade_dosage", "superglue-record": "superglue_record"}


@pytest.fixture
def metaicl_scripts(monkeypatch):
    """MetaICL's preprocess/ modules, imported as its scripts run (from that directory, with --do_test)."""
    pre = Path(METAICL_REPO) / "preprocess"
    monkeypatch.chdir(pre)
    monkeypatch.syspath_prepend(str(pre))
    monkeypatch.setattr(sys, "argv", ["preprocess", "--do_test"])
    monkeypatch.setitem(sys.modules, "wget", types.ModuleType("wget"))  # proto_qa imports it, never used here
    before = set(sys.modules)
    yield lambda name: importlib.import_module(name)
    for name in set(sys.modules) - before:  # their names ("utils", "squad", ...) must not shadow anything later
        del sys.modules[name]


@pytest.mark.skipif(not METAICL_REPO, reason="set METAICL_REPO to a MetaICL checkout to compare with its scripts")
def test_same_lines_as_metaicl_scripts(metaicl_scripts, tmp_path):
    fg, mu, muq = (metaicl_scripts(n) for n in ("fewshot_gym_dataset", "utils", "unifiedqa"))
    configs = mu.load_configs()
    cases = {**CHOICE_ROWS, **CLASS_ROWS, **FREE_ROWS, "sciq": HUB_ROWS["sciq"]}
    cases["wino_grande"] = (cases["wino_grande"][0][:1], None)  # MetaICL's int("") fails on an unlabelled row
    for task, (rows, _) in sorted(cases.items()):
        family, _, variant = task.partition("-")
        name = SCRIPT.get(task) or ("lama" if family == "lama" else family if variant and family in
                                    ("quartz", "race", "squad", "blimp") else task)
        module = metaicl_scripts(name)
        cls = next(c for c in vars(module).values() if isinstance(c, type) and issubclass(c, fg.FewshotGymDataset)
                   and c.__module__ == name)
        gym = cls(variant) if name in ("quartz", "race", "squad", "lama", "blimp") else cls()
        ref = [mu.preprocess(task, line, configs[task]) for line in gym.map_hf_dataset_to_list({"s": rows}, "s")]
        assert [json.loads(r) for r in ref if r is not None] == lines_of(task, rows), task

    # preprocess on random inputs full of markers; an error is MetaICL's assert
    rng, marks = np.random.RandomState(0), ["Q", "a", " (A) ", " (B) ", "(A)", "(B)", " (1) ", " (2) ", "[SEP]",
                                            " [SEP] ", " or", ".", "\\n", " ", "SEP", "aster", "NO ANSWER!", "\t"]
    for task in ("codah", "quarel", "quail", "race-high", "ai2_arc", "superglue-multirc", "cosmos_qa", "tweet_qa"):
        for _ in range(500):
            x, y = ("".join(rng.choice(marks, rng.randint(1, n))) for n in (12, 4))
            try:
                ref = mu.preprocess(task, (x, y), configs[task])
                ref = ref and json.loads(ref)
            except AssertionError:
                ref = "error"
            try:
                ours = ms.preprocess(task, (x, y))
            except ms.ConversionError:
                ours = "error"
            assert ours == ref, (task, x, y)

    # unifiedqa: MetaICL's process_train / process_test on the same files
    words = [f"w{i}" for i in range(400)]
    long = [" ".join(words[:37 * i % 390] + ["golden", "key"] + words[37 * i % 390 + 2:]) for i in range(30)]
    train = ([f"Where is key {i}? \\n {c}\tgolden key\n" for i, c in enumerate(long)]
             + [f"Who won {i}? \\n Ann won race {i}.\tAnn\n" for i in range(30)] + ["junk\n", "Who? \\n Ann.\tBob\n"])
    for t, lines in [("quoref", train), ("natural_questions_with_dpr_para", train), ("squad2", train),
                     ("race_string", [f"Q{i} \\n (A) x (B) y \\n the blue sky {i}.\tblue sky\n" for i in range(9)])]:
        (tmp_path / f"unifiedqa:{t}").mkdir()
        (tmp_path / f"unifiedqa:{t}" / "train.tsv").write_text("".join(lines))
        muq.process_train(str(tmp_path), [t], 200, k=25, seed=100)
        ref = [json.loads(line) for line in open(tmp_path / f"unifiedqa:{t}" / f"unifiedqa:{t}_25_100_train.jsonl")]
        assert ref == uq.train_examples(f"unifiedqa:{t}", lines, 25, np.random.RandomState(100)), t
    test = ([f"What is {i}? \\n (A) a star (B) planet {i}\ta star\n" for i in range(40)]
            + [f"q{i}? \\n (A) x (B) y{i} \\n fact {i}.\ty{i}\n" for i in range(20)] + ["is it? \\n ctx\tyes\n", "\n"])
    for t in ("openbookqa", "qasc_with_ir"):
        spec = mt.REGISTRY[f"unifiedqa:{t}"]
        (tmp_path / spec.name).mkdir()
        for split, name in spec.files.items():
            (tmp_path / spec.name / name).write_text("".join(test if split == "train" else test[::7]))
        muq.process_test(str(tmp_path), [t], k=16, seeds=list(ms.TEST_SEEDS))
        files = b.unifiedqa_task_files(spec, {"train": test, "test": test[::7]}, train=False, test=True).files
        assert sorted(files) == sorted(p.name for p in (tmp_path / spec.name).glob("*.jsonl"))
        for name, examples in files.items():
            assert [json.loads(line) for line in open(tmp_path / spec.name / name)] == examples, name


# one whole setting: every task's data mocked by local Datasets (the rows above) or TSV lines

UQA_TEST = ("What is the sun? \\n (A) a star (B) a planet\ta star\n",
            ("What is the sun? ", "a star", ["a star", "a planet"]))
UQA_TRAIN = {t: ("what is it? \\n " + ("(A) blue sky (B) red sea \\n " if t[len(uq.PREFIX):] in uq.THREE_PARTS else "")
                 + "it is the blue sky.\tblue sky\n", ("what is it? \\n it is the blue sky.", "blue sky", []))
             for t in ms.TASK_INFO if t.startswith(uq.PREFIX)}
SCIQ = {"question": "Q?", "distractor3": "d3", "distractor1": "d1", "distractor2": "d2", "correct_answer": "right",
        "support": "S."}
HUB_ROWS = {**{t: (rows, [(*w, []) for w in want]) for t, (rows, want) in FREE_ROWS.items()},
            **{t: (rows, [(*w, ms.TASK_INFO[t]["options"]) for w in want]) for t, (rows, want) in CLASS_ROWS.items()},
            **CHOICE_ROWS, "sciq": ([SCIQ], [(" S.Q?", "right", ["d1", "d2", "d3", "right"])])}


def same_line(e, want):
    if e["task"] == "sciq":  # its choices are shuffled per row
        e = {**e, "options": sorted(e["options"])}
    return e in want


def copies(task, rows, n):
    if task == "superglue-multirc":  # its rows are grouped by question: one group per copy
        return [{**r, "idx": {**r["idx"], "question": r["idx"]["question"] + 10 * c}} for c in range(n) for r in rows]
    return [r for _ in range(n) for r in rows]


def whole_setting_load(spec):
    if isinstance(spec, uq.UnifiedQASpec):
        line = UQA_TEST[0] if ms.TASK_INFO[spec.name]["type"] == "multi-choice" else UQA_TRAIN[spec.name][0]
        return {"train": [line] * 20 + ["\n"], "test": [line] * 3}
    rows = HUB_ROWS[spec.name][0]
    splits = [spec.splits.train] + ([spec.splits.test] if spec.splits.test else [])
    return DatasetDict({split: Dataset.from_list(copies(spec.name, rows, 20)) for split in splits})


def test_build_a_whole_setting(tmp_path, monkeypatch):
    setting = "qa_to_qa"
    out = tmp_path / "metaicl"
    assert mt.missing(setting) == []
    written = b.build(setting, out, load=whole_setting_load, progress=False)
    s = ms.SETTINGS[setting]
    assert written == s
    assert data.load_setting(out, setting)["test"] == written["test"]
    for task in sorted(set(written["train"]) | set(written["test"])):
        if task.startswith(uq.PREFIX):
            want = [ex(task, *(UQA_TEST[1] if ms.TASK_INFO[task]["type"] == "multi-choice" else UQA_TRAIN[task][1]))]
        else:
            want = [ex(task, *w) for w in HUB_ROWS[task][1]]
        files = sorted(p.name for p in (out / task).iterdir())
        if task in s["test"]:
            seeds = [f"{task}_16_{seed}_{split}.jsonl" for seed in ms.TEST_SEEDS
                     for split in (("train", "test") if task.startswith(uq.PREFIX) else ("train", "dev", "test"))]
            assert files == sorted(seeds), task
            for seed in ms.TEST_SEEDS:
                demos = data.load_task(out, task, "train", seed=seed)
                queries = data.read_jsonl(data.task_file(out, task, "test", 16, seed), task, need_options=True)
                assert len(demos) == 16 and queries, task
                assert all(same_line(e, want) for e in demos + queries), task
        else:
            assert files == [f"{task}_16384_100_train.jsonl"], task
            pool = data.load_task(out, task, "train", k=16384, seed=100)
            assert pool and all(same_line(e, want) for e in pool), task
        info = data.task_info(out, task)
        assert info["type"] == b.TYPES[ms.TASK_INFO[task]["type"]], task


def test_errors_name_what_is_wrong(tmp_path, toy, monkeypatch):
    load, _ = toy
    monkeypatch.setitem(ms.SETTINGS, "partial", {"train": ["glue-mrpc", "no_such_task"], "test": ["superglue-cb"],
                                                 "unseen_domain_test": []})
    with pytest.raises(b.BuildError, match=r"partial: no converter yet for 1 of its tasks \(no_such_task\)\. "
                                           r".*--skip-missing"):
        b.build("partial", tmp_path / "x", load=load)
    assert b.build("partial", tmp_path / "x", load=load, skip_missing=True, progress=False)["train"] == ["glue-mrpc"]
    with pytest.raises(b.BuildError, match="unknown"):
        b.build("no_such_setting", tmp_path / "x", load=load)
    # a row the converter cannot read: task, split, row index and the missing field
    bad = DatasetDict(train=Dataset.from_dict({"sentence1": ["a", "b"], "sentence_2": ["c", "d"], "label": [0, 1]}),
                      validation=_mrpc(2))
    with pytest.raises(ms.ConversionError, match=r"glue-mrpc: split 'train', row 0: KeyError: 'sentence2'"):
        b.task_lines(mt.REGISTRY["glue-mrpc"], bad)
    with pytest.raises(b.BuildError, match=r"glue-mrpc: dataset 'glue' has no split 'validation'"):
        b.task_lines(mt.REGISTRY["glue-mrpc"], DatasetDict(train=_mrpc(3)))
    # too few rows for a test task: nothing is written
    monkeypatch.setitem(HUB, ("super_glue", "cb"), DatasetDict(train=_cb(10), validation=_cb(2)))
    with pytest.raises(b.BuildError, match="superglue-cb: 10 pool / 2 test examples"):
        b.build("toy", tmp_path / "y", load=load, progress=False)
    assert not (tmp_path / "y" / "superglue-cb").exists() and not list((tmp_path / "y").glob(".*.tmp"))


def test_unreachable_hub_fails_at_once_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(SystemExit) as e:
        b.main(["--setting", "class_to_class", "--out", str(tmp_path / "d"), "--no-progress"])
    msg = str(e.value.code)
    assert msg.startswith("error: the Hugging Face hub (http://127.0.0.1:9) is unreachable") and "\n" not in msg
    assert not (tmp_path / "d").exists()


def test_hub_load_names_the_task_and_dataset(monkeypatch):
    import datasets

    def fail(path, config):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(b.BuildError, match=r"^glue-mrpc: cannot load dataset 'glue' \(config 'mrpc'\): "
                                           r"ConnectionError: Couldn't reach 'glue' on the Hub"):
        b.hub_load(mt.REGISTRY["glue-mrpc"])
