"""The run's budget as the training machine sees it: how long it may train before `max_cost` is spent.

The laptop that launched a run may be gone when the money runs out, so the cap is enforced where
the meter runs: the lifecycle turns max_cost and the hourly price into seconds of training left at
the start, and the trainer stops at that deadline with its outputs so far.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

BUDGET_ENV = "CLOUDTUNE_BUDGET"


@dataclass(frozen=True)
class Budget:
    max_cost: float  # dollars the whole run may cost
    price_per_hour: float  # what the machine costs
    train_seconds: float  # how long the training may run from its start, after what was already spent

    def env(self) -> dict[str, str]:
        return {BUDGET_ENV: json.dumps(asdict(self))}


def budget_for(max_cost: float | None, price_per_hour: float | None, seconds_spent: float) -> Budget | None:
    """None when nothing caps the run (no cap, or a machine with no price)."""
    if not max_cost or not price_per_hour:
        return None
    allowed = max_cost / price_per_hour * 3600 - seconds_spent
    return Budget(max_cost=max_cost, price_per_hour=price_per_hour, train_seconds=max(0.0, allowed))


def read_budget(environ: Mapping[str, str] = os.environ) -> Budget | None:
    text = environ.get(BUDGET_ENV)
    if not text:
        return None
    return Budget(**json.loads(text))
