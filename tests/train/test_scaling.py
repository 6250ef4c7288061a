"""Sharded / 8-bit / master-weight state under torchrun (2 gloo ranks on CPU).

1. This file run as a torchrun worker: on each rank an unsharded and a sharded engine take the same steps on the
   rank's tasks; parameters and every state tensor must be torch.equal (float64 and float32: the reduction is
   a + b either way and the elementwise kernels see the same lanes).
2. train/meta.py with engine.shard_state and engine.moments_bits=8 under torchrun equals a one-process run, and
   resumes across world sizes (2 → 1 and 1 → 2) from checkpoints holding the full, gathered state.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

if __name__ != "__main__":
    import pytest
    from safetensors.torch import load_file

    from mamlen.train import meta

META = Path(__file__).resolve().parents[2] / "train" / "meta.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ---------------------------------------------------------------------------------------------------------
# 1. the worker (torchrun runs this file)
def _worker():
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from mamlen.core import MetaConfig, MetaEngine, Task

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def model(dtype):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=61, n_positions=32, attn_pdrop=0.0,
                         resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(cfg).to(dtype).eval()

    def batch(gen):
        ids = torch.randint(1, 40, (2, 9), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    gen = torch.Generator().manual_seed(7)  # the same tasks on every rank; rank r adapts tasks[r::world]
    tasks = [Task(support=[batch(gen)], query=batch(gen)) for _ in range(3)]
    mine = tasks[rank::world]
    base = dict(hvp="exact", inner_lr=3e-2, outer_lr=1e-2, outer_weight_decay=0.05)
    cases = {"float64": (torch.float64, {}), "float32-sgd": (torch.float32, dict(outer_optimizer="sgd")),
             "float64-8bit": (torch.float64, dict(moments_bits=8)),
             "bf16-master-8bit": (torch.bfloat16, dict(master_weights=True, moments_bits=8,
                                                       autocast_dtype=torch.bfloat16))}
    for name, (dtype, opts) in cases.items():
        engines = [MetaEngine(model(dtype), MetaConfig(**base, **opts, shard_state=s)) for s in (False, True)]
        assert engines[1].opt_state.sharded and not engines[0].opt_state.sharded
        for _ in range(2):
            ma, mb = (e.step(mine) for e in engines)
            # the norm alone is summed per shard: float32 norms differ by round-off (measured 8e-8 relative)
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            assert abs(ma["grad_norm"] - mb["grad_norm"]) <= tol * ma["grad_norm"], (name, ma, mb)
        for e in engines:
            e.metaicl_step([t.query for t in mine])
        G = [e.meta_gradient(mine) for e in engines]  # the sharded engine gathers its shards back
        sa, sb = (e.optimizer_state() for e in engines)
        pa, pb = (dict(e.model.named_parameters()) for e in engines)
        for n in pa:
            assert torch.equal(pa[n], pb[n]), (name, n)
            assert torch.equal(G[0][n], G[1][n]), (name, "G", n)
        for key in sa:
            if key != "step":
                assert sa[key].keys() == sb[key].keys(), (name, key)
                for n in sa[key]:
                    assert torch.equal(sa[key][n], sb[key][n]), (name, key, n)
        # really sharded: this rank holds about 1/world of the moments
        full, shard = (e.opt_state.nbytes()["moments"] for e in engines)
        assert shard <= full / world + 4 * 256 * 8, (name, full, shard)
    dist.barrier()
    if rank == 0:
        print(f"WORKER OK {len(cases)} cases on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker()
    sys.exit(0)


def _run(cmd, cwd):
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600, cwd=cwd)
    assert p.returncode == 0, f"{cmd} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_equals_unsharded_on_two_ranks(tmp_path):
    p = _run([*TORCHRUN, str(Path(__file__).resolve())], tmp_path)
    assert "WORKER OK 4 cases on 2 ranks" in p.stdout


# ---------------------------------------------------------------------------------------------------------
# 2. train/meta.py: sharding + 8-bit moments, across world sizes
ARGS = ["--preset", "tiny", "--set", "model.dtype=float64", "--set", "model.dropout=false",
        "--set", "train.tasks_per_step=3", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=3",
        "--set", "log.tensorboard=false", "--set", "engine.shard_state=true", "--set", "engine.moments_bits=8"]


def _in_process(out, steps):
    n = torch.get_num_threads()
    try:  # the one-process runs run in this process (saves a Python + transformers start-up)
        assert meta.main([*ARGS, "--max-steps", str(steps), "--output-dir", str(out)]) == 0
    finally:
        torch.set_num_threads(n)


def _torchrun(out, steps):
    return _run([*TORCHRUN, str(META), *ARGS, "--max-steps", str(steps), "--output-dir", str(out)], out.parent)


def _resume_dir(src, dst, step):
    dst.mkdir()
    shutil.copytree(src / f"ckpt-{step:08d}", dst / f"ckpt-{step:08d}")


def _assert_same(a, b, step):
    for name in ("model.safetensors", "optimizer.safetensors"):
        ta, tb = (load_file(str(d / f"ckpt-{step:08d}" / name)) for d in (a, b))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            if k.startswith("quantized.") and ".codes." in k:
                # a 1e-16 summation-order difference may move a value across a code boundary: allow a few
                assert (ta[k] != tb[k]).float().mean() < 1e-3, k
            else:
                torch.testing.assert_close(tb[k], ta[k], rtol=1e-10, atol=1e-14, msg=f"{b} vs {a}: {name} {k}")


@pytest.mark.slow
@pytest.mark.distributed
def test_meta_sharded_8bit_two_ranks_and_world_size_changes(tmp_path):
    """one: 3 steps in one process. up: one's step-1 checkpoint resumed on 2 ranks (sharded, 8-bit) to step 2.
    down: up's step-2 checkpoint (saved by 2 ranks) resumed in one process to step 3. All equal to `one`."""
    one, up, down = tmp_path / "one", tmp_path / "up", tmp_path / "down"
    _in_process(one, 3)
    _resume_dir(one, up, 1)
    p = _torchrun(up, 2)
    assert "resuming on 2" in p.stdout  # 1 → 2 ranks
    state = json.loads((up / "ckpt-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    opt = load_file(str(up / "ckpt-00000002" / "optimizer.safetensors"))
    assert any(k.startswith("quantized.exp_avg.codes.") for k in opt)  # 8-bit codes saved in full
    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (up / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m2] == [2] and not any(m["skipped"] for m in m1 + m2)
    assert m2[0]["loss"] == pytest.approx(m1[1]["loss"], rel=1e-12)
    _assert_same(one, up, 2)
    _resume_dir(up, down, 2)  # 2 ranks → 1 process
    _in_process(down, 3)
    _assert_same(one, down, 3)
