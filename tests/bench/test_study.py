"""bench/study.py: the plans (arms, seeds, equal budgets), a smoke plan end to end on a tiny GPT-2 (resumable,
skips finished runs, refuses a dirty tree, records the commit), and the paired analysis on per-query files with a
known answer."""
import gzip
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")
_spec = importlib.util.spec_from_file_location("bench_study", Path(__file__).resolve().parents[2] / "bench" / "study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = study  # dataclasses look their module up while the file executes
_spec.loader.exec_module(study)


@pytest.fixture
def one_thread():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_main_plan_arms_and_budgets(tmp_path):
    plan = study.build_plan("main")
    names = [r.name for r in plan.runs]
    assert len(names) == len(set(names))
    seeds = {a: {r.seed for r in plan.runs if r.arm == a} for a in study.ARMS if a != "base"}
    assert all(len(s) >= 5 for s in seeds.values()), seeds
    assert sum(r.arm == "base" for r in plan.runs) == 1
    cfg = {r.name: study.run_config(plan, r, tmp_path) for r in plan.runs if r.seed == 0 and r.arm != "base"}
    mi, ma, fo, mt = cfg["metaicl-s0"], cfg["maml-s0"], cfg["fomaml-s0"], cfg["metaicl-time-s0"]
    assert (ma.train.method, ma.engine.hvp, ma.engine.moments) == ("maml-en-llm", "exact", "shared")
    assert (fo.train.method, fo.engine.hvp) == ("maml-en-llm", "first_order")
    assert mi.train.method == mt.train.method == "metaicl" and mt.train.max_steps > mi.train.max_steps
    for c in (mi, fo):  # equal tokens: same steps, tasks per step, batch and k as MAML-en-LLM
        assert (c.train.max_steps, c.train.tasks_per_step, c.train.batch_size, c.data.k) == \
            (ma.train.max_steps, ma.train.tasks_per_step, ma.train.batch_size, ma.data.k)
    assert all(c.model.dropout is False and c.model.dtype == "float32" for c in cfg.values())
    full = plan.evals["full"]
    assert full.k == 16 and len(full.seeds) >= 3 and full.max_queries is None
    assert set(full.splits) == {"test", "unseen_domain_test"}


def test_pilot_tracks_continue_in_step_order():
    plan = study.build_plan("pilot")
    tracks = {}
    for r in plan.runs:
        if r.track:
            tracks.setdefault(r.track, []).append(r.steps)
    assert tracks and all(s == sorted(s) and len(s) >= 4 for s in tracks.values())
    assert any(r.arm == "base" for r in plan.runs)


def _repo(path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    (path / "f.txt").write_text("x")
    for cmd in (["add", "f.txt"], ["-c", "user.email=a@b", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(["git", *cmd], cwd=path, check=True)
    return path


def test_dirty_tree_is_refused(tmp_path):
    root = _repo(tmp_path / "repo")
    sha = study.require_clean(root)
    assert len(sha) == 40
    (root / "bench" / "results").mkdir(parents=True)
    (root / "bench" / "results" / "r.json").write_text("{}")  # results written by runs do not count
    assert study.require_clean(root) == sha
    (root / "f.txt").write_text("changed")
    with pytest.raises(SystemExit, match="uncommitted changes.*f.txt"):
        study.require_clean(root)


def test_smoke_plan_end_to_end(tmp_path):
    root = _repo(tmp_path / "repo")
    plan = study.build_plan("smoke")
    results, work = tmp_path / "results" / "study", tmp_path / "work"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in plan.runs:
            study.execute(plan, r, results, work, log=lambda m: None, root=root)
    rec = json.loads((results / "maml-s0.json").read_text())
    assert rec["status"] == 0 and rec["git"] == study.git_state(root)["sha"]
    assert set(rec["evals"]) == {"test", "unseen_domain_test"}
    assert rec["training"]["steps"] == 2 and rec["config"]["engine"]["hvp"] == "exact"
    # the compute record comes from the per-step log (it read 0 while the log kept only the step's numbers)
    assert 0 < rec["compute"]["step_wall_s"] <= rec["compute"]["train_wall_s_this_process"]
    assert rec["compute"]["peak_mem_gb"] > 0
    pq = json.loads(gzip.decompress((results / "maml-s0.pq.json.gz").read_bytes()))["per_query"]
    task = next(iter(pq["test"]))
    assert set(pq["test"][task]) == {"100", "13"} and len(pq["test"][task]["100"]["nll"]) == 4
    assert not list((work / "maml-s0").glob("ckpt-*")), "checkpoints are removed once the JSON is written"
    log = json.loads(gzip.decompress((results / "maml-s0.train.json.gz").read_bytes()))["steps"]
    assert [m["step"] for m in log] == [1, 2] and all("adapt_gain" in m for m in log)
    # the curve track: the step-1 run kept its checkpoint for step 2, which resumed from it
    c2 = json.loads((results / "curve-metaicl-s0-step2.json").read_text())
    assert c2["compute"]["resumed_from_step"] == 1 and c2["training"]["steps"] == 2
    # a finished run is skipped: the JSON is returned untouched
    mtime = (results / "maml-s0.json").stat().st_mtime_ns
    assert study.execute(plan, plan.runs[2], results, work, root=root)["date"] == rec["date"]
    assert (results / "maml-s0.json").stat().st_mtime_ns == mtime
    # ... unless the plan changed under it: a finished run of other steps is not silently reused
    with pytest.raises(SystemExit, match="different run"):
        study.execute(study.build_plan("smoke"), study.Run("maml-s0", "maml", 0, 3), results, work, root=root)
    comps = study.main_comparisons(results, n_boot=50)
    assert not comps  # the smoke runs are not the main plan
    for p in results.glob("*.json"):  # relabel them as main-plan runs: the analysis must then find every pair
        r = json.loads(p.read_text())
        r["plan"] = "main"
        p.write_text(json.dumps(r))
    comps = study.main_comparisons(results, n_boot=50)
    pairs = {(c.arm, c.ref) for c in comps}
    assert {("metaicl", "base"), ("maml", "base"), ("maml", "metaicl")} <= pairs
    assert all(len(c.seeds) == 2 and c.p_holm is not None for c in comps if c.ref != "base" or c.arm == "maml")
    text = study.report(results, tmp_path / "report.md", n_boot=50)
    assert "| MAML-en-LLM − MetaICL |" in text and "MDE" in text
    assert "| maml-s0 | maml | 2 |" in text  # the inner step during training, from the per-step logs
    assert "![paired comparisons](study_comparisons.png)" in text
    assert (tmp_path / "study_comparisons.png").stat().st_size > 0
    assert "| MetaICL | 2 | 2 |" in text  # the arms table: 2 seeds of 2 meta-steps


def test_training_log_keeps_the_last_record_of_each_step(tmp_path):
    # a run resumed from its step-2 checkpoint logs step 3 again; steps past the run's end are not its own
    rows = [{"step": 1, "loss": 1.0, "adapt_gain": 0.1}, {"step": 2, "loss": 0.9, "adapt_gain": -0.2},
            {"step": 3, "loss": 5.0, "adapt_gain": 9.0}, {"step": 3, "loss": 0.8, "adapt_gain": 0.3},
            {"step": 4, "loss": 0.7, "adapt_gain": 0.4}]
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.training_log(m, 3) == [rows[0], rows[1], rows[3]]
    with pytest.raises(SystemExit, match="4 of the run's 5 meta-steps"):  # a log that misses a step is refused
        study.write_training_log(tmp_path, "x", m, 5)
    assert not (tmp_path / "x.train.json.gz").exists()


def test_step_seconds_of_old_and_new_logs():
    # new logs carry step_s; the main plan's (017f47b) only tokens / tokens_per_s, both of target tokens
    assert study.step_seconds({"tokens": 40, "input_tokens": 4000, "tokens_per_s": 1000.0, "step_s": 4.0}) == 4.0
    assert study.step_seconds({"tokens": 40, "tokens_per_s": 10.0}) == 4.0
    assert study.step_seconds({"tokens": 40, "tokens_per_s": 0}) == 0.0


def test_adaptation_table_known_answer():
    import numpy as np
    from scipy import stats as st

    gains = {"maml-s0": [0.1, 0.3, -0.1, 0.2], "maml-s1": [0.0, 0.2, 0.1, 0.1], "metaicl-s0": [0.0] * 4}
    results = {n: {"arm": n.split("-")[0], "plan": "main"} for n in gains}
    logs = {n: [{"step": i + 1, "adapt_gain": g} for i, g in enumerate(v)] for n, v in gains.items()}
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]]
            for r in study.adaptation_table(results, logs)[2:]}
    g = np.array(gains["maml-s0"])
    half = st.t.ppf(0.975, 3) * g.std(ddof=1) / 2
    assert rows["maml-s0"][3] == f"{g.mean():+.4f}"
    assert rows["maml-s0"][4] == f"[{g.mean() - half:+.4f}, {g.mean() + half:+.4f}]"
    assert rows["maml-s0"][5] == "3/4"
    assert "metaicl-s0" not in rows  # no inner step: its logged 0 is not a measurement
    pooled = next(v for k, v in rows.items() if k.startswith("**MAML-en-LLM, 2 seeds"))
    assert pooled[3] == f"{np.mean([g.mean(), np.mean(gains['maml-s1'])]):+.4f}"


def _write_pq(results, name, arm, seed, values, plan="main"):
    """values: {task: per-query nll list}; margin = −nll, identical for both demonstration seeds."""
    pq = {sp: {t: {s: {"nll": v, "margin": [-x for x in v], "correct": [True] * len(v)} for s in ("1", "2")}
               for t, v in values.items()} for sp in study.SPLITS}
    study._write(results / f"{name}.pq.json.gz", {"per_query": pq})
    study._write(results / f"{name}.json", {"name": name, "plan": plan, "arm": arm, "status": 0, "evals": {},
                                            "run": {"seed": seed, "steps": 1, "track": ""}})


def test_analysis_known_answer(tmp_path):
    import numpy as np

    results = tmp_path / "study"
    base = {"a": [1.0, 2.0, 3.0], "b": [0.5, 0.5]}
    _write_pq(results, "base", "base", 0, base)
    shifts = {0: 0.1, 1: 0.3, 2: 0.2}  # seed s lowers every NLL by shifts[s] on task a and 2*shifts[s] on b
    for s, d in shifts.items():
        _write_pq(results, f"metaicl-s{s}", "metaicl", s, {"a": [x - d for x in base["a"]],
                                                           "b": [x - 2 * d for x in base["b"]]})
    res = study.load_results(results)
    c = study.compare(results, res, "metaicl", "base", "test", "nll", n_boot=200)
    want = [1.5 * d for d in shifts.values()]  # macro over tasks a, b of (d, 2d)
    assert c.per_seed == pytest.approx(want)
    assert c.t.mean == pytest.approx(np.mean(want)) and c.t.sd == pytest.approx(np.std(want, ddof=1))
    m = study.compare(results, res, "metaicl", "base", "test", "margin", n_boot=200)
    assert m.per_seed == pytest.approx(want)  # margin = −nll here: the same improvement, sign handled
    assert c.boot.low <= c.t.mean <= c.boot.high
    # the table's corrected interval: the t interval at 1 − 0.05/m, m = 4 tests (2 splits x 2 metrics)
    from scipy import stats as st

    comps = study.main_comparisons(results, n_boot=100)
    assert len(comps) == 4 and all(x.t_simultaneous is not None for x in comps)
    half = st.t.ppf(1 - 0.05 / 8, 2) * np.std(want, ddof=1) / np.sqrt(3)
    assert comps[0].t_simultaneous.low == pytest.approx(np.mean(want) - half)
    assert comps[0].t_simultaneous.high - comps[0].t_simultaneous.low > comps[0].t.high - comps[0].t.low
    assert f"corrected [{np.mean(want) - half:+.4f}," in "\n".join(study.main_table(comps))


def test_gold_nll_gain_splits_into_label_set_and_margin(tmp_path):
    import numpy as np

    rng = np.random.default_rng(5)
    results = tmp_path / "study"

    def write(name, arm, seed, shift):
        # per query: gold NLL and margin drawn independently; the arm shifts every best-wrong NLL down by `shift`
        pq = {sp: {t: {s: {"nll": list(nll[sp][t][s] - shift), "margin": list(mar[sp][t][s]),
                           "correct": [True] * 3} for s in ("1", "2")} for t in ("a", "b")} for sp in study.SPLITS}
        if name != "base":  # change gold and wrong differently: margin moves too
            for sp in pq:
                for t in pq[sp]:
                    for s in pq[sp][t]:
                        extra = rng.normal(size=3)
                        pq[sp][t][s]["nll"] = list(np.array(pq[sp][t][s]["nll"]) - extra)
                        pq[sp][t][s]["margin"] = list(np.array(pq[sp][t][s]["margin"]) + extra)
        study._write(results / f"{name}.pq.json.gz", {"per_query": pq})
        study._write(results / f"{name}.json", {"name": name, "plan": "main", "arm": arm, "status": 0,
                                                "evals": {}, "run": {"seed": seed, "steps": 1, "track": ""}})

    nll = {sp: {t: {s: rng.gamma(2.0, size=3) for s in ("1", "2")} for t in ("a", "b")} for sp in study.SPLITS}
    mar = {sp: {t: {s: rng.normal(size=3) for s in ("1", "2")} for t in ("a", "b")} for sp in study.SPLITS}
    write("base", "base", 0, 0.0)
    for seed, shift in enumerate((0.25, 0.5)):
        write(f"metaicl-s{seed}", "metaicl", seed, shift)
    res = study.load_results(results)
    g, w, m = (study.compare(results, res, "metaicl", "base", "test", k, n_boot=100) for k in ("nll", study.WRONG,
                                                                                                 "margin"))
    assert np.allclose(np.array(g.per_seed), np.array(w.per_seed) + np.array(m.per_seed))
    assert w.per_seed == pytest.approx([0.25, 0.5])  # the shift of every wrong option, and nothing else
    rows = [r for r in study.decomposition_table(results, res, n_boot=100) if r.startswith("| MetaICL")]
    assert len(rows) == 2 and rows[0].split("|")[3].strip() == "2"
    assert rows[0].split("|")[5].strip().startswith(f"{w.t.mean:+.4f} [")


def test_arms_table_known_answer():
    from scipy import stats as st

    def run(arm, seed, score, cpu):
        ev = {sp: {"macro": {"mean": score, "worst": score, "nll": 1.0 - score, "margin": -score}}
              for sp in study.SPLITS}
        return {"plan": "main", "status": 0, "arm": arm, "run": {"seed": seed, "steps": 100}, "evals": ev,
                "compute": {"train_cpu_s_this_process": cpu}, "training": {"tokens": 600}}

    results = {"base": run("base", 0, 0.3, None), "m0": run("metaicl", 0, 0.4, 700.0),
               "m1": run("metaicl", 1, 0.5, 800.0), "x": {**run("maml", 0, 0.9, 1.0), "status": 1}}
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in study.arms_table(results)[4:]}
    assert set(rows) == {"no meta-training", "MetaICL"}  # a failed run is not an arm's seed
    half = st.t.ppf(0.975, 1) * (0.1 / 2 ** 0.5) / 2 ** 0.5  # sd of (0.4, 0.5) is 0.1 / sqrt(2); n = 2
    assert rows["MetaICL"][1:4] == ["2", "100", f"0.450 [{0.45 - half:.3f}, {0.45 + half:.3f}]"]
    assert rows["MetaICL"][-2:] == ["750", "600"] and rows["no meta-training"][3] == "0.300"
    # a run resumed at step 50 did half its training in the process that reported it
    results["m1"]["compute"]["resumed_from_step"] = 50
    assert study.train_cpu([results["m0"], results["m1"]]) == "700 (1 of 2 runs)"
    assert study.train_cpu([results["m1"]]) == "≈ 1600"
