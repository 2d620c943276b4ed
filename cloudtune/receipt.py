"""The receipt of a run: what the training machine reported, where the outputs are, estimate against actual.

Built here and only here, for a run that just ended and for one whose outputs were pulled again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import units
from .planning.budget import PriceFields
from .units import with_units

RECEIPT = "receipt.json"
RUN_JSON = "run.json"
ESTIMATE_COLUMNS = tuple(PriceFields.__annotations__)


SAMPLES = "samples.jsonl"


def read_run_json(output_dir: Path) -> dict[str, Any]:
    run = json.loads((output_dir / RUN_JSON).read_text())
    return {**run, "weights_path": str(output_dir / run["weights_dir"]), "sample": first_sample(output_dir)}


def first_sample(output_dir: Path) -> dict[str, str] | None:
    """The first of outputs.samples, before and after training, for the receipt to show."""
    path = output_dir / SAMPLES
    if not path.is_file():
        return None
    with path.open() as handle:
        line = handle.readline()
    return json.loads(line) if line.strip() else None


def build(pulled: dict[str, Any], *, run_id: str, backend: str, machine: str, wall_seconds: float | None,
          output_dir: Path, price: dict[str, Any] | None) -> dict[str, Any]:
    made = {**pulled, "run_id": run_id, "backend": backend, "machine": machine, "wall_seconds": wall_seconds,
            "output_dir": str(output_dir)}
    if price:
        made["estimate"] = price
        made["actual_cost"] = actual_cost(price, wall_seconds)
    return made


def write(made: dict[str, Any], output_dir: Path) -> None:
    (output_dir / RECEIPT).write_text(json.dumps(with_units(made), indent=1))


def read_receipt(output_dir: Path) -> dict[str, Any] | None:
    """The receipt of outputs that arrived (its fields named as --json names them), or None."""
    try:
        return json.loads((output_dir / RECEIPT).read_text())
    except (OSError, ValueError):
        return None


def scale(made: dict[str, Any]) -> dict[str, Any]:
    """How many GPUs a run trained on and how fast, in total and per GPU, from its run.json (or a receipt,
    or a ledger row's meta, which keep the same names). A run.json without them trained on one GPU."""
    world = made.get("world_size") or 1
    total = made.get("tokens_per_s")
    per_gpu = made.get("tokens_per_s_per_gpu")
    if per_gpu is None and total is not None:
        per_gpu = total / world
    return {"world_size": world, "nodes": made.get("nodes") or 1, "parallelism": made.get("parallelism"),
            "tokens_per_s": total, "tokens_per_s_per_gpu": per_gpu}


def scale_rows(made: dict[str, Any]) -> list[tuple[str, str]]:
    """The receipt's and the report's lines for it: world size (GPUs, machines, how they shared the work)
    and tokens/s, in total and per GPU."""
    run = scale(made)
    world = units.world(run["world_size"], run["nodes"])
    if run["world_size"] > 1 and run["parallelism"]:
        world += f", {run['parallelism']}"
    speed = units.count(round(run["tokens_per_s"] or 0))
    if run["world_size"] > 1:
        speed += f" total, {units.count(round(run['tokens_per_s_per_gpu'] or 0))} per GPU"
    return [("world size", world), ("tokens/s", speed)]


def ledger_columns(made: dict[str, Any]) -> dict[str, Any]:
    """What the ledger keeps of a receipt, beside the estimate it was given at the start."""
    columns = {"tokens": made.get("tokens"), "train_seconds": made.get("train_seconds"), "gpu": made.get("device"),
               "wall_seconds": made.get("wall_seconds")}
    if made.get("actual_cost") is not None:
        columns["actual_cost"] = made["actual_cost"]
    kept = {key: value for key, value in columns.items() if value is not None}
    meta = {key: value for key, value in scale(made).items() if value is not None}  # for `status`
    evaluation = made.get("eval")
    if evaluation and evaluation.get("best_loss") is not None:  # runs without eval have none
        meta |= {"eval_loss": evaluation["best_loss"], "eval_step": evaluation["best_step"]}
    kept["meta"] = meta
    return kept


def estimate_columns(price: dict[str, Any] | None) -> dict[str, Any]:
    """The estimate's ledger columns, from a quote's price or a ledger row."""
    if not price:
        return {}
    return {key: price.get(key) for key in ESTIMATE_COLUMNS if price.get(key) is not None}


def actual_cost(price: dict[str, Any] | None, wall_seconds: float | None) -> float | None:
    if not price or price.get("price_per_hour") is None or wall_seconds is None:
        return None
    return round(price["price_per_hour"] * wall_seconds / 3600, 4)
