"""A plan: every GPU offer, whether the fine-tune fits on it, and what the whole run would cost.

The cost model (cost.py) fills these in; `cloudtune cost` shows them, `cloudtune run` picks from them
and the SkyPilot backend turns the fitting ones into its accelerator alternatives.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .planning.offers import Offer


@dataclass
class Estimate:
    """What one recipe would cost on one offer, as a low–high range rather than a false point."""

    offer: Offer
    spot: bool
    fits: bool
    peak_gib: float  # predicted peak GPU memory per GPU
    micro_batch_size: int
    gradient_checkpointing: bool
    tokens: int  # tokens to train (dataset tokens × epochs, or steps × tokens per step)
    tokens_per_s_low: float
    tokens_per_s_high: float
    hours_low: float  # overheads included
    hours_high: float
    cost_low: float
    cost_high: float
    why: str = ""  # one line: what the estimate is made of
    checkpointed_layers: int = 0  # decoder layers recomputed in backward (gradient_checkpointing: any)

    @property
    def price_per_hour(self) -> float:
        if self.spot and self.offer.spot_price_per_hour is not None:
            return self.offer.spot_price_per_hour
        return self.offer.price_per_hour

    def ledger_fields(self) -> dict:
        """The columns the ledger and receipts keep, so estimate and actual can be compared later."""
        return {"gpu": f"{self.offer.gpu}x{self.offer.gpu_count}", "price_per_hour": self.price_per_hour,
                "est_hours_low": self.hours_low, "est_hours_high": self.hours_high,
                "est_cost_low": self.cost_low, "est_cost_high": self.cost_high}

    def as_dict(self) -> dict:
        return {**asdict(self), "price_per_hour": self.price_per_hour}


@dataclass
class Plan:
    tokens: int
    tokens_exact: bool
    snapshot_date: str
    estimates: list[Estimate] = field(default_factory=list)  # fitting first, then by high cost
    notes: list[str] = field(default_factory=list)  # what the user should know about this plan
    model_source: str = ""  # where the model's shape came from
    catalog: dict = field(default_factory=dict)  # price sources per cloud, cache use, unreadable clouds

    @property
    def chosen(self) -> Estimate | None:
        return next((e for e in self.estimates if e.fits), None)

    def candidates(self, limit: int = 8) -> list[Estimate]:
        """The fitting offers, cheapest run first: what a launcher may fall back through."""
        return [e for e in self.estimates if e.fits][:limit]

    def as_dict(self, limit: int | None = None) -> dict:
        return {"tokens": self.tokens, "tokens_exact": self.tokens_exact, "snapshot_date": self.snapshot_date,
                "model_source": self.model_source, "notes": self.notes, "catalog": self.catalog,
                "chosen": self.chosen.as_dict() if self.chosen else None,
                "estimates": [e.as_dict() for e in self.estimates[:limit]]}
