"""train/build_metaicl_data.py and train/metaicl_tasks.py on small local `datasets.Dataset`s (no network):
- every converter maps every label index to one of the task's MetaICL options;
- exact MetaICL strings for the converters with special cases;
- splits and k-shot samples equal an independent replay of MetaICL's numpy shuffles;
- the written directory loads with train/data.py and feeds the episode sampler;
- an unreachable hub, a missing converter and a bad row are reported by name."""
import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from mamlen.train import build_metaicl_data as b
from mamlen.train import data, metaicl_tasks as mt

LABEL_FIELD = {"circa": "goldstandard2", "climate_fever": "claim_label", "hate_speech_offensive": "class",
               "trec": "label-coarse", "trec-finegrained": "label-fine", "yahoo_answers_topics": "topic",
               **{t: t.split("-", 1)[1] for t in mt.REGISTRY if t.startswith("ethos-")}}
SPECIAL = {"google_wellformed_query", "hatexplain", "kilt_fever", "scitail"}  # no label index: tested below


def test_settings_and_coverage():
    assert len(mt.SETTINGS) == 7 and len(mt.TASK_INFO) == 142
    s = mt.SETTINGS["class_to_class"]
    assert (len(s["train"]), len(s["test"]), len(s["unseen_domain_test"])) == (43, 20, 4)
    assert set(s["unseen_domain_test"]) <= set(s["test"]) and not set(s["train"]) & set(s["test"])
    for setting in ("class_to_class", "non_nli_to_nli", "non_paraphrase_to_paraphrase"):
        assert mt.missing(setting) == [], setting
    assert len(mt.missing("hr_to_lr")) == 43 and "piqa" in mt.missing("hr_to_lr")
    assert "class_to_class: converters for 63 of 63 tasks" in b.listing()


class Row(dict):
    """A row whose text fields are '<field>' and whose label field is `label`."""

    def __init__(self, label_field, label):
        super().__init__({label_field: label})

    def __missing__(self, key):
        return f"<{key}>"


@pytest.mark.parametrize("task", sorted(set(mt.REGISTRY) - SPECIAL))
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
        ex = mt.preprocess(task, pair)
        assert ex["output"] in mt.TASK_INFO[task]["options"]
        assert "<" in ex["input"] and ex["input"] == ex["input"].strip()
        outputs.append(ex["output"])
    assert len(outputs) >= 2 and len(set(outputs)) == len(outputs), outputs  # distinct label names
    if task != "tweet_eval-irony":  # MetaICL lists "0", "1" among its options, which no row produces
        assert sorted(outputs) == sorted(mt.TASK_INFO[task]["options"])


def convert(task, **row):
    pair = mt.REGISTRY[task].convert(row)
    return None if pair is None else mt.preprocess(task, pair)


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
    with pytest.raises(mt.ConversionError, match="'maybe' is not among the task's options"):
        convert("scitail", sentence1="a", sentence2="b", gold_label="maybe")


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
    monkeypatch.setitem(mt.SETTINGS, "toy", {"train": ["glue-mrpc", "trec"], "test": ["superglue-cb"],
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
    for seed in mt.TEST_SEEDS:
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


def test_errors_name_what_is_wrong(tmp_path, toy, monkeypatch):
    load, _ = toy
    with pytest.raises(b.BuildError, match=r"hr_to_lr: no converter yet for 43 of its tasks \(ai2_arc, .*--skip-missing"):
        b.build("hr_to_lr", tmp_path / "x", load=load)
    with pytest.raises(b.BuildError, match="unknown"):
        b.build("no_such_setting", tmp_path / "x", load=load)
    # a row the converter cannot read: task, split, row index and the missing field
    bad = DatasetDict(train=Dataset.from_dict({"sentence1": ["a", "b"], "sentence_2": ["c", "d"], "label": [0, 1]}),
                      validation=_mrpc(2))
    with pytest.raises(mt.ConversionError, match=r"glue-mrpc: split 'train', row 0: KeyError: 'sentence2'"):
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
