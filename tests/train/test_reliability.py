"""Reliability probes of the trainer and the evaluator (issue 18), on the tiny preset.

What a hostile but realistic user does: two runs on one directory, killing torchrun's launcher, damaging
checkpoints in every way a manifest does not catch, data and flags that pass a shallow check and break later,
a full disk. Kills and races use real subprocesses; the rest runs in process. Where "before the model loads"
is the claim, `models.load_model` is replaced by a function that fails the test.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mamlen.train import checkpoint, evaluate, instances, meta, models

ROOT = Path(__file__).resolve().parents[2]
META = ROOT / "train" / "meta.py"
TINY = ["--preset", "tiny", "--set", "log.tensorboard=false"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded: the error under test must come before."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")
    monkeypatch.setattr(models, "load_model", refuse)


def run(out, steps, *extra):
    return meta.main([*TINY, "--output-dir", str(out), "--max-steps", str(steps), *extra])


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tensors(ckpt):
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "optimizer.safetensors"))}


def wait_for(cond, what, timeout=180, procs=()):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process {p.args} exited ({p.returncode}) while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid):
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def newest_step(out):
    return max(int(p.name.split("-")[1]) for p in checkpoint.checkpoints(out))


# ---------------------------------------------------------------------------------------------------------
# 1. one run per output directory


@pytest.mark.slow
def test_a_second_run_on_a_live_directory_fails_at_once(tmp_path, no_model, monkeypatch):
    out = tmp_path / "run"
    log = open(tmp_path / "a.log", "w")
    a = subprocess.Popen([sys.executable, str(META), *TINY, "--output-dir", str(out), "--max-steps", "100000",
                          "--set", "checkpoint.every=1", "--set", "checkpoint.keep=1"],
                         stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2, "run A's first steps",
                 procs=[a])
        # the second run stops before reading anything, naming the holder (and without loading a model)
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {a.pid} on host "
                                             rf"{socket.gethostname()}"):
            run(out, 5)
        n = len(metrics(out))
        wait_for(lambda: len(metrics(out)) > n, "run A to go on", procs=[a])
    finally:
        a.kill()
        a.wait()
        log.close()
    # killed: the kernel released the lock, and the same command resumes from the newest checkpoint
    monkeypatch.undo()  # the model may load now
    step = newest_step(out)
    assert run(out, step + 1, "--set", "checkpoint.every=1", "--set", "checkpoint.keep=1") == 0
    assert [m["step"] for m in metrics(out)] == list(range(1, step + 2))


# ---------------------------------------------------------------------------------------------------------
# 2. ranks die with their launcher, and resume together (also past a damaged checkpoint)

DIST = ["--preset", "tiny", "--set", "log.tensorboard=false", "--set", "model.dtype=float64",
        "--set", "model.dropout=false", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(META)]


@pytest.mark.slow
@pytest.mark.distributed
def test_killing_torchrun_stops_its_ranks_and_they_resume_together(tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "launch1.log", "w")
    launcher = subprocess.Popen([*TORCHRUN, *DIST, "--max-steps", "100000", "--output-dir", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=tmp_path,
                                start_new_session=True)
    workers = []
    try:
        wait_for(lambda: len(checkpoint.checkpoints(out)) >= 2 and newest_step(out) >= 3, "three checkpoints",
                 procs=[launcher])
        workers = children(launcher.pid)
        assert len(workers) == 2, workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        end = time.time() + 30
        while time.time() < end and any(alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(alive(w) for w in workers), "the ranks outlived their launcher"
    finally:
        for w in workers:  # on failure: do not leave them training
            if alive(w):
                os.kill(w, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()

    # damage the newest checkpoint: rank 0 must choose the previous one, and both ranks load it
    n = newest_step(out)
    f = out / f"ckpt-{n:08d}" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    p = subprocess.run([*TORCHRUN, *DIST, "--max-steps", str(n + 1), "--output-dir", str(out)],
                       capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"ckpt-{n:08d} is unusable" in p.stdout and f"ckpt-{n - 1:08d} at step {n - 1}" in p.stdout

    # exact: equal to an uninterrupted single-process run (float64, no dropout: up to summation order)
    ref = tmp_path / "ref"
    assert meta.main([*DIST, "--max-steps", str(n + 1), "--output-dir", str(ref)]) == 0
    a, b = tensors(ref / f"ckpt-{n + 1:08d}"), tensors(out / f"ckpt-{n + 1:08d}")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-10, atol=1e-14, msg=k)
    assert [m["step"] for m in metrics(out)] == list(range(1, n + 2))


# ---------------------------------------------------------------------------------------------------------
# 3. damaged checkpoints: skipped, never counted as kept; all damaged is an error


def test_a_damaged_newer_checkpoint_does_not_push_good_ones_out(tmp_path, capsys):
    out = tmp_path / "run"
    keep1 = ["--set", "checkpoint.every=1", "--set", "checkpoint.keep=1"]
    assert run(out, 2, *keep1) == 0
    damaged = out / "ckpt-00000006"
    shutil.copytree(out / "ckpt-00000002", damaged)
    (damaged / "model.safetensors").write_bytes(b"\0" * 10)
    assert run(out, 4, *keep1) == 0
    assert "ckpt-00000006 is unusable" in capsys.readouterr().out
    assert [p.name for p in checkpoint.checkpoints(out)] == ["ckpt-00000004", "ckpt-00000006"]
    checkpoint.verify(out / "ckpt-00000004")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run of 2 steps with ckpt-1 and ckpt-2, and ckpt-2's tensors (what resuming from ckpt-1 must redo)."""
    out = tmp_path_factory.mktemp("base") / "run"
    n = torch.get_num_threads()
    try:
        assert run(out, 2, "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2") == 0
    finally:
        torch.set_num_threads(n)
    return out, tensors(out / "ckpt-00000002")


def rehash(ckpt):
    """Rewrite the manifest so that it matches the (damaged) files: only parsing can find the damage."""
    mpath = ckpt / "manifest.json"
    m = json.loads(mpath.read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": checkpoint._sha256(ckpt / name), "bytes": (ckpt / name).stat().st_size}
    mpath.write_text(json.dumps(m))


def _manifest(ckpt, edit):
    m = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps(edit(m)))


def _state(ckpt, edit):
    s = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps(edit(s)))
    rehash(ckpt)


def _wrong_shape(ckpt):
    t = load_file(str(ckpt / "model.safetensors"))
    name = next(iter(t))
    t[name] = torch.zeros(3, 3, dtype=t[name].dtype)
    save_file(t, str(ckpt / "model.safetensors"), metadata={"format": "1"})
    rehash(ckpt)


def _write(name, data):
    def damage(ckpt):
        (ckpt / name).write_bytes(data)
        rehash(ckpt)
    return damage


DAMAGE = {  # name: (damage ckpt-2, file the message must name)
    "manifest not UTF-8": (lambda c: (c / "manifest.json").write_bytes(b'{"format": 1, "files": {"\xff": 1}}'),
                           "manifest.json"),
    "manifest files a number": (lambda c: (c / "manifest.json").write_text('{"format": 1, "files": 5}'),
                                "manifest.json"),
    "manifest entry not an object": (
        lambda c: _manifest(c, lambda m: {**m, "files": {**m["files"], "model.safetensors": "abc"}}),
        "manifest.json"),
    "manifest entry without bytes": (
        lambda c: _manifest(c, lambda m: {**m, "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}}),
        "manifest.json"),
    "config.yaml not YAML": (_write("config.yaml", b"model: [unclosed\n"), "config.yaml"),
    "state.json broken": (_write("state.json", b'{"step": 2, '), "state.json"),
    "state.json without sampler": (lambda c: _state(c, lambda s: {k: v for k, v in s.items() if k != "sampler"}),
                                   "state.json"),
    "weights of the wrong shape": (_wrong_shape, "model.safetensors"),
    "optimizer file not safetensors": (_write("optimizer.safetensors", b"\x08\0\0\0\0\0\0\0{}garbage"),
                                       "optimizer.safetensors"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_any_checkpoint_damage_falls_back_to_the_previous_one(kind, two_checkpoints, tmp_path, capsys):
    base, want = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(base, out)
    damage, file = DAMAGE[kind]
    damage(out / "ckpt-00000002")
    capsys.readouterr()
    assert run(out, 2, "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2") == 0
    printed = capsys.readouterr().out
    assert "ckpt-00000002 is unusable" in printed and file in printed, printed
    assert "ckpt-00000001 at step 1" in printed
    got = tensors(out / "ckpt-00000002")  # step 2 redone from ckpt-1: the same numbers
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_all_checkpoints_damaged_is_an_error_unless_resume_never(two_checkpoints, tmp_path, capsys):
    base, _ = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(base, out)
    for ckpt in checkpoint.checkpoints(out):
        (ckpt / "optimizer.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"no usable checkpoint in .*: all 2 are damaged .*optimizer\.safetensors"):
        run(out, 3)
    assert [m["step"] for m in metrics(out)] == [1, 2]  # nothing was touched
    assert run(out, 2, "--resume", "never") == 0
    discarded = list(out.glob("discarded-*"))
    assert len(discarded) == 1 and sorted(p.name for p in discarded[0].iterdir()) == ["ckpt-00000001",
                                                                                      "ckpt-00000002"]
    assert "resumed" not in capsys.readouterr().out
    assert [m["step"] for m in metrics(out)] == [1, 2]  # a fresh run's lines
    checkpoint.verify(out / "ckpt-00000002")


# ---------------------------------------------------------------------------------------------------------
# 4. a full disk


def test_free_space_is_checked_before_each_save(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(SystemExit, match=rf"{out}: not enough free space to save a checkpoint: \d+ bytes needed"):
        run(out, 2, "--set", "checkpoint.every=1")
    assert not checkpoint.checkpoints(out) and not list(out.glob(".ckpt-*"))


def test_a_resumed_run_checks_free_space_before_the_model_loads(two_checkpoints, tmp_path, monkeypatch, no_model):
    base, _ = two_checkpoints
    out = tmp_path / "run"
    shutil.copytree(base, out)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(SystemExit, match=rf"{out}: not enough free space to save a checkpoint"):
        run(out, 4)


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "run"

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(SystemExit, match=r"\.ckpt-00000001\.tmp: saving checkpoint of step 1 failed .*No space left"):
        run(out, 2, "--set", "checkpoint.every=1")
    assert not checkpoint.checkpoints(out) and not list(out.glob(".ckpt-*"))


# ---------------------------------------------------------------------------------------------------------
# 5. bad data and config are refused before the model loads


def _task(root, task, rows, k=16384, split="train", seed=100):
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{task}_{k}_{seed}_{split}.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps({"task": task, **r})) + "\n" for r in rows))
    return path


@pytest.fixture
def toy(tmp_path):
    """A data dir: training tasks `echo` (generation) and `parity` (20 examples each), test task `succ`."""
    root = tmp_path / "data"
    _task(root, "echo", [{"input": f"say {i}", "output": str(i), "options": []} for i in range(20)])
    _task(root, "parity", [{"input": f"is {i} even?", "output": "yes" if i % 2 == 0 else "no",
                            "options": ["yes", "no"]} for i in range(20)])
    rows = [{"input": f"after {i}", "output": str(i + 1), "options": [str(i + 1), str(i + 2)]} for i in range(6)]
    _task(root, "succ", rows, k=2, split="train")
    _task(root, "succ", rows, k=2, split="test")
    (root / "settings").mkdir()
    (root / "settings" / "toy.json").write_text(json.dumps({"train": ["echo", "parity"], "test": ["succ"]}))
    return root


def toy_run(tmp_path, root, *extra):
    return run(tmp_path / "out", 2, "--set", f"data.data_dir={root}", "--set", "data.setting=toy", *extra)


def test_empty_outputs_and_options_are_refused_with_file_and_line(tmp_path, toy, no_model):
    f = _task(toy, "echo", [{"input": f"say {i}", "output": "" if i == 6 else str(i), "options": []}
                            for i in range(20)])
    with pytest.raises(SystemExit, match=rf"{f}:7: field 'output' is empty"):
        toy_run(tmp_path, toy)
    _task(toy, "echo", [{"input": f"say {i}", "output": str(i), "options": []} for i in range(20)])
    f = _task(toy, "parity", [{"input": "x", "output": "", "options": [""]}] * 20)
    with pytest.raises(SystemExit, match=rf"{f}:1: field 'output' is empty"):
        toy_run(tmp_path, toy)
    f = _task(toy, "parity", [{"input": "x", "output": "yes", "options": ["yes", "", "no"]}] * 20)
    with pytest.raises(SystemExit, match=rf"{f}:1: field 'options' has an empty option"):
        toy_run(tmp_path, toy)
    _task(toy, "parity", [{"input": "x", "output": "yes", "options": ["yes", "no"]}] * 20)
    # an evaluation query without options cannot be scored: refused when the run starts, not at evaluation
    f = _task(toy, "succ", [{"input": "a", "output": "b", "options": ["b"]}, {"input": "a", "output": "b",
                                                                              "options": []}], k=2, split="test")
    with pytest.raises(SystemExit, match=rf"{f}:2: field 'options' is empty"):
        toy_run(tmp_path, toy, "--set", "eval.after=true", "--set", "eval.seeds=[100]")


def test_a_non_utf8_setting_file_is_named(tmp_path, toy, no_model):
    setting = toy / "settings" / "toy.json"
    setting.write_bytes(b'{"train": ["echo", "parity"],\n "test": ["s\xe9cc"]}')
    with pytest.raises(SystemExit, match=rf"{setting}:2: not UTF-8"):
        toy_run(tmp_path, toy)


def test_k_above_the_pool_is_refused_and_repeats_are_warned_once(tmp_path, toy, no_model, capsys):
    with pytest.raises(SystemExit, match=r"data.k=30: task 'echo' has 20 training examples, so at most k=19"):
        toy_run(tmp_path, toy, "--set", "data.k=30")
    with pytest.raises(SystemExit, match=r"task 'echo': 1 training example after data.fraction=0.01"):
        toy_run(tmp_path, toy, "--set", "data.fraction=0.01")
    # k=12 < 20, but each query part (10 examples) is smaller than k+1: allowed, said once
    with pytest.raises(AssertionError, match="the model was loaded"):
        toy_run(tmp_path, toy, "--set", "data.k=12")
    printed = capsys.readouterr().out
    assert printed.count("demonstrations will repeat") == 1 and "echo (20 examples, query part 10)" in printed


def test_duplicate_yaml_keys_and_missing_bitsandbytes_are_config_errors(tmp_path, monkeypatch, no_model):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  seed: 1\n  max_steps: 2\n  seed: 2\n")
    with pytest.raises(SystemExit, match=rf"{cfg}:4: duplicate key 'seed' \(first given on line 2\)"):
        run(tmp_path / "out", 2, "--config", str(cfg))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(SystemExit, match="engine.moments_bits: 8-bit moments need bitsandbytes"):
        run(tmp_path / "out", 2, "--set", "engine.moments_bits=8")


def test_a_bad_model_name_or_output_dir_is_refused_before_the_model_loads(tmp_path, no_model):
    with pytest.raises(SystemExit, match=r"model './no/such/model': no such directory"):
        run(tmp_path / "out", 2, "--set", "model.name=./no/such/model")
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit, match=rf"output directory {afile / 'run'}: cannot be created or written"):
        run(afile / "run", 2)


# ---------------------------------------------------------------------------------------------------------
# 6. huge inputs are cut before tokenizing, with the same tokens


def bpe_tokenizer():
    """A byte-level BPE with real merges (trained in memory), so that cutting could change tokens."""
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本語", "    ", "\n\n", "12345"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(50)) for i in range(200)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class CountingTokenizer:
    """Records the length of every text it is asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.seen = tok, []

    def __call__(self, text, **kw):
        self.seen.append(len(text))
        return self.tok(text, **kw)


def test_huge_inputs_are_cut_before_tokenizing_with_the_same_tokens(monkeypatch):
    tok = bpe_tokenizer()
    counting = CountingTokenizer(tok)
    huge = "alpha beta " * 200_000  # 2.2 MB
    inst = instances.build_instance(counting, [{"input": huge, "output": "yes"}], {"input": huge, "output": "no"},
                                    max_example_len=256, max_len=1024)
    assert max(counting.seen) < 100_000, max(counting.seen)
    assert len(inst["input_ids"]) <= 2 * 256 + 8  # two examples of <= 256 tokens and a separator

    # the same ids as tokenizing every text in full, on random texts around and far beyond the cut
    def full(tokenizer, text, limit=None):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    g = torch.Generator().manual_seed(0)
    pieces = ["alpha", " beta", " ", "   ", "\n", "naïve", "日本語", "x", "12345", "über", "\t"]
    for n_pieces in (1, 50, 300, 600, 1500, 4000, 20000):
        def text():
            idx = torch.randint(len(pieces), (n_pieces,), generator=g).tolist()
            return "".join(pieces[i] for i in idx)
        demos = [{"input": text(), "output": text()} for _ in range(2)]
        query = {"input": text(), "output": text()}
        for max_example_len in (16, 256):
            got = instances.build_instance(tok, demos, query, max_example_len=max_example_len, max_len=1024)
            with monkeypatch.context() as m:
                m.setattr(instances, "_ids", full)
                want = instances.build_instance(tok, demos, query, max_example_len=max_example_len, max_len=1024)
            assert got == want, (n_pieces, max_example_len)


# ---------------------------------------------------------------------------------------------------------
# 7. train/evaluate.py: flags, task files, model name and output path checked before the model loads


def eval_main(toy, *extra):
    return evaluate.main(["--data-dir", str(toy), "--tasks", "succ", "--k", "2", "--seeds", "100", "--model",
                          "tiny-gpt2", "--no-progress", *extra])


@pytest.mark.parametrize("flag,value,message", [
    ("--batch-size", "0", "argument --batch-size: must be >= 1, got 0"),
    ("--max-queries", "0", "argument --max-queries: must be >= 1, got 0"),
    ("--max-len", "4", "argument --max-len: must be >= 16, got 4"),
    ("--k", "-1", "argument --k: must be >= 0, got -1"),
    ("--seeds", ",", "argument --seeds: no seed given"),
])
def test_evaluate_refuses_bad_flags_in_one_line(flag, value, message, toy, no_model, capsys):
    with pytest.raises(SystemExit) as e:
        eval_main(toy, flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(message), err


def test_evaluate_reads_task_files_before_the_model(toy, no_model):
    (toy / "tasks.json").write_text('{\n "succ": {"type": "classification"},\n "x": }\n')
    with pytest.raises(SystemExit, match=rf"error: {toy / 'tasks.json'}:3: malformed JSON"):
        eval_main(toy)
    (toy / "tasks.json").unlink()
    f = _task(toy, "succ", [{"input": "a", "output": "b", "options": ["b"]}, "{not json"], k=2, split="test")
    with pytest.raises(SystemExit, match=rf"error: {f}:2: malformed JSON"):
        eval_main(toy)


def test_evaluate_checks_the_output_path_first(toy, tmp_path, no_model, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as e:
        eval_main(toy, "--output", str(afile / "results.json"))
    assert e.value.code == 2 and "argument --output" in capsys.readouterr().err


def test_an_unknown_model_fails_fast_without_retries(toy, no_model, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match=r"model 'no-such-org/no-such-model': .*HF_HUB_OFFLINE is set"):
        eval_main(toy, "--model", "no-such-org/no-such-model")
    # online without a network: one request, no retries
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(name, timeout=None):
        calls.append((name, timeout))
        raise ConnectionError("Name or service not known")
    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(SystemExit, match=r"model 'no-such-org/no-such-model': .*Hub cannot be reached"):
        eval_main(toy, "--model", "no-such-org/no-such-model")
    assert len(calls) == 1 and calls[0][1] is not None


@pytest.mark.slow
def test_evaluate_cli_offline_unknown_model_is_one_line(toy, tmp_path):
    """As a user runs it (a fresh process: nothing imported beforehand)."""
    p = subprocess.run([sys.executable, str(ROOT / "train" / "evaluate.py"), "--data-dir", str(toy), "--tasks",
                        "succ", "--k", "2", "--seeds", "100", "--model", "no-such-org/no-such-model"],
                       capture_output=True, text=True, env={**env(), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model 'no-such-org/no-such-model': not a local directory")
    assert "and HF_HUB_OFFLINE is set" in lines[0] and lines[0].endswith(models.ACCEPTED), lines
