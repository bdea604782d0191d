"""The derived generator seeds: what they were where they fitted, and defined for every seed."""
import torch

from alterrec_dist.common.seeds import PRIME, derived_seed


def test_derived_seeds_keep_their_old_values_and_take_any_seed():
    for seed, epoch, step in [(0, 0, 0), (4, 29, 411), (9_000, 3, 5)]:  # the old formula, which fitted here
        assert derived_seed(seed, epoch, step) == (seed * PRIME + epoch) * PRIME + step
    for seed in (20240101, 2**40, 2**63 + 5):  # a date overflowed the generator's 64 bits at the first step
        value = derived_seed(seed, 3, 5)
        assert 0 <= value < 2**63
        torch.Generator().manual_seed(value)
