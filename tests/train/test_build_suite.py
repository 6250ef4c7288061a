"""build_suite: WordNet line parsing, the file layout it writes, and that a failed build leaves the old suite."""
import json

import pytest

from mamlen.train import build_suite, data

BREATHE = ("00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 * 00005041 v 0000 * 00004227 v 0000 "
           "+ 03110323 a 0301 + 00831191 n 0303 + 04080833 n 0301 + 04250850 n 0105 + 00831191 n 0101 "
           "^ 00004227 v 0103 ^ 00005041 v 0103 $ 00002325 v 0000 $ 00002573 v 0000 ~ 00002573 v 0000 "
           "~ 00002724 v 0000 ~ 00002942 v 0000 ~ 00003826 v 0000 ~ 00004032 v 0000 ~ 00004227 v 0000 "
           "~ 00005041 v 0000 ~ 00006697 v 0000 ~ 00007328 v 0000 ~ 00017031 v 0000 02 + 02 00 + 08 00 | "
           'draw air into, and expel out of, the lungs; "I can breathe better when the air is clean"; '
           '"The patient is respiring"  \n')


def test_parse_data_line():
    s = build_suite.parse_data_line(BREATHE)
    assert s.key == ("v", 1740) and s.pos == "v" and s.lexname == "verb.body"
    assert s.words == ["breathe", "take a breath", "respire", "suspire"] and s.lex_ids == [0, 0, 0, 3]
    assert len(s.ptrs) == 21 and s.rel("*") == [("v", 5041), ("v", 4227)] and s.rel("+")[0] == ("a", 3110323)
    assert s.frames == {2, 8}
    assert s.definition == "draw air into, and expel out of, the lungs"
    assert s.examples == ["I can breathe better when the air is clean", "The patient is respiring"]
    adj = build_suite.parse_data_line("00002730 00 a 01 acroscopic(a) 0 001 ! 00002843 a 0101 | facing the apex  ")
    assert adj.words == ["acroscopic"] and adj.rel("!") == [("a", 2843)] and adj.examples == []


def _fake_tasks(n=60):
    labels = ["yes", "no"]
    mk = lambda t, i, o, opts: {"input": f"{t} {i}", "output": o, "options": opts}  # noqa: E731
    tasks = {}
    for kind in ("classification", "nli", "paraphrase", "multiple-choice", "generation"):
        for j in range(3):
            name = f"{kind.replace('-', '_')}_{j}"
            if kind == "multiple-choice":
                rows = [mk(name, i, str(i), [str(i), str(i + 1)]) for i in range(n)]
            elif kind == "generation":
                rows = [mk(name, i, str(i), []) for i in range(n)]
            else:
                rows = [mk(name, i, labels[i % 2], labels) for i in range(n)]
            tasks[name] = (kind, "toy", "synthetic", rows)
    tasks["unicode_x"] = ("classification", "unicode", "synthetic", [mk("u", i, labels[i % 2], labels) for i in range(n)])
    return tasks


@pytest.fixture
def fake_sources(monkeypatch):
    monkeypatch.setattr(build_suite, "load_wordnet", lambda root: None)
    monkeypatch.setattr(build_suite, "wordnet_tasks", lambda wn: _fake_tasks())
    monkeypatch.setattr(build_suite, "unicode_tasks", lambda: {})
    monkeypatch.setattr(build_suite, "geography_tasks", lambda root: {})


def test_build_writes_metaicl_layout(tmp_path, fake_sources):
    out = tmp_path / "suite"
    meta = build_suite.build(out, tmp_path, tmp_path)
    assert len(meta) == 16
    t = "classification_0"
    assert len(data.load_task(out, t, "train", k=data.TRAIN_POOL_K)) == 40  # 60 - 20 test
    test = data.load_task(out, t, "test", seed=13)
    assert len(test) == 20 and sorted(e["output"] for e in test) == ["no"] * 10 + ["yes"] * 10  # balanced
    for seed in build_suite.SEEDS:
        assert len(data.load_task(out, t, "train", seed=seed)) == 16
    assert not (out / "generation_0" / "generation_0_16_100_test.jsonl").exists()  # generation: training only
    for name in ("class_to_class", "qa_to_qa", "non_nli_to_nli", "hr_to_lr"):
        s = data.load_setting(out, name)
        assert "unicode_x" not in s["train"]
    assert json.loads((out / "tasks.json").read_text())[t]["type"] == "classification"
    # deterministic: a rebuild gives identical files
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jsonl")}
    build_suite.build(out, tmp_path, tmp_path)
    assert first == {p.relative_to(out): p.read_bytes() for p in out.rglob("*.jsonl")}


def test_failed_build_leaves_the_old_suite(tmp_path, fake_sources, monkeypatch):
    out = tmp_path / "suite"
    build_suite.build(out, tmp_path, tmp_path)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []

    def flaky(path, task, rows):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk full")
        return real(path, task, rows)

    real = build_suite.write_jsonl
    monkeypatch.setattr(build_suite, "write_jsonl", flaky)
    with pytest.raises(OSError, match="disk full"):
        build_suite.build(out, tmp_path, tmp_path)
    assert before == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite"]  # no temporary folder left behind


def test_build_shows_progress(tmp_path, fake_sources, capsys):
    build_suite.build(tmp_path / "suite", tmp_path, tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "sources: 100%" in err and "3/3" in err
    assert "tasks: 100%" in err and "16/16" in err
    build_suite.build(tmp_path / "suite", tmp_path, tmp_path, progress=False)
    assert "100%" not in capsys.readouterr().err
