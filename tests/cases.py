"""Shared helpers for parametrised tests."""

import random


def balanced_cases(factors, n, seed):
    """Up to n distinct cases, each value of each factor appearing n / len(values) times."""
    rng = random.Random(seed)
    columns = [
        [v for _ in range(-(-n // len(vs))) for v in rng.sample(vs, len(vs))][:n] for vs in factors
    ]
    return list(dict.fromkeys(zip(*columns, strict=True)))  # drop repeated cases
