"""train/meta.py with engine.fsdp (FSDP2-sharded parameters, sharded DCP checkpoints) against a one-process run.

float64, dropout off, hvp=fd. `one`: the unsharded engine in one process. `two`: engine.fsdp under torchrun on 2
gloo ranks (each batch of 2 rows split 1 + 1). `down`: two's step-1 sharded checkpoint resumed in one process
(engine.fsdp on one rank: DCP reshards 2 → 1). Losses, parameters and moments must agree to round-off (fd
divides the gradients' summation-order differences by its probe step: ~1e-12 relative here).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from mamlen.train import meta, sharded_checkpoint
from mamlen.train.checkpoint import CheckpointError

META = Path(__file__).resolve().parents[2] / "train" / "meta.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ARGS = ["--preset", "tiny", "--set", "model.dtype=float64", "--set", "model.dropout=false",
        "--set", "engine.hvp=fd", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=3",
        "--set", "log.tensorboard=false", "--set", "engine.eps=1e-3"]
# engine.eps=1e-3: AdamW moves θ by lr·G/(|G| + eps); at eps = 1e-8 round-off in a gradient that is zero in exact
# arithmetic (attention key biases: G ~ 1e-17) becomes a ~1e-10 difference in θ between any two implementations
FSDP = ["--set", "engine.fsdp=true"]


def _in_process(out, steps, extra=()):
    n = torch.get_num_threads()
    try:
        assert meta.main([*ARGS, *extra, "--max-steps", str(steps), "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(n)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _full_state(ckpt: Path, tmp: Path) -> dict:
    """{"model.<name>" | "exp_avg.<name>" | "exp_avg_sq.<name>": full tensor} of either kind of checkpoint."""
    if sharded_checkpoint.is_sharded(ckpt):
        dcp_to_torch_save(str(ckpt / "dcp"), str(tmp))
        tree = torch.load(str(tmp), weights_only=True)
        out = {f"model.{n}": t for n, t in tree["model"].items()}
        out.update({f"{k}.{n}": t for k in ("exp_avg", "exp_avg_sq") for n, t in tree["optim"][k].items()})
        return out
    out = {f"model.{n}": t for n, t in load_file(str(ckpt / "model.safetensors")).items()}
    out.update(load_file(str(ckpt / "optimizer.safetensors")))
    return out


def _assert_same(a: Path, b: Path, tmp_path):
    ta, tb = _full_state(a, tmp_path / "a.pt"), _full_state(b, tmp_path / "b.pt")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype == torch.float64, k
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-8, atol=1e-11, msg=f"{b} vs {a}: {k}")


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_torchrun_equals_one_process_and_resumes_on_another_world_size(tmp_path):
    one, two, down = tmp_path / "one", tmp_path / "two", tmp_path / "down"
    _in_process(one, 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(META),
           *ARGS, *FSDP, "--max-steps", "2", "--output-dir", str(two)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900, cwd=tmp_path)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"

    ck = two / "ckpt-00000002"
    assert sorted(x.name for x in (ck / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ck / "state.json").read_text())["world_size"] == 2
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert a["tokens"] == b["tokens"] and not b["skipped"]
        for key in ("loss", "support_loss", "query_loss_before", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=0), key
    for step in (1, 2):
        _assert_same(one / f"ckpt-{step:08d}", two / f"ckpt-{step:08d}", tmp_path)

    # 2 ranks → 1: two's step-1 checkpoint resumed in one process (DCP reshards), one more step
    down.mkdir()
    shutil.copytree(two / "ckpt-00000001", down / "ckpt-00000001")
    _in_process(down, 2, FSDP)
    m3 = _metrics(down)
    assert [m["step"] for m in m3] == [2]
    assert m3[0]["loss"] == pytest.approx(m1[1]["loss"], rel=1e-9)
    _assert_same(one / "ckpt-00000002", down / "ckpt-00000002", tmp_path)

    # a kill mid-save leaves a hidden .tmp directory: ignored; a damaged newest checkpoint: the previous one is used
    (down / ".ckpt-00000003.tmp" / "dcp").mkdir(parents=True)
    shard = down / "ckpt-00000002" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    warned = []
    ck = sharded_checkpoint.latest(down, warn=warned.append)
    assert ck.step == 1 and "truncated" in warned[0] and "__0_0.distcp" in warned[0]
    # the other kind of checkpoint is refused, naming the setting (never silently started over and pruned)
    with pytest.raises(CheckpointError, match="engine.fsdp=false"):
        sharded_checkpoint.latest(one)
    with pytest.raises(SystemExit, match="engine.fsdp"):
        meta.main([*ARGS, "--max-steps", "3", "--output-dir", str(down)])


@pytest.mark.parametrize("argv, expected", [
    (["--set", "engine.fsdp=true"], "engine.hvp: engine.fsdp=true needs 'fd' or 'first_order'"),  # tiny: exact
    (["--set", "engine.fsdp=true", "--set", "engine.hvp=fd", "--set", "engine.shard_state=true"],
     "engine.shard_state: engine.fsdp=true shards the state already"),
])
def test_fsdp_config_errors_name_the_field(argv, expected):
    from mamlen.train.config import ConfigError, load
    with pytest.raises(ConfigError) as e:
        load(["--preset", "tiny", *argv])
    assert expected in str(e.value)
