"""train/meta.py under torchrun (run as a script, 2 gloo ranks): its meta-gradients and parameters must equal
a single-process run's (float64, dropout off: the maths allows equality there, up to summation order)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamlen.train import meta

META = Path(__file__).resolve().parents[2] / "train" / "meta.py"
# float64 and no dropout: the only differences left between 1 and 2 ranks are summation orders.
# 3 tasks per step over 2 ranks: an uneven split (rank 0 adapts tasks 0 and 2, rank 1 task 1).
ARGS = ["--preset", "tiny", "--max-steps", "2", "--set", "model.dtype=float64", "--set", "model.dropout=false",
        "--set", "train.tasks_per_step=3", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2",
        "--set", "log.tensorboard=false"]


def launch(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([*cmd, *ARGS, "--output-dir", str(out)], capture_output=True, text=True, env=env,
                       timeout=600, cwd=out.parent)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    n = torch.get_num_threads()
    try:  # the single-process reference runs in this process (saves a Python + transformers start-up)
        assert meta.main([*ARGS, "--output-dir", str(one)]) == 0
    finally:
        torch.set_num_threads(n)
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(META)], two)

    state = json.loads((two / "ckpt-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # really two ranks, each RNG state saved
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2]  # rank 0 alone writes
    for a, b in zip(m1, m2):
        assert a["tokens"] == b["tokens"] and not a["skipped"] and not b["skipped"]
        for key in ("loss", "support_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-12, abs=0), key

    # after step 1, exp_avg = (1 - β1) G: the step-1 meta-gradients are equal
    for step in (1, 2):
        for name in ("optimizer.safetensors", "model.safetensors"):
            t1 = load_file(str(one / f"ckpt-{step:08d}" / name))
            t2 = load_file(str(two / f"ckpt-{step:08d}" / name))
            assert t1.keys() == t2.keys()
            for k in t1:
                assert t1[k].dtype == torch.float64
                torch.testing.assert_close(t2[k], t1[k], rtol=1e-10, atol=1e-14, msg=f"step {step} {name} {k}")
    # and the run did move: G is not zero
    g1 = load_file(str(one / "ckpt-00000001" / "optimizer.safetensors"))
    assert max(t.abs().max().item() for k, t in g1.items() if k.startswith("exp_avg.")) > 0
