"""Evaluation: cached scoring equals full sequences, the protocol's arithmetic, adaptation, the CLI."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from mamlen.train import data, evaluate, instances, metrics, models

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


def ex(i, o, opts):
    return {"task": "t", "input": i, "output": o, "options": opts}


DEMOS = [ex(f"demo number {i} says", "yes" if i % 2 else "no", ["yes", "no"]) for i in range(5)]
# options of one token ("y" with the byte tokenizers) and of several
QUERIES = [ex("short q", "yes", ["yes", "no", "maybe so"]), ex("a much longer query " * 3, "no", ["no", "yes"]),
           ex("q3", "y", ["y", "n", "no"])]


@pytest.fixture(scope="module")
def tiny_llama():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.load_model("tiny-llama")


def _reference(model, tok, demos, queries, method, max_len):
    out = []
    for q in queries:
        row = []
        for o in q["options"]:
            inst = instances.build_instance(tok, demos, q, method=method, target=o, max_len=max_len)
            with torch.no_grad():
                row.append(model(**instances.collate([inst], tok.pad_token_id)).loss.item())
        out.append(row)
    return out


# max_len: 1024 no cut, 120 cuts into the demonstrations, 30 into the query itself
@pytest.mark.parametrize("which, method, max_len", [("tiny", "direct", 1024), ("tiny", "channel", 120),
                                                    ("tiny_llama", "direct", 30), ("tiny_llama", "channel", 1024),
                                                    ("tiny_llama", "direct", 120)])
def test_cached_batched_scores_equal_full_sequences(request, which, method, max_len):
    model, tok = request.getfixturevalue(which)
    got = evaluate.score_options(model, tok, DEMOS, QUERIES, method=method, max_len=max_len, batch_size=2)
    ref = _reference(model, tok, DEMOS, QUERIES, method, max_len)
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, abs=1e-5)


def test_batch_size_does_not_change_scores(tiny_llama):
    model, tok = tiny_llama
    ref = evaluate.score_options(model, tok, DEMOS, QUERIES, batch_size=1)
    for bs in (2, 3, 64):
        got = evaluate.score_options(model, tok, DEMOS, QUERIES, batch_size=bs)
        for g, r in zip(got, ref):
            assert g == pytest.approx(r, abs=1e-5)


def test_query_scores_by_hand():
    qs = [ex("a", "no", ["yes", "no", "maybe"]), ex("b", "yes", ["yes", "no"]), ex("c", "no", ["no", "yes"])]
    losses = [[1.0, 1.5, 3.0], [0.2, 0.7], [2.0, 2.0]]
    r = evaluate.query_scores(losses, qs)
    assert r.nll == [1.5, 0.2, 2.0]
    assert r.margin == [pytest.approx(-0.5), pytest.approx(0.5), 0.0]  # best wrong − gold: > 0 prefers the gold
    assert r.correct == [False, True, True]  # a tie goes to the first option, here the gold
    with pytest.raises(data.DataError, match="single option"):
        evaluate.query_scores([[1.0]], [ex("d", "x", ["x"])])


def test_continuous_metric_and_per_query(data_dir, tiny, monkeypatch):
    """nll / margin per seed, task and macro are the means of the per-query values, which follow the losses."""
    model, tok = tiny

    def fake_scores(model, tok, demos, queries, **kw):  # loss of option j of query i: i + j (+ 1 for the gold)
        return [[i + j + (o == q["output"]) for j, o in enumerate(q["options"])] for i, q in enumerate(queries)]

    monkeypatch.setattr(evaluate, "score_options", fake_scores)
    res = evaluate.evaluate(model, tok, data_dir, ["parity", "successor"], k=4, seeds=(100, 13), per_query=True,
                            progress=False)
    for task in ("parity", "successor"):
        tests = data.read_jsonl(data.task_file(data_dir, task, "test", 4, 100), task)
        want_nll = [i + q["options"].index(q["output"]) + 1 for i, q in enumerate(tests)]
        want_margin = [min(i + j for j, o in enumerate(q["options"]) if o != q["output"]) - g
                       for (i, q), g in zip(enumerate(tests), want_nll)]
        pq = res["per_query"][task]
        assert set(pq) == {"100", "13"}
        assert pq["100"]["nll"] == want_nll and pq["100"]["margin"] == pytest.approx(want_margin)
        r = res["tasks"][task]
        assert r["nll"]["13"] == pytest.approx(sum(want_nll) / len(want_nll))
        assert r["margin_mean"] == pytest.approx(sum(want_margin) / len(want_margin))
    assert res["macro"]["nll"] == pytest.approx((res["tasks"]["parity"]["nll_mean"]
                                                 + res["tasks"]["successor"]["nll_mean"]) / 2)
    assert "per_query" not in evaluate.evaluate(model, tok, data_dir, ["parity"], k=4, seeds=(100,), progress=False)


def test_zero_shot_scores(tiny):
    model, tok = tiny
    got = evaluate.score_options(model, tok, [], QUERIES, batch_size=3)
    for g, r in zip(got, _reference(model, tok, [], QUERIES, "direct", 1024)):
        assert g == pytest.approx(r, abs=1e-5)


def test_protocol_arithmetic(data_dir, tiny, monkeypatch):
    """With the scores fixed, the per-seed metric, mean, worst and macro follow by hand."""
    model, tok = tiny
    seen = []

    def fake_scores(model, tok, demos, queries, **kw):
        seen.append(len(demos))
        # parity queries 50..55 (gold yes,no,yes,...): predict "yes" always (losses: yes 0, no 1)
        # successor: right on the first two queries only
        if queries[0]["task"] == "parity":
            return [[0.0, 1.0] for _ in queries]
        return [[0.0 if (o == q["output"]) == (i < 2) else 1.0 for o in q["options"]] for i, q in enumerate(queries)]

    monkeypatch.setattr(evaluate, "score_options", fake_scores)
    res = evaluate.evaluate(model, tok, data_dir, ["parity", "successor"], k=4, seeds=(100, 13), progress=False)
    f1 = metrics.macro_f1(["yes"] * 6, ["yes", "no"] * 3)
    assert f1 == pytest.approx(1 / 3)  # yes: 2*3/(2*3+3) = 2/3, no: 0
    p, s = res["tasks"]["parity"], res["tasks"]["successor"]
    assert (p["metric"], s["metric"]) == ("macro_f1", "accuracy")
    assert p["seeds"] == {"100": pytest.approx(f1), "13": pytest.approx(f1)}
    # successor (6 queries): the first two right, the other four pick another option
    assert s["mean"] == pytest.approx(2 / 6) and s["worst"] == pytest.approx(2 / 6)
    assert res["macro"]["mean"] == pytest.approx((f1 + 2 / 6) / 2)
    assert seen == [4, 4, 4, 4]


def test_end_to_end_real_model(data_dir, tiny):
    model, tok = tiny
    res = evaluate.evaluate(model, tok, data_dir, ["parity", "successor"], k=4, seeds=(100, 13), batch_size=4,
                            progress=False)
    for task in ("parity", "successor"):
        r = res["tasks"][task]
        assert set(r["seeds"]) == {"100", "13"}
        assert all(0 <= v <= 1 for v in r["seeds"].values())
        assert r["worst"] == min(r["seeds"].values())
        assert r["mean"] == pytest.approx(sum(r["seeds"].values()) / 2)
        assert r["n_queries"] == 6
    # k = 0: the same queries for every seed, so the seeds agree
    zs = evaluate.evaluate(model, tok, data_dir, ["parity"], k=0, seeds=(100, 13), progress=False)
    assert len(set(zs["tasks"]["parity"]["seeds"].values())) == 1
    # fewer demonstrations than the files hold: the first k of them
    assert evaluate.evaluate(model, tok, data_dir, ["parity"], k=2, seeds=(100,), progress=False)


def test_adaptation_restores_weights(data_dir, tiny):
    model, tok = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = evaluate.evaluate(model, tok, data_dir, ["parity"], k=4, seeds=(100,), progress=False)
    adapted = evaluate.evaluate(model, tok, data_dir, ["parity"], k=4, seeds=(100,), adapt_steps=2,
                                adapt_lr=1e-2, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert adapted["config"]["adapt_steps"] == 2
    assert 0 <= adapted["tasks"]["parity"]["mean"] <= 1
    assert plain["tasks"]["parity"]["mean"] == evaluate.evaluate(
        model, tok, data_dir, ["parity"], k=4, seeds=(100,), progress=False)["tasks"]["parity"]["mean"]


def test_adapt_changes_the_model_by_full_batch_adamw(tiny):
    model, tok = tiny
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        loss_before = _reference(model, tok, DEMOS[1:], [DEMOS[0]], "direct", 1024)[0][DEMOS[0]["options"].index("no")]
        evaluate.adapt(model, tok, DEMOS, steps=3, lr=1e-3, batch_size=2)
        loss_after = _reference(model, tok, DEMOS[1:], [DEMOS[0]], "direct", 1024)[0][DEMOS[0]["options"].index("no")]
        assert loss_after < loss_before  # fitting the demonstrations lowers their loss
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])


def test_errors(data_dir, tiny, task_writer):
    model, tok = tiny
    task_writer(data_dir, "gen", "test", [{"input": "a", "output": "b", "options": []}])
    task_writer(data_dir, "gen", "train", [{"input": "a", "output": "b", "options": []}] * 16)
    with pytest.raises(data.DataError, match=r"gen_16_100_test.jsonl:1: field 'options' is empty"):
        evaluate.evaluate(model, tok, data_dir, ["gen"], seeds=(100,), progress=False)
    with pytest.raises(data.DataError, match="no such task file, and no parity_K_100_train.jsonl with K >= k=16"):
        evaluate.evaluate(model, tok, data_dir, ["parity"], k=16, seeds=(100,), progress=False)
    task_writer(data_dir, "short", "test", [{"input": "a", "output": "b", "options": ["b"]}], k=4)
    task_writer(data_dir, "short", "train", [{"input": "a", "output": "b", "options": ["b"]}] * 3, k=4)
    with pytest.raises(data.DataError, match="short_4_100_train.jsonl: 3 demonstrations, k=4 requested"):
        evaluate.evaluate(model, tok, data_dir, ["short"], k=4, seeds=(100,), progress=False)
    with pytest.raises(data.DataError, match="no such task file"):
        evaluate.evaluate(model, tok, data_dir, ["parity"], k=4, seeds=(5,), progress=False)


def test_cli_writes_results(data_dir, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    evaluate.main(["--model", "tiny-gpt2", "--data-dir", str(data_dir), "--setting", "toy", "--k", "4",
                   "--seeds", "100,13", "--output", str(out), "--no-progress", "--batch-size", "4"])
    res = json.loads(out.read_text())
    assert set(res) == {"tasks", "macro", "config"}
    assert list(res["tasks"]) == ["successor"]
    assert set(res["tasks"]["successor"]) >= {"seeds", "mean", "worst", "type", "metric"}
    assert 0 <= res["macro"]["mean"] <= 1 and 0 <= res["macro"]["worst"] <= res["macro"]["mean"]
    assert res["config"]["model"] == "tiny-gpt2" and res["config"]["seeds"] == [100, 13]
    printed = capsys.readouterr().out
    assert "successor" in printed and "macro (1 tasks)" in printed
    assert not list(out.parent.glob("*.tmp"))  # written atomically


def test_cli_per_query_file(data_dir, tmp_path):
    import gzip

    pq = tmp_path / "pq.json.gz"
    res = evaluate.main(["--model", "tiny-gpt2", "--data-dir", str(data_dir), "--tasks", "parity", "--k", "4",
                         "--seeds", "100,13", "--per-query", str(pq), "--no-progress"])
    got = json.loads(gzip.decompress(pq.read_bytes()))
    assert got["config"]["seeds"] == [100, 13] and set(got["per_query"]["parity"]) == {"100", "13"}
    seed = got["per_query"]["parity"]["100"]
    assert len(seed["nll"]) == len(seed["margin"]) == len(seed["correct"]) == res["tasks"]["parity"]["n_queries"]
    assert sum(seed["nll"]) / len(seed["nll"]) == pytest.approx(res["tasks"]["parity"]["nll"]["100"])


def test_cli_as_a_script_on_the_shipped_suite(tmp_path):
    out = tmp_path / "r.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / "evaluate.py"), "--model", "tiny-gpt2", "--setting",
         "non_nli_to_nli", "--split", "unseen_domain_test", "--k", "2", "--seeds", "100", "--max-queries", "3",
         "--method", "channel", "--output", str(out)],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res["tasks"]) == ["nli_city_country"] and res["tasks"]["nli_city_country"]["n_queries"] == 3


def test_cli_argument_errors(data_dir, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--data-dir", str(data_dir)])  # neither --setting nor --tasks
    with pytest.raises(SystemExit):
        evaluate.main(["--data-dir", str(data_dir), "--tasks", "parity", "--seeds", "1,x"])
    with pytest.raises(SystemExit, match="error: unknown setting"):  # one line, before the model loads
        evaluate.main(["--data-dir", str(data_dir), "--setting", "nope", "--model", "tiny-gpt2"])


@pytest.mark.parametrize("hvp", ["exact", "fd"])
def test_scores_unchanged_under_the_engines_attention(hvp):
    """Evaluation during training runs on the model as the engine leaves it (since the per-pass attention choice
    that is SDPA, the tiled attention being installed only inside second-order passes): the cached, padded,
    position-shifted scoring must give the same scores there as on full sequences."""
    from mamlen.core import MetaConfig, MetaEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = models.load_model("tiny-llama")
    ref = _reference(model, tok, DEMOS, QUERIES, "direct", 1024)
    MetaEngine(model, MetaConfig(hvp=hvp))
    got = evaluate.score_options(model, tok, DEMOS, QUERIES, batch_size=2)
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, abs=1e-5)
