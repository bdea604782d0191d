"""The one rule that derives a generator's seed from the run's seed and keys (epoch, step, id block), so
the same keys draw the same numbers whatever the world size or device."""

PRIME = 1_000_003


def derived_seed(seed: int, *keys: int) -> int:
    """((seed * PRIME + k1) * PRIME + k2) ..., modulo 2**63, which a torch generator takes. The modulo leaves
    every value that fits unchanged (so runs made before it draw as they did) and keeps a large seed, such as
    a date 20240101, from overflowing."""
    for key in keys:
        seed = seed * PRIME + key
    return seed % (1 << 63)
