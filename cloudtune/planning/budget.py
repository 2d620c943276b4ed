"""Money before and after a run: the budget check before anything is rented, and the price fields the
ledger and the receipt keep of the chosen offer, so that estimate and actual can be compared later.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from ..errors import CloudtuneError
from ..units import hours_range, money, per_hour

if TYPE_CHECKING:  # the planner pulls in the recipe and pydantic; receipts and `--help` need only PriceFields
    from .planner import Estimate, Plan


class PriceFields(TypedDict, total=False):
    """What the ledger and receipts keep of a run's price estimate (the receipt's "estimate")."""

    gpu: str  # "A10G×1", "2×H100×8" (two machines), or "local"
    price_per_hour: float
    est_hours_low: float
    est_hours_high: float
    est_cost_low: float
    est_cost_high: float


def price_fields(chosen: Estimate) -> PriceFields:
    return {"gpu": chosen.label, "price_per_hour": chosen.price_per_hour,
            "est_hours_low": chosen.hours_low, "est_hours_high": chosen.hours_high,
            "est_cost_low": chosen.cost_low, "est_cost_high": chosen.cost_high}


def local_price_fields() -> PriceFields:
    """`--backend local`: this machine, nothing rented, nothing to pay."""
    return {"gpu": "local", "price_per_hour": 0.0, "est_cost_low": 0.0, "est_cost_high": 0.0}


def check_budget(plan_or_estimate: Plan | Estimate, max_cost: float | None) -> None:
    """Refuse a plan whose high estimate exceeds `max_cost` dollars."""
    from .planner import Plan

    if max_cost is None:
        return
    chosen = plan_or_estimate.chosen if isinstance(plan_or_estimate, Plan) else plan_or_estimate
    if chosen is None:
        return
    if isinstance(plan_or_estimate, Plan) and not plan_or_estimate.tokens:
        raise CloudtuneError(f"max_cost {money(max_cost)} cannot be checked: the number of tokens is unknown "
                             "before the training machine counts the hub dataset.",
                             "Set training.max_steps, or train from a local dataset file.")
    if chosen.cost_high > max_cost:
        raise CloudtuneError(
            f"the cheapest plan that fits costs up to {money(chosen.cost_high)} "
            f"({chosen.label} on {chosen.offer.cloud}, "
            f"{hours_range(chosen.hours_low, chosen.hours_high)} at {per_hour(chosen.price_per_hour)}), "
            f"over max_cost {money(max_cost)}.",
            "Raise compute.max_cost (or --max-cost), train fewer tokens (epochs, max_steps, max_rows), "
            "or see `cloudtune cost` for the options.")
