"""How every command writes a figure: time, money, memory, GPUs, token counts, and the names `--json`
gives its fields. One function per kind of figure, so a table, a message and a receipt never disagree.

Standard library only: the planner, the core and the CLI all write figures with it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

DASH = "–"  # between the ends of a range
TIMES = "×"  # GPU count: A10G×1


def span(low: float | None, high: float | None, write: Callable[[float], str]) -> str:
    """`low–high`, written once when both ends read the same (163.7k tok/s, not 163.7k–163.7k)."""
    if low is None or high is None:
        return "-"
    a, b = write(low), write(high)
    return a if a == b else f"{a}{DASH}{b}"


def duration(seconds: float | None) -> str:
    """42s, 17m, 1h20m."""
    if seconds is None:
        return "-"
    if seconds < 59.5:
        return f"{round(seconds)}s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def duration_range(low_seconds: float | None, high_seconds: float | None) -> str:
    return span(low_seconds, high_seconds, duration)


def hours_range(low_hours: float | None, high_hours: float | None) -> str:
    if low_hours is None or high_hours is None:
        return "-"
    return duration_range(low_hours * 3600, high_hours * 3600)


def money(usd: float | None) -> str:
    return "-" if usd is None else f"${usd:,.2f}"


def money_range(low_usd: float | None, high_usd: float | None) -> str:
    return span(low_usd, high_usd, money)


def per_hour(usd: float | None) -> str:
    return "-" if usd is None else f"{money(usd)}/h"


def gib(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} GiB" if value < 100 else f"{value:.0f} GiB"


def data_size(n_bytes: int | None) -> str:
    """Bytes on disk, in binary units: 512 B, 12 KiB, 3.4 MiB, 1.2 GiB."""
    if n_bytes is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}" if n_bytes < 10 * scale else f"{n_bytes / scale:.0f} {unit}"
    return f"{n_bytes} B"


def gpus(name: str, count: int) -> str:
    return f"{name}{TIMES}{count}"


def machines(name: str, count: int, nodes: int = 1) -> str:
    """A run's GPUs: A10G×1, H100×8 on one machine; 2×H100×8 on two machines of eight each."""
    return gpus(name, count) if nodes <= 1 else f"{nodes}{TIMES}{gpus(name, count)}"


def world(world_size: int | None, nodes: int | None = 1) -> str:
    """How many GPUs a run trained on: 1, 8, 16 (2×8)."""
    if not world_size:
        return "1"
    nodes = nodes or 1
    return str(world_size) if nodes <= 1 else f"{world_size} ({nodes}{TIMES}{world_size // nodes})"


def percent(share: float) -> str:
    return f"{share * 100:.0f} %"


def percent_range(low: float, high: float) -> str:
    """78–90 %: one unit for the range, so that it never wraps between a figure and its sign."""
    return span(low * 100, high * 100, lambda value: f"{value:.0f}") + " %"


def si(value: float) -> str:
    """287.3k, 1.2M: a count to read at a glance (exact counts use `count`)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def tokens_per_second(low: float, high: float) -> str:
    return f"{span(low, high, si)} tok/s"


# What `--json` (and receipt.json) calls a field whose name inside cloudtune does not say its unit.
# Fields already named with one (hours_low, peak_gib, wall_seconds, tokens_per_s_low) keep their name.
JSON_NAMES = {
    "cost_low": "cost_usd_low",
    "cost_high": "cost_usd_high",
    "est_cost_low": "est_cost_usd_low",
    "est_cost_high": "est_cost_usd_high",
    "actual_cost": "actual_cost_usd",
    "max_cost": "max_cost_usd",
    "price_per_hour": "usd_per_hour",
    "spot_price_per_hour": "spot_usd_per_hour",
    "created_at": "created_at_unix",
    "finished_at": "finished_at_unix",
    "terminated_at": "terminated_at_unix",
}


def with_units(data: Any) -> Any:
    """`data` with every field named as JSON_NAMES says, at any depth."""
    if isinstance(data, dict):
        return {JSON_NAMES.get(key, key): with_units(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [with_units(value) for value in data]
    return data
