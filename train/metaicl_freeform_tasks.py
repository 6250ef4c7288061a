"""MetaICL's free-form tasks from hub datasets: one converter (`TaskSpec`) per task, following MetaICL's
preprocess/{task}.py (from CrossFit).

They are training tasks only: MetaICL writes their 16,384-example pools with no options, the output being the
first of the tab-joined reference answers. proto_qa is not on the hub: MetaICL reads ProtoQA's JSON lines
from GitHub, and so does its spec (`data_files`). The unifiedqa:* free-form tasks are in metaicl_unifiedqa.py.
"""
from __future__ import annotations

from mamlen.train.metaicl_spec import Splits, TaskSpec, answers, one_line

HOLDOUT = Splits(test=None)
PROTO_QA_URL = "https://raw.githubusercontent.com/iesl/protoqa-data/master/data/train/train.jsonl"


def _freebase(r):
    if "RawQuestion" not in r or "Parses" not in r:
        return None
    # Parses.Answers holds, per parse, the answers' names as lists: every name of every parse, deduplicated
    names = {name for parse in r["Parses"]["Answers"] for names in parse["AnswersName"] for name in names}
    return r["RawQuestion"], answers(sorted(names))


def _hotpot(r):
    # the supporting paragraphs only, in context order, each one's sentences joined as they are
    supporting = r["supporting_facts"]["title"]
    context = "".join("".join(sentences) + " " for sentences, title in zip(r["context"]["sentences"],
                                                                          r["context"]["title"])
                      if title in supporting)
    return f"question: {r['question']} context: {context.strip()}", r["answer"]


def _kilt(name: str, config: str) -> TaskSpec:
    return TaskSpec(name, "kilt_tasks", config,
                    lambda r: (one_line(r["input"]), answers(o["answer"] for o in r["output"])))


def _lama(subset: str) -> TaskSpec:
    if subset in ("trex", "google_re"):  # a relation template filled with the subject
        text = lambda r: r["template"].replace("[X]", r["sub_label"]).replace("[Y]", "[MASK]")  # noqa: E731
    else:
        text = lambda r: r["masked_sentence"]  # noqa: E731
    # trex is large: MetaICL keeps only the last 1% as its test part
    return TaskSpec(f"lama-{subset}", "lama", subset, lambda r: (text(r), r["obj_label"]),
                    Splits(test=None, test_from=0.99 if subset == "trex" else None))


def _squad(with_context: bool):
    def convert(r):
        x = f"question: {r['question']}"
        if with_context:
            x += " context: " + r["context"].replace("\t", " ").replace("\n", " ")
        return x, r["answers"]["text"][0]
    return convert


FREE_FORM: tuple[TaskSpec, ...] = (
    TaskSpec("ade_corpus_v2-dosage", "ade_corpus_v2", "Ade_corpus_v2_drug_dosage_relation",
             lambda r: (f"{r['text']} [SEP] {r['drug']}", r["dosage"]), HOLDOUT),
    TaskSpec("freebase_qa", "freebase_qa", None, _freebase),
    TaskSpec("gigaword", "gigaword", None, lambda r: ("summarize: " + r["document"], r["summary"])),
    TaskSpec("hotpot_qa", "hotpot_qa", "distractor", _hotpot),
    _kilt("kilt_ay2", "aidayago2"),
    _kilt("kilt_hotpotqa", "hotpotqa"),
    _kilt("kilt_nq", "nq"),
    _kilt("kilt_trex", "trex"),
    _kilt("kilt_zsre", "structured_zeroshot"),
    *(_lama(s) for s in ("conceptnet", "google_re", "squad", "trex")),
    TaskSpec("proto_qa", "iesl/protoqa-data", None,
             lambda r: (r["question"]["normalized"], answers(r["answers"]["raw"].keys())), HOLDOUT,
             data_files={"train": PROTO_QA_URL}),
    TaskSpec("qa_srl", "qa_srl", None,
             lambda r: (f"question: {' '.join(r['question'])} context: {r['sentence']}", answers(r["answers"]))),
    TaskSpec("quoref", "quoref", None,
             lambda r: (one_line(f"question: {r['question']} context: {r['context']}"), answers(r["answers"]["text"]))),
    TaskSpec("ropes", "ropes", None,
             lambda r: (one_line(f"question: {r['question']} [SEP] situation: {r['situation']} "
                                 f"[SEP] background: {r['background']}"), answers(r["answers"]["text"]))),
    TaskSpec("search_qa", "search_qa", "train_test_val",  # no space before "category:", as in MetaICL
             lambda r: (f"question: {r['question']}category: {r['category']}", r["answer"])),
    TaskSpec("spider", "spider", None, lambda r: (r["question"], r["query"])),
    TaskSpec("squad-no_context", "squad", None, _squad(with_context=False)),
    TaskSpec("squad-with_context", "squad", None, _squad(with_context=True)),
    TaskSpec("superglue-record", "super_glue", "record",
             lambda r: (f"question: {r['query']} context: {one_line(r['passage'])}", r["answers"][0])),
    TaskSpec("tweet_qa", "tweet_qa", None,
             lambda r: (f"question: {r['Question']} context: {r['Tweet']}", answers(r["Answer"]))),
    TaskSpec("web_questions", "web_questions", None, lambda r: (r["question"], answers(r["answers"])), HOLDOUT),
    TaskSpec("wikisql", "wikisql", None, lambda r: (r["question"], r["sql"]["human_readable"].strip())),
    TaskSpec("xsum", "xsum", None, lambda r: ("summarize: " + one_line(r["document"]), r["summary"])),
)
