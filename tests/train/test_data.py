"""MetaICL files, settings, the low-resource option, the episode sampler and the shipped suite."""
import json
import random
import re

import pytest
import torch

from mamlen.core import Task
from mamlen.train import build_suite, data
from mamlen.train.data import DataError, EpisodeSampler
from mamlen.train.instances import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")

GOOD = {"input": "x", "output": "a", "options": ["a", "b"]}


# --- task files --------------------------------------------------------------------------------------
def test_load_task_round_trip(tmp_path, task_writer):
    task_writer(tmp_path, "t", "train", [GOOD, {"input": "y", "output": "free text", "options": []}], k=16, seed=13)
    rows = data.load_task(tmp_path, "t", "train", k=16, seed=13)
    assert rows == [{"task": "t", **GOOD}, {"task": "t", "input": "y", "output": "free text", "options": []}]


@pytest.mark.parametrize("line, line_no, pattern", [
    ('{"task": "t", "input": "x", "output": "a", "options": ["a"]', 2, "malformed JSON"),
    ('{"task": "t", "input": "x", "output": "a"}', 2, "missing field 'options'"),
    ('{"task": "t", "output": "a", "options": []}', 2, "missing field 'input'"),
    ('{"task": "t", "input": "x", "output": "c", "options": ["a", "b"]}', 2, "field 'output' 'c' is not among"),
    ('{"task": "t", "input": 3, "output": "a", "options": []}', 2, "field 'input' must be a string"),
    ('{"task": "t", "input": "x", "output": "a", "options": "a"}', 2, "field 'options' must be a list"),
    ('{"task": "other", "input": "x", "output": "a", "options": []}', 2, "field 'task' is 'other'"),
    ('["not", "an", "object"]', 2, "expected a JSON object"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, task_writer, line, line_no, pattern):
    path = task_writer(tmp_path, "t", "test", [GOOD, line, GOOD])
    with pytest.raises(DataError, match=re.escape(f"{path}:{line_no}: ") + ".*" + pattern):
        data.load_task(tmp_path, "t", "test")


def test_not_utf8(tmp_path, task_writer):
    path = task_writer(tmp_path, "t", "test", [GOOD])
    path.write_bytes(path.read_bytes() + b'{"task": "t", "input": "\xff", "output": "a", "options": []}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + "not UTF-8"):
        data.load_task(tmp_path, "t", "test")


def test_empty_and_missing_task_files(tmp_path, task_writer):
    path = task_writer(tmp_path, "t", "test", ["", "   "])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*empty task file"):
        data.load_task(tmp_path, "t", "test")
    with pytest.raises(DataError, match="no such task file"):
        data.load_task(tmp_path, "t", "test", seed=13)


# --- settings ----------------------------------------------------------------------------------------
def test_load_setting(data_dir):
    s = data.load_setting(data_dir, "toy")
    assert s == {"train": ["echo", "parity"], "test": ["successor"], "unseen_domain_test": []}
    assert data.load_setting(data_dir, str(data_dir / "settings" / "toy.json")) == s  # a path works too


def _setting(tmp_path, text):
    (tmp_path / "settings").mkdir(exist_ok=True)
    p = tmp_path / "settings" / "bad.json"
    p.write_text(text)
    return p


def test_setting_errors(data_dir):
    p = _setting(data_dir, '{\n "train": ["parity"],\n "test": ["nope"]\n}')
    with pytest.raises(DataError, match=re.escape(f"{p}:3: ") + "field 'test': unknown task 'nope'"):
        data.load_setting(data_dir, "bad")
    _setting(data_dir, '{"train": ["parity"],\n "test": [}')
    with pytest.raises(DataError, match=re.escape(f"{p}:2: ") + "malformed JSON"):
        data.load_setting(data_dir, "bad")
    _setting(data_dir, '{"train": [],\n "tests": []}')
    with pytest.raises(DataError, match=re.escape(f"{p}:2: ") + "unknown key 'tests'"):
        data.load_setting(data_dir, "bad")
    _setting(data_dir, '{"train": ["parity"], "test": ["parity"]}')
    with pytest.raises(DataError, match="both a train and a test task"):
        data.load_setting(data_dir, "bad")
    _setting(data_dir, '{"train": "parity"}')
    with pytest.raises(DataError, match="field 'train' must be a list"):
        data.load_setting(data_dir, "bad")
    with pytest.raises(DataError, match="unknown setting 'missing'.*known: bad, toy"):
        data.load_setting(data_dir, "missing")


# --- low resource ------------------------------------------------------------------------------------
def test_load_train_tasks_and_fraction(data_dir):
    full = data.load_train_tasks(data_dir, "toy")
    assert {t: len(v) for t, v in full.items()} == {"echo": 30, "parity": 40}
    low = data.load_train_tasks(data_dir, "toy", fraction=0.1)
    assert {t: len(v) for t, v in low.items()} == {"echo": 3, "parity": 4}
    for t in low:  # a subset, in the original order, the same on every call
        idx = [full[t].index(e) for e in low[t]]
        assert idx == sorted(idx)
    assert low == data.load_train_tasks(data_dir, "toy", fraction=0.1)
    assert {t: len(v) for t, v in data.load_train_tasks(data_dir, "toy", fraction=0.001).items()} == \
        {"echo": 1, "parity": 1}  # never empty
    with pytest.raises(ValueError, match="fraction must be in"):
        data.load_train_tasks(data_dir, "toy", fraction=0)


def test_task_info(data_dir):
    assert data.task_info(data_dir, "parity", data.load_task(data_dir, "parity", "test", k=4))["type"] == \
        "classification"
    assert data.task_info(data_dir, "successor", data.load_task(data_dir, "successor", "test", k=4))["type"] == \
        "multiple-choice"
    (data_dir / "tasks.json").write_text(json.dumps({"parity": {"type": "nli", "domain": "maths"}}))
    assert data.task_info(data_dir, "parity") == {"type": "nli", "domain": "maths"}
    (data_dir / "tasks.json").write_text(json.dumps({"parity": {"type": "poetry"}}))
    with pytest.raises(DataError, match="field 'type' is 'poetry'"):
        data.task_info(data_dir, "parity")


# --- the sampler -------------------------------------------------------------------------------------
def _pools(n_tasks=3, n=40):
    return {f"t{j}": [{"task": f"t{j}", "input": f"t{j}-ex{i}", "output": f"o{i}", "options": []}
                      for i in range(n)] for j in range(n_tasks)}


def _sampler(byte_tok, pools=None, **kw):
    args = dict(tasks_per_step=2, k=3, inner_steps=2, batch_size=2, max_len=512, seed=7)
    args.update(kw)
    return EpisodeSampler(_pools() if pools is None else pools, byte_tok, **args)


def _equal(a, b):
    if isinstance(a, Task):
        return a.name == b.name and all(_equal(x, y) for x, y in zip(a.support, b.support)) and \
            len(a.support) == len(b.support) and _equal(a.query, b.query)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _examples(tok, batch):
    """Example ids ("tJ-exI") in each row of a batch, and the id of each row's query (the one before the target)."""
    rows, queries = [], []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        n = int((ids != tok.pad_token_id).sum())
        text = tok.decode(ids[:n])
        found = re.findall(r"t\d-ex\d+", text)
        rows.append(found)
        queries.append(found[-1])
        target = tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])
        assert target == "o" + found[-1].split("ex")[1]  # the target is the query's output
    return rows, queries


def test_meta_batch_structure_and_disjointness(byte_tok):
    s = _sampler(byte_tok)
    batch = s.meta_batch(0)
    assert len(batch) == 2 and all(isinstance(t, Task) for t in batch)
    assert len({t.name for t in batch}) == 2  # without replacement
    for task in batch:
        assert len(task.support) == 2
        support_ex = set()
        for b in task.support:
            assert b["input_ids"].shape[0] == 2
            rows, queries = _examples(byte_tok, b)
            for row, q in zip(rows, queries):
                assert len(row) == 4 and q not in row[:-1]  # k demos + query, query not among its demos
                assert all(e.startswith(task.name + "-") for e in row)  # one task per Task
            support_ex |= {e for row in rows for e in row}
        rows, _ = _examples(byte_tok, task.query)
        query_ex = {e for row in rows for e in row}
        assert not support_ex & query_ex, "support and query share examples"


def test_small_pools_still_disjoint(byte_tok):
    s = _sampler(byte_tok, pools=_pools(n_tasks=2, n=3), k=4)  # fewer examples than k: demos repeat
    for step in range(5):
        for task in s.meta_batch(step):
            sup = {e for b in task.support for row in _examples(byte_tok, b)[0] for e in row}
            qry = {e for row in _examples(byte_tok, task.query)[0] for e in row}
            assert not sup & qry


def test_sampling_is_a_function_of_seed_and_step(byte_tok):
    a, b = _sampler(byte_tok), _sampler(byte_tok)
    for step in (0, 3, 11):
        assert all(_equal(x, y) for x, y in zip(a.meta_batch(step), b.meta_batch(step)))
    assert not all(_equal(x, y) for x, y in zip(a.meta_batch(0), a.meta_batch(1)))
    c = _sampler(byte_tok, seed=8)
    assert not all(_equal(x, y) for x, y in zip(a.meta_batch(0), c.meta_batch(0)))
    # a rank's share built alone equals the same positions of the whole meta-batch
    full = a.meta_batch(5)
    assert _equal(a.meta_batch(5, indices=[1])[0], full[1])
    # the global RNGs play no part
    torch.manual_seed(123); random.seed(123)
    assert _equal(a.meta_batch(5)[0], full[0])


def test_state_round_trip(byte_tok):
    a = _sampler(byte_tok)
    for _ in range(3):
        a.next_meta_batch()
    sd = json.loads(json.dumps(a.state_dict()))  # checkpoints may store it as JSON
    b = _sampler(byte_tok)
    b.load_state_dict(sd)
    assert b.step == 3
    assert all(_equal(x, y) for x, y in zip(a.next_meta_batch(), b.next_meta_batch()))
    c = _sampler(byte_tok, batch_size=3)
    with pytest.raises(ValueError, match="config.batch_size differs"):
        c.load_state_dict(sd)
    with pytest.raises(KeyError, match="step"):
        b.load_state_dict({"seed": 7})


def test_metaicl_batch(byte_tok):
    s = _sampler(byte_tok)
    batches = s.metaicl_batch(4)
    names = s.step_tasks(4)
    assert [t.name for t in s.meta_batch(4)] == names
    assert len(batches) == 2
    for name, b in zip(names, batches):
        assert b["input_ids"].shape[0] == (2 + 1) * 2  # the token budget of a Task
        rows, _ = _examples(byte_tok, b)
        assert all(e.startswith(name + "-") for row in rows for e in row)


def test_more_tasks_per_step_than_tasks(byte_tok):
    s = _sampler(byte_tok, pools=_pools(n_tasks=2), tasks_per_step=5)
    assert len(s.meta_batch(0)) == 5


def test_sampler_errors(byte_tok):
    with pytest.raises(ValueError, match="'t0' has 1 example"):
        _sampler(byte_tok, pools=_pools(n_tasks=1, n=1))
    with pytest.raises(ValueError, match="inner_steps must be >= 1"):
        _sampler(byte_tok, inner_steps=0)
    with pytest.raises(ValueError, match="no training tasks"):
        _sampler(byte_tok, pools={})


def test_batches_feed_a_model(tiny):
    model, tok = tiny
    s = EpisodeSampler(_pools(), tok, tasks_per_step=1, k=2, inner_steps=1, batch_size=2, max_len=128)
    task = s.meta_batch(0)[0]
    with torch.no_grad():
        loss = model(**task.query).loss
    assert torch.isfinite(loss) and loss > 0


# --- the shipped suite -------------------------------------------------------------------------------
SETTINGS = ["hr_to_lr", "class_to_class", "non_class_to_class", "qa_to_qa", "non_qa_to_qa", "non_nli_to_nli",
            "non_paraphrase_to_paraphrase"]


def test_shipped_suite():
    root = data.DEFAULT_DATA_DIR
    meta = json.loads((root / "tasks.json").read_text())
    assert len(meta) >= 40
    assert {m["type"] for m in meta.values()} == set(data.TASK_TYPES)
    unseen = {t for t, m in meta.items() if m["domain"] in ("unicode", "geography")}
    for name in SETTINGS:
        s = data.load_setting(root, name)
        assert s["train"] and s["test"] and s["unseen_domain_test"], name
        assert not set(s["train"]) & set(s["test"] + s["unseen_domain_test"])
        assert not set(s["train"]) & unseen  # unseen domains are never trained on
        assert all(meta[t]["type"] != "generation" for t in s["test"] + s["unseen_domain_test"])
    types = lambda ts: {meta[t]["type"] for t in ts}  # noqa: E731
    assert types(data.load_setting(root, "qa_to_qa")["test"]) == {"multiple-choice"}
    assert types(data.load_setting(root, "non_qa_to_qa")["train"]) == set(data.TASK_TYPES) - {"multiple-choice"}
    assert types(data.load_setting(root, "non_nli_to_nli")["test"]) == {"nli"}
    assert types(data.load_setting(root, "non_paraphrase_to_paraphrase")["test"]) == {"paraphrase"}
    assert types(data.load_setting(root, "class_to_class")["train"]) <= set(data.CLASSIFICATION_TYPES)
    assert not types(data.load_setting(root, "non_class_to_class")["train"]) & set(data.CLASSIFICATION_TYPES)


def test_shipped_test_tasks_files():
    root = data.DEFAULT_DATA_DIR
    meta = json.loads((root / "tasks.json").read_text())
    for task, m in meta.items():
        pool = data.load_task(root, task, "train", k=data.TRAIN_POOL_K)
        assert 32 <= len(pool) <= 300
        if m["type"] == "generation":
            continue
        tests = [data.load_task(root, task, "test", seed=s) for s in (100, 13, 21, 42, 87)]
        assert all(t == tests[0] for t in tests) and 20 <= len(tests[0]) <= build_suite.TEST_CAP
        assert not {e["input"] for e in pool} & {e["input"] for e in tests[0]}  # test queries unseen in training
        for seed in (100, 13, 21, 42, 87):
            demos = data.load_task(root, task, "train", seed=seed)
            assert len(demos) == 16
            # 16-shot prompts stay short: ~4 characters per token, far below 1024 tokens
            chars = sum(len(d["input"]) + len(d["output"]) + 4 for d in demos)
            assert chars < 3000, (task, seed, chars)
