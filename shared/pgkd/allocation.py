"""Splitting an integer budget over groups in proportion to weights (largest-remainder method).

Used for stratified sampling (rows per class) and for the guided teacher's budget (samples per class).
"""
from __future__ import annotations

import math
from typing import Mapping, TypeVar

K = TypeVar("K")


def allocate(weights: Mapping[K, float], total: int, minimum: int = 0,
             capacity: Mapping[K, int] | None = None) -> dict[K, int]:
    """Split `total` into integers proportional to `weights`.

    Every key gets at least `minimum` (when the total allows it) and at most its `capacity`.
    Ties in the remainders are broken by key order, so the result is deterministic.
    """
    keys = list(weights)
    cap = {k: (capacity[k] if capacity is not None else math.inf) for k in keys}
    total = int(min(total, sum(cap.values())))
    out = {k: int(min(minimum, cap[k])) for k in keys}
    if sum(out.values()) > total:
        raise ValueError(f"cannot give {minimum} to each of {len(keys)} groups from a total of {total}")
    while True:
        left = total - sum(out.values())
        open_keys = [k for k in keys if out[k] < cap[k]]
        if left <= 0 or not open_keys:
            return out
        weight_sum = sum(max(weights[k], 0.0) for k in open_keys)
        shares = {k: left * (max(weights[k], 0.0) / weight_sum if weight_sum > 0 else 1 / len(open_keys))
                  for k in open_keys}
        for k in open_keys:
            out[k] += min(int(shares[k]), cap[k] - out[k])
        left = total - sum(out.values())
        # The rest one by one, largest remainder first; each pass gives at least one, so the loop ends.
        for k in sorted(open_keys, key=lambda k: (int(shares[k]) - shares[k], keys.index(k))):
            if left > 0 and out[k] < cap[k]:
                out[k] += 1
                left -= 1
