"""Block.tree's one-row fast path builds exactly the tensors of the general construction (random trees,
verify forwards and drafter levels, padded buckets, windows wider than needed)."""
import random

import torch

from runtime.batch import Block, TreeBatch, window_mask
from spec_compiler.tree import TreeTopology


def test_one_row_block_equals_the_general_construction():
    random.seed(0)
    for _ in range(300):
        n = random.randint(1, 9)
        topo = TreeTopology(tuple([-1] + [random.randint(0, i - 1) for i in range(1, n)]))
        bucket = n + random.randint(0, 3)
        tb = TreeBatch.build([topo], [[random.randint(0, 9) for _ in range(n)]], [[0] + [1] * (n - 1)], bucket)
        L = random.randint(0, 20)
        drafter = random.random() < 0.5 and L > 0 and bucket > 1  # root committed: base = L - 1, levels lo >= 1
        base = L - 1 if drafter else L
        lo = random.randint(1, bucket - 1) if drafter else 0
        hi = random.randint(lo + 1, bucket)
        kv = base + hi + random.randint(0, 5)
        lengths, b = torch.tensor([L]), torch.tensor([base])
        fast = Block.tree(lengths, tb, kv, lo, hi, base=b if drafter else None)
        slots = b[:, None] + torch.arange(lo, hi)[None]
        par = tb.parents[:, lo:hi]
        ps = torch.where(tb.valid[:, lo:hi], torch.where(par >= 0, b[:, None] + par, lengths[:, None] - 1), -1)
        anc = tb.anc[:, lo:hi, :hi]
        mask = window_mask(lengths, b, anc, kv)
        assert torch.equal(fast.mask, mask) or (fast.mask_full and bool(mask.all()))
        assert not fast.mask_full or (lo == 0 and hi == 1)
        assert torch.equal(fast.slots, slots) and torch.equal(fast.parent_slots, ps)
        assert torch.equal(fast.positions, b[:, None] + tb.depth[:, lo:hi])
        assert torch.equal(fast.offsets, slots - lengths[:, None]) and torch.equal(fast.anc, anc[:, :, lo:hi])
        assert fast.start == base + lo and torch.equal(fast.lengths, lengths)
