"""How the trainer lays documents into rows and orders the rows in each epoch.

Stdlib only: `cloudtune cost` runs the very same packing and shuffle over the token counts it made
locally, so the tokens it prices for a run are the tokens the trainer will train, not a fill-factor
guess (cloudtune/train/data.py's Batcher uses these functions too).
"""
from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: group document indices into rows of at most `capacity` tokens.

    Deterministic for a given dataset, so every epoch (and a resumed run) has the same rows.
    O(n log n) with a sorted list of free room, so a million documents pack in seconds.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, b = free.pop(at)
            bins[b].append(i)
        else:
            room, b = capacity, len(bins)
            bins.append([i])
        bisect.insort(free, (room - lengths[i], b))
    return bins


def layout(lengths: Sequence[int], capacity: int, packing: bool) -> list[list[int]]:
    """The rows of every epoch: packed documents, or one document per row."""
    return pack(lengths, capacity) if packing else [[i] for i in range(len(lengths))]


def epoch_order(n_rows: int, seed: int, epoch: int) -> list[int]:
    """The seeded order of the rows in one epoch (the same on every machine and after a resume)."""
    order = list(range(n_rows))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def tokens_read(lengths: Sequence[int], rows: list[list[int]], micro_batch_size: int, seed: int,
                micro_batches: int) -> int:
    """The tokens the trainer reads in its first `micro_batches` micro-batches, partial last epoch included."""
    row_tokens = [sum(lengths[i] for i in row) for row in rows]
    per_epoch = math.ceil(len(rows) / micro_batch_size)
    full_epochs, rest = divmod(micro_batches, per_epoch)
    total = full_epochs * sum(row_tokens)
    if rest:
        order = epoch_order(len(rows), seed, full_epochs)
        total += sum(row_tokens[i] for i in order[:rest * micro_batch_size])
    return total
