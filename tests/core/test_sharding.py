"""core/sharding.py on one process: shard layouts, and shard_state / moments_bits / master_weights leaving a
single-process run exactly as it was. The two-rank equalities are in tests/train/test_scaling.py (torchrun)."""
import pytest
import torch

from mamlen.core import MetaConfig, MetaEngine, Task
from mamlen.core.sharding import ShardLayout


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 1000, 4097, 65536])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_layout_covers_buffer_once(numel, world):
    layouts = [ShardLayout(numel, world, r) for r in range(world)]
    covered = torch.zeros(numel, dtype=torch.int32)
    for L in layouts:
        assert L.shard == layouts[0].shard and L.padded == L.shard * world >= numel
        assert 0 <= L.local <= L.shard and L.lo <= L.hi
        covered[L.lo:L.hi] += 1
        if world > 1:  # shards start on 8-bit blocks, so quantisation does not depend on the world size
            assert L.start % 256 == 0 and L.shard % 256 == 0
            assert L.padded - numel < world * 256  # padding stays below one block per rank
    assert bool((covered == 1).all())
    if world == 1:
        assert layouts[0].shard == numel  # unsharded: exactly the buffer, no padding


@pytest.mark.parametrize("opts", [dict(shard_state=True), dict(shard_state=True, outer_optimizer="sgd")])
def test_shard_state_on_one_process_is_a_no_op(tiny, gen, opts):
    tasks = [Task(support=[tiny.batch(gen)], query=tiny.batch(gen)) for _ in range(2)]
    kw = dict(hvp="exact", inner_lr=3e-2, outer_lr=1e-2, outer_weight_decay=0.05)
    runs = []
    for extra in ({**opts, "shard_state": False}, opts):
        engine = MetaEngine(tiny.gpt2(), MetaConfig(**kw, **extra))
        assert not engine.opt_state.sharded
        for _ in range(2):
            engine.step(tasks)
        engine.metaicl_step([t.query for t in tasks])
        runs.append((dict(engine.model.named_parameters()), engine.optimizer_state()))
    (pa, sa), (pb, sb) = runs
    for n in pa:
        assert torch.equal(pa[n], pb[n]), n
        assert torch.equal(sa["exp_avg"][n], sb["exp_avg"][n]) and torch.equal(sa["exp_avg_sq"][n], sb["exp_avg_sq"][n])
