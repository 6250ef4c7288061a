"""The trainer end to end on the tiny preset (in process): exact resume, fallback from a damaged checkpoint,
non-finite steps skipped with nothing changed, and the consecutive-skip limit."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mamlen.train import evaluate, meta

TINY = ["--preset", "tiny", "--set", "log.tensorboard=false"]


def run(out, steps, *extra):
    return meta.main([*TINY, "--output-dir", str(out), "--max-steps", str(steps), *extra])


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_numbers(rec):  # timing and memory differ between runs; everything computed must not
    return {k: v for k, v in rec.items() if k not in ("tokens_per_s", "step_s", "peak_mem_gb")}


def tensors(ckpt):
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "optimizer.safetensors"))}


def assert_equal_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_is_exact_and_skips_a_truncated_checkpoint(tmp_path, capsys):
    # uninterrupted, with evaluation on: evaluating must not change the run either
    a = tmp_path / "a"
    assert run(a, 4, "--set", "checkpoint.every=2", "--set", "eval.every=2", "--set", "eval.before=true",
               "--set", "eval.after=true", "--set", "eval.max_queries=2",
               "--set", "eval.tasks=[noun_category,verb_transitivity]") == 0
    printed = capsys.readouterr().out
    assert "before vs after" in printed and "macro mean" in printed and "gold NLL" in printed
    assert "bootstrap interval over 2 tasks x 4 queries" in printed  # the per-query values of both evaluations
    tags = [json.loads(line)["tag"] for line in (a / "eval.jsonl").read_text().splitlines()]
    assert tags == ["before", "periodic", "periodic"]  # step 4's periodic evaluation doubles as "after"

    # stopped after step 3, with the checkpoint of step 3 damaged on disk: resumes from step 2
    b = tmp_path / "b"
    assert run(b, 3, "--set", "checkpoint.every=2") == 0
    assert [m["step"] for m in metrics(b)] == [1, 2, 3]
    f = b / "ckpt-00000003" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    capsys.readouterr()
    assert run(b, 4, "--set", "checkpoint.every=2") == 0
    printed = capsys.readouterr().out
    assert "ckpt-00000003 is unusable" in printed and "truncated" in printed
    assert "resumed from" in printed and "ckpt-00000002 at step 2" in printed

    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]  # the lines past the checkpoint were rewritten, not added
    assert [same_numbers(m) for m in ma] == [same_numbers(m) for m in mb]
    assert all(set(m) >= {"step", "loss", "support_loss", "grad_norm", "inner_lr", "outer_lr", "tokens_per_s",
                          "peak_mem_gb", "skipped"} for m in ma)
    # throughput counts every token the model read, not only the supervised ones
    assert all(m["input_tokens"] > m["tokens"] > 0 and m["tokens_per_s"] == m["input_tokens"] / m["step_s"]
               for m in ma)
    assert_equal_tensors(tensors(a / "ckpt-00000004"), tensors(b / "ckpt-00000004"))

    # already at max_steps: nothing to do, nothing changes
    assert run(b, 4, "--set", "checkpoint.every=2") == 0
    assert len(metrics(b)) == 4


@pytest.mark.slow
def test_nan_step_is_skipped_and_the_skip_limit_stops(tmp_path, capsys):
    out = tmp_path / "nan"
    status = run(out, 6, "--set", "checkpoint.every=1", "--set", "checkpoint.keep=5",
                 "--set", "train.nan_steps=[2,3]", "--set", "train.max_consecutive_skips=2")
    assert status == 1
    printed = capsys.readouterr().out
    assert "stopping at step 3: 2 consecutive steps had a non-finite loss" in printed
    assert "max_consecutive_skips=2" in printed
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3]
    assert [r["skipped"] for r in m] == [False, True, True]
    assert m[1]["loss"] is None  # NaN is written as null: the file stays strict JSON
    # step 2 was skipped: weights, moments and the optimizer step are exactly those after step 1
    assert_equal_tensors(tensors(out / "ckpt-00000001"), tensors(out / "ckpt-00000002"))
    opt = lambda s: json.loads((out / f"ckpt-0000000{s}" / "manifest.json").read_text())  # noqa: E731
    assert opt(2)["step"] == 2
    from safetensors import safe_open
    steps = [safe_open(str(out / f"ckpt-0000000{s}" / "optimizer.safetensors"), "pt").metadata()["step"]
             for s in (1, 2)]
    assert steps == ["1", "1"]
    assert not (out / "ckpt-00000003").exists()  # the stopping step is not saved


def test_metaicl_baseline_runs_and_resume_flag(tmp_path, capsys):
    out = tmp_path / "icl"
    with pytest.raises(SystemExit, match="--resume: no usable checkpoint"):
        run(out, 2, "--resume")
    assert run(out, 2, "--set", "train.method=metaicl", "--set", "log.tensorboard=true") == 0
    assert list((out / "tb").glob("events.out.tfevents.*"))
    m = metrics(out)
    assert [r["step"] for r in m] == [1, 2] and not any(r["skipped"] for r in m)
    assert m[0]["loss"] == m[0]["support_loss"]  # MetaICL has no inner step: one loss
    assert run(out, 3, "--set", "train.method=metaicl", "--resume") == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_bad_names_are_refused_before_training(tmp_path):
    with pytest.raises(SystemExit, match=r"eval.tasks: \['no_such_task'\] not found"):
        run(tmp_path / "x", 2, "--set", "eval.after=true", "--set", "eval.tasks=[no_such_task]")
    with pytest.raises(SystemExit, match="no_such_setting"):
        run(tmp_path / "x", 2, "--set", "data.setting=no_such_setting")
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_side_by_side_shows_score_and_gold_nll_changes():
    before = {"tasks": {"t1": 0.5, "t2": 0.25}, "nll": {"t1": 1.5, "t2": 2.0},
              "macro": {"mean": 0.375, "worst": 0.25, "nll": 1.75, "margin": -0.5}}
    after = {"tasks": {"t1": 0.75, "t2": 0.25}, "nll": {"t1": 1.25, "t2": 2.5},
             "macro": {"mean": 0.5, "worst": 0.25, "nll": 1.875, "margin": -0.25}}
    rows = {line.split()[0]: line.split() for line in meta.side_by_side(before, after).splitlines()[1:3]}
    assert [float(x) for x in rows["t1"][1:]] == [0.5, 0.75, 0.25, 1.5, 1.25, -0.25]
    assert [float(x) for x in rows["t2"][1:]] == [0.25, 0.25, 0.0, 2.0, 2.5, 0.5]
    text = meta.side_by_side(before, after)
    assert "+0.1250" in text and "+0.2500" in text  # macro NLL change, margin change
    # an evaluation logged before NLL was recorded (a resumed old run) shows its scores and nan for NLL
    old = {"tasks": {"t1": 0.5, "t2": 0.25}, "macro": {"mean": 0.375, "worst": 0.25}}
    assert "nan" in meta.side_by_side(old, after).splitlines()[1]


def test_paired_changes_pair_each_query_with_itself():
    # two tasks with different query counts; after = before + a per-query change whose macro mean is known
    nll_b = {"t1": [1.0, 2.0, 3.0], "t2": [0.5, 0.5]}
    change = {"t1": [-0.5, -0.25, 0.0], "t2": [0.25, -0.75]}
    macro = ((-0.75 / 3) + (-0.5 / 2)) / 2
    before = {"tasks": {"t1": 0.5, "t2": 0.5},
              "queries": {t: {"nll": v, "margin": [0.0] * len(v)} for t, v in nll_b.items()}}
    after = {"tasks": {"t1": 0.5, "t2": 0.5},
             "queries": {t: {"nll": [x + d for x, d in zip(v, change[t])], "margin": [0.125] * len(v)}
                         for t, v in nll_b.items()}}
    lines = meta.paired_changes(before, after)
    assert "2 tasks x 5 queries" in lines[0]
    nll = [float(x.strip("[],")) for x in lines[1].split()[2:5]]
    assert nll[0] == pytest.approx(macro) and nll[1] < macro < nll[2]
    assert lines[2].split()[1:4] == ["+0.1250", "[+0.1250,", "+0.1250]"]  # a constant change: no spread
    # an old evaluation without per-query values, or different queries: no interval rather than a wrong one
    assert meta.paired_changes({"tasks": before["tasks"]}, after) == []
    fewer = {**before, "queries": {**before["queries"], "t2": {"nll": [0.5], "margin": [0.0]}}}
    assert meta.paired_changes(fewer, after) == []
    assert evaluate.seed_mean([[1.0, 2.0], [3.0, 5.0]]) == [2.0, 3.5]
