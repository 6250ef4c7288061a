"""core/sharding.py on one process: the shard layouts. Sharding itself only happens on several ranks: its
equalities with the unsharded run (float64 and float32, 8-bit, master weights) are in tests/train/test_scaling.py
under torchrun. (A single-process "sharded" run took the unsharded path twice and could not fail: removed.)"""
import pytest
import torch

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
