"""bench/replicate.py: the plans pair MetaICL and MAML-en-LLM runs on equal token budgets over >= 3 seeds, >= 2
settings, the 10% variant and the paper's ablations; one smoke run goes end to end (tiny GPT-2) into a JSON the
report reads, and a finished run is skipped."""
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_replicate", Path(__file__).resolve().parents[2] / "bench" / "replicate.py")
rep = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = rep  # dataclasses look their module up while the file executes
_spec.loader.exec_module(rep)


def _pairs(plan):
    trained = [r for r in plan.runs if r.method != "none" and r.group in ("main", "low_resource")]
    by = {}
    for r in trained:
        by.setdefault((r.group, r.setting, r.seed, r.fraction), {})[r.method] = r
    return by


@pytest.mark.parametrize("name", ["cpu", "paper"])
def test_plan_covers_the_protocol(name, tmp_path):
    plan = rep.build_plan(name)
    names = [r.name for r in plan.runs]
    assert len(names) == len(set(names)), "run names must be unique (one JSON each)"
    main = [r for r in plan.runs if r.group == "main"]
    settings = {r.setting for r in main}
    assert len(settings) >= 2, settings
    for s in settings:
        for m in ("metaicl", "maml-en-llm"):
            assert len({r.seed for r in main if r.setting == s and r.method == m}) >= 3, (s, m)
        assert any(r.group == "base" and r.setting == s for r in plan.runs), f"no base row for {s}"
        assert {"unseen", "domain", "adapt"} <= set(plan.evals[s]), plan.evals[s]
    low = [r for r in plan.runs if r.group == "low_resource"]
    assert {r.method for r in low} == {"metaicl", "maml-en-llm"} and all(r.fraction == 0.1 for r in low)
    assert len({r.seed for r in low}) >= 3
    variants = {r.variant for r in plan.runs if r.group == "ablation"}
    assert variants == {v for v, _, _ in rep.ABLATIONS}
    overrides = {k: v for r in plan.runs if r.group == "ablation" for k, v in r.overrides}
    assert {"engine.moments", "engine.inner_optimizer", "train.tasks_per_step", "engine.hvp"} <= set(overrides)
    assert {dict(r.overrides).get("train.tasks_per_step") for r in plan.runs if r.variant.startswith("states")} \
        == {1, 4}  # with the default of 2: exploration states 1 / 2 / 4
    assert {dict(r.overrides)["engine.hvp"] for r in plan.runs if "engine.hvp" in dict(r.overrides)} \
        == {"fd", "first_order"}  # with the default exact
    assert any(r.curve for r in plan.runs)
    if name == "paper":
        assert all(s.k == 16 and len(s.seeds) == 5 for e in plan.evals.values() for s in e.values())
    # equal budgets between the two methods of every pair, and the run's config matches its row
    for key, pair in _pairs(plan).items():
        assert set(pair) == {"metaicl", "maml-en-llm"}, key
        cfgs = {m: rep.run_config(plan, r, tmp_path) for m, r in pair.items()}
        assert rep.budget(cfgs["metaicl"]) == rep.budget(cfgs["maml-en-llm"]), key
        for m, c in cfgs.items():
            assert (c.train.method, c.data.setting, c.train.seed, c.data.fraction) == (m, key[1], key[2], key[3])


def test_paired_runs_see_equal_tokens():
    from mamlen.train import models

    plan = rep.build_plan("smoke")
    tok = models.byte_tokenizer()
    for key, pair in _pairs(plan).items():
        counts = {m: rep.count_tokens(rep.run_config(plan, r, Path("unused")), tok) for m, r in pair.items()}
        a, b = counts["metaicl"], counts["maml-en-llm"]
        assert a["sequences"] == b["sequences"], (key, counts)
        # the same tasks and number of sequences; the examples drawn differ, so tokens agree only roughly
        assert abs(a["input_tokens"] - b["input_tokens"]) <= 0.2 * b["input_tokens"], (key, counts)


def test_smoke_run_end_to_end(tmp_path):
    plan = rep.build_plan("smoke")
    results, work = tmp_path / "replication", tmp_path / "work"
    chosen = [r for r in plan.runs if r.name in ("base-class_to_class", "class_to_class-maml-en-llm-s0")]
    assert len(chosen) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in chosen:
            rep.execute(plan, r, results, work, log=lambda m: None)
    rec = json.loads((results / "class_to_class-maml-en-llm-s0.json").read_text())
    assert rec["status"] == 0 and set(rec["evals"]) == {"unseen", "domain", "adapt"}
    assert rec["evals"]["adapt"]["config"]["adapt_steps"] == 1
    assert rec["tokens"]["sequences"] == rec["budget"]["sequences"]
    assert [s for s, *_ in rec["losses"]] == [1, 2] and rec["compute"]["train_cpu_s"] > 0
    assert [p[0] for p in rec["curve"]] == [1, 2], "the curve run evaluates every step in the smoke plan"
    assert not list((work / "class_to_class-maml-en-llm-s0").glob("ckpt-*")), "checkpoints are removed"
    # a finished run is skipped: the JSON is returned untouched
    mtime = (results / "class_to_class-maml-en-llm-s0.json").stat().st_mtime_ns
    assert rep.execute(plan, chosen[1], results, work, log=lambda m: None)["date"] == rec["date"]
    assert (results / "class_to_class-maml-en-llm-s0.json").stat().st_mtime_ns == mtime
    text = rep.report(results)
    assert "| MAML-en-LLM |" in text and "| no meta-training |" in text
    assert (tmp_path / "replication.md").read_text() == text and (tmp_path / "replication.png").is_file()
